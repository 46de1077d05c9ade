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
* **Pressure** (:meth:`SnapKVSchedulerMixin.schedule`, with ``--snapkv-trigger pressure``): before
  vLLM schedules a step, :meth:`SnapKVSchedulerMixin._snapkv_relieve` compares the free blocks with
  what the running and the admissible waiting requests need within the next ``window + 1``
  tokens, and when they fall short orders compactions of those requests, most blocks freed
  first, until the shortfall is covered. An order joins
  the request's schedule (and travels to the workers in the connector's metadata); its blocks
  are freed when it has run, like any compaction's.

Observability (:mod:`vllm_snapkv.metrics`): compactions are counted when their blocks are freed,
in a :class:`~vllm_snapkv.metrics.StatsRecorder` that the SnapKV metrics connector hands to vLLM's
KV-connector stats each step.
"""

from __future__ import annotations

import itertools
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
        self._snapkv_managers = managers
        if connector is not None:
            # The connector's metadata carries the pressure orders to the workers.
            connector.schedules = self.snapkv_schedules
        elif self.snapkv_config.pressure:
            raise RuntimeError("--snapkv-trigger pressure needs the SnapKV connector, which "
                               "carries the scheduler's orders to the workers")

    def _snapkv_on_compacted(self, request_id: str, done: list[Compaction]) -> None:
        self.snapkv_recorder.compacted(request_id, done, self.snapkv_block_size)
        bs = self.snapkv_block_size
        for c in done:
            log = logger.info if c.phase == "prompt" else logger.debug
            log("SnapKV %s compaction of request %s at token %d: %d -> %d tokens per KV head, "
                "%d blocks freed", c.phase, request_id, c.at, c.attended, c.kept,
                c.freed_blocks(bs))

    # ------------------------------------------------------------------ pressure

    @seam.overrides("Scheduler.schedule")
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.snapkv_config.pressure:
            self._snapkv_relieve()
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    @seam.uses("Scheduler.kv_cache_manager")
    @seam.uses("Scheduler.running", "Scheduler.waiting", "RequestQueue.__iter__",
               "RequestQueue.__bool__",
               "Scheduler.max_num_running_reqs", "KVCacheManager.block_pool",
               "BlockPool.get_num_free_blocks", "Request.num_computed_tokens",
               "Request.num_tokens")
    def _snapkv_relieve(self) -> list[Compaction]:
        """Order compactions when the pool cannot hold what comes next (see the module
        docstring). Returns the orders made.

        Needed: the blocks the running requests open within their next ``window + 1`` tokens
        (an ordered compaction runs up to ``window`` tokens after its order, once its window's
        queries exist), plus, for each free running slot, the next waiting request's whole
        length and the same margin (vLLM admits a request only when all of it fits). When that
        exceeds the free blocks, the running and waiting requests whose orders free the most
        blocks are ordered until the shortfall is covered. A waiting request's order runs at
        its prompt's end, in the step that reads it. Prefix-cache hits are not known here, so
        it may order a little early."""
        settings = self.snapkv_config.settings
        assert settings is not None
        bs, window = self.snapkv_block_size, settings.window
        horizon = window + 1
        slots = self.max_num_running_reqs - len(self.running)
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        # A request opens at most ceil(horizon / bs) + 1 blocks within horizon tokens: when that
        # bound fits and nothing waits, the exact count below cannot exceed the free blocks.
        if (slots <= 0 or not self.waiting) and \
                len(self.running) * (-(-horizon // bs) + 1) <= free:
            return []
        need = 0
        for r in self.running:
            nc = r.num_computed_tokens
            need += -(-(nc + horizon) // bs) - (-(-nc // bs))
        waiting = list(itertools.islice(self.waiting, max(0, slots)))
        for r in waiting:
            need += -(-(r.num_tokens + horizon) // bs) - (-(-r.num_computed_tokens // bs))
        shortfall = need - free
        if shortfall <= 0:
            return []
        candidates = []
        for rank, r in enumerate((*self.running, *waiting)):
            schedule = self.snapkv_schedules.get(r.request_id)
            if schedule is None:
                continue
            c = schedule.pressure_order(r.num_computed_tokens, window)
            if c is not None:
                candidates.append((-c.freed_blocks(bs), rank, r.request_id, schedule, c))
        candidates.sort(key=lambda x: x[:2])  # most blocks first; running before waiting
        ordered = []
        for minus_freed, _, rid, schedule, c in candidates:
            if shortfall <= 0:
                break
            if not self._snapkv_prepare_rewrite(rid, c):
                continue
            self.snapkv_schedules[rid] = schedule.with_order(c.at)
            shortfall += minus_freed
            ordered.append(c)
            logger.info("SnapKV pressure: request %s compacts at token %d (%d -> %d tokens per "
                        "KV head, %d blocks)", rid, c.at, c.at - c.prior, c.kept, -minus_freed)
        return ordered

    @seam.uses("Scheduler.kv_cache_manager", "KVCacheManager.block_pool",
               "BlockPool.evict_blocks", "KVCacheBlock.ref_cnt",
               "KVCacheBlock.block_id", "SingleTypeKVCacheManager.req_to_blocks")
    def _snapkv_prepare_rewrite(self, request_id: str, c: Compaction) -> bool:
        """Whether ``c`` may rewrite the request's blocks it moves kept K/V into, and if so,
        drop them from the prefix cache first (they were hashed while the request was whole).
        A block another request shares (a prefix hit) is never rewritten: ``False``."""
        bs = self.snapkv_block_size
        rewritten = []
        for manager in self._snapkv_managers:
            blocks = manager.req_to_blocks.get(request_id) or []
            part = blocks[c.evicted // bs:-(-c.at // bs)]
            if any(b.ref_cnt > 1 for b in part):
                return False
            rewritten.extend(b.block_id for b in part)
        if rewritten:
            self.kv_cache_manager.block_pool.evict_blocks(set(rewritten))
        return True

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
        if schedule is not None and n > 0 and not schedule.idle:
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
