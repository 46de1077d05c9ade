"""Paged SnapKV over vLLM's FlashAttention backend (``FLASH_ATTN``), registered as ``CUSTOM``.

NOT RUN ON A GPU: written and unit-tested on a CPU-only machine against vLLM 0.32's Python
sources (see ``docs/cuda.md`` for what was and was not checked, and how to check the rest).

Everything backend-agnostic (step planning and the metadata shift, ranking and moving the kept
K/V, the window-query stash, the debug oracle) is shared with the CPU adapter
(:mod:`.plan`, :mod:`.compaction`). This module only knows

* **FlashAttention's cache layout** (:class:`FlashAttnCacheAccessor`). vLLM 0.32 hands each
  layer's cache to the backend as a *logical* 4-D view ``kv_cache[B, H, N, 2*D]`` whose strides
  encode the physical layout (``KVCacheLayout``: ``LBNHC`` = "NHD", ``LBHNC`` = "HND", and the
  block-major ``BL*`` variants; ``v1/kv_cache_interface.py`` ``create_kv_cache_views``). The
  write op, ``FlashAttentionImpl.do_kv_cache_update``, splits it as
  ``key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)`` (both ``[B, N, H, D]``)
  and calls ``reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, ...)``,
  whose kernel (``csrc/cache_kernels.cu``) stores token ``i``'s head ``h`` at
  ``block = slot // N``, ``offset = slot % N`` through the *strides* of ``key_cache``
  (``block_stride = stride(0)``, ``page_stride = stride(1)``, ``head_stride = stride(2)``,
  dimension stride 1) and skips ``slot < 0``. So, for every layout:
  K of (physical block b, KV head h, in-block token t) is ``kv_cache[b, h, t, :D]`` and V is
  ``kv_cache[b, h, t, D:]``. Indexing the logical view therefore needs no layout probe (unlike
  the CPU kernels, which pack K column-major inside the region); strides do the work.
  fp8 caches (``--kv-cache-dtype fp8*``) hold scaled bytes: refused with a clear error.
* **How** ``FlashAttentionMetadataBuilder`` / ``FlashAttentionImpl`` are called.

CUDA graphs: compaction and the window stash run host-side Python inside the impl's
``forward`` (data-dependent reads, selection, scatter). A captured *full* graph would replay the
attention kernels without that Python, so the builder declares
``AttentionCGSupport.NEVER``: vLLM then downgrades the default ``FULL_AND_PIECEWISE`` to
``PIECEWISE`` (attention runs eagerly between captured pieces) and refuses an explicit
``FULL``. The shifted ``seq_lens`` / block table still go into persistent buffers the builder
owns (what a future full-graph mode needs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vllm_snapkv.integration import metadata, seam
from vllm_snapkv.backends import compaction, plan
from vllm_snapkv.backends.state import RunnerState, state_for
from vllm_snapkv.integration.kv_cache import SnapKVAttentionSpec

AttentionCGSupport = seam.get("AttentionCGSupport")
AttentionType = seam.get("AttentionType")
FlashAttentionBackend = seam.get("FlashAttentionBackend")
FlashAttentionImpl = seam.get("FlashAttentionImpl")
FlashAttentionMetadata = seam.get("FlashAttentionMetadata")
FlashAttentionMetadataBuilder = seam.get("FlashAttentionMetadataBuilder")
FullAttentionSpec = seam.get("FullAttentionSpec")

logger = logging.getLogger("vllm_snapkv")

__all__ = [
    "FlashAttnCacheAccessor",
    "SnapKVFlashAttentionBackend",
    "SnapKVFlashAttentionImpl",
    "SnapKVFlashAttentionMetadata",
    "SnapKVFlashAttentionMetadataBuilder",
    "check_kv_cache_dtype",
]

#: ``--kv-cache-dtype`` values whose cache holds the model's own floating-point values.
UNQUANTIZED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "half", "float", "float32")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """Refuse quantized (fp8 etc.) KV caches: their bytes are scaled, and the accessor reads
    and moves raw values (moving would be fine; *scoring* needs real keys)."""
    if str(kv_cache_dtype) not in UNQUANTIZED_KV_CACHE_DTYPES:
        raise NotImplementedError(
            f"vllm-snapkv: --kv-cache-dtype {kv_cache_dtype} is not supported with "
            "--kv-compression on CUDA (quantized KV caches store scaled bytes that SnapKV "
            "scoring cannot read); use --kv-cache-dtype auto")


class FlashAttnCacheAccessor:
    """:class:`~vllm_snapkv.backends.compaction.CacheAccessor` over one FlashAttention cache
    (any ``KVCacheLayout``).

    ``kv_cache`` is the per-layer logical view ``[num_blocks, H, block_size, 2 * D]`` exactly as
    vLLM hands it to ``FlashAttentionImpl``; ``block_ids`` a request's block table row in
    *kernel* blocks (what the builder sees; ``block_size`` is ``kv_cache.shape[2]``). Logical
    position ``p`` lives in block ``block_ids[p // block_size]`` at in-block index
    ``p % block_size`` (vLLM's slot mapping). Pure torch indexing: works on CPU tensors (tests)
    and CUDA tensors alike.
    """

    def __init__(self, head_size: int, kv_cache_dtype: str = "auto") -> None:
        check_kv_cache_dtype(kv_cache_dtype)
        self.head_size = int(head_size)

    # -- layout --------------------------------------------------------------------------------

    def split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` views ``[B, H, N, D]``: ``K[b, h, t]`` is token t's key. The same split as
        ``do_kv_cache_update``'s ``kv_cache.transpose(1, 2).split(D, -1)``, transposed back."""
        d = self.head_size
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * d:
            raise ValueError(f"FlashAttention kv_cache must be [num_blocks, H, block_size, "
                             f"2*{d}], got {tuple(kv_cache.shape)}")
        if not kv_cache.is_floating_point() or kv_cache.element_size() == 1:
            raise NotImplementedError(f"vllm-snapkv: KV cache dtype {kv_cache.dtype} (fp8/"
                                      "quantized) is not supported with compression")
        return kv_cache[..., :d], kv_cache[..., d:]

    @staticmethod
    def _indices(kv_cache: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor):
        h, bs = kv_cache.shape[1], kv_cache.shape[2]
        dev = kv_cache.device
        positions = positions.to(device=dev, dtype=torch.int64)
        if positions.dim() == 1:
            positions = positions[None, :]  # same positions for every head; broadcasts
        elif positions.dim() != 2 or positions.shape[0] != h:
            raise ValueError(f"positions must be [n] or [H={h}, n], got {tuple(positions.shape)}")
        block_ids = block_ids.to(device=dev, dtype=torch.int64)
        if positions.numel() and (int(positions.min()) < 0
                                  or int(positions.max()) >= block_ids.numel() * bs):
            raise IndexError(f"positions out of range for {block_ids.numel()} blocks of {bs}")
        blk = block_ids[positions // bs]
        heads = torch.arange(h, device=dev, dtype=torch.int64)[:, None]
        return blk, heads, positions % bs, positions.shape[1]

    # -- CacheAccessor -------------------------------------------------------------------------

    def read_kv(self, kv_cache, block_ids, positions):
        """K, V of logical ``positions`` (``[n]`` or ``[H, n]``) as fresh ``[H, n, D]`` tensors."""
        k, v = self.split(kv_cache)
        blk, heads, tok, _ = self._indices(kv_cache, block_ids, positions)
        return k[blk, heads, tok], v[blk, heads, tok]

    def write_kv(self, kv_cache, block_ids, positions, keys, values) -> None:
        """Store ``keys``/``values`` ``[H, n, D]`` at logical ``positions`` (distinct per head):
        what ``reshape_and_cache_flash`` stores for the same slots (dtype ``auto``)."""
        k, v = self.split(kv_cache)
        blk, heads, tok, n = self._indices(kv_cache, block_ids, positions)
        shape = (kv_cache.shape[1], n, self.head_size)
        if tuple(keys.shape) != shape or tuple(values.shape) != shape:
            raise ValueError(f"keys/values must be {shape}, got {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}")
        k.index_put_((blk, heads, tok), keys.to(kv_cache.dtype))
        v.index_put_((blk, heads, tok), values.to(kv_cache.dtype))


@dataclass
class SnapKVFlashAttentionMetadata(FlashAttentionMetadata):
    #: This step's plan (None: nothing to do for any row).
    snapkv_plan: plan.StepPlan | None = None
    #: The model runner's state (stash, records, debug oracle).
    snapkv_state: RunnerState | None = None
    #: The block table before the shift (compaction and debug read logical positions through it).
    unshifted_block_table: torch.Tensor | None = None


class SnapKVFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """Shifts compacted rows (``seq_len - E``, block table minus its first ``E / bs`` entries)
    into builder-owned persistent buffers before FlashAttention's own metadata (and FA3's AOT
    scheduler metadata) is built from them."""

    # Compaction is host-side Python in forward: no full CUDA graphs (see module docstring).
    _cudagraph_support = AttentionCGSupport.NEVER
    # vLLM would otherwise reuse one group's metadata for another KV-cache group with only the
    # block table swapped (unshifted); build each group's metadata instead.
    supports_update_block_table = False

    @seam.overrides("FlashAttentionMetadataBuilder.__init__")
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        self._snapkv_state = state_for(vllm_config) \
            if isinstance(kv_cache_spec, FullAttentionSpec) else None
        self._snapkv_seq_lens: torch.Tensor | None = None
        self._snapkv_block_table: torch.Tensor | None = None

    @seam.uses("AttentionMetadataBuilder.vllm_config")
    def snapkv_buffers(self, seq_lens: torch.Tensor,
                       block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Persistent output buffers for :func:`~vllm_snapkv.backends.plan.shift_rows`, sliced to this step's shape.

        Allocated once (rows: ``max(max_num_seqs, rows seen)``, the block table's width) on the
        inputs' device/dtype, and reused every step, so the tensors FlashAttention reads keep
        their addresses across steps."""
        buf_s, buf_b = self._snapkv_seq_lens, self._snapkv_block_table
        rows = max(seq_lens.shape[0], block_table.shape[0])
        if (buf_s is None or buf_b is None or buf_b.shape[0] < rows
                or buf_b.shape[1] != block_table.shape[1] or buf_b.device != block_table.device
                or buf_b.dtype != block_table.dtype or buf_s.dtype != seq_lens.dtype):
            if buf_b is not None:
                logger.warning("snapkv: reallocating the shift buffers (%s -> %s rows x %s)",
                               buf_b.shape[0], rows, block_table.shape[1])
            max_seqs = int(getattr(self.vllm_config.scheduler_config, "max_num_seqs", 0) or 0)
            rows = max(rows, max_seqs)
            buf_s = torch.zeros(rows, dtype=seq_lens.dtype, device=seq_lens.device)
            buf_b = torch.zeros(rows, block_table.shape[1], dtype=block_table.dtype,
                                device=block_table.device)
            self._snapkv_seq_lens, self._snapkv_block_table = buf_s, buf_b
        return buf_s[: seq_lens.shape[0]], buf_b[: block_table.shape[0]]

    @seam.overrides("FlashAttentionMetadataBuilder.build")
    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        return metadata.build_metadata(self, super().build, common_prefix_len, common_attn_metadata,
                                   fast_build, state=self._snapkv_state,
                                   base_cls=FlashAttentionMetadata,
                                   cls=SnapKVFlashAttentionMetadata, buffers=self.snapkv_buffers)


class SnapKVFlashAttentionImpl(FlashAttentionImpl):
    """Normal FlashAttention first; then, per row completing prefill, SnapKV selection and
    in-place compaction of this layer's cache; stashes window queries of unfinished prefills."""

    _snapkv_accessor: FlashAttnCacheAccessor | None = None

    @seam.uses("FlashAttentionImpl.head_size", "FlashAttentionImpl.kv_cache_dtype")
    def _get_accessor(self) -> FlashAttnCacheAccessor:
        if self._snapkv_accessor is None:
            self._snapkv_accessor = FlashAttnCacheAccessor(self.head_size, self.kv_cache_dtype)
        return self._snapkv_accessor

    @seam.uses(
        "FlashAttentionImpl.alibi_slopes",
        "FlashAttentionImpl.kv_cache_dtype",
        "FlashAttentionImpl.kv_sharing_target_layer_name",
        "FlashAttentionImpl.logits_soft_cap",
        "FlashAttentionImpl.sinks",
        "FlashAttentionImpl.sliding_window",
    )
    def _snapkv_check_supported(self) -> None:
        reasons = []
        if tuple(self.sliding_window) != (-1, -1):
            reasons.append("sliding-window layers")
        if self.alibi_slopes is not None:
            reasons.append("ALiBi")
        if self.sinks is not None:
            reasons.append("attention sinks")
        if self.logits_soft_cap:
            reasons.append("logit soft-capping")
        if self.kv_sharing_target_layer_name is not None:
            reasons.append("cross-layer KV sharing")
        if getattr(self, "dcp_world_size", 1) > 1:
            reasons.append("decode context parallelism")
        if reasons:
            raise NotImplementedError("vllm-snapkv: " + ", ".join(reasons) + " are not "
                                      "supported with compression yet")
        check_kv_cache_dtype(self.kv_cache_dtype)

    @seam.uses(
        "FlashAttentionImpl.attn_type",
        "FlashAttentionImpl.head_size",
        "FlashAttentionImpl.num_heads",
        "FlashAttentionImpl.scale",
    )
    @seam.overrides("FlashAttentionImpl.forward")
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        step_plan = getattr(attn_metadata, "snapkv_plan", None)
        if step_plan is None or self.attn_type != AttentionType.DECODER:
            return out
        self._snapkv_check_supported()
        q = query.view(query.shape[0], self.num_heads, self.head_size)
        compaction.after_attention(step_plan, attn_metadata.snapkv_state, layer.layer_name, q,
                                   output, kv_cache, attn_metadata.unshifted_block_table,
                                   self._get_accessor, self.scale)
        return out


class SnapKVFlashAttentionBackend(FlashAttentionBackend):
    """``FLASH_ATTN`` with paged SnapKV eviction, registered as ``AttentionBackendEnum.CUSTOM``
    (by the SnapKV GPU worker and the plugin; selected through ``attention_config.backend``)."""

    @seam.overrides("AttentionBackend.customize_spec")
    @classmethod
    def customize_spec(cls, spec):
        return SnapKVAttentionSpec.from_spec(super().customize_spec(spec))

    @seam.overrides("FlashAttentionBackend.get_impl_cls")
    @staticmethod
    def get_impl_cls() -> type[SnapKVFlashAttentionImpl]:
        return SnapKVFlashAttentionImpl

    @seam.overrides("FlashAttentionBackend.get_builder_cls")
    @staticmethod
    def get_builder_cls() -> type[SnapKVFlashAttentionMetadataBuilder]:
        return SnapKVFlashAttentionMetadataBuilder
