"""What each request's compression did: the per-request summary, the stats payload and the
recorders that fill it. Pure: no vLLM (``tests/unit/test_boundary.py``).

* **Per request**: :func:`request_summary`, the ``{"snapkv": {...}}`` object the scheduler adds
  to the ``kv_transfer_params`` of a request's final output (vLLM copies them into
  non-streaming responses; :mod:`vllm_snapkv.integration.streaming` adds it to streams).
* **Per step**: a payload (:func:`empty_data`) that travels on vLLM's KV-connector stats channel
  from the engine core and the workers to one API server per step:
  :class:`StatsRecorder` is the scheduler's side (compressed and skipped requests, evicted
  tokens, freed blocks, blocks saved now), :class:`SelectionTimer` the worker's (selection time
  per request). :func:`aggregate_data` merges payloads as vLLM aggregates stats.

The vLLM classes that carry the payload and export it (``KVConnectorStats``,
``KVConnectorPromMetrics`` and the connector) are in :mod:`vllm_snapkv.integration.prometheus`
and :mod:`vllm_snapkv.integration.connector`; the metric names and buckets are here, so the
benchmarks, the dashboard and the tests read them without vLLM.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from vllm_snapkv.schedule import REASONS, Compaction, Schedule

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
M_RUNS = "vllm:snapkv_compaction_runs"

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
    what the request attended at its end; ``ratio`` is ``kept_tokens / prompt_tokens``;
    ``reasons`` counts the compactions by why they ran (``schedule``, or ``pressure``: ordered
    by the scheduler when its pool ran short).
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
    reasons = {r: 0 for r in REASONS}
    if schedule is not None:
        for c in schedule.compactions(progress):
            reasons[c.reason] += 1
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
        "reasons": reasons,
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
        # reason (schedule, pressure) -> compactions run (each counted once)
        "runs": {},
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
    for key in ("evicted", "freed", "skipped", "runs"):
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
            and not data.get("runs") and not data.get("selection_s")
            and data.get("blocks_saved") is None)


def interval_summary(data: Mapping[str, Any]) -> dict[str, int | float]:
    """A payload's summary for vLLM's periodic log line."""
    comp = data.get("compressed") or []
    prompt = sum(c[0] for c in comp)
    kept = sum(c[1] for c in comp)
    sel = list(selection_seconds(data).values())
    out: dict[str, int | float] = {
        "SnapKV compressed": len(comp),
        "skipped": int(sum((data.get("skipped") or {}).values())),
        "kept ratio": round(kept / prompt, 4) if prompt else 1.0,
        "freed blocks": int(sum((data.get("freed") or {}).values())),
        "avg selection ms": round(1000 * sum(sel) / len(sel), 2) if sel else 0.0,
    }
    if data.get("blocks_saved") is not None:
        out["blocks saved"] = int(data["blocks_saved"])
    return out


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
            runs = self._pending["runs"]
            runs[c.reason] = runs.get(c.reason, 0) + 1
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

    def take(self) -> dict[str, Any] | None:
        """This step's payload (None when nothing happened and the gauge did not move)."""
        data, self._pending = self._pending, empty_data()
        saved = self.blocks_saved
        if saved != self._saved_sent:
            data["blocks_saved"] = saved
            self._saved_sent = saved
        return None if data_is_empty(data) else data


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

    def take(self, stage: int = 0) -> dict[str, Any] | None:
        """The times since the last call, as a payload from pipeline stage ``stage``."""
        if not self._times:
            return None
        times, self._times = self._times, {}
        data = empty_data()
        data["selection_s"] = {rid: {str(stage): t} for rid, t in times.items()}
        return data
