"""Per-token access to vLLM's paged CPU KV cache, through the layout the kernel really uses.

Why this module exists: the CPU attention cache of one layer is allocated as
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, but the CPU kernels do **not** store one
key per row of that tensor. On x86 (the ``vec``/``vec16`` kernels, ``csrc/cpu/cpu_attn_vec.hpp``)
each (block, head) K region is column-major ``[head_size, block_size]`` (one row per *dimension*)
and V is row-major ``[block_size, head_size]``; the ``amx`` write op packs both into 16-wide tiles
(bf16: with VNNI pairs interleaved), and other ISAs may differ again. Code that reads
``cache[block, h, t, :D]`` as "the key of token t" reads garbage keys, and near-uniform attention
can hide that for a long time (see ``docs/design.md``, "The cache layout").

So nothing here assumes a layout. :func:`probe_cpu_layout` lets the backend's own write op
(``ops.cpu_attn_reshape_and_cache``) store coded probe values into a scratch cache and records,
for every (token-in-block ``t``, dimension ``d``), the element offset where K and V land inside a
(block, head) region. The result, a :class:`TokenLayout`, drives :func:`read_kv` and
:func:`write_kv` (and through them :func:`vllm_snapkv.backends.compaction.move_kept`). When the offsets turn out affine in ``(t, d)`` (true for
``vec``/``vec16``) the accessors use a strided view of the cache and row gathers; otherwise they
gather/scatter element by element through the offset tables (exercised by the ``amx`` packing).

**Which view of the cache is used.** Every function takes ``kv_cache`` exactly as vLLM hands it to
the attention backend: the 4-D tensor ``[num_blocks, H, block_size, 2 * D]`` (possibly a view into
a larger allocation). The kernel's ``key_cache``/``value_cache`` are the two halves of dim 2 of
``kv_cache.view(num_blocks, H, 2 * block_size, D)``, so the (block, head) region
``kv_cache[b, h]`` — ``block_size * 2 * D`` contiguous elements — holds both K (first half, for
the ISAs seen so far) and V. Offsets in :class:`TokenLayout` are element offsets inside that
region, i.e. indices into ``kv_cache.view(num_blocks, H, block_size * 2 * D)[b, h]``. Only the
inner region must be contiguous (the kernel requires that too); block and head strides are taken
from the tensor as it is.

Positions are *logical* token positions of one request: position ``p`` lives in physical block
``block_ids[p // block_size]`` at in-block index ``p % block_size`` — the same rule as vLLM's
slot mapping (``slot = block_ids[p // bs] * bs + p % bs``).

Only ``kv_cache_dtype="auto"`` caches (the cache holds the model dtype) are supported; fp8 caches
store scaled bytes, which this accessor does not (yet) decode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TokenLayout",
    "layout_for_cache",
    "probe_cpu_layout",
    "read_kv",
    "slot_mapping",
    "write_kv",
]

#: Probe values are hex digits + 1 (1..16): exact in fp32, fp16 and bf16 alike, and never 0, so
#: an element still holding the scratch cache's 0 is known to be "not written".
_PROBE_BASE = 16


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Where the kernel stores token ``t``'s dimension ``d`` inside one (block, head) region.

    ``k_offsets[t, d]`` / ``v_offsets[t, d]`` (int64, ``[block_size, head_size]``) are element
    offsets into the flattened region ``kv_cache[b, h]`` of ``block_size * 2 * head_size``
    elements. ``k_affine`` / ``v_affine`` are ``(base, token_stride, dim_stride)`` when the
    offsets are exactly ``base + t * token_stride + d * dim_stride`` (then a strided view serves
    reads and writes), else ``None`` (generic gather/scatter through the offset tables).
    """

    head_size: int
    block_size: int
    dtype: torch.dtype
    isa: str
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor
    k_affine: tuple[int, int, int] | None
    v_affine: tuple[int, int, int] | None

    @property
    def region_size(self) -> int:
        """Elements in one (block, head) region: ``block_size * 2 * head_size``."""
        return self.block_size * 2 * self.head_size

    def describe(self) -> str:
        """Human-readable summary, e.g. ``K: column-major [D, bs] at +0; V: row-major ...``."""
        return (f"isa={self.isa} dtype={str(self.dtype).removeprefix('torch.')} "
                f"bs={self.block_size} D={self.head_size}: "
                f"K {_describe_part(self.k_affine, self)}; V {_describe_part(self.v_affine, self)}")


