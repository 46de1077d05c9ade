"""The paged-cache token accessor against vLLM's real CPU attention ops (no mocks).

What these tests prove, and why each matters (``docs/design.md``, "The cache layout"):

* Round trip: K/V written by the kernel's own write op (``ops.cpu_attn_reshape_and_cache``) come
  back bit-exact through :func:`read_kv`, while the naive row read ``cache[b, h, t, :D]`` does not
  — so the tests would catch the pitfall that cost a prototype every answer.
* :func:`write_kv` stores the very bytes the kernel's write op stores, and the real attention
  kernel (``ops.cpu_attention_with_kv_cache``) over those slots matches dense fp64 attention to
  fp32 noise (a layout bug shows up as errors of 1e-1, not 1e-3).
* compaction (:func:`~vllm_snapkv.backends.compaction.move_kept` through the accessor; per-head
  kept sets, overlapping source/destination): the kernel attending over
  the compacted tail ``[E, N)`` through a block table without the first ``E / bs`` blocks equals
  dense attention over exactly each KV head's kept tokens, GQA-grouped as vLLM groups query heads.
"""

from __future__ import annotations

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

from vllm_snapkv.backends.compaction import move_kept  # noqa: E402
from vllm_snapkv.paged_kv import (  # noqa: E402
    TokenLayout,
    layout_for_cache,
    probe_cpu_layout,
    read_kv,
    slot_mapping,
    write_kv,
)

#: The kernel whose layout is probed: vLLM's own CPU write op.
WRITE = ops.cpu_attn_reshape_and_cache

#: (dtype, head_size, block_size, isa or None = what vLLM's `_get_attn_isa` picks here).
CONFIGS = [
    (dt, d, bs, None)
    for dt in (torch.float32, torch.bfloat16)
    for d in (64, 128)
    for bs in (32, 128)
] + [
    (torch.float32, 80, 32, None),  # head size not a multiple of 32: vLLM picks "vec16"
    (torch.float32, 64, 32, "vec16"),
]


def _ids(cfg) -> str:
    dt, d, bs, isa = cfg
    return f"{str(dt).removeprefix('torch.')}-D{d}-bs{bs}" + (f"-{isa}" if isa else "")


def _isa(dtype: torch.dtype, block_size: int, head_size: int, isa: str | None) -> str:
    return isa or cpu_attn._get_attn_isa(dtype, block_size, head_size, "auto")


def _layout(dtype, head_size, block_size, isa) -> tuple[TokenLayout, str]:
    isa = _isa(dtype, block_size, head_size, isa)
    return probe_cpu_layout(WRITE, head_size, block_size, dtype, isa), isa


