"""Paged SnapKV over vLLM's CPU attention backend (``CPU_ATTN``): the layout-specific adapter.

Everything backend-agnostic (step planning and the metadata shift: :mod:`.plan`; ranking and
moving the kept K/V: :mod:`.compaction`; the window-query stash, the debug oracle) lives beside
it. This module only knows

* how the CPU cache is laid out (through :mod:`vllm_snapkv.paged_kv`, which derives it from the
  kernel's own write op — never from the tensor's shape), and
* how ``CPUAttentionMetadataBuilder``/``CPUAttentionBackendImpl`` are called.

The worker (:mod:`vllm_snapkv.integration.worker`) installs :class:`SnapKVCPUBackend` in place of
``CPU_ATTN`` before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_snapkv import paged_kv
from vllm_snapkv.integration import metadata, seam
from vllm_snapkv.backends import compaction, plan
from vllm_snapkv.backends.state import RunnerState, state_for
from vllm_snapkv.integration.kv_cache import SnapKVAttentionSpec

AttentionType = seam.get("AttentionType")
CPUAttentionBackend = seam.get("CPUAttentionBackend")
CPUAttentionBackendImpl = seam.get("CPUAttentionBackendImpl")
CPUAttentionMetadata = seam.get("CPUAttentionMetadata")
CPUAttentionMetadataBuilder = seam.get("CPUAttentionMetadataBuilder")

__all__ = [
    "CPUCacheAccessor",
    "SnapKVCPUBackend",
    "SnapKVCPUImpl",
    "SnapKVCPUMetadata",
    "SnapKVCPUMetadataBuilder",
]


class CPUCacheAccessor:
    """:class:`~vllm_snapkv.backends.compaction.CacheAccessor` over one CPU cache, via the
    probed kernel layout."""

    def __init__(self, kv_cache: torch.Tensor, isa: str) -> None:
        self.layout = paged_kv.layout_for_cache(seam.get("cpu_attn_reshape_and_cache"), kv_cache,
                                               isa)

    def read_kv(self, kv_cache, block_ids, positions):
        return paged_kv.read_kv(kv_cache, block_ids, positions, self.layout)

    def write_kv(self, kv_cache, block_ids, positions, keys, values):
        paged_kv.write_kv(kv_cache, block_ids, positions, keys, values, self.layout)


@dataclass
class SnapKVCPUMetadata(CPUAttentionMetadata):
    #: This step's plan (None: nothing to do for any row).
    snapkv_plan: plan.StepPlan | None = None
    #: The model runner's state (stash, records, debug oracle).
    snapkv_state: RunnerState | None = None
    #: The model runner's block table before the shift (compaction and debug read logical
    #: positions through it).
    unshifted_block_table: torch.Tensor | None = None


class SnapKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Shifts rows with evicted slots (``seq_len - E``, block table minus its first ``E / bs``
    entries) before the CPU scheduler metadata is built from the shifted sequence lengths."""

    @seam.overrides("CPUAttentionMetadataBuilder.__init__")
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        self._snapkv_state = state_for(vllm_config)

    @seam.uses(
        "CPUAttentionMetadataBuilder.is_cross_attention",
        "CPUAttentionMetadataBuilder.is_encoder_only_attention",
    )
    @seam.overrides("CPUAttentionMetadataBuilder.build")
    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        active = not (self.is_cross_attention or self.is_encoder_only_attention)
        return metadata.build_metadata(self, super().build, common_prefix_len, common_attn_metadata,
                                   fast_build, state=self._snapkv_state if active else None,
                                   base_cls=CPUAttentionMetadata, cls=SnapKVCPUMetadata)


class SnapKVCPUImpl(CPUAttentionBackendImpl):
    """Normal CPU attention first; then this step's compactions of this layer's cache and the
    window-query stash (:func:`~vllm_snapkv.backends.compaction.after_attention`)."""

    _accessor: CPUCacheAccessor | None = None

    @seam.uses(
        "CPUAttentionBackendImpl.attn_type",
        "CPUAttentionBackendImpl.sliding_window",
        "CPUAttentionBackendImpl.alibi_slopes",
        "CPUAttentionBackendImpl.sinks",
        "CPUAttentionBackendImpl.logits_soft_cap",
        "CPUAttentionBackendImpl.is_fp8_kv_cache",
    )
    @seam.overrides("CPUAttentionBackendImpl.__init__")
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Refused when the model is built (start-up), not on the first long request.
        reasons = []
        if self.attn_type == AttentionType.DECODER:
            if self.sliding_window > 0:
                reasons.append("sliding-window layers")
            if self.alibi_slopes is not None:
                reasons.append("ALiBi")
            if self.sinks is not None:
                reasons.append("attention sinks")
            if self.logits_soft_cap:
                reasons.append("logit soft-capping")
            if self.is_fp8_kv_cache:
                reasons.append("fp8 KV caches")
        if reasons:
            raise ValueError("--kv-compression does not support " + ", ".join(reasons) +
                             " yet (this model uses them); serve it with --kv-compression none")

    def _get_accessor(self, kv_cache: torch.Tensor, layer) -> CPUCacheAccessor:
        acc = self._accessor
        if acc is None or acc.layout.dtype != kv_cache.dtype:
            acc = self._accessor = CPUCacheAccessor(kv_cache, layer.isa)
        return acc

    @seam.uses("CPUAttentionBackendImpl.attn_type")
    @seam.uses(
        "CPUAttentionBackendImpl.num_heads",
        "CPUAttentionBackendImpl.head_size",
        "CPUAttentionBackendImpl.scale",
    )
    @seam.overrides("CPUAttentionBackendImpl.forward")
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        step_plan = getattr(attn_metadata, "snapkv_plan", None)
        if step_plan is None or self.attn_type != AttentionType.DECODER:
            return out
        state = attn_metadata.snapkv_state

        def accessor() -> CPUCacheAccessor:
            acc = self._get_accessor(kv_cache, layer)
            # Which kernel layout this worker reads and writes (the report shows it).
            state.layouts[layer.layer_name] = acc.layout.describe()
            return acc

        q = query.view(query.shape[0], self.num_heads, self.head_size)
        compaction.after_attention(step_plan, state, layer.layer_name, q, output, kv_cache,
                                   attn_metadata.unshifted_block_table, accessor, self.scale)
        return out


class SnapKVCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with paged SnapKV eviction (installed by the SnapKV worker)."""

    @seam.overrides("AttentionBackend.customize_spec")
    @classmethod
    def customize_spec(cls, spec):
        # Full-attention layers get the SnapKV spec, hence the SnapKV KV-cache manager.
        return SnapKVAttentionSpec.from_spec(super().customize_spec(spec))

    @seam.overrides("CPUAttentionBackend.get_impl_cls")
    @staticmethod
    def get_impl_cls() -> type[SnapKVCPUImpl]:
        return SnapKVCPUImpl

    @seam.overrides("CPUAttentionBackend.get_builder_cls")
    @staticmethod
    def get_builder_cls() -> type[SnapKVCPUMetadataBuilder]:
        return SnapKVCPUMetadataBuilder