def _describe_part(affine: tuple[int, int, int] | None, layout: TokenLayout) -> str:
    if affine is None:
        return "packed (non-affine; generic offset tables)"
    base, st, sd = affine
    bs, d = layout.block_size, layout.head_size
    if st == 1 and sd == bs:
        kind = "column-major [D, bs]"
    elif st == d and sd == 1:
        kind = "row-major [bs, D]"
    else:
        kind = f"strided (token stride {st}, dim stride {sd})"
    return f"{kind} at region offset {base}"


def _affine_form(offsets: torch.Tensor) -> tuple[int, int, int] | None:
    """``(base, token_stride, dim_stride)`` if ``offsets[t, d]`` is affine in ``(t, d)``."""
    bs, d = offsets.shape
    base = int(offsets[0, 0])
    st = int(offsets[1, 0]) - base if bs > 1 else 0
    sd = int(offsets[0, 1]) - base if d > 1 else 0
    t = torch.arange(bs, dtype=torch.int64)[:, None]
    dd = torch.arange(d, dtype=torch.int64)[None, :]
    if torch.equal(offsets, base + t * st + dd * sd) and st >= 0 and sd >= 0:
        return base, st, sd
    return None


@functools.lru_cache(maxsize=None)
def probe_cpu_layout(reshape_and_cache: Callable[..., Any], head_size: int, block_size: int,
                     dtype: torch.dtype, isa: str) -> TokenLayout:
    """Derive the (block, head) region layout of ``reshape_and_cache`` (vLLM's
    ``ops.cpu_attn_reshape_and_cache``, handed in by the integration layer so that this module
    needs no vLLM) by probing it.

    A scratch cache of 3 physical blocks x 2 heads is filled, for two logical blocks mapped to
    physical blocks (2, 0) (block 1 must stay untouched), with values that encode
    ``(head, logical block, K-or-V, t, d)``. A code is too large to be exact in bf16, so it is
    written one base-16 digit per pass and reassembled. The probe then checks that every
    (block, head) region received exactly its own codes, each once (a bijection between the
    region's elements and its ``2 * block_size * head_size`` (K/V, t, d) triples), and that all
    regions agree, before returning the offset tables. Cached per argument tuple.
    """
    bs, D = int(block_size), int(head_size)
    H, num_logical, num_physical = 2, 2, 3
    phys = torch.tensor([2, 0], dtype=torch.int64)  # logical block i -> physical block phys[i]
    region = bs * 2 * D

    # code[h, lb, kind, t, d]
    n_codes = H * num_logical * 2 * bs * D
    codes = torch.arange(n_codes, dtype=torch.int64).view(H, num_logical, 2, bs, D)
    n_digits = max(1, math.ceil(math.log(n_codes, _PROBE_BASE)))
    slots = (phys[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)  # token-major
    decoded = torch.zeros(num_physical, H, region, dtype=torch.int64)
    for digit in range(n_digits):
        vals = (codes // _PROBE_BASE**digit) % _PROBE_BASE + 1  # 1..16
        # key/value inputs: [num_tokens, H, D], token order = logical order
        key = vals[:, :, 0].permute(1, 2, 0, 3).reshape(num_logical * bs, H, D).to(dtype)
        value = vals[:, :, 1].permute(1, 2, 0, 3).reshape(num_logical * bs, H, D).to(dtype)
        kv = torch.zeros(num_physical, H, bs, 2 * D, dtype=dtype)
        key_cache, value_cache = kv.view(num_physical, H, 2 * bs, D).chunk(2, dim=2)
        reshape_and_cache(key.contiguous(), value.contiguous(), key_cache, value_cache, slots,
                          isa)
        got = kv.view(num_physical, H, region).to(torch.float64)
        digit_vals = got.round().to(torch.int64)
        if not torch.equal(got, digit_vals.to(torch.float64)) or (digit_vals < 0).any() or (
                digit_vals > _PROBE_BASE).any():
            raise RuntimeError(f"layout probe ({isa}, {dtype}, bs={bs}, D={D}): the write op "
                               "transformed the probe values; cannot derive a layout")
        if digit == 0:
            written = digit_vals > 0
        elif not torch.equal(written, digit_vals > 0):
            raise RuntimeError("layout probe: the written element set changed between passes")
        decoded += (digit_vals - 1).clamp(min=0) * _PROBE_BASE**digit

    if written[1].any():
        raise RuntimeError(f"layout probe ({isa}): the write op touched an unmapped block")
    k_offsets = v_offsets = None
    for lb in range(num_logical):
        for h in range(H):
            if not written[phys[lb], h].all():
                raise RuntimeError(f"layout probe ({isa}): region (block {lb}, head {h}) has "
                                   "elements the write op never filled")
            c = decoded[phys[lb], h]
            # Every code in this region must belong to this (head, logical block) and be unique.
            expected = codes[h, lb].reshape(-1)
            lo = int(expected[0])
            if ((c < lo) | (c >= lo + 2 * bs * D)).any():
                raise RuntimeError(f"layout probe ({isa}): region (block {lb}, head {h}) holds "
                                   "another region's data; layout is not region-local")
            where = torch.full((2 * bs * D,), -1, dtype=torch.int64)
            where[c - lo] = torch.arange(region, dtype=torch.int64)
            if (where < 0).any():
                raise RuntimeError(f"layout probe ({isa}): some (t, d) of (block {lb}, head {h}) "
                                   "was not stored exactly once")
            where = where.view(2, bs, D)
            if k_offsets is None:
                k_offsets, v_offsets = where[0].clone(), where[1].clone()
            elif not (torch.equal(k_offsets, where[0]) and torch.equal(v_offsets, where[1])):
                raise RuntimeError(f"layout probe ({isa}): regions disagree on the layout")
    assert k_offsets is not None and v_offsets is not None
    return TokenLayout(head_size=D, block_size=bs, dtype=dtype, isa=isa, k_offsets=k_offsets,
                       v_offsets=v_offsets, k_affine=_affine_form(k_offsets),
                       v_affine=_affine_form(v_offsets))


def layout_for_cache(reshape_and_cache: Callable[..., Any], kv_cache: torch.Tensor,
                     isa: str) -> TokenLayout:
    """:func:`probe_cpu_layout` for a vLLM CPU cache tensor ``[nb, H, bs, 2*D]`` and its ISA
    string (the ``layer.isa`` that ``CPUAttentionMetadataBuilder`` sets)."""
    _, _, bs, two_d = kv_cache.shape
    return probe_cpu_layout(reshape_and_cache, two_d // 2, bs, kv_cache.dtype, isa)


def slot_mapping(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """vLLM slot ids of logical ``positions`` for a request with block table ``block_ids``."""
    positions = positions.to(torch.int64)
    return block_ids.to(torch.int64)[positions // block_size] * block_size + positions % block_size


def _check_cache(kv_cache: torch.Tensor, layout: TokenLayout) -> tuple[int, int]:
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be [num_blocks, H, block_size, 2*D], got {kv_cache.shape}")
    nb, H, bs, two_d = kv_cache.shape
    if bs != layout.block_size or two_d != 2 * layout.head_size:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not match layout "
                         f"(block_size={layout.block_size}, head_size={layout.head_size})")
    if kv_cache.dtype != layout.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != layout dtype {layout.dtype}")
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_d:
        raise ValueError("each (block, head) region of kv_cache must be contiguous, as the "
                         f"kernel requires; got strides {kv_cache.stride()}")
    return nb, H


def _indices(block_ids: torch.Tensor, positions: torch.Tensor, H: int,
             bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Broadcastable (physical block [.., n], head [H, 1], in-block index [.., n]) and n."""
    positions = positions.to(torch.int64)
    if positions.dim() == 1:
        positions = positions[None, :]  # shared by all heads; broadcasts over [H, 1]
    elif positions.dim() != 2 or positions.shape[0] != H:
        raise ValueError(f"positions must be [n] or [H={H}, n], got {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or
                              int(positions.max()) >= block_ids.numel() * bs):
        raise IndexError(f"positions out of range for {block_ids.numel()} blocks of {bs}")
    blk = block_ids.to(torch.int64)[positions // bs]
    heads = torch.arange(H, dtype=torch.int64)[:, None]
    return blk, heads, positions % bs, positions.shape[1]


def _strided_view(kv_cache: torch.Tensor, affine: tuple[int, int, int],
                  layout: TokenLayout) -> torch.Tensor:
    """``[nb, H, bs, D]`` view of one of K/V in which ``[b, h, t]`` is token t's vector."""
    base, st, sd = affine
    nb, H = kv_cache.shape[:2]
    return kv_cache.as_strided((nb, H, layout.block_size, layout.head_size),
                               (kv_cache.stride(0), kv_cache.stride(1), st, sd),
                               kv_cache.storage_offset() + base)


def _gather(kv_cache: torch.Tensor, offsets: torch.Tensor, affine: tuple[int, int, int] | None,
            layout: TokenLayout, blk: torch.Tensor, heads: torch.Tensor,
            tok: torch.Tensor) -> torch.Tensor:
    if affine is not None:
        return _strided_view(kv_cache, affine, layout)[blk, heads, tok]
    nb, H = kv_cache.shape[:2]
    regions = kv_cache.view(nb, H, layout.region_size)
    return regions[blk[..., None], heads[..., None], offsets[tok]]


def _scatter(kv_cache: torch.Tensor, offsets: torch.Tensor, affine: tuple[int, int, int] | None,
             layout: TokenLayout, blk: torch.Tensor, heads: torch.Tensor, tok: torch.Tensor,
             src: torch.Tensor) -> None:
    if affine is not None:
        _strided_view(kv_cache, affine, layout).index_put_((blk, heads, tok), src)
        return
    nb, H = kv_cache.shape[:2]
    regions = kv_cache.view(nb, H, layout.region_size)
    regions.index_put_((blk[..., None], heads[..., None], offsets[tok]), src)


def read_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor,
            layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one request's tokens at logical ``positions``, as ``[H, n, D]`` each.

    ``block_ids`` is the request's block table (logical block i -> physical block id, 1-D).
    ``positions`` is ``[n]`` (same positions for every KV head) or ``[H, n]`` (per head). Returns
    fresh tensors (copies) in the cache dtype — so the caller may overwrite the source slots
    afterwards, which compaction relies on.
    """
    _, H = _check_cache(kv_cache, layout)
    blk, heads, tok, _ = _indices(block_ids, positions, H, layout.block_size)
    keys = _gather(kv_cache, layout.k_offsets, layout.k_affine, layout, blk, heads, tok)
    values = _gather(kv_cache, layout.v_offsets, layout.v_affine, layout, blk, heads, tok)
    return keys, values


def write_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor,
             keys: torch.Tensor, values: torch.Tensor, layout: TokenLayout) -> None:
    """Store ``keys``/``values`` (``[H, n, D]``) at logical ``positions`` of one request, in place.

    The inverse of :func:`read_kv`, and byte-for-byte what ``ops.cpu_attn_reshape_and_cache``
    would store for the same slots (tests check that). ``positions`` is ``[n]`` or ``[H, n]``
    (each head its own destination slots); positions must be distinct within a head. Inputs in
    another dtype are cast to the cache dtype.
    """
    _, H = _check_cache(kv_cache, layout)
    blk, heads, tok, n = _indices(block_ids, positions, H, layout.block_size)
    shape = (H, n, layout.head_size)
    if tuple(keys.shape) != shape or tuple(values.shape) != shape:
        raise ValueError(f"keys/values must be {shape}, got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    _scatter(kv_cache, layout.k_offsets, layout.k_affine, layout, blk, heads, tok,
             keys.to(kv_cache.dtype))
    _scatter(kv_cache, layout.v_offsets, layout.v_affine, layout, blk, heads, tok,
             values.to(kv_cache.dtype))
