"""The KV-cache spec and manager of compressed full-attention layers: one decision each.

vLLM picks a KV-cache manager per layer group from the group's spec class through its
``KVCacheSpecRegistry``. The SnapKV attention backends turn each full-attention layer's spec into
:class:`SnapKVAttentionSpec` (``AttentionBackend.customize_spec``), a :class:`FullAttentionSpec`
that adds no field — same pages, same grouping — and is registered with
:class:`SnapKVFullAttentionManager`. That manager differs from vLLM's ``FullAttentionManager`` in
two overridden decisions:

* **Freeing** (:meth:`SnapKVFullAttentionManager.remove_skipped_blocks`, which vLLM calls before
  every allocation with the tokens processed so far): the blocks the request's compactions have
  evicted (``schedule.evicted_at(processed)``) are swapped for ``null_block`` and return to the
  pool — the mechanism sliding-window layers use. ``processed`` excludes in-flight tokens, so
  under async scheduling nothing is freed before the compaction's step has run.
* **Caching** (:meth:`SnapKVFullAttentionManager.cache_blocks`): slots from the first
  compaction's eviction on are rewritten by compactions, so a compressed request never hashes
  them. Blocks below it are never written after they were computed, so they stay valid
  prefix-cache entries after being freed.

The manager learns each request's schedule from the scheduler (:mod:`vllm_snapkv.integration.scheduler`),
which connects to the managers vLLM built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_snapkv.integration import seam
from vllm_snapkv.integration.plugin import _default_block_size

if TYPE_CHECKING:
    from vllm_snapkv.schedule import Compaction, Schedule

FullAttentionSpec = seam.get("FullAttentionSpec")
FullAttentionManager = seam.get("FullAttentionManager")

__all__ = ["SnapKVAttentionSpec", "SnapKVFullAttentionManager", "register_spec"]


@dataclass(frozen=True, kw_only=True)
class SnapKVAttentionSpec(FullAttentionSpec):
    """A full-attention layer whose requests may compact: vLLM's spec, managed by
    :class:`SnapKVFullAttentionManager`."""

    @seam.uses("KVCacheSpec.block_size", "AttentionSpec.page_size_bytes")
    @seam.overrides("FullAttentionSpec.max_memory_usage_bytes")
    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        # With prompts compacted while read, one request needs far less than max_model_len of
        # KV (vllm_snapkv.capacity); otherwise vLLM's own answer.
        from vllm_snapkv import capacity
        from vllm_snapkv.config import CompressionConfig

        config = CompressionConfig.from_vllm_config(vllm_config)
        if not capacity.relaxed(config):
            return super().max_memory_usage_bytes(vllm_config)
        max_len = int(vllm_config.model_config.max_model_len)
        blocks = min(-(-max_len // self.block_size),
                     capacity.engine_min_blocks(config, max_len, self.block_size))
        return blocks * self.page_size_bytes

    @classmethod
    def from_spec(cls, spec: Any) -> Any:
        """``spec`` as a :class:`SnapKVAttentionSpec` when it is plain full attention (no sliding
        window, no chunked-local attention), else unchanged."""
        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None \
                or spec.attention_chunk_size is not None:
            return spec
        from dataclasses import fields

        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init})


class SnapKVFullAttentionManager(FullAttentionManager):
    """Full attention whose requests' compactions free head blocks (module docstring)."""

    #: request id -> schedule, shared with (and owned by) the scheduler.
    schedules: dict[str, Schedule] = {}
    #: called with (request id, compactions just freed), once per compaction.
    on_compacted: Callable[[str, list[Compaction]], None] | None = None

    @seam.overrides("SingleTypeKVCacheManager.__init__")
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedules = {}
        #: request id -> tokens processed when its blocks were last freed.
        self._freed_at: dict[str, int] = {}

    @seam.uses("SingleTypeKVCacheManager.block_size")
    @seam.uses(
        "KVCacheManager.allocate_slots frees skipped blocks",
        "KVCacheManager.allocate_slots",
        "SingleTypeKVCacheManager._remove_blocks_in_range",
        "SingleTypeKVCacheManager.req_to_blocks",
        "SingleTypeKVCacheManager._null_block",
    )
    @seam.overrides("SingleTypeKVCacheManager.remove_skipped_blocks")
    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        schedule = self.schedules.get(request_id)
        if schedule is None or schedule.idle:
            return
        last = self._freed_at.get(request_id, 0)
        if processed_computed_tokens <= last:
            return
        done = schedule.between(last, processed_computed_tokens)
        self._freed_at[request_id] = processed_computed_tokens
        if not done:
            return
        evicted = done[-1].evicted
        blocks = self.req_to_blocks.get(request_id)
        if blocks:
            self._remove_blocks_in_range(request_id, 0, min(evicted // self.block_size,
                                                            len(blocks)))
        if self.on_compacted is not None:
            self.on_compacted(request_id, done)

    @seam.uses("SingleTypeKVCacheManager.block_size")
    @seam.uses("SingleTypeKVCacheManager.max_admission_blocks_per_request")
    @seam.overrides("SingleTypeKVCacheManager.get_num_blocks_to_allocate")
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args: Any,
                                   apply_admission_cap: bool = False, **kwargs: Any) -> int:
        # Admission (vLLM checks that a new request's whole prompt fits before it starts): a
        # request compacted while read needs its peak, not its length.
        schedule = self.schedules.get(request_id)
        if not apply_admission_cap or schedule is None or schedule.prefill_budget is None:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, *args, apply_admission_cap=apply_admission_cap,
                **kwargs)
        from vllm_snapkv.capacity import peak_blocks

        saved = self.max_admission_blocks_per_request
        self.max_admission_blocks_per_request = peak_blocks(schedule, num_tokens,
                                                            self.block_size)
        try:
            return super().get_num_blocks_to_allocate(request_id, num_tokens, *args,
                                                      apply_admission_cap=True, **kwargs)
        finally:
            self.max_admission_blocks_per_request = saved

    @seam.overrides("SingleTypeKVCacheManager.free")
    def free(self, request_id: str) -> None:
        # Finished or preempted: a recompute starts over from 0 tokens.
        self._freed_at.pop(request_id, None)
        super().free(request_id)

    @seam.uses("SingleTypeKVCacheManager.cache_blocks")
    @seam.overrides("FullAttentionManager.cache_blocks")
    def cache_blocks(self, request: Any, num_tokens: int, retention_interval: int | None = None,
                     *, replay_boundaries: Sequence[int]) -> None:
        schedule = self.schedules.get(request.request_id)
        if schedule is not None and schedule.cache_limit is not None:
            num_tokens = min(num_tokens, schedule.cache_limit)
        super().cache_blocks(request, num_tokens, retention_interval,
                             replay_boundaries=replay_boundaries)


