"""Scheduler side of paged compression: schedules, chunk cuts, prefix-hit caps, per-request stats.

Each request's :class:`~vllm_snapkv.schedule.Schedule` is computed once, when the request is
added, from (prompt length, block size, the request's ``extra_args``) — the same pure function
the workers evaluate, so both sides agree on every compaction without talking. The SnapKV
KV-cache managers (:mod:`vllm_snapkv.integration.kv_cache`) read it to free evicted blocks and to keep
rewritten blocks out of the prefix cache. The scheduler itself overrides three decisions, each in
one small method:

* **Chunk cuts** (:meth:`SnapKVSchedulerMixin._reserve_prefill_lookahead`, which vLLM asks for
  every chunk it schedules): a chunk never runs past the request's next compaction, so each
  compaction runs at the end of a step, exactly where the schedule puts it — a preempted request
  that recomputes meets the same compactions, and a prompt compacted while it is read never
  holds more than its bound. With speculative decoding a step never ends at a compaction with
  draft tokens in it (drafts may be rejected): it stops short, and the compaction runs in a
  one-token step once every token before it is known.
* **Prefix hits** (:meth:`SnapKVSchedulerMixin._get_local_prefix_cache_hit`): a compressed request
  reuses cached blocks only below its first compaction's eviction, so the slots compaction
  rewrites are in blocks it owns alone (through vLLM's own ``max_cache_hit_length`` where it has
  one).
* **The end** (``_free_request``): the request's summary joins its ``kv_transfer_params``, and the
  metrics recorder counts it.

Observability (:mod:`vllm_snapkv.metrics`): compactions are counted when their blocks are freed,
in a :class:`~vllm_snapkv.metrics.StatsRecorder` that the SnapKV metrics connector hands to vLLM's
KV-connector stats each step.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_snapkv import metrics
from vllm_snapkv.integration import kv_transfer, seam
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.integration.kv_cache import SnapKVFullAttentionManager, register_spec
from vllm_snapkv.schedule import Compaction, Schedule
from vllm_snapkv.settings import SettingsError

Scheduler = seam.get("Scheduler")
AsyncScheduler = seam.get("AsyncScheduler")

# A child of vLLM's own logger, so vLLM's logging configuration (format, level) applies.
logger = logging.getLogger("vllm.snapkv")


class SnapKVSchedulerMixin:
    """Adds compaction schedules to a vLLM scheduler; see the module docstring."""

    snapkv_config: CompressionConfig
    snapkv_schedules: dict[str, Schedule]

    @seam.uses("Scheduler.cache_config", "Scheduler.vllm_config")
    @seam.uses(
        "Scheduler.kv_cache_manager",
        "Scheduler.connector",
        "KVCacheManager.coordinator",
        "KVCacheCoordinator.single_type_managers",
    )
    def _snapkv_init(self) -> None:
        self.snapkv_config = CompressionConfig.from_vllm_config(self.vllm_config)
        self.snapkv_schedules = {}
        self.snapkv_recorder = metrics.StatsRecorder()
        connector = kv_transfer.find_connector(getattr(self, "connector", None))
        if connector is not None:
            connector.recorder = self.snapkv_recorder
        else:
            logger.warning("SnapKV: no SnapKV metrics connector configured; the vllm:snapkv_* "
                           "metrics are not exported (per-request summaries still are)")
        self.snapkv_block_size = self.cache_config.block_size
        managers = [m for m in self.kv_cache_manager.coordinator.single_type_managers
                    if isinstance(m, SnapKVFullAttentionManager)]
        if not managers:
            raise RuntimeError(
                "--kv-compression needs full-attention KV-cache groups; this model has none "
                "(sliding-window, Mamba or MLA-only models are not supported)")
        for manager in managers:
            manager.schedules = self.snapkv_schedules
            manager.on_compacted = self._snapkv_on_compacted

    def _snapkv_on_compacted(self, request_id: str, done: list[Compaction]) -> None:
        self.snapkv_recorder.compacted(request_id, done, self.snapkv_block_size)
        bs = self.snapkv_block_size
        for c in done:
            log = logger.info if c.phase == "prompt" else logger.debug
            log("SnapKV %s compaction of request %s at token %d: %d -> %d tokens per KV head, "
                "%d blocks freed", c.phase, request_id, c.at, c.attended, c.kept,
                c.freed_blocks(bs))

    # ------------------------------------------------------------------ vLLM's decisions

    @seam.uses("Scheduler.requests", "Request.num_prompt_tokens", "Request.sampling_params")
    @seam.overrides("Scheduler.add_request")
    def add_request(self, request: Any) -> None:
        if request.request_id not in self.requests:
            sp = request.sampling_params
            # Pooling requests (no sampling params) are never compressed.
            schedule = None if sp is None else self.snapkv_config.schedule(
                request.num_prompt_tokens, self.snapkv_block_size, sp.extra_args)
            if schedule is not None:
                self.snapkv_schedules[request.request_id] = schedule
        super().add_request(request)  # type: ignore[misc]

    @seam.uses("Scheduler.schedule cuts chunks")
    @seam.overrides("Scheduler._reserve_prefill_lookahead")
    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        n = super()._reserve_prefill_lookahead(  # type: ignore[misc]
            request, num_computed_tokens, num_new_tokens)
        schedule = self.snapkv_schedules.get(request.request_id)
        if schedule is not None and n > 0:
            nxt = schedule.next_after(num_computed_tokens)
            if nxt is not None and num_computed_tokens + n >= nxt.at:
                if nxt.at <= request.num_tokens:
                    n = nxt.at - num_computed_tokens
                else:
                    # The compaction's last tokens would be speculative drafts, which may be
                    # rejected: stop before it; it runs once they are known (a 1-token step).
                    n = max(1, nxt.at - num_computed_tokens - 1)
        return n

    @seam.overrides("Scheduler._get_local_prefix_cache_hit")
    def _get_local_prefix_cache_hit(self, request: Any, *args: Any) -> Any:
        schedule = self.snapkv_schedules.get(request.request_id)
        limit = schedule.cache_limit if schedule is not None else None
        if limit is not None and seam.feature("prefix_hit_cap"):
            cap = args[0] if args and args[0] is not None else request.num_tokens - 1
            return super()._get_local_prefix_cache_hit(  # type: ignore[misc]
                request, min(cap, limit))
        blocks, num_local, boundary, diverged = super()._get_local_prefix_cache_hit(  # type: ignore[misc]
            request, *args)
        if limit is not None and num_local > limit:
            keep = limit // self.snapkv_block_size
            blocks = type(blocks)(tuple(list(group[:keep]) for group in blocks.blocks))
            num_local = limit
            boundary = min(boundary, num_local)
        return blocks, num_local, boundary, diverged

    def _snapkv_skip_reason(self, request: Any, schedule: Schedule | None,
                            compressed: bool) -> str | None:
        if compressed:
            return None
        if schedule is not None:
            return metrics.SKIP_NOT_COMPACTED
        sp = request.sampling_params
        if sp is None:
            return metrics.SKIP_FITS
        try:
            opted_out = self.snapkv_config.request_settings(sp.extra_args) is None
        except SettingsError:
            opted_out = False
        return metrics.SKIP_OPTED_OUT if opted_out else metrics.SKIP_FITS

    @seam.overrides("Scheduler._free_request")
    def _free_request(self, request: Any, delay_free_blocks: bool = False) -> Any:
        rid = request.request_id
        schedule = self.snapkv_schedules.get(rid)
        summary = metrics.request_summary(request.num_prompt_tokens, schedule,
                                          self.snapkv_recorder.progress(rid),
                                          request.num_computed_tokens)
        result = super()._free_request(request, delay_free_blocks)  # type: ignore[misc]
        self.snapkv_schedules.pop(rid, None)
        self.snapkv_recorder.finished(
            rid, summary, self._snapkv_skip_reason(request, schedule, summary["compressed"]))
        if isinstance(result, tuple) and result:
            return (metrics.merge_kv_transfer_params(result[0], summary), *result[1:])
        return metrics.merge_kv_transfer_params(result, summary)

    @seam.overrides("Scheduler._preempt_request")
    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        # A preempted request holds no blocks until it is recomputed (and compacted again).
        self.snapkv_recorder.released(request.request_id)
        return super()._preempt_request(request, *args, **kwargs)  # type: ignore[misc]


class SnapKVScheduler(SnapKVSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with compaction schedules (CPU forces synchronous
    scheduling)."""

    @seam.overrides("Scheduler.__init__")
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        register_spec(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        self._snapkv_init()


class SnapKVAsyncScheduler(SnapKVSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with compaction schedules."""

    @seam.overrides("AsyncScheduler.__init__")
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        register_spec(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        self._snapkv_init()


def scheduler_class_for(async_scheduling: bool) -> str:
    """Qualified name of the scheduler class matching vLLM's own choice."""
    name = "SnapKVAsyncScheduler" if async_scheduling else "SnapKVScheduler"
    return f"{__name__}.{name}"
