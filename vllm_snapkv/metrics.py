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

from vllm_snapkv import vllm_seam as seam

from vllm_snapkv.schedule import Compaction, Schedule

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
M_COMPACTIONS = "vllm:snapkv_compactions"

#: Why a finished request was not compressed (label ``reason`` of the skipped counter).
SKIP_OPTED_OUT = "opted_out"  # vllm_xargs kv_compression=none
SKIP_FITS = "fits_budget"  # prompt within budget / under min_prompt / surplus < one block
SKIP_NOT_COMPACTED = "not_compacted"  # had compactions scheduled, finished before the first ran
SKIP_REASONS = (SKIP_OPTED_OUT, SKIP_FITS, SKIP_NOT_COMPACTED)

RATIO_BUCKETS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
FACTOR_BUCKETS = [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]
COMPACTION_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128]
SELECTION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0]


KVConnectorPromMetrics = seam.get("KVConnectorPromMetrics")
KVConnectorStats = seam.get("KVConnectorStats")


# ---------------------------------------------------------------------------------------------
# Per-request summary (the response field)
# ---------------------------------------------------------------------------------------------


def request_summary(prompt_len: int, schedule: Schedule | None, progress: int,
                    processed: int) -> dict:
    """The ``kv_transfer_params["snapkv"]`` object of one finished request.

    ``progress``: tokens processed up to the last compaction that ran (compactions re-run after
    a preemption count once); ``processed``: tokens processed in all. ``kept_tokens`` is per KV
    head, after the prompt phase (the prompt when it was left whole); ``evicted_tokens`` and
    ``freed_blocks`` count every compaction (prefill, prompt, decode); ``final_kept_tokens`` is
    what the request attended at its end; ``ratio`` is ``kept_tokens / prompt_tokens``.
    """
    evicted = schedule.evicted_at(progress) if schedule is not None else 0
    done = schedule.compactions_done(progress) if schedule is not None else 0
    kept = prompt_len
    # the prompt phase's last compaction (at the prompt's end, or before its question with
    # compact_at) has run: what the prompt keeps is known
    prompt_phase = list(schedule.compactions(prompt_len)) if schedule is not None else []
    if prompt_phase and progress >= prompt_phase[-1].at:
        kept = prompt_len - schedule.evicted_at(prompt_len)
    bs = schedule.block_size if schedule is not None else 1
    total = max(processed, progress)
    return {
        "compressed": bool(done),
        "method": schedule.method if schedule is not None else None,
        "prompt_tokens": int(prompt_len),
        "kept_tokens": int(kept),
        "evicted_tokens": int(evicted),
        "freed_blocks": int(evicted // bs),
        "compactions": int(done),
        "final_kept_tokens": int(max(0, total - evicted)),
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
        # one [prompt_len, kept, method, compactions] per finished request that compacted
        "compressed": [],
        # phase -> tokens evicted per KV head / blocks freed (each compaction counted once)
        "evicted": {},
        "freed": {},
        # reason -> count of finished requests that were not compressed
        "skipped": {},
        # request id -> pipeline stage -> selection seconds of that stage's layers (worker
        # side; max over a stage's tensor-parallel workers, summed over stages when read)
        "selection_s": {},
        # blocks saved right now (scheduler side; absent when unchanged)
        "blocks_saved": None,
    }


def _add_counts(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(a or {})
    for key, n in (b or {}).items():
        out[key] = out.get(key, 0) + n
    return out


def aggregate_data(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Combine two payloads: lists concatenate, counts add, per-request times take the max per
    pipeline stage (the tensor-parallel workers of a stage select for the same layers at the
    same time, in parallel), the gauge takes the later value."""
    out = empty_data()
    out["compressed"] = list(a.get("compressed") or []) + list(b.get("compressed") or [])
    for key in ("evicted", "freed", "skipped"):
        out[key] = _add_counts(a.get(key), b.get(key))
    sel = {rid: dict(stages) for rid, stages in (a.get("selection_s") or {}).items()}
    for rid, stages in (b.get("selection_s") or {}).items():
        mine = sel.setdefault(rid, {})
        for stage, s in stages.items():
            mine[stage] = max(mine.get(stage, 0.0), s)
    out["selection_s"] = sel
    out["blocks_saved"] = (b.get("blocks_saved") if b.get("blocks_saved") is not None
                           else a.get("blocks_saved"))
    return out


def selection_seconds(data: Mapping[str, Any]) -> dict[str, float]:
    """Each request's selection time in a payload: the sum over pipeline stages (a step's
    stages select one after another, each for its own layers) of each stage's time."""
    return {rid: float(sum(stages.values()))
            for rid, stages in (data.get("selection_s") or {}).items()}


def data_is_empty(data: Mapping[str, Any]) -> bool:
    return (not data.get("compressed") and not data.get("skipped") and not data.get("evicted")
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
        sel = list(selection_seconds(self.data).values())
        out: dict[str, int | float] = {
            "SnapKV compressed": len(comp),
            "skipped": int(sum((self.data.get("skipped") or {}).values())),
            "kept ratio": round(kept / prompt, 4) if prompt else 1.0,
            "freed blocks": int(sum((self.data.get("freed") or {}).values())),
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

    The scheduler calls :meth:`compacted` when compactions of a request have run and their
    blocks are freed (each compaction counted once, even when a preempted request runs it again),
    :meth:`released` when the request stops holding its blocks (finished, aborted or preempted),
    and :meth:`finished` once per finished request.
    """

    def __init__(self) -> None:
        self._pending = empty_data()
        self._progress: dict[str, int] = {}  # request -> `at` of its last counted compaction
        self._holding: dict[str, int] = {}  # live request -> blocks its compactions freed
        self._saved_sent: int | None = None

    # -- events -------------------------------------------------------------------------------

    def compacted(self, request_id: str, compactions: list[Compaction], block_size: int) -> None:
        if not compactions:
            return
        self._holding[request_id] = compactions[-1].evicted // block_size
        progress = self._progress.get(request_id, 0)
        for c in compactions:
            if c.at <= progress:
                continue  # re-run after a preemption: counted already
            ev = self._pending["evicted"]
            ev[c.phase] = ev.get(c.phase, 0) + c.evicted - c.prior
            fr = self._pending["freed"]
            fr[c.phase] = fr.get(c.phase, 0) + c.freed_blocks(block_size)
            progress = c.at
        self._progress[request_id] = progress

    def released(self, request_id: str) -> None:
        self._holding.pop(request_id, None)

    def finished(self, request_id: str, summary: dict, skip_reason: str | None) -> None:
        """A request finished; ``summary`` is its :func:`request_summary`."""
        self.released(request_id)
        self._progress.pop(request_id, None)
        if summary["compressed"]:
            self._pending["compressed"].append(
                [summary["prompt_tokens"], summary["kept_tokens"], summary["method"],
                 summary["compactions"]])
        elif skip_reason is not None:
            sk = self._pending["skipped"]
            sk[skip_reason] = sk.get(skip_reason, 0) + 1

    # -- reads --------------------------------------------------------------------------------

    def progress(self, request_id: str) -> int:
        """``at`` of the request's last counted compaction (0: none)."""
        return self._progress.get(request_id, 0)

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


# ---------------------------------------------------------------------------------------------
# Worker side: selection time
# ---------------------------------------------------------------------------------------------


class SelectionTimer:
    """Per-request SnapKV selection time (scoring + top-k), summed over layers.

    Registers :meth:`add` as a selection observer of :mod:`vllm_snapkv.backends.compaction`
    (whose ``compact`` reports each layer's selection time), so generation itself is untouched.
    Installed once per worker process by the connector's worker side; :meth:`take` is called at
    the end of every step.
    """

    _lock = threading.Lock()
    _installed: SelectionTimer | None = None

    def __init__(self) -> None:
        self._times: dict[str, float] = {}

    @classmethod
    def install(cls) -> SelectionTimer:
        """The process's timer, registered with :mod:`~vllm_snapkv.backends.compaction` on
        first call."""
        with cls._lock:
            if cls._installed is None:
                from vllm_snapkv.backends import compaction

                timer = cls()
                compaction.add_selection_observer(timer.add)
                cls._installed = timer
            return cls._installed

    def add(self, req_id: str, seconds: float) -> None:
        self._times[req_id] = self._times.get(req_id, 0.0) + seconds

    def take(self, stage: int = 0) -> SnapKVStats | None:
        """The times since the last call, as a payload from pipeline stage ``stage``."""
        if not self._times:
            return None
        times, self._times = self._times, {}
        data = empty_data()
        data["selection_s"] = {rid: {str(stage): t} for rid, t in times.items()}
        return SnapKVStats(data=data)


# ---------------------------------------------------------------------------------------------
# API-server side: Prometheus metrics
# ---------------------------------------------------------------------------------------------


class SnapKVPromMetrics(KVConnectorPromMetrics):
    """The ``vllm:snapkv_*`` series, labelled ``model_name`` and ``engine`` like vLLM's own, plus
    ``method`` (per-request series), ``phase`` (evictions) or ``reason`` (skips)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._values = per_engine_labelvalues
        by_method = [*labelnames, "method"]
        by_phase = [*labelnames, "phase"]
        self.ratio = self._histogram_cls(
            name=M_RATIO, labelnames=by_method, buckets=RATIO_BUCKETS,
            documentation="Per compressed request: prompt tokens kept per KV head after the "
                          "prompt phase / prompt tokens.")
        self.factor = self._histogram_cls(
            name=M_FACTOR, labelnames=by_method, buckets=FACTOR_BUCKETS,
            documentation="Per compressed request: prompt tokens / prompt tokens kept (the "
                          "compression factor, the inverse of the ratio).")
        self.compactions = self._histogram_cls(
            name=M_COMPACTIONS, labelnames=by_method, buckets=COMPACTION_BUCKETS,
            documentation="Per compressed request: compactions it ran (while its prompt was "
                          "read, at its end, during decode).")
        self.compressed = self._counter_cls(
            name=M_COMPRESSED, labelnames=by_method,
            documentation="Finished requests whose KV was compacted at least once.")
        self.skipped = self._counter_cls(
            name=M_SKIPPED, labelnames=[*labelnames, "reason"],
            documentation="Finished requests whose KV was never compacted, by reason "
                          "(opted_out, fits_budget, not_compacted).")
        self.prompt_tokens = self._counter_cls(
            name=M_PROMPT_TOKENS, labelnames=by_method,
            documentation="Prompt tokens of compressed requests.")
        self.kept_tokens = self._counter_cls(
            name=M_KEPT_TOKENS, labelnames=by_method,
            documentation="Prompt tokens kept per KV head after the prompt phase, by compressed "
                          "requests.")
        self.evicted = self._counter_cls(
            name=M_EVICTED, labelnames=by_phase,
            documentation="Tokens evicted per KV head by compactions, by phase (prefill, "
                          "prompt, decode).")
        self.freed = self._counter_cls(
            name=M_FREED, labelnames=by_phase,
            documentation="KV-cache blocks returned to the pool by compactions, by phase.")
        self.selection = self._histogram_cls(
            name=M_SELECTION, labelnames=labelnames, buckets=SELECTION_BUCKETS,
            documentation="Per request and step: token-selection time, summed over layers, in "
                          "the worker.")
        self.saved = self._gauge_cls(
            name=M_SAVED, labelnames=labelnames, multiprocess_mode="mostrecent",
            documentation="KV-cache blocks running requests do not hold thanks to compaction "
                          "(freed blocks of live requests).")
        # Every series exists (at 0) from the start, as vLLM's own do: dashboards and alerts
        # see a known label set instead of series that appear on first use.
        from vllm_snapkv.methods import method_names
        from vllm_snapkv.schedule import PHASES

        for idx in per_engine_labelvalues:
            for method in method_names():
                for metric in (self.ratio, self.factor, self.compactions, self.compressed,
                               self.prompt_tokens, self.kept_tokens):
                    self._child(metric, idx, method)
            for phase in PHASES:
                self._child(self.evicted, idx, phase)
                self._child(self.freed, idx, phase)
            for reason in SKIP_REASONS:
                self._child(self.skipped, idx, reason)
            self._child(self.selection, idx)
            self._child(self.saved, idx)

    def _child(self, metric: Any, engine_idx: int, *extra: object) -> Any:
        return metric.labels(*self._values[engine_idx], *extra)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for prompt_len, kept, method, compactions in data.get("compressed") or []:
            self._child(self.ratio, engine_idx, method).observe(kept / prompt_len)
            self._child(self.factor, engine_idx, method).observe(prompt_len / kept)
            self._child(self.compactions, engine_idx, method).observe(compactions)
            self._child(self.compressed, engine_idx, method).inc()
            self._child(self.prompt_tokens, engine_idx, method).inc(prompt_len)
            self._child(self.kept_tokens, engine_idx, method).inc(kept)
        for phase, n in (data.get("evicted") or {}).items():
            if n:
                self._child(self.evicted, engine_idx, phase).inc(n)
        for phase, n in (data.get("freed") or {}).items():
            if n:
                self._child(self.freed, engine_idx, phase).inc(n)
        for reason, n in (data.get("skipped") or {}).items():
            if reason in SKIP_REASONS and n:
                self._child(self.skipped, engine_idx, reason).inc(n)
        for seconds in selection_seconds(data).values():
            self._child(self.selection, engine_idx).observe(seconds)
        if data.get("blocks_saved") is not None:
            self._child(self.saved, engine_idx).set(data["blocks_saved"])


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


#: The connector hooks that move KV: loading external KV into a request, saving a layer's KV.
TRANSFER_HOOKS = ("get_num_new_matched_tokens", "start_load_kv", "save_kv_layer")


def _connector_entries(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The connectors a ``--kv-transfer-config`` dict configures (MultiConnector children
    included), as connector dicts."""
    if cfg.get("kv_connector") == "MultiConnector":
        extra = cfg.get("kv_connector_extra_config") or {}
        return [e for child in extra.get("connectors") or [] for e in _connector_entries(child)]
    return [dict(cfg)]


def moves_kv(entry: Mapping[str, Any]) -> str | None:
    """Why the connector ``entry`` (a connector dict) may move KV, or ``None`` when it cannot.

    Judged by what its class does, not by its name: a connector that inherits every KV-moving
    hook (:data:`TRANSFER_HOOKS`) from :class:`~vllm_snapkv.metrics_connector.NoTransferConnector`
    moves none; any other implementation of them (vLLM's NIXL, LMCache, offloading, example,
    Mooncake, UMBP connectors, ...) may load prompt KV into a request or save it, which
    compression cannot share. A connector class that cannot be loaded is judged as moving KV.
    """
    from vllm_snapkv.metrics_connector import NoTransferConnector

    name = entry.get("kv_connector")
    if name == CONNECTOR_NAME:
        return None
    try:
        cls = _connector_class(entry)
    except Exception as exc:  # noqa: BLE001 - any failure to load means we cannot vouch for it
        return f"{name} (its class could not be loaded: {exc})"
    overridden = [h for h in TRANSFER_HOOKS
                  if getattr(cls, h, None) is not getattr(NoTransferConnector, h)]
    if overridden:
        return f"{name} (implements {', '.join(overridden)})"
    return None


def _connector_class(entry: Mapping[str, Any]) -> type:
    import importlib

    name = entry["kv_connector"]
    module_path = entry.get("kv_connector_module_path")
    if module_path:
        return getattr(importlib.import_module(module_path), name)
    from vllm_snapkv import vllm_seam as seam

    return seam.get("KVConnectorFactory.get_connector_class_by_name")(name)


def check_kv_transfer(engine_args: Any) -> None:
    """Refuse (``ValueError``, one line naming the flag) KV-transfer settings that cannot work
    with compression on: ``--kv-offloading-size`` (vLLM's offloading connector) and any
    connector in ``--kv-transfer-config`` that may move KV (:func:`moves_kv`). Connectors that
    move none (derived from ``NoTransferConnector``) are composed with the SnapKV connector.
    """
    if getattr(engine_args, "kv_offloading_size", None) is not None:
        raise ValueError(
            "--kv-offloading-size cannot be combined with --kv-compression snapkv: vLLM's "
            "offloading connector saves prompt KV after SnapKV compacted it and loads it into "
            "requests whose prefill SnapKV then cannot see; use one or the other")
    user = engine_args.kv_transfer_config
    if user is None:
        return
    movers = [why for e in _connector_entries(_ktc_to_dict(user))
              if e.get("kv_connector") and (why := moves_kv(e)) is not None]
    if movers:
        raise ValueError(
            f"--kv-transfer-config with {'; '.join(movers)} cannot be combined with "
            "--kv-compression: a connector that moves KV would save prompt KV after a "
            "compaction rewrote it (other requests would load corrupted KV) or load prompt KV "
            "into requests whose prefill compression then cannot see; use one or the other (a "
            "connector that moves no KV may derive from "
            "vllm_snapkv.metrics_connector.NoTransferConnector)")


def wire(engine_args: Any) -> None:
    """Add the SnapKV metrics connector to ``engine_args`` (compression on), after
    :func:`check_kv_transfer`. ``--disable-log-stats`` is left alone (then nothing is exported,
    as for vLLM's own metrics)."""
    KVTransferConfig = seam.get("KVTransferConfig")
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
    current_platform = seam.get("current_platform")
    if not current_platform.is_cpu() or CPU_RESERVED_ENV in os.environ:
        return
    CpuArchEnum = seam.get("CpuArchEnum")

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
    for child in getattr(connector, "sub_connectors", None) or []:
        found = find_connector(child)
        if found is not None:
            return found
    return None
