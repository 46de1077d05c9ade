"""Scheduler side of paged SnapKV: free each compressed prompt's head blocks, keep prefix caching safe.

Each request's :class:`~vllm_snapkv.placement.Placement` is computed once, when the request is
added, from (prompt length, block size, the request's ``extra_args``) — the same pure function the
workers evaluate, so both sides agree on E without talking. Then three decisions differ from
vanilla vLLM, each in one small override:

* **Freeing** (:meth:`SnapKVFullAttentionManager.remove_skipped_blocks`): once every prompt token
  is processed (the worker has compacted the kept KV into the tail slots [E, N) in the step that
  completed the prefill), the head blocks [0, E) are swapped for ``null_block`` and return to the
  pool — the mechanism sliding-window layers use. ``processed_computed_tokens`` excludes in-flight
  tokens, so under async scheduling nothing is freed before the compaction step has run.
* **Caching** (:meth:`SnapKVFullAttentionManager.cache_blocks`): blocks from E on hold compacted KV
  (and later tokens computed over it), so a compressed request never hashes them. Blocks [0, E)
  are never written after the prompt, so they stay valid prefix-cache entries after being freed.
* **Prefix hits** (:meth:`SnapKVSchedulerMixin._get_local_prefix_cache_hit`): a compressed request
  reuses cached blocks only below its own E, so its tail [E, N), which compaction rewrites, is made
  of blocks it owns alone.

Observability (:mod:`vllm_snapkv.metrics`): the scheduler records each request's first
compaction, its release and its finish in a :class:`~vllm_snapkv.metrics.StatsRecorder`, which the
SnapKV metrics connector hands to vLLM's KV-connector stats each step, and it adds the request's
summary under ``"snapkv"`` to the ``kv_transfer_params`` of its final output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request

from vllm_snapkv import metrics
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.placement import Placement
from vllm_snapkv.settings import SettingsError

logger = init_logger("vllm.snapkv")


class SnapKVFullAttentionManager(FullAttentionManager):
    """Full attention whose compressed requests drop their head blocks after prefill."""

    #: request id -> placement, shared with (and owned by) the scheduler.
    placements: dict[str, Placement]
    #: called once per compaction, when the head blocks have just been freed.
    on_freed: Callable[[str, Placement], None]

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        placement = self.placements.get(request_id)
        if placement is None or processed_computed_tokens < placement.prompt_len:
            return
        blocks = self.req_to_blocks.get(request_id)
        if blocks and blocks[0] is not self._null_block:
            self._remove_blocks_in_range(request_id, 0, placement.freed_blocks)
            self.on_freed(request_id, placement)

    def cache_blocks(
        self,
        request: Request,
        num_tokens: int,
        retention_interval: int | None = None,
        *,
        replay_boundaries: Sequence[int],
    ) -> None:
        placement = self.placements.get(request.request_id)
        if placement is not None:
            num_tokens = min(num_tokens, placement.evicted)
        super().cache_blocks(request, num_tokens, retention_interval,
                             replay_boundaries=replay_boundaries)


class SnapKVSchedulerMixin:
    """Adds placements to a vLLM scheduler; see the module docstring."""

    snapkv_config: CompressionConfig
    snapkv_placements: dict[str, Placement]

    def _snapkv_init(self) -> None:
        self.snapkv_config = CompressionConfig.from_vllm_config(self.vllm_config)
        self.snapkv_placements = {}
        self.snapkv_recorder = metrics.StatsRecorder()
        connector = metrics.find_connector(getattr(self, "connector", None))
        if connector is not None:
            connector.recorder = self.snapkv_recorder
        else:
            logger.warning("SnapKV: no SnapKV metrics connector configured; the vllm:snapkv_* "
                           "metrics are not exported (per-request summaries still are)")
        self.snapkv_block_size = self.cache_config.block_size
        swapped = 0
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if type(manager) is FullAttentionManager:
                # Same state, one overridden decision each: turn the instance vLLM built into
                # our subclass rather than re-creating it with vLLM's private constructor args.
                manager.__class__ = SnapKVFullAttentionManager
                manager.placements = self.snapkv_placements
                manager.on_freed = self._snapkv_on_freed
                swapped += 1
        if swapped == 0:
            raise RuntimeError(
                "--kv-compression snapkv needs full-attention KV-cache groups; this model has "
                "none (sliding-window, Mamba or MLA-only models are not supported)"
            )

    def _snapkv_on_freed(self, request_id: str, placement: Placement) -> None:
        self.snapkv_recorder.compacted(request_id, placement)
        logger.info(
            "SnapKV compressed request %s: %d -> %d prompt tokens per KV head, %d of %d blocks "
            "freed", request_id, placement.prompt_len, placement.kept, placement.freed_blocks,
            placement.prompt_blocks,
        )

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            placement = self.snapkv_config.placement(
                request.num_prompt_tokens, self.snapkv_block_size,
                request.sampling_params.extra_args if request.sampling_params else None,
            )
            if placement is not None:
                self.snapkv_placements[request.request_id] = placement
        super().add_request(request)  # type: ignore[misc]

    def _get_local_prefix_cache_hit(self, request: Request) -> tuple[Any, int, int, bool]:
        blocks, num_local, boundary, diverged = super()._get_local_prefix_cache_hit(request)  # type: ignore[misc]
        placement = self.snapkv_placements.get(request.request_id)
        if placement is not None and num_local > placement.evicted:
            keep = placement.evicted // placement.block_size
            blocks = type(blocks)(tuple(list(group[:keep]) for group in blocks.blocks))
            num_local = placement.evicted
            boundary = min(boundary, num_local)
        return blocks, num_local, boundary, diverged

    def _snapkv_skip_reason(self, request: Request, placement: Placement | None,
                            compacted: bool) -> str | None:
        if compacted:
            return None
        if placement is not None:
            return metrics.SKIP_NOT_COMPACTED
        sp = request.sampling_params
        if sp is None:
            return metrics.SKIP_FITS
        try:
            opted_out = self.snapkv_config.request_settings(sp.extra_args) is None
        except SettingsError:
            opted_out = False
        return metrics.SKIP_OPTED_OUT if opted_out else metrics.SKIP_FITS

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        rid = request.request_id
        placement = self.snapkv_placements.get(rid)
        compacted = self.snapkv_recorder.was_compacted(rid)
        result = super()._free_request(request, delay_free_blocks)  # type: ignore[misc]
        self.snapkv_placements.pop(rid, None)
        self.snapkv_recorder.finished(rid, self._snapkv_skip_reason(request, placement,
                                                                    compacted))
        summary = metrics.request_summary(request.num_prompt_tokens, placement, compacted)
        if isinstance(result, tuple) and result:
            return (metrics.merge_kv_transfer_params(result[0], summary), *result[1:])
        return metrics.merge_kv_transfer_params(result, summary)

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        # A preempted request holds no blocks until it is recomputed (and compacted again).
        self.snapkv_recorder.released(request.request_id)
        return super()._preempt_request(request, *args, **kwargs)  # type: ignore[misc]

    def snapkv_placement(self, request_id: str) -> Placement | None:
        """The placement of a live request (``None`` when it is not compressed)."""
        return self.snapkv_placements.get(request_id)


class SnapKVScheduler(SnapKVSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with SnapKV placements (CPU forces synchronous scheduling)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._snapkv_init()


class SnapKVAsyncScheduler(SnapKVSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with SnapKV placements."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._snapkv_init()


def scheduler_class_for(async_scheduling: bool) -> str:
    """Qualified name of the scheduler class matching vLLM's own choice."""
    name = "SnapKVAsyncScheduler" if async_scheduling else "SnapKVScheduler"
    return f"{__name__}.{name}"
