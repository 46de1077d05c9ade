"""The vLLM classes that carry the stats payload (:mod:`vllm_snapkv.metrics`) and export it as
the ``vllm:snapkv_*`` Prometheus series, in the API server that receives a step's stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_snapkv import metrics
from vllm_snapkv.integration import seam
from vllm_snapkv.methods import method_names
from vllm_snapkv.schedule import PHASES, REASONS

KVConnectorPromMetrics = seam.get("KVConnectorPromMetrics")
KVConnectorStats = seam.get("KVConnectorStats")


@dataclass
class SnapKVStats(KVConnectorStats):
    """vLLM ``KVConnectorStats`` carrying one step's (or one log interval's) payload
    (:func:`vllm_snapkv.metrics.empty_data`)."""

    data: dict[str, Any] = field(default_factory=metrics.empty_data)

    @seam.overrides("KVConnectorStats.reset")
    def reset(self) -> None:
        self.data = metrics.empty_data()

    @seam.overrides("KVConnectorStats.aggregate")
    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data = metrics.aggregate_data(self.data, other.data)
        return self

    @seam.overrides("KVConnectorStats.reduce")
    def reduce(self) -> dict[str, int | float]:
        """Interval summary for vLLM's periodic log line."""
        return metrics.interval_summary(self.data)

    @seam.overrides("KVConnectorStats.is_empty")
    def is_empty(self) -> bool:
        return metrics.data_is_empty(self.data)


def stats(data: dict[str, Any] | None) -> SnapKVStats | None:
    """``data`` (a payload, or None) as vLLM's stats object."""
    return None if data is None else SnapKVStats(data=data)


class SnapKVPromMetrics(KVConnectorPromMetrics):
    """The ``vllm:snapkv_*`` series, labelled ``model_name`` and ``engine`` like vLLM's own, plus
    ``method`` (per-request series), ``phase`` (evictions) or ``reason`` (skips)."""

    @seam.uses(
        "KVConnectorPromMetrics._counter_cls",
        "KVConnectorPromMetrics._gauge_cls",
        "KVConnectorPromMetrics._histogram_cls",
    )
    @seam.overrides("KVConnectorPromMetrics.__init__")
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._values = per_engine_labelvalues
        by_method = [*labelnames, "method"]
        by_phase = [*labelnames, "phase"]
        self.ratio = self._histogram_cls(
            name=metrics.M_RATIO, labelnames=by_method, buckets=metrics.RATIO_BUCKETS,
            documentation="Per compressed request: prompt tokens kept per KV head after the "
                          "prompt phase / prompt tokens.")
        self.factor = self._histogram_cls(
            name=metrics.M_FACTOR, labelnames=by_method, buckets=metrics.FACTOR_BUCKETS,
            documentation="Per compressed request: prompt tokens / prompt tokens kept (the "
                          "compression factor, the inverse of the ratio).")
        self.compactions = self._histogram_cls(
            name=metrics.M_COMPACTIONS, labelnames=by_method, buckets=metrics.COMPACTION_BUCKETS,
            documentation="Per compressed request: compactions it ran (while its prompt was "
                          "read, at its end, during decode).")
        self.compressed = self._counter_cls(
            name=metrics.M_COMPRESSED, labelnames=by_method,
            documentation="Finished requests whose KV was compacted at least once.")
        self.skipped = self._counter_cls(
            name=metrics.M_SKIPPED, labelnames=[*labelnames, "reason"],
            documentation="Finished requests whose KV was never compacted, by reason "
                          "(opted_out, fits_budget, not_compacted).")
        self.prompt_tokens = self._counter_cls(
            name=metrics.M_PROMPT_TOKENS, labelnames=by_method,
            documentation="Prompt tokens of compressed requests.")
        self.kept_tokens = self._counter_cls(
            name=metrics.M_KEPT_TOKENS, labelnames=by_method,
            documentation="Prompt tokens kept per KV head after the prompt phase, by compressed "
                          "requests.")
        self.evicted = self._counter_cls(
            name=metrics.M_EVICTED, labelnames=by_phase,
            documentation="Tokens evicted per KV head by compactions, by phase (prefill, "
                          "prompt, decode).")
        self.freed = self._counter_cls(
            name=metrics.M_FREED, labelnames=by_phase,
            documentation="KV-cache blocks returned to the pool by compactions, by phase.")
        self.runs = self._counter_cls(
            name=metrics.M_RUNS, labelnames=[*labelnames, "reason"],
            documentation="Compactions run, by why: schedule (at a budget's point) or pressure "
                          "(ordered when the KV pool ran short, --snapkv-trigger pressure).")
        self.selection = self._histogram_cls(
            name=metrics.M_SELECTION, labelnames=labelnames, buckets=metrics.SELECTION_BUCKETS,
            documentation="Per request and step: token-selection time, summed over layers, in "
                          "the worker.")
        self.saved = self._gauge_cls(
            name=metrics.M_SAVED, labelnames=labelnames, multiprocess_mode="mostrecent",
            documentation="KV-cache blocks running requests do not hold thanks to compaction "
                          "(freed blocks of live requests).")
        # Every series exists (at 0) from the start, as vLLM's own do: dashboards and alerts
        # see a known label set instead of series that appear on first use.
        for idx in per_engine_labelvalues:
            for method in method_names():
                for metric in (self.ratio, self.factor, self.compactions, self.compressed,
                               self.prompt_tokens, self.kept_tokens):
                    self._child(metric, idx, method)
            for phase in PHASES:
                self._child(self.evicted, idx, phase)
                self._child(self.freed, idx, phase)
            for reason in metrics.SKIP_REASONS:
                self._child(self.skipped, idx, reason)
            for reason in REASONS:
                self._child(self.runs, idx, reason)
            self._child(self.selection, idx)
            self._child(self.saved, idx)

    def _child(self, metric: Any, engine_idx: int, *extra: object) -> Any:
        return metric.labels(*self._values[engine_idx], *extra)

    @seam.overrides("KVConnectorPromMetrics.observe")
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
            if reason in metrics.SKIP_REASONS and n:
                self._child(self.skipped, engine_idx, reason).inc(n)
        for reason, n in (data.get("runs") or {}).items():
            if reason in REASONS and n:
                self._child(self.runs, engine_idx, reason).inc(n)
        for seconds in metrics.selection_seconds(data).values():
            self._child(self.selection, engine_idx).observe(seconds)
        if data.get("blocks_saved") is not None:
            self._child(self.saved, engine_idx).set(data["blocks_saved"])