class _Accessor:
    """The CPU adapter's accessor, spelled out: read/write through a probed layout."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout

    def read_kv(self, kv_cache, block_ids, positions):
        return read_kv(kv_cache, block_ids, positions, self.layout)

    def write_kv(self, kv_cache, block_ids, positions, keys, values):
        write_kv(kv_cache, block_ids, positions, keys, values, self.layout)


def compact(kv, block_ids, kept, dest_start, layout) -> int:
    return move_kept(_Accessor(layout), kv, block_ids, kept, dest_start)


def _split(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's own view: halves of dim 2 of ``[nb, H, 2*bs, D]``."""
    nb, h, bs, two_d = kv.shape
    return kv.view(nb, h, 2 * bs, two_d // 2).chunk(2, dim=2)


def _kernel_write(kv: torch.Tensor, block_ids: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, isa: str) -> None:
    """Write ``keys``/``values`` ``[H, N, D]`` at logical positions 0..N-1 via the kernel op."""
    n = keys.shape[1]
    slots = slot_mapping(block_ids, torch.arange(n), kv.shape[2])
    key_cache, value_cache = _split(kv)
    ops.cpu_attn_reshape_and_cache(keys.transpose(0, 1).contiguous(),
                                   values.transpose(0, 1).contiguous(), key_cache, value_cache,
                                   slots, isa)


def _kernel_attention(kv: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                      query: torch.Tensor, isa: str, scale: float) -> torch.Tensor:
    """One request through ``ops.cpu_attention_with_kv_cache``, called as the backend calls it.

    ``query`` is ``[q, Hq, D]``: the last ``q`` tokens of a ``seq_len``-token sequence, causal.
    """
    q, hq, d = query.shape
    hkv = kv.shape[1]
    qsl = torch.tensor([0, q], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=seq_lens,
        dtype=query.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    key_cache, value_cache = _split(kv)
    out = torch.zeros(q, hq, d, dtype=query.dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=block_table.to(torch.int32)[None, :], softcap=0.0,
        scheduler_metadata=meta, s_aux=None)
    return out


def _dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """fp64 reference. ``keys``/``values`` ``[Hkv, L, D]`` (each KV head its own tokens);
    query ``[q, Hq, D]`` = the last q of L tokens, causal; query head h reads KV head
    ``h // (Hq // Hkv)`` (vLLM's GQA grouping)."""
    q, hq, _ = query.shape
    hkv, length, _ = keys.shape
    group = torch.arange(hq) // (hq // hkv)
    k, v = keys.double()[group], values.double()[group]
    scores = torch.einsum("qhd,hnd->hqn", query.double(), k) * scale
    qpos = torch.arange(length - q, length)
    scores = scores.masked_fill(torch.arange(length)[None, :] > qpos[:, None], float("-inf"))
    return torch.einsum("hqn,hnd->qhd", scores.softmax(-1), v)


def _request(n: int, bs: int, hkv: int, d: int, dtype: torch.dtype, seed: int, spare: int = 3):
    """A zeroed cache pool with a shuffled block table for an ``n``-token request, and K/V."""
    gen = torch.Generator().manual_seed(seed)
    nblk = -(-n // bs)
    kv = torch.zeros(nblk + spare, hkv, bs, 2 * d, dtype=dtype)
    block_ids = torch.randperm(nblk + spare, generator=gen)[:nblk]
    keys = torch.randn(hkv, n, d, generator=gen).to(dtype)
    values = torch.randn(hkv, n, d, generator=gen).to(dtype)
    return kv, block_ids, keys, values, gen


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


# --------------------------------------------------------------------------------------------
# The probe


def _expected_offsets(isa: str, dtype: torch.dtype, head_size: int,
                      block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Element offsets of (token t, dim d) inside one (block, head) region, written down from
    the kernels' ``reshape_and_cache`` sources (``csrc/cpu/cpu_attn_vec.hpp``, ``_vec16.hpp``,
    ``_amx.hpp``), independently of the probe. ``None`` for ISAs whose packing is not written
    down here (NEON, VSX, ...): those get only the probe's own invariants."""
    bs, d = block_size, head_size
    t = torch.arange(bs, dtype=torch.int64)[:, None]
    dd = torch.arange(d, dtype=torch.int64)[None, :]
    if isa in ("vec", "vec16"):
        # "reshape K as column-major and V as row-major": K [D, bs], then V [bs, D].
        return t + dd * bs, bs * d + t * d + dd
    if isa == "amx":
        # K: one 32-bit word (2 bf16 / 1 fp32 elements) per (token, word) pair; tokens in groups
        # of 16, each group a [words, 16] tile.  V: after K; blocks of 16 head dims, each a
        # [bs / pack, 16, pack] tile (VNNI: `pack` consecutive tokens interleaved).
        pack = 4 // torch.tensor([], dtype=dtype).element_size()
        words = d // pack
        word = (t // 16) * (16 * words) + t % 16 + (dd // pack) * 16
        k = word * pack + dd % pack
        v = bs * d + (dd // 16) * (bs * 16) + (t // pack) * (pack * 16) + (dd % 16) * pack \
            + t % pack
        return k, v
    return None


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_probe_finds_known_layout(cfg) -> None:
    """Whatever ISA vLLM picks on this machine, the probe must rediscover the layout its kernel
    source describes (a changed kernel shows up here first; the accessor adapts)."""
    layout, isa = _layout(*cfg)
    dt, d, bs, _ = cfg
    expected = _expected_offsets(isa, dt, d, bs)
    if expected is None:
        # An ISA without a written-down layout: the probe's bijection checks already ran;
        # K and V must still fill the region exactly once between them.
        both = torch.cat([layout.k_offsets.flatten(), layout.v_offsets.flatten()])
        assert torch.equal(both.sort().values, torch.arange(layout.region_size))
        return
    assert torch.equal(layout.k_offsets, expected[0]), layout.describe()
    assert torch.equal(layout.v_offsets, expected[1]), layout.describe()
    if isa in ("vec", "vec16"):
        assert layout.k_affine == (0, 1, bs) and layout.v_affine == (bs * d, d, 1)
        assert "column-major [D, bs]" in layout.describe()
    elif isa == "amx":
        assert layout.k_affine is None and layout.v_affine is None  # generic path


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,bs", [(64, 32), (128, 128)])
def test_probe_finds_known_amx_layout(dt: torch.dtype, d: int, bs: int) -> None:
    """The AMX packing, on every machine: its write op runs without AMX tiles, so the probe of
    the ``amx`` ISA is checked against the kernel source's formula even where vLLM picks
    ``vec`` (machines without AMX) — and the AMX machines run it through the test above."""
    layout = _amx_layout(dt, d, bs, require_generic=False)
    k, v = _expected_offsets("amx", dt, d, bs)
    assert torch.equal(layout.k_offsets, k) and torch.equal(layout.v_offsets, v)


def test_probe_is_cached_and_layout_for_cache() -> None:
    a = probe_cpu_layout(WRITE, 64, 32, torch.float32, "vec")
    assert probe_cpu_layout(WRITE, 64, 32, torch.float32, "vec") is a
    assert layout_for_cache(WRITE, torch.zeros(2, 3, 32, 128), "vec") is a


# --------------------------------------------------------------------------------------------
# Round trip against the kernel's own write op


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_kernel_write_then_read_kv_is_exact(cfg) -> None:
    layout, isa = _layout(*cfg)
    dt, d, bs, _ = cfg
    n, hkv = 2 * bs + 37, 3
    kv, block_ids, keys, values, gen = _request(n, bs, hkv, d, dt, seed=1)
    _kernel_write(kv, block_ids, keys, values, isa)

    k_read, v_read = read_kv(kv, block_ids, torch.arange(n), layout)
    assert k_read.dtype == dt and k_read.shape == (hkv, n, d)
    assert torch.equal(k_read, keys) and torch.equal(v_read, values)

    # Per-head positions, each head its own order.
    per_head = torch.stack([torch.randperm(n, generator=gen)[:50] for _ in range(hkv)])
    k_read, v_read = read_kv(kv, block_ids, per_head, layout)
    for h in range(hkv):
        assert torch.equal(k_read[h], keys[h, per_head[h]])
        assert torch.equal(v_read[h], values[h, per_head[h]])

    # The pitfall: one key per row is NOT how the kernel stores K.
    pos = torch.arange(n)
    naive_k = kv[block_ids[pos // bs][None, :], torch.arange(hkv)[:, None], (pos % bs)[None, :], :d]
    assert not torch.equal(naive_k, keys)
    assert not torch.allclose(naive_k.float(), keys.float(), atol=1e-1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_write_kv_stores_the_kernels_bytes(cfg) -> None:
    """``write_kv`` into one zeroed pool and the kernel write op into another: identical bytes."""
    layout, isa = _layout(*cfg)
    dt, d, bs, _ = cfg
    n, hkv = bs + 19, 2
    kv, block_ids, keys, values, _ = _request(n, bs, hkv, d, dt, seed=2)
    kv_kernel = kv.clone()
    _kernel_write(kv_kernel, block_ids, keys, values, isa)
    write_kv(kv, block_ids, torch.arange(n), keys, values, layout)
    assert torch.equal(kv.view(torch.uint8), kv_kernel.view(torch.uint8))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("q", [1, 5])
def test_write_kv_then_kernel_attention_matches_dense(cfg, q: int) -> None:
    """The key test: what ``write_kv`` stores is what the attention kernel reads."""
    layout, isa = _layout(*cfg)
    dt, d, bs, _ = cfg
    n, hkv, hq = 2 * bs + 45, 3, 9
    kv, block_ids, keys, values, gen = _request(n, bs, hkv, d, dt, seed=3)
    # Per-head destinations: write head h's tokens in a head-specific order.
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(hkv)])
    idx = perms[..., None].expand(hkv, n, d)
    write_kv(kv, block_ids, perms, keys.gather(1, idx), values.gather(1, idx), layout)
    query = torch.randn(q, hq, d, generator=gen).to(dt)
    scale = d**-0.5
    out = _kernel_attention(kv, block_ids, n, query, isa, scale)
    ref = _dense_attention(query, keys, values, scale)
    if dt == torch.float32:
        assert _rel_err(out, ref) < 1e-5
    else:
        # bf16 kernel arithmetic; a layout bug would be O(1). Exactness is covered by the
        # byte-identity test and by comparing with a kernel-written cache:
        assert _rel_err(out, ref) < 1e-2
        kv_kernel = torch.zeros_like(kv)
        _kernel_write(kv_kernel, block_ids, keys, values, isa)
        assert torch.equal(out, _kernel_attention(kv_kernel, block_ids, n, query, isa, scale))


# --------------------------------------------------------------------------------------------
# Compaction


def _kept_sets(n: int, k: int, window: int, hkv: int, gen: torch.Generator) -> torch.Tensor:
    """Per-head sorted kept sets of size k: a head-specific prefix sample plus the window."""
    rows = []
    for _ in range(hkv):
        prefix = torch.randperm(n - window, generator=gen)[: k - window]
        rows.append(torch.cat([prefix.sort().values, torch.arange(n - window, n)]))
    return torch.stack(rows)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1] in (64, 80) or c[2] == 32],
                         ids=_ids)
def test_compact_to_tail_then_kernel_attention(cfg) -> None:
    layout, isa = _layout(*cfg)
    dt, d, bs, _ = cfg
    hkv, hq, window = 3, 9, 16
    n = 4 * bs + 29
    budget = bs + 40
    e = (n - budget) // bs * bs  # the design's placement: E = floor((N - b) / bs) * bs
    k = n - e
    kv, block_ids, keys, values, gen = _request(n, bs, hkv, d, dt, seed=4, spare=2)
    _kernel_write(kv, block_ids, keys, values, isa)
    # Another request's blocks in the same pool must stay untouched.
    spare = torch.tensor(sorted(set(range(kv.shape[0])) - set(block_ids.tolist())))
    kv[spare] = torch.randn(kv[spare].shape, generator=gen).to(dt)
    before = kv.clone()

    kept = _kept_sets(n, k, window, hkv, gen)
    assert not torch.equal(kept[0], kept[1])
    moved = compact(kv, block_ids, kept, e, layout)
    assert 0 < moved <= k - window  # the window is already in place: never moved

    assert torch.equal(kv[spare], before[spare])
    k_tail, v_tail = read_kv(kv, block_ids, torch.arange(e, n), layout)
    for h in range(hkv):
        assert torch.equal(k_tail[h], keys[h, kept[h]])
        assert torch.equal(v_tail[h], values[h, kept[h]])

    # The kernel over the compacted tail: drop the first E/bs blocks, seq_len N - E.
    query = torch.randn(1, hq, d, generator=gen).to(dt)
    scale = d**-0.5
    out = _kernel_attention(kv, block_ids[e // bs:], k, query, isa, scale)
    idx = kept[..., None].expand(hkv, k, d)
    ref = _dense_attention(query, keys.gather(1, idx), values.gather(1, idx), scale)
    assert _rel_err(out, ref) < (1e-5 if dt == torch.float32 else 1e-2)
    # ... and it is not what attention over the uncompacted prefix would give.
    wrong = _dense_attention(query, keys[:, n - k:], values[:, n - k:], scale)
    assert _rel_err(out, wrong) > 1e-2


@pytest.mark.parametrize("dest_start", [0, 10, 40])
def test_compact_overlap_directions(dest_start: int) -> None:
    """Sources after destinations (dest 0), mixed, and sources before destinations."""
    dt, d, bs = torch.float32, 64, 32
    layout, isa = _layout(dt, d, bs, None)
    hkv, n = 2, 3 * bs
    kv, block_ids, keys, values, gen = _request(n, bs, hkv, d, dt, seed=5)
    _kernel_write(kv, block_ids, keys, values, isa)
    k = 40
    # Head 0: a dense run straddling the destination; head 1: scattered.
    kept = torch.stack([torch.arange(20, 20 + k),
                        torch.randperm(n, generator=gen)[:k].sort().values])
    compact(kv, block_ids, kept, dest_start, layout)
    k_read, v_read = read_kv(kv, block_ids, torch.arange(dest_start, dest_start + k), layout)
    for h in range(hkv):
        assert torch.equal(k_read[h], keys[h, kept[h]])
        assert torch.equal(v_read[h], values[h, kept[h]])


def test_compact_identity_moves_nothing() -> None:
    dt, d, bs = torch.float32, 64, 32
    layout, isa = _layout(dt, d, bs, None)
    kv, block_ids, keys, values, _ = _request(70, bs, 2, d, dt, seed=6)
    _kernel_write(kv, block_ids, keys, values, isa)
    before = kv.clone()
    assert compact(kv, block_ids, torch.arange(30, 70).expand(2, 40), 30, layout) == 0
    assert torch.equal(kv, before)


# --------------------------------------------------------------------------------------------
# The generic (non-affine) path, exercised with the AMX packing's write op


def _amx_layout(dt: torch.dtype, d: int, bs: int, require_generic: bool = True) -> TokenLayout:
    try:
        layout = probe_cpu_layout(WRITE, d, bs, dt, "amx")
    except Exception as exc:  # a vLLM build compiled without the AMX kernel refuses "amx"
        pytest.skip(f"this vLLM build has no amx write op: {exc}")
    if require_generic and layout.k_affine is not None and layout.v_affine is not None:
        pytest.skip("amx packing is affine in this build; generic path not exercised")
    return layout


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_generic_offsets_path_with_amx_packing(dt: torch.dtype) -> None:
    """AMX packs K (and V) non-affinely; its reshape op runs without AMX tiles, so the generic
    gather/scatter path can be checked against it byte for byte (the AMX attention kernel itself
    cannot run on a machine without AMX, so no attention check here)."""
    d, bs, hkv = 64, 32, 2
    layout = _amx_layout(dt, d, bs)
    n = 2 * bs + 11
    kv, block_ids, keys, values, gen = _request(n, bs, hkv, d, dt, seed=7)
    kv_kernel = kv.clone()
    _kernel_write(kv_kernel, block_ids, keys, values, "amx")
    k_read, v_read = read_kv(kv_kernel, block_ids, torch.arange(n), layout)
    assert torch.equal(k_read, keys) and torch.equal(v_read, values)
    write_kv(kv, block_ids, torch.arange(n), keys, values, layout)
    assert torch.equal(kv.view(torch.uint8), kv_kernel.view(torch.uint8))

    kept = _kept_sets(n, 30, 8, hkv, gen)
    compact(kv, block_ids, kept, n - 30, layout)
    k_tail, v_tail = read_kv(kv, block_ids, torch.arange(n - 30, n), layout)
    for h in range(hkv):
        assert torch.equal(k_tail[h], keys[h, kept[h]])
        assert torch.equal(v_tail[h], values[h, kept[h]])


# --------------------------------------------------------------------------------------------
# Views and argument checking


def test_works_on_a_view_of_a_larger_allocation() -> None:
    """vLLM may hand the backend a view (e.g. one layer of a shared buffer): strides of the block
    and head dims are taken from the tensor, and writes go to the underlying storage."""
    dt, d, bs, hkv = torch.float32, 64, 32, 2
    layout, isa = _layout(dt, d, bs, None)
    n = 50
    big = torch.zeros(2, 5, hkv, bs, 2 * d, dtype=dt)  # [layers, blocks, H, bs, 2D]
    kv = big[1]
    _, block_ids, keys, values, _ = _request(n, bs, hkv, d, dt, seed=8)
    block_ids = torch.tensor([3, 1])
    _kernel_write(kv, block_ids, keys, values, isa)
    k_read, v_read = read_kv(kv, block_ids, torch.arange(n), layout)
    assert torch.equal(k_read, keys) and torch.equal(v_read, values)
    write_kv(kv, block_ids, torch.arange(n), values, keys, layout)  # swap K and V
    assert big[0].abs().sum() == 0
    k_read, v_read = read_kv(big[1], block_ids, torch.arange(n), layout)
    assert torch.equal(k_read, values) and torch.equal(v_read, keys)


def test_argument_checks() -> None:
    layout = probe_cpu_layout(WRITE, 64, 32, torch.float32, "vec")
    kv = torch.zeros(4, 2, 32, 128)
    block_ids = torch.tensor([2, 0])
    with pytest.raises(ValueError):
        read_kv(torch.zeros(4, 2, 16, 128), block_ids, torch.arange(3), layout)
    with pytest.raises(ValueError):
        read_kv(kv.bfloat16(), block_ids, torch.arange(3), layout)
    with pytest.raises(ValueError):
        read_kv(kv, block_ids, torch.zeros(3, 5, dtype=torch.int64), layout)
    with pytest.raises(IndexError):
        read_kv(kv, block_ids, torch.tensor([64]), layout)
    with pytest.raises(ValueError):
        write_kv(kv, block_ids, torch.arange(3), torch.zeros(2, 4, 64), torch.zeros(2, 4, 64),
                 layout)
    with pytest.raises(ValueError):
        compact(kv, block_ids, torch.arange(4), 0, layout)  # kept must be [H, k]