@seam.uses(
    "KVCacheSpecRegistry.register",
    "KVCacheSpecRegistry._ensure_registered",
    "register_all_kvcache_specs",
)
@seam.uses("CacheConfig.block_size", "CacheConfig.user_specified_block_size")
def configured_block_size(vllm_config: Any) -> int:
    """The block size the engine will allocate with, as known outside the worker.

    vLLM 0.33 keeps ``CacheConfig``'s default (16) until the worker resolves the backend's
    (``CpuPlatform.update_block_size_for_backend``: 128 on CPU), after the config is built and
    after the model runner exists; 0.32 set 128 while building the config. So on CPU a size the
    user did not choose is the CPU backend's 128; a chosen one, or any size on CUDA, is read."""
    cache = vllm_config.cache_config
    if seam.get("current_platform").is_cpu() and not cache.user_specified_block_size:
        return _default_block_size(seam.get("current_platform"))
    return int(cache.block_size or 0) or _default_block_size(seam.get("current_platform"))


def register_spec(vllm_config: Any) -> None:
    """Register :class:`SnapKVAttentionSpec` -> :class:`SnapKVFullAttentionManager` in this
    process (after vLLM's own specs: the registry registers those only while it is empty).
    Idempotent."""
    registry = seam.get("KVCacheSpecRegistry")
    registry._ensure_registered(vllm_config)
    registry.register(SnapKVAttentionSpec, SnapKVFullAttentionManager,
                      uniform_type_base_spec=FullAttentionSpec)
