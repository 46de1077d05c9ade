"""Paged SnapKV over vLLM's CPU attention backend (``CPU_ATTN``): the layout-specific adapter.

Everything backend-agnostic (which rows complete prefill, window queries, selection, the shift
arithmetic, debug checks) lives in :mod:`vllm_snapkv.backends.core`. This module only knows

* how the CPU cache is laid out (through :mod:`vllm_snapkv.paged_kv`, which derives it from the
  kernel's own write op — never from the tensor's shape), and
* how ``CPUAttentionMetadataBuilder``/``CPUAttentionBackendImpl`` are called.

The worker (:mod:`vllm_snapkv.worker`) installs :class:`SnapKVCPUBackend` in place of
``CPU_ATTN`` before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_snapkv import paged_kv
from vllm_snapkv.backends import core

__all__ = [
    "CPUCacheAccessor",
    "SnapKVCPUBackend",
    "SnapKVCPUImpl",
    "SnapKVCPUMetadata",
    "SnapKVCPUMetadataBuilder",
]


class CPUCacheAccessor:
    """:class:`core.CacheAccessor` over one CPU cache, via the probed kernel layout."""

    def __init__(self, kv_cache: torch.Tensor, isa: str) -> None:
        self.layout = paged_kv.layout_for_cache(kv_cache, isa)

    def read_kv(self, kv_cache, block_ids, positions):
        return paged_kv.read_kv(kv_cache, block_ids, positions, self.layout)

    def compact(self, kv_cache, block_ids, kept, dest_start):
        return paged_kv.compact(kv_cache, block_ids, kept, dest_start, self.layout)


@dataclass
class SnapKVCPUMetadata(CPUAttentionMetadata):
    #: This step's compression plan (None: nothing compressed in the batch).
    snapkv_plan: core.StepPlan | None = None
    #: The model runner's block table before the shift (compaction and debug read logical
    #: positions through it).
    unshifted_block_table: torch.Tensor | None = None


class SnapKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Shifts compacted rows (``seq_len - E``, block table minus its first ``E / bs`` entries)
    before the CPU scheduler metadata is built from the shifted sequence lengths."""

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        cm = common_attn_metadata
        plan = None
        if not (self.is_cross_attention or self.is_encoder_only_attention):
            plan = core.plan_step(core.current_batch(), cm.query_start_loc_cpu, cm.num_reqs)
        if plan is None:
            return super().build(common_prefix_len, cm, fast_build)
        unshifted = cm.block_table_tensor
        if plan.shifted:
            cm = core.shift_common_metadata(cm, plan, self.block_size)
        md = super().build(common_prefix_len, cm, fast_build)
        return core.extend_metadata(md, CPUAttentionMetadata, SnapKVCPUMetadata,
                                    snapkv_plan=plan, unshifted_block_table=unshifted)


class SnapKVCPUImpl(CPUAttentionBackendImpl):
    """Normal CPU attention first; then, per row completing prefill, SnapKV selection and
    in-place compaction of this layer's cache; stashes window queries of unfinished prefills."""

    _accessor: CPUCacheAccessor | None = None

    def _get_accessor(self, kv_cache: torch.Tensor, layer) -> CPUCacheAccessor:
        acc = self._accessor
        if acc is None or acc.layout.dtype != kv_cache.dtype:
            acc = self._accessor = CPUCacheAccessor(kv_cache, layer.isa)
            # Which kernel layout this worker reads and writes (the report shows it).
            core.state().layouts[layer.layer_name] = acc.layout.describe()
        return acc

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        plan = getattr(attn_metadata, "snapkv_plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return out
        if self.sliding_window > 0 or self.is_fp8_kv_cache or self.alibi_slopes is not None \
                or self.sinks is not None or self.logits_soft_cap:
            raise NotImplementedError(
                "vllm-snapkv: sliding-window, ALiBi, sink, soft-capped layers and fp8 KV caches "
                "are not supported with compression yet")
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        core.after_attention(plan, layer.layer_name, q, output, kv_cache,
                             attn_metadata.unshifted_block_table,
                             lambda: self._get_accessor(kv_cache, layer), self.scale)
        return out


class SnapKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with paged SnapKV eviction (installed by the SnapKV worker)."""

    @staticmethod
    def get_impl_cls() -> type[SnapKVCPUImpl]:
        return SnapKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type[SnapKVCPUMetadataBuilder]:
        return SnapKVCPUMetadataBuilder
