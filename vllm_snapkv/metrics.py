"""SnapKV observability: what each request's compression did, as Prometheus metrics and as a
per-request response field.

Route through vLLM 0.32 (no vLLM file is patched):

* **Per-step stats** travel on vLLM's KV-connector stats channel. The plugin adds a connector that
  transfers nothing, :class:`vllm_snapkv.metrics_connector.SnapKVConnector` (composed with a
  user's own connector through vLLM's ``MultiConnector``, see :func:`wire`):

  - its **scheduler** side hands vLLM the scheduler's :class:`StatsRecorder` (compressed and
    skipped requests, evicted tokens, freed blocks, blocks saved now), filled by
    :class:`vllm_snapkv.scheduler.SnapKVSchedulerMixin`;
  - its **worker** side times the SnapKV selection of each request (summed over layers) with
    :class:`SelectionTimer` and returns it with the step's model-runner output;
  - vLLM merges both into ``SchedulerStats.kv_connector_stats`` and sends them to one API server
    per step, whose ``PrometheusStatLogger`` calls :meth:`SnapKVPromMetrics.observe`. Each
    observation therefore reaches exactly one API-server process, and Prometheus multiprocess
    mode (``--api-server-count N``) sums counters/histograms across processes.

* **Per request**, the scheduler adds ``{"snapkv": {...}}`` (see :func:`request_summary`) to the
  ``kv_transfer_params`` of the request's final engine output; vLLM copies ``kv_transfer_params``
  into non-streaming ``/v1/completions`` and ``/v1/chat/completions`` responses.

Everything in this module except :class:`SnapKVPromMetrics`/:class:`SnapKVStats` is free of vLLM
imports at module level so the unit tests can exercise it directly.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from vllm_snapkv.placement import Placement

#: Connector class name (MultiConnector keys stats and metrics by it) and module.
CONNECTOR_NAME = "SnapKVConnector"
CONNECTOR_MODULE = "vllm_snapkv.metrics_connector"
#: Key of the per-request summary inside ``kv_transfer_params``.
RESPONSE_KEY = "snapkv"

# Metric names (vLLM's style: ``vllm:`` prefix; counters get ``_total`` appended on export).
M_RATIO = "vllm:snapkv_compression_ratio"
M_FACTOR = "vllm:snapkv_compression_factor"
M_COMPRESSED = "vllm:snapkv_compressed_requests"
M_SKIPPED = "vllm:snapkv_skipped_requests"
M_PROMPT_TOKENS = "vllm:snapkv_prompt_tokens"
M_KEPT_TOKENS = "vllm:snapkv_kept_tokens"
M_EVICTED = "vllm:snapkv_evicted_tokens"
M_FREED = "vllm:snapkv_freed_blocks"
M_SELECTION = "vllm:snapkv_selection_seconds"
M_SAVED = "vllm:snapkv_blocks_saved"

#: Why a finished request was not compressed (label ``reason`` of the skipped counter).
SKIP_OPTED_OUT = "opted_out"  # vllm_xargs kv_compression=none
SKIP_FITS = "fits_budget"  # prompt within budget / under min_prompt / surplus < one block
SKIP_NOT_COMPACTED = "not_compacted"  # had a placement, finished/aborted before its prefill ended
SKIP_REASONS = (SKIP_OPTED_OUT, SKIP_FITS, SKIP_NOT_COMPACTED)

RATIO_BUCKETS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
FACTOR_BUCKETS = [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]
SELECTION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0]


# ---------------------------------------------------------------------------------------------
# Per-request summary (the response field)
# ---------------------------------------------------------------------------------------------


def request_summary(prompt_len: int, placement: Placement | None, compacted: bool) -> dict:
    """The ``kv_transfer_params["snapkv"]`` object of one finished request.

    ``ratio`` is kept/prompt tokens (1.0 when the prompt was left whole); ``kept_tokens`` is per
    KV head.
    """
    if placement is not None and compacted:
        kept, freed = placement.kept, placement.freed_blocks
    else:
        kept, freed = prompt_len, 0
    return {
        "compressed": bool(freed),
        "prompt_tokens": int(prompt_len),
        "kept_tokens": int(kept),
        "evicted_tokens": int(prompt_len - kept),
        "freed_blocks": int(freed),
        "ratio": (kept / prompt_len) if prompt_len else 1.0,
    }


def merge_kv_transfer_params(params: dict | None, summary: dict) -> dict:
    """``params`` (a real connector's, or None) with the SnapKV summary under ``"snapkv"``."""
    out = dict(params or {})
    out[RESPONSE_KEY] = summary
    return out


# ---------------------------------------------------------------------------------------------
# Stats payload (what travels from the engine core to the API server)
# ---------------------------------------------------------------------------------------------


def empty_data() -> dict[str, Any]:
    return {
        # one [prompt_len, kept, freed_blocks] per request compressed (first compaction only)
        "compressed": [],
        # reason -> count of finished requests that were not compressed
        "skipped": {},
        # request id -> selection seconds (worker side; max over workers)
        "selection_s": {},
        # blocks saved right now (scheduler side; absent when unchanged)
        "blocks_saved": None,
    }


def aggregate_data(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Combine two payloads: lists concatenate, counts add, per-request times take the max (the
    same request timed by several tensor-parallel workers), the gauge takes the later value."""
    out = empty_data()
    out["compressed"] = list(a.get("compressed") or []) + list(b.get("compressed") or [])
    skipped = dict(a.get("skipped") or {})
    for reason, n in (b.get("skipped") or {}).items():
        skipped[reason] = skipped.get(reason, 0) + n
    out["skipped"] = skipped
    sel = dict(a.get("selection_s") or {})
    for rid, s in (b.get("selection_s") or {}).items():
        sel[rid] = max(sel.get(rid, 0.0), s)
    out["selection_s"] = sel
    out["blocks_saved"] = (b.get("blocks_saved") if b.get("blocks_saved") is not None
                           else a.get("blocks_saved"))
    return out


def data_is_empty(data: Mapping[str, Any]) -> bool:
    return (not data.get("compressed") and not data.get("skipped")
            and not data.get("selection_s") and data.get("blocks_saved") is None)


@dataclass
class SnapKVStats(KVConnectorStats):
    """vLLM ``KVConnectorStats`` carrying one step's (or one log interval's) SnapKV facts."""

    data: dict[str, Any] = field(default_factory=empty_data)

    def reset(self) -> None:
        self.data = empty_data()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data = aggregate_data(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        """Interval summary for vLLM's periodic log line."""
        comp = self.data.get("compressed") or []
        prompt = sum(c[0] for c in comp)
        kept = sum(c[1] for c in comp)
        sel = list((self.data.get("selection_s") or {}).values())
        out: dict[str, int | float] = {
            "SnapKV compressed": len(comp),
            "skipped": int(sum((self.data.get("skipped") or {}).values())),
            "kept ratio": round(kept / prompt, 4) if prompt else 1.0,
            "freed blocks": int(sum(c[2] for c in comp)),
            "avg selection ms": round(1000 * sum(sel) / len(sel), 2) if sel else 0.0,
        }
        if self.data.get("blocks_saved") is not None:
            out["blocks saved"] = int(self.data["blocks_saved"])
        return out

    def is_empty(self) -> bool:
        return data_is_empty(self.data)


# ---------------------------------------------------------------------------------------------
# Scheduler side: what the scheduler records
# ---------------------------------------------------------------------------------------------


class StatsRecorder:
    """Scheduler-side accumulator, drained once per step by the connector's scheduler side.

    The scheduler calls :meth:`compacted` when a request's head blocks are freed (counted once per
    request even if a preempted request is compacted again), :meth:`released` when the request
    stops holding its blocks (finished, aborted or preempted), and :meth:`finished` once per
    finished request.
    """

    def __init__(self) -> None:
        self._pending = empty_data()
        self._counted: set[str] = set()  # requests whose compression is already counted
        self._holding: dict[str, int] = {}  # live compacted request -> freed blocks
        self._saved_sent: int | None = None

    # -- events -------------------------------------------------------------------------------

    def compacted(self, request_id: str, placement: Placement) -> None:
        self._holding[request_id] = placement.freed_blocks
        if request_id not in self._counted:
            self._counted.add(request_id)
            self._pending["compressed"].append(
                [placement.prompt_len, placement.kept, placement.freed_blocks])

    def released(self, request_id: str) -> None:
        self._holding.pop(request_id, None)

    def finished(self, request_id: str, skip_reason: str | None) -> None:
        self.released(request_id)
        self._counted.discard(request_id)
        if skip_reason is not None:
            sk = self._pending["skipped"]
            sk[skip_reason] = sk.get(skip_reason, 0) + 1

    # -- reads --------------------------------------------------------------------------------

    def was_compacted(self, request_id: str) -> bool:
        return request_id in self._counted

    @property
    def blocks_saved(self) -> int:
        return sum(self._holding.values())

    def take(self) -> SnapKVStats | None:
        """This step's payload (None when nothing happened and the gauge did not move)."""
        data, self._pending = self._pending, empty_data()
        saved = self.blocks_saved
        if saved != self._saved_sent:
            data["blocks_saved"] = saved
            self._saved_sent = saved
        return None if data_is_empty(data) else SnapKVStats(data=data)

    def resend_gauge(self) -> None:
        """Make the next :meth:`take` carry the gauge even if unchanged."""
        self._saved_sent = None


# ---------------------------------------------------------------------------------------------
# Worker side: selection time
# ---------------------------------------------------------------------------------------------


class SelectionTimer:
    """Per-request SnapKV selection time (scoring + top-k), summed over layers.

    Registers :meth:`add` as a selection observer of :mod:`vllm_snapkv.backends.core` (whose
    ``compact_row`` reports each layer's selection time), so generation itself is untouched.
    Installed once per worker process by the connector's worker side; :meth:`take` is called at
    the end of every step.
    """

    _lock = threading.Lock()
    _installed: SelectionTimer | None = None

    def __init__(self) -> None:
        self._times: dict[str, float] = {}

    @classmethod
    def install(cls) -> SelectionTimer:
        """The process's timer, registered with the backends' core on first call."""
        with cls._lock:
            if cls._installed is None:
                from vllm_snapkv.backends import core

                timer = cls()
                core.add_selection_observer(timer.add)
                cls._installed = timer
            return cls._installed

    def add(self, req_id: str, seconds: float) -> None:
        self._times[req_id] = self._times.get(req_id, 0.0) + seconds

    def take(self) -> SnapKVStats | None:
        if not self._times:
            return None
        times, self._times = self._times, {}
        data = empty_data()
        data["selection_s"] = times
        return SnapKVStats(data=data)


# ---------------------------------------------------------------------------------------------
# API-server side: Prometheus metrics
# ---------------------------------------------------------------------------------------------


class SnapKVPromMetrics(KVConnectorPromMetrics):
    """The ``vllm:snapkv_*`` series, labelled ``model_name`` and ``engine`` like vLLM's own."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        pe = per_engine_labelvalues

        def per_engine(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*vals) for idx, vals in pe.items()}

        self.ratio = per_engine(self._histogram_cls(
            name=M_RATIO, labelnames=labelnames, buckets=RATIO_BUCKETS,
            documentation="Per compressed request: prompt tokens kept per KV head / prompt "
                          "tokens (SnapKV)."))
        self.factor = per_engine(self._histogram_cls(
            name=M_FACTOR, labelnames=labelnames, buckets=FACTOR_BUCKETS,
            documentation="Per compressed request: prompt tokens / kept tokens (SnapKV "
                          "compression factor, the inverse of the ratio)."))
        self.compressed = per_engine(self._counter_cls(
            name=M_COMPRESSED, labelnames=labelnames,
            documentation="Requests whose prompt KV was compressed by SnapKV."))
        skipped = self._counter_cls(
            name=M_SKIPPED, labelnames=[*labelnames, "reason"],
            documentation="Finished requests whose prompt KV was not compressed, by reason "
                          "(opted_out, fits_budget, not_compacted).")
        self.skipped = {idx: {r: skipped.labels(*vals, r) for r in SKIP_REASONS}
                        for idx, vals in pe.items()}
        self.prompt_tokens = per_engine(self._counter_cls(
            name=M_PROMPT_TOKENS, labelnames=labelnames,
            documentation="Prompt tokens of SnapKV-compressed requests."))
        self.kept_tokens = per_engine(self._counter_cls(
            name=M_KEPT_TOKENS, labelnames=labelnames,
            documentation="Prompt tokens kept per KV head by SnapKV-compressed requests."))
        self.evicted = per_engine(self._counter_cls(
            name=M_EVICTED, labelnames=labelnames,
            documentation="Prompt tokens evicted per KV head by SnapKV."))
        self.freed = per_engine(self._counter_cls(
            name=M_FREED, labelnames=labelnames,
            documentation="KV-cache blocks returned to the pool by SnapKV compaction."))
        self.selection = per_engine(self._histogram_cls(
            name=M_SELECTION, labelnames=labelnames, buckets=SELECTION_BUCKETS,
            documentation="Per compressed request: SnapKV token-selection time, summed over "
                          "layers, in the worker."))
        self.saved = per_engine(self._gauge_cls(
            name=M_SAVED, labelnames=labelnames, multiprocess_mode="mostrecent",
            documentation="KV-cache blocks running requests do not hold thanks to SnapKV "
                          "(freed head blocks of live compressed requests)."))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for prompt_len, kept, freed in data.get("compressed") or []:
            self.ratio[engine_idx].observe(kept / prompt_len)
            self.factor[engine_idx].observe(prompt_len / kept)
            self.compressed[engine_idx].inc()
            self.prompt_tokens[engine_idx].inc(prompt_len)
            self.kept_tokens[engine_idx].inc(kept)
            self.evicted[engine_idx].inc(prompt_len - kept)
            self.freed[engine_idx].inc(freed)
        for reason, n in (data.get("skipped") or {}).items():
            child = self.skipped[engine_idx].get(reason)
            if child is not None and n:
                child.inc(n)
        for seconds in (data.get("selection_s") or {}).values():
            self.selection[engine_idx].observe(seconds)
        if data.get("blocks_saved") is not None:
            self.saved[engine_idx].set(data["blocks_saved"])


# ---------------------------------------------------------------------------------------------
# Wiring (called from vllm_snapkv.plugin when compression is on)
# ---------------------------------------------------------------------------------------------


def snapkv_connector_dict() -> dict[str, Any]:
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both"}


def _is_snapkv(entry: Mapping[str, Any]) -> bool:
    return entry.get("kv_connector") == CONNECTOR_NAME


def _ktc_to_dict(ktc: Any) -> dict[str, Any]:
    """A user's ``KVTransferConfig`` as the dict ``MultiConnector`` rebuilds children from."""
    if isinstance(ktc, Mapping):
        return {k: copy.deepcopy(v) for k, v in ktc.items() if v is not None}
    out: dict[str, Any] = {}
    for name in ("kv_connector", "kv_role", "kv_connector_extra_config",
                 "kv_connector_module_path", "kv_buffer_device", "kv_port", "engine_id",
                 "enable_permute_local_kv", "kv_load_failure_policy"):
        if hasattr(ktc, name):
            value = getattr(ktc, name)
            if value is not None:
                out[name] = copy.deepcopy(value)
    return out


def composed_kv_transfer_config(user: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` dict that runs the SnapKV connector next to ``user``'s.

    * none -> the SnapKV connector alone;
    * ``MultiConnector`` -> SnapKV appended to its ``connectors`` (once);
    * any other connector -> a ``MultiConnector`` of [user's, SnapKV]. The user's comes first,
      so it keeps deciding loads; SnapKV never loads, saves or returns ``kv_transfer_params``.

    Which user connectors may run with compression at all is :func:`check_kv_transfer`'s call.
    """
    if user is None:
        return snapkv_connector_dict()
    cfg = _ktc_to_dict(user)
    if not cfg.get("kv_connector"):
        raise ValueError(
            "--kv-compression snapkv: --kv-transfer-config has no kv_connector; give one or "
            "leave --kv-transfer-config out")
    if cfg["kv_connector"] == CONNECTOR_NAME:
        return cfg
    if cfg["kv_connector"] == "MultiConnector":
        extra = dict(cfg.get("kv_connector_extra_config") or {})
        children = [dict(c) for c in extra.get("connectors") or []]
        if not any(_is_snapkv(c) for c in children):
            children.append(snapkv_connector_dict())
        extra["connectors"] = children
        cfg["kv_connector_extra_config"] = extra
        cfg.setdefault("kv_role", "kv_both")
        return cfg
    # The MultiConnector carries the ids and role; children inherit engine_id from it.
    top = {k: cfg[k] for k in ("kv_role", "engine_id", "kv_buffer_device") if k in cfg}
    top.setdefault("kv_role", "kv_both")
    child = {k: v for k, v in cfg.items() if k != "engine_id"}
    return {**top, "kv_connector": "MultiConnector",
            "kv_connector_extra_config": {"connectors": [child, snapkv_connector_dict()]}}


#: The KV connectors vLLM 0.32 bundles (``kv_connector/factory.py``) apart from ``MultiConnector``.
#: Each moves prompt KV, which compression cannot share: loading a prompt's KV into a request
#: skips the prefill whose last queries SnapKV needs (the engine stops, as measured with
#: ``ExampleConnector``), and saving or sending it at or after the end of prefill reads the
#: compacted tail ``[E, N)`` or the freed head blocks (``ExampleConnector`` stores the compacted
#: tail under the whole prompt's hash, so a later load would inject it into another request).
VLLM_KV_CONNECTORS = frozenset({
    "DecodeBenchConnector", "ExampleConnector", "ExampleHiddenStatesConnector",
    "FlexKVConnectorV1", "HF3FSKVConnector", "HiSparseConnector", "LMCacheConnectorV1",
    "LMCacheMPConnector", "MoRIIOConnector", "MooncakeConnector", "MooncakeStoreConnector",
    "NixlConnector", "NixlPullConnector", "NixlPushConnector", "OffloadingConnector",
    "SimpleCPUOffloadConnector",
})


def _prompt_kv_movers(cfg: Mapping[str, Any]) -> list[str]:
    """Connectors in ``cfg`` (a connector dict, MultiConnector children included) named like one
    of vLLM's: also when loaded from another module (LMCache ships its ``LMCacheConnectorV1``
    that way), since a connector of that name is that connector or a variant of it."""
    name = cfg.get("kv_connector")
    if name == "MultiConnector":
        extra = cfg.get("kv_connector_extra_config") or {}
        return [n for child in extra.get("connectors") or [] for n in _prompt_kv_movers(child)]
    return [name] if name in VLLM_KV_CONNECTORS else []


def check_kv_transfer(engine_args: Any) -> None:
    """Refuse (``ValueError``, one line naming the flag) KV-transfer settings that cannot work
    with compression on: ``--kv-offloading-size`` (vLLM's offloading connector) and any of
    vLLM's own connectors in ``--kv-transfer-config`` (see :data:`VLLM_KV_CONNECTORS`). Other
    connectors (your own, from ``kv_connector_module_path``) are composed: the plugin cannot see
    what they do, so they must not load or save prompt KV (``docs/observability.md``).
    """
    if getattr(engine_args, "kv_offloading_size", None) is not None:
        raise ValueError(
            "--kv-offloading-size cannot be combined with --kv-compression snapkv: vLLM's "
            "offloading connector saves prompt KV after SnapKV compacted it and loads it into "
            "requests whose prefill SnapKV then cannot see; use one or the other")
    user = engine_args.kv_transfer_config
    movers = _prompt_kv_movers(_ktc_to_dict(user)) if user is not None else []
    if movers:
        raise ValueError(
            f"--kv-transfer-config with {', '.join(movers)} cannot be combined with "
            "--kv-compression snapkv: vLLM's KV connectors save or send prompt KV after SnapKV "
            "compacted it (other requests would load corrupted KV) and load prompt KV into "
            "requests whose prefill SnapKV then cannot see (the engine stops); use one or the "
            "other")


def wire(engine_args: Any) -> None:
    """Add the SnapKV metrics connector to ``engine_args`` (compression on), after
    :func:`check_kv_transfer`. ``--disable-log-stats`` is left alone (then nothing is exported,
    as for vLLM's own metrics)."""
    from vllm.config import KVTransferConfig

    check_kv_transfer(engine_args)
    if engine_args.kv_transfer_config is None:
        keep_cpu_core_reservation(engine_args)
    engine_args.kv_transfer_config = KVTransferConfig(
        **composed_kv_transfer_config(engine_args.kv_transfer_config))


#: vLLM's CPU worker reserves cores for the engine's other processes from this variable.
CPU_RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def keep_cpu_core_reservation(engine_args: Any) -> None:
    """On CPU, keep the compute cores vanilla vLLM would have, despite our connector.

    vLLM's CPU backend reserves one extra core per rank whenever any KV connector is configured
    ("for nixl_connector under p/d", ``utils/ompmultiprocessing.py``). The SnapKV connector moves
    no KV, so that reservation would only take a compute core away from the worker (and on a
    2-core machine the over-reservation is dropped altogether, giving it one core *more* than
    vanilla). So, unless the user set the variable, pin it to vanilla's reservation: one core per
    local rank on x86/ARM/RISC-V (vLLM's default), else one.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or CPU_RESERVED_ENV in os.environ:
        return
    from vllm.platforms.interface import CpuArchEnum

    ranks = int(getattr(engine_args, "tensor_parallel_size", 1) or 1) * \
        int(getattr(engine_args, "pipeline_parallel_size", 1) or 1)
    per_rank = current_platform.get_cpu_architecture() in (
        CpuArchEnum.X86, CpuArchEnum.ARM, CpuArchEnum.RISCV)
    os.environ[CPU_RESERVED_ENV] = str(ranks if per_rank else 1)


def find_connector(connector: Any) -> Any:
    """The SnapKV connector inside the scheduler's connector (itself or a MultiConnector child)."""
    if connector is None:
        return None
    if type(connector).__name__ == CONNECTOR_NAME:
        return connector
    for child in getattr(connector, "_connectors", None) or []:
        found = find_connector(child)
        if found is not None:
            return found
    return None
