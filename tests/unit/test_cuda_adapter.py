"""The CUDA (FlashAttention) adapter, as far as a machine without a GPU can check it.

What runs here (CPU tensors, vLLM 0.32's own Python sources; no FlashAttention kernels):

* ``vllm_snapkv.integration.attention_cuda`` imports on the CPU build of vLLM, registers nothing on import,
  and declares ``AttentionCGSupport.NEVER`` (full CUDA graphs cannot replay the host-side
  compaction).
* The cache accessor against a plain-torch transcription of ``reshape_and_cache_flash``'s write
  (``csrc/cache_kernels.cu``: slot = block * bs + offset; address = block * stride(0) +
  offset * stride(1) + head * stride(2) + d on the ``key_cache``/``value_cache`` views that
  ``FlashAttentionImpl.do_kv_cache_update`` passes), on caches laid out by vLLM's own
  ``create_kv_cache_views`` in **every** ``KVCacheLayout`` (NHD = LBNHC, HND = LBHNC and the
  block-/head-major variants), two layers sharing one allocation: exact round trips, identical
  bytes, compaction with per-head kept sets, neighbours untouched.
* The builder's shift into persistent buffers (same addresses every step; inputs unmodified; no
  device-to-host read: run on ``meta`` tensors), and a two-step flow (prefill completes ->
  compaction; decode reads the shifted table) through the real builder/impl subclasses with the
  parent ``build``/``forward`` replaced by an emulation of FlashAttention's paged semantics.
* The plugin's CUDA wiring (``CUSTOM`` backend, GPU worker, V1 model runner, refusals) with the
  platform faked, and the lazy worker classes (importing ``vllm_snapkv.integration.worker`` must not import
  vLLM's CPU worker, which monkeypatches ``torch.cuda``).

What needs a GPU (skipped here, with the reason): the real ``reshape_and_cache_flash`` op vs.
the accessor, and an engine run (``docs/cuda.md`` has the commands).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

cuda_mod = pytest.importorskip(
    "vllm_snapkv.integration.attention_cuda",
    reason="vLLM's flash_attn backend module does not import on this vLLM build")
kvi = pytest.importorskip("vllm.v1.kv_cache_interface")

from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.flash_attn import (  # noqa: E402
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from vllm_snapkv.backends import compaction  # noqa: E402
from vllm_snapkv.backends import plan as stepplan
from vllm_snapkv.integration.metadata import shift_common_metadata  # noqa: E402
from vllm_snapkv.backends.state import RunnerState  # noqa: E402
from vllm_snapkv.integration.attention_cuda import (  # noqa: E402
    FlashAttnCacheAccessor,
    SnapKVFlashAttentionBackend,
    SnapKVFlashAttentionImpl,
    SnapKVFlashAttentionMetadata,
    SnapKVFlashAttentionMetadataBuilder,
)
from vllm_snapkv.config import RequestPlan  # noqa: E402
from vllm_snapkv.schedule import Schedule  # noqa: E402
from vllm_snapkv.selection import select_tokens_with_settings  # noqa: E402
from vllm_snapkv.settings import CompressionSettings  # noqa: E402

LAYOUTS = list(KVCacheLayout)
HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Caches as vLLM allocates them, and the kernel's write, in plain torch


def _caches(layout: KVCacheLayout, num_blocks: int, hkv: int, bs: int, d: int,
            dtype: torch.dtype, num_layers: int = 2, device: str = "cpu") -> list[torch.Tensor]:
    """Per-layer logical ``[B, H, N, 2D]`` views of one shared allocation, built by vLLM's own
    ``create_kv_cache_views`` (what the GPU model runner hands to the attention backend)."""
    spec = kvi.FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=d, dtype=dtype)
    strides = kvi.compute_layout_strides(spec, num_blocks, num_layers, layout)
    size = spec.page_size_bytes * num_blocks * num_layers
    tensor = kvi.KVCacheTensor(size=size, layers=[f"l{i}" for i in range(num_layers)],
                               layer_stride=strides[0], block_stride=strides[1])
    raw = torch.zeros(size, dtype=torch.int8, device=device)
    return kvi.create_kv_cache_views(raw, spec, num_blocks, layout, tensor)


def _storage(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``'s storage as a flat tensor of its dtype."""
    return torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


def _reshape_and_cache_flash(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """Plain-torch transcription of ``reshape_and_cache_flash`` (``kv_cache_dtype="auto"``) as
    ``FlashAttentionImpl.do_kv_cache_update`` calls it: ``key``/``value`` ``[T, H, D]``; token i
    goes to ``slot_mapping[i]`` (skipped when < 0) by raw address arithmetic on the strides of
    the ``key_cache``/``value_cache`` views, exactly as the CUDA kernel computes them."""
    d = key.shape[-1]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)  # do_kv_cache_update
    bs = key_cache.shape[1]
    for src, cache in ((key, key_cache), (value, value_cache)):
        assert cache.stride(3) == 1 and cache.stride(0) == key_cache.stride(0)
        flat = _storage(cache)
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(torch.int64)
        blk, off = slots // bs, slots % bs
        h = torch.arange(src.shape[1])
        addr = (cache.storage_offset() + blk[:, None, None] * cache.stride(0)
                + off[:, None, None] * cache.stride(1) + h[None, :, None] * cache.stride(2)
                + torch.arange(d)[None, None, :])
        flat[addr.to(flat.device)] = src[keep].to(cache.dtype)


def _slots(block_ids: torch.Tensor, positions: torch.Tensor, bs: int) -> torch.Tensor:
    positions = positions.to(torch.int64)
    return block_ids.to(torch.int64)[positions // bs] * bs + positions % bs


def _request(n: int, bs: int, hkv: int, d: int, dtype: torch.dtype, num_blocks: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    nblk = -(-n // bs)
    block_ids = torch.randperm(num_blocks, generator=gen)[:nblk]
    keys = torch.randn(hkv, n, d, generator=gen).to(dtype)
    values = torch.randn(hkv, n, d, generator=gen).to(dtype)
    return block_ids, keys, values, gen


def _fa_paged_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int):
    """What FlashAttention reads for one request: ``k_cache[page_table[p // bs], p % bs, h]``
    on the ``key_cache``/``value_cache`` views its forward passes -> ``[H, seq_len, D]``."""
    d = kv_cache.shape[-1] // 2
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    pos = torch.arange(seq_len)
    blk, off = block_row.to(torch.int64)[pos // kv_cache.shape[2]], pos % kv_cache.shape[2]
    return key_cache[blk, off].transpose(0, 1), value_cache[blk, off].transpose(0, 1)


def _dense(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """fp64 causal GQA attention: query ``[q, Hq, D]`` = the last q of the keys' L tokens."""
    q, hq, _ = query.shape
    hkv, length, _ = keys.shape
    group = torch.arange(hq) // (hq // hkv)
    k, v = keys.double()[group], values.double()[group]
    scores = torch.einsum("qhd,hnd->hqn", query.double(), k) * scale
    qpos = torch.arange(length - q, length)
    scores = scores.masked_fill(torch.arange(length)[None, :] > qpos[:, None], float("-inf"))
    return torch.einsum("hqn,hnd->qhd", scores.softmax(-1), v)


# --------------------------------------------------------------------------------------------
# Import, registration surface, graph support


def test_module_imports_without_cuda_and_subclasses_flash_attention() -> None:
    assert issubclass(SnapKVFlashAttentionBackend, FlashAttentionBackend)
    assert SnapKVFlashAttentionBackend.get_impl_cls() is SnapKVFlashAttentionImpl
    assert SnapKVFlashAttentionBackend.get_builder_cls() is SnapKVFlashAttentionMetadataBuilder
    assert issubclass(SnapKVFlashAttentionImpl, FlashAttentionImpl)
    assert issubclass(SnapKVFlashAttentionMetadata, FlashAttentionMetadata)
    # Same name as FLASH_ATTN: vLLM maps get_name() back to the enum and keys FA checks on it.
    assert SnapKVFlashAttentionBackend.get_name() == "FLASH_ATTN"
    assert not SnapKVFlashAttentionBackend.forward_includes_kv_cache_update


def test_builder_declares_no_cuda_graph_support() -> None:
    b = SnapKVFlashAttentionMetadataBuilder
    assert issubclass(b, FlashAttentionMetadataBuilder)
    assert b.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert b.supports_update_block_table is False


def test_importing_adapter_registers_nothing() -> None:
    code = ("import vllm_snapkv.integration.attention_cuda\n"
            "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
            "try:\n    print(E.CUSTOM.get_path())\nexcept ValueError:\n    print('unset')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "unset"


# --------------------------------------------------------------------------------------------
# The accessor against the kernel's write, every layout


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda x: str(x).removeprefix("torch."))
def test_kernel_write_then_read_kv_is_exact(layout, dtype) -> None:
    hkv, bs, d, n, nb = 3, 16, 32, 75, 9
    layer0, layer1 = _caches(layout, nb, hkv, bs, d, dtype)
    block_ids, keys, values, gen = _request(n, bs, hkv, d, dtype, nb, seed=1)
    slots = _slots(block_ids, torch.arange(n), bs)
    slots[5] = -1  # a padding token: the kernel skips it
    _reshape_and_cache_flash(keys.transpose(0, 1), values.transpose(0, 1), layer0, slots)
    acc = FlashAttnCacheAccessor(d)
    k, v = acc.read_kv(layer0, block_ids, torch.arange(n))
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False
    assert torch.equal(k[:, mask], keys[:, mask]) and torch.equal(v[:, mask], values[:, mask])
    assert not k[:, 5].any() and not v[:, 5].any()
    assert not layer1.any()  # the other layer sharing the allocation is untouched
    # Per-head positions.
    pos = torch.stack([torch.randperm(n, generator=gen)[:10] for _ in range(hkv)])
    pos[pos == 5] = 6
    kh, vh = acc.read_kv(layer0, block_ids, pos)
    for h in range(hkv):
        assert torch.equal(kh[h], keys[h, pos[h]]) and torch.equal(vh[h], values[h, pos[h]])


def test_layouts_really_differ_in_memory() -> None:
    """Guards the test above: reading the allocation as a dense [B, H, N, 2D] tensor (i.e.
    trusting the shape, not the strides) is right for LBHNC only."""
    hkv, bs, d, n, nb = 3, 16, 32, 64, 6
    block_ids, keys, values, _ = _request(n, bs, hkv, d, torch.float32, nb, seed=2)
    for layout in LAYOUTS:
        kv = _caches(layout, nb, hkv, bs, d, torch.float32)[0]
        _reshape_and_cache_flash(keys.transpose(0, 1), values.transpose(0, 1), kv,
                                 _slots(block_ids, torch.arange(n), bs))
        dense = torch.as_strided(kv, kv.shape, torch.empty(kv.shape).stride(),
                                 kv.storage_offset())
        naive = dense[block_ids.repeat_interleave(bs)[:n], :, torch.arange(n) % bs, :d]
        assert torch.equal(naive.transpose(0, 1), keys) == (layout == KVCacheLayout.LBHNC)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_write_kv_stores_the_kernels_bytes(layout) -> None:
    hkv, bs, d, n, nb = 2, 16, 64, 40, 5
    block_ids, keys, values, _ = _request(n, bs, hkv, d, torch.bfloat16, nb, seed=3)
    ours, theirs = (_caches(layout, nb, hkv, bs, d, torch.bfloat16) for _ in range(2))
    FlashAttnCacheAccessor(d).write_kv(ours[0], block_ids, torch.arange(n), keys, values)
    _reshape_and_cache_flash(keys.transpose(0, 1), values.transpose(0, 1), theirs[0],
                             _slots(block_ids, torch.arange(n), bs))
    assert torch.equal(_storage(ours[0]).view(torch.int16), _storage(theirs[0]).view(torch.int16))


def _kept_sets(n: int, k: int, window: int, hkv: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(hkv):
        prefix = torch.randperm(n - window, generator=gen)[: k - window]
        rows.append(torch.cat([prefix.sort().values, torch.arange(n - window, n)]))
    return torch.stack(rows)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_compact_to_tail_then_paged_attention(layout) -> None:
    hkv, hq, bs, d, window = 3, 9, 16, 32, 8
    n, budget = 6 * bs + 5, 2 * bs + 3
    e = (n - budget) // bs * bs
    k = n - e
    nb = 10
    layer0, layer1 = _caches(layout, nb, hkv, bs, d, torch.float32)
    block_ids, keys, values, gen = _request(n, bs, hkv, d, torch.float32, nb, seed=4)
    _reshape_and_cache_flash(keys.transpose(0, 1), values.transpose(0, 1), layer0,
                             _slots(block_ids, torch.arange(n), bs))
    spare = torch.tensor(sorted(set(range(nb)) - set(block_ids.tolist())))
    layer0[spare] = torch.randn(layer0[spare].shape, generator=gen)
    layer1.copy_(torch.randn(layer1.shape, generator=gen))
    before0, before1 = layer0.clone(), layer1.clone()

    kept = _kept_sets(n, k, window, hkv, gen)
    moved = compaction.move_kept(FlashAttnCacheAccessor(d), layer0, block_ids, kept, e)
    assert 0 < moved <= k - window  # the window is in place already: never moved
    assert torch.equal(layer0[spare], before0[spare]) and torch.equal(layer1, before1)
    k_tail, v_tail = _fa_paged_kv(layer0, block_ids[e // bs:], k)
    for h in range(hkv):
        assert torch.equal(k_tail[h], keys[h, kept[h]])
        assert torch.equal(v_tail[h], values[h, kept[h]])
    # Paged attention (FA's semantics) over the shifted table == dense over the kept tokens.
    query = torch.randn(1, hq, d, generator=gen)
    scale = d**-0.5
    ref = _dense(query, keys.gather(1, kept[..., None].expand(-1, -1, d)),
                 values.gather(1, kept[..., None].expand(-1, -1, d)), scale)
    got = _dense(query, k_tail, v_tail, scale)
    assert float((got - ref).abs().max()) < 1e-12


def test_compact_identity_and_overlap() -> None:
    hkv, bs, d, n, nb = 2, 16, 32, 48, 4
    kv = _caches(KVCacheLayout.LBNHC, nb, hkv, bs, d, torch.float32)[0]
    block_ids, keys, values, gen = _request(n, bs, hkv, d, torch.float32, nb, seed=5)
    acc = FlashAttnCacheAccessor(d)
    acc.write_kv(kv, block_ids, torch.arange(n), keys, values)
    before = kv.clone()
    assert compaction.move_kept(acc, kv, block_ids, torch.arange(10, n).expand(hkv, -1), 10) == 0
    assert torch.equal(kv, before)
    for dest in (0, 5, 20):
        acc.write_kv(kv, block_ids, torch.arange(n), keys, values)
        kept = torch.stack([torch.arange(12, 40),
                            torch.randperm(n, generator=gen)[:28].sort().values])
        compaction.move_kept(acc, kv, block_ids, kept, dest)
        got_k, got_v = acc.read_kv(kv, block_ids, torch.arange(dest, dest + 28))
        for h in range(hkv):
            assert torch.equal(got_k[h], keys[h, kept[h]])
            assert torch.equal(got_v[h], values[h, kept[h]])


def test_accessor_refuses_fp8_and_bad_shapes() -> None:
    for dt in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        with pytest.raises(NotImplementedError, match="kv-cache-dtype"):
            FlashAttnCacheAccessor(64, dt)
    acc = FlashAttnCacheAccessor(8)
    with pytest.raises(NotImplementedError, match="fp8"):
        acc.read_kv(torch.zeros(2, 1, 4, 16, dtype=torch.uint8), torch.tensor([0]),
                    torch.arange(2))
    with pytest.raises(ValueError, match="2\\*8"):
        acc.read_kv(torch.zeros(2, 1, 4, 32), torch.tensor([0]), torch.arange(2))
    with pytest.raises(IndexError):
        acc.read_kv(torch.zeros(2, 1, 4, 16), torch.tensor([0]), torch.arange(5))


# --------------------------------------------------------------------------------------------
# Builder: the shift into persistent buffers


def _builder(bs: int, max_num_seqs: int = 8) -> SnapKVFlashAttentionMetadataBuilder:
    """The subclass without FlashAttentionMetadataBuilder.__init__ (needs a CUDA vLLM config):
    only the attributes the SnapKV part uses."""
    b = object.__new__(SnapKVFlashAttentionMetadataBuilder)
    b.block_size = bs
    b.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
    b._snapkv_state = RunnerState(b.vllm_config)
    b._snapkv_seq_lens = b._snapkv_block_table = None
    return b


def _shifted_row(row: int, n: int, e: int, bs: int, nc: int) -> stepplan.RowPlan:
    schedule = Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=n - e)
    assert schedule.evicted_at(nc) == e
    return stepplan.RowPlan(row, f"r{row}", row, row + 1, nc, CompressionSettings(budget=n - e),
                            schedule, e, (), None)


def _cm(seq_lens, block_table, qsl, ub=True) -> CommonAttentionMetadata:
    r = len(qsl) - 1
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.cpu(), seq_lens=seq_lens, num_reqs=r,
        num_actual_tokens=int(qsl[-1]), max_query_len=int((qsl[1:] - qsl[:-1]).max()),
        max_seq_len=int(seq_lens.max()) if seq_lens.device.type == "cpu" else 10**6,
        block_table_tensor=block_table,
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64),
        seq_lens_cpu_upper_bound=(torch.tensor([300, 70, 500], dtype=torch.int32) if ub
                                  else None))


def test_shift_into_persistent_buffers_keeps_addresses() -> None:
    bs = 16
    b = _builder(bs)
    bt = torch.arange(3 * 40, dtype=torch.int32).view(3, 40)
    seq = torch.tensor([300, 70, 500], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    plan = stepplan.StepPlan((_shifted_row(0, 290, 256, bs, 299),
                              _shifted_row(2, 400, 128, bs, 499)))
    bt0, seq0 = bt.clone(), seq.clone()
    ptrs = set()
    for _ in range(2):
        out_s, out_b = b.snapkv_buffers(seq, bt)
        cm = shift_common_metadata(_cm(seq, bt, qsl), plan, bs, out_seq_lens=out_s,
                                        out_block_table=out_b)
        ptrs.add((cm.seq_lens.data_ptr(), cm.block_table_tensor.data_ptr()))
    assert len(ptrs) == 1  # the same builder-owned memory every step
    assert cm.seq_lens.data_ptr() == b._snapkv_seq_lens.data_ptr()
    assert b._snapkv_seq_lens.shape[0] == 8  # sized for max_num_seqs up front
    assert torch.equal(bt, bt0) and torch.equal(seq, seq0)  # inputs untouched
    ref_s, ref_b = stepplan.shift_rows(seq, bt, plan.shifted, bs)
    assert torch.equal(cm.seq_lens, ref_s) and torch.equal(cm.block_table_tensor, ref_b)
    assert cm.seq_lens.tolist() == [44, 70, 372]
    assert cm.block_table_tensor[0, :24].tolist() == list(range(16, 40))
    assert not cm.block_table_tensor[0, 24:].any()
    assert cm.block_table_tensor[2, :32].tolist() == list(range(88, 120))
    assert cm.seq_lens_cpu_upper_bound.tolist() == [44, 70, 372]
    assert cm.max_seq_len == 372


def test_shift_on_a_device_reads_nothing_back() -> None:
    """On a device, max_seq_len comes from the CPU upper bound: with ``meta`` tensors (which
    hold no data, so any read-back would raise) the shift still goes through."""
    bs = 16
    b = _builder(bs)
    bt = torch.empty(3, 40, dtype=torch.int32, device="meta")
    seq = torch.empty(3, dtype=torch.int32, device="meta")
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    plan = stepplan.StepPlan((_shifted_row(0, 290, 256, bs, 299),))
    out_s, out_b = b.snapkv_buffers(seq, bt)
    cm = shift_common_metadata(_cm(seq, bt, qsl), plan, bs, out_seq_lens=out_s,
                                    out_block_table=out_b)
    assert cm.seq_lens.device.type == "meta" and cm.max_seq_len == 500
    cm = shift_common_metadata(_cm(seq, bt, qsl, ub=False), plan, bs,
                                    out_seq_lens=out_s, out_block_table=out_b)
    assert cm.max_seq_len == 10**6  # no upper bound: the old (upper-bound) value stays


# --------------------------------------------------------------------------------------------
# Builder + impl through a whole request (FlashAttention's kernels emulated)


def _fa_build_emulation(self, common_prefix_len, cm, fast_build=False):
    return FlashAttentionMetadata(
        num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
        query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
        block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping)


def _fa_forward_emulation(self, layer, query, key, value, kv_cache, md, output,
                          output_scale=None, output_block_scale=None):
    """FlashAttention's varlen paged forward, in fp64 torch: per row, causal attention of its
    queries over ``seq_lens[row]`` tokens read through ``block_table[row]``."""
    qsl = md.query_start_loc.tolist()
    for r in range(len(qsl) - 1):
        k, v = _fa_paged_kv(kv_cache, md.block_table[r], int(md.seq_lens[r]))
        out = _dense(query[qsl[r]:qsl[r + 1]], k, v, self.scale)
        output[qsl[r]:qsl[r + 1]] = out.reshape(out.shape[0], -1).to(output.dtype)
    return output


def _impl(hq: int, hkv: int, d: int) -> SnapKVFlashAttentionImpl:
    impl = object.__new__(SnapKVFlashAttentionImpl)
    impl.__dict__.update(num_heads=hq, num_kv_heads=hkv, head_size=d, scale=d**-0.5,
                         sliding_window=(-1, -1), alibi_slopes=None, sinks=None,
                         logits_soft_cap=0, kv_sharing_target_layer_name=None,
                         kv_cache_dtype="auto", attn_type="decoder", dcp_world_size=1)
    return impl


@pytest.mark.parametrize("layout", [KVCacheLayout.LBNHC, KVCacheLayout.LBHNC],
                         ids=lambda x: x.name)
def test_prefill_compaction_then_shifted_decode(layout, monkeypatch) -> None:
    monkeypatch.setattr(FlashAttentionMetadataBuilder, "build", _fa_build_emulation)
    monkeypatch.setattr(FlashAttentionImpl, "forward", _fa_forward_emulation)
    from vllm.v1.attention.backend import AttentionType
    hkv, hq, d, bs, nb = 2, 6, 32, 16, 12
    n, budget = 7 * bs + 3, 3 * bs
    settings = CompressionSettings(budget=budget, window=8, kernel=5)
    schedule = Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=budget)
    e = schedule.prompt_compaction.evicted
    assert e == 4 * bs
    impl = _impl(hq, hkv, d)
    impl.attn_type = AttentionType.DECODER
    b = _builder(bs)
    state = b._snapkv_state
    state.set_debug(True)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    kv = _caches(layout, nb, hkv, bs, d, torch.float32, num_layers=1)[0]
    gen = torch.Generator().manual_seed(7)
    block_ids = torch.randperm(nb, generator=gen)[:-(-(n + 1) // bs)].to(torch.int32)
    bt = torch.zeros(1, 12, dtype=torch.int32)
    bt[0, : block_ids.numel()] = block_ids
    keys = torch.randn(n + 1, hkv, d, generator=gen)
    values = torch.randn(n + 1, hkv, d, generator=gen)
    queries = torch.randn(n + 1, hq, d, generator=gen)

    def step(nc: int, qlen: int) -> torch.Tensor:
        state.current_rows = (stepplan.RowState("req", nc, RequestPlan(settings, schedule)),)
        pos = torch.arange(nc, nc + qlen)
        _reshape_and_cache_flash(keys[pos], values[pos], kv, _slots(block_ids, pos, bs))
        qsl = torch.tensor([0, qlen], dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, num_reqs=1, num_actual_tokens=qlen,
            seq_lens=torch.tensor([nc + qlen], dtype=torch.int32), max_query_len=qlen,
            max_seq_len=nc + qlen, block_table_tensor=bt.clone(),
            slot_mapping=_slots(block_ids, pos, bs),
            seq_lens_cpu_upper_bound=torch.tensor([nc + qlen], dtype=torch.int32))
        md = b.build(0, cm)
        assert isinstance(md, SnapKVFlashAttentionMetadata)
        out = torch.zeros(qlen, hq * d)
        impl.forward(layer, queries[pos], keys[pos], values[pos], kv, md, out)
        return md, out

    # Step 1: the whole prompt; attention sees all N tokens, then the layer is compacted.
    md, out = step(0, n)
    assert [t.req_id for t in md.snapkv_plan.compacting] == ["req"]
    assert int(md.seq_lens[0]) == n and md.block_table is not b._snapkv_block_table
    full_ref = _dense(queries[:n], keys[:n].transpose(0, 1), values[:n].transpose(0, 1),
                      impl.scale)
    assert float((out.view(n, hq, d).double() - full_ref).abs().max()) < 1e-5
    q_win = queries[n - 8:n].transpose(0, 1)
    kept = select_tokens_with_settings(q_win, keys[:n].transpose(0, 1), settings, keep=n - e)
    acc = FlashAttnCacheAccessor(d)
    k_tail, v_tail = acc.read_kv(kv, block_ids, torch.arange(e, n))
    for h in range(hkv):
        assert torch.equal(k_tail[h], keys[kept[h], h]) and torch.equal(v_tail[h],
                                                                        values[kept[h], h])
    rec = state.compactions["req"]
    assert (rec["prompt_len"], rec["evicted"], rec["kept"], rec["layers"]) == (n, e, n - e, 1)

    # Step 2: one decode token; the builder shifts into its buffers, attention reads N+1-E.
    md, out = step(n, 1)
    assert [r.req_id for r in md.snapkv_plan.shifted] == ["req"]
    assert int(md.seq_lens[0]) == n + 1 - e and md.max_seq_len == n + 1 - e
    assert md.seq_lens.data_ptr() == b._snapkv_seq_lens.data_ptr()
    assert md.block_table.data_ptr() == b._snapkv_block_table.data_ptr()
    assert torch.equal(md.block_table[0, : bt.shape[1] - e // bs], bt[0, e // bs:])
    assert torch.equal(md.unshifted_block_table, bt)
    idx = torch.cat([kept, torch.full((hkv, 1), n)], dim=1)
    ref = _dense(queries[n:n + 1], torch.stack([keys[idx[h], h] for h in range(hkv)]),
                 torch.stack([values[idx[h], h] for h in range(hkv)]), impl.scale)
    assert float((out.view(1, hq, d).double() - ref).abs().max()) < 1e-5
    dbg = state.debug
    assert dbg.checks["req"] == 1 and dbg.slot_err["req"] == 0.0 and dbg.max_err["req"] < 1e-5


def test_impl_refuses_unsupported_layers(monkeypatch) -> None:
    monkeypatch.setattr(FlashAttentionImpl, "forward", lambda self, *a, **k: a[5])
    from vllm.v1.attention.backend import AttentionType
    plan = stepplan.StepPlan((_shifted_row(0, 290, 256, 16, 299),))
    md = SimpleNamespace(snapkv_plan=plan, snapkv_state=RunnerState(object()),
                         unshifted_block_table=None)
    layer = SimpleNamespace(layer_name="l0")
    for change, what in ((dict(sliding_window=(127, 0)), "sliding-window"),
                         (dict(kv_sharing_target_layer_name="l0"), "KV sharing"),
                         (dict(logits_soft_cap=30.0), "soft-capping"),
                         (dict(kv_cache_dtype="fp8"), "kv-cache-dtype")):
        impl = _impl(2, 1, 8)
        impl.attn_type = AttentionType.DECODER
        impl.__dict__.update(change)
        with pytest.raises(NotImplementedError, match=what):
            impl.forward(layer, torch.zeros(1, 2, 8), None, None, None, md, torch.zeros(1, 16))


# --------------------------------------------------------------------------------------------
# Plugin wiring on a (faked) CUDA platform; lazy worker classes


class _FakeCuda:
    def is_cpu(self) -> bool:
        return False

    def is_cuda(self) -> bool:
        return True


@pytest.fixture
def fake_cuda(monkeypatch):
    import vllm.platforms
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(vllm.platforms, "current_platform", _FakeCuda())
    saved = dict(registry._ATTN_OVERRIDES)
    yield
    registry._ATTN_OVERRIDES.clear()
    registry._ATTN_OVERRIDES.update(saved)
    selector._cached_get_attn_backend.cache_clear()


def _parallel(worker_cls: str = "vllm.v1.worker.gpu_worker.Worker", tp: int = 1,
              pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(worker_cls=worker_cls, tensor_parallel_size=tp,
                           pipeline_parallel_size=pp)


def _vllm_config(**att):
    from vllm.config import AttentionConfig
    from vllm.config.compilation import CompilationMode

    return SimpleNamespace(
        parallel_config=_parallel(),
        compilation_config=SimpleNamespace(mode=CompilationMode.NONE),  # eager: CPU-only limit
        model_config=SimpleNamespace(get_total_num_kv_heads=lambda: 4),
        scheduler_config=SimpleNamespace(async_scheduling=False, scheduler_cls=None),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        attention_config=AttentionConfig(**att), use_v2_model_runner=False)


def test_plugin_wires_cuda(fake_cuda) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_snapkv.integration import plugin
    from vllm_snapkv.integration.scheduler import scheduler_class_for

    for backend, pp in ((None, 1), ("FLASH_ATTN", 1), ("CUSTOM", 1), (None, 2)):
        cfg = _vllm_config(backend=backend)
        cfg.parallel_config = _parallel(pp=pp)  # pipeline stages are wired like one device
        plugin._wire_vllm_config(cfg)
        assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
        assert cfg.parallel_config.worker_cls == "vllm_snapkv.integration.worker.SnapKVGPUWorker"
        assert cfg.scheduler_config.scheduler_cls == scheduler_class_for(False)
    assert AttentionBackendEnum.CUSTOM.get_path() == \
        "vllm_snapkv.integration.attention_cuda.SnapKVFlashAttentionBackend"
    assert AttentionBackendEnum.CUSTOM.get_class() is SnapKVFlashAttentionBackend


def test_plugin_refuses_what_cuda_cannot_do(fake_cuda) -> None:
    from vllm_snapkv.integration import plugin

    cases = [
        (dict(cache_config=SimpleNamespace(cache_dtype="fp8", block_size=16)), "kv-cache-dtype fp8"),
        (dict(use_v2_model_runner=True), "V1 model runner"),
        (dict(parallel_config=_parallel("my.Worker")), "worker-cls"),
        (dict(parallel_config=_parallel(tp=8)), "--tensor-parallel-size 8 exceeds the model's 4"),
    ]
    for change, match in cases:
        cfg = _vllm_config()
        cfg.__dict__.update(change)
        with pytest.raises(ValueError, match=match):
            plugin._wire_vllm_config(cfg)
    with pytest.raises(ValueError, match="TRITON_ATTN"):
        plugin._wire_vllm_config(_vllm_config(backend="TRITON_ATTN"))


def test_plugin_asks_for_the_v1_model_runner(fake_cuda, monkeypatch) -> None:
    from vllm_snapkv.integration import plugin

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plugin._prepare_engine_env()
    import os
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="V1 model runner"):
        plugin._prepare_engine_env()


def test_other_platforms_are_refused(monkeypatch) -> None:
    import vllm.platforms

    from vllm_snapkv.integration import plugin

    class _Rocm(_FakeCuda):
        def is_cuda(self) -> bool:
            return False

    monkeypatch.setattr(vllm.platforms, "current_platform", _Rocm())
    with pytest.raises(ValueError, match="CPU and CUDA platforms only"):
        plugin._wire_vllm_config(_vllm_config())


def test_worker_module_is_lazy_and_gpu_classes_resolve() -> None:
    code = ("import sys, vllm_snapkv.integration.worker as w\n"
            "assert 'vllm.v1.worker.cpu_worker' not in sys.modules\n"
            "from vllm.utils.import_utils import resolve_obj_by_qualname as r\n"
            "g = r('vllm_snapkv.integration.worker.SnapKVGPUWorker')\n"
            "m = w.SnapKVGPUModelRunner\n"
            "assert 'vllm.v1.worker.cpu_worker' not in sys.modules\n"
            "from vllm.v1.worker.gpu_worker import Worker\n"
            "from vllm.v1.worker.gpu_model_runner import GPUModelRunner\n"
            "assert issubclass(g, w.SnapKVWorkerMixin) and issubclass(g, Worker)\n"
            "assert m.__mro__[1:3] == (w.SnapKVModelRunnerMixin, GPUModelRunner)\n"
            "assert g.__module__ == 'vllm_snapkv.integration.worker' and m.__qualname__ == "
            "'SnapKVGPUModelRunner'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_cpu_classes_keep_their_names() -> None:
    from vllm_snapkv.integration import worker

    assert worker.SnapKVCPUWorker.__name__ == "SnapKVCPUWorker"
    assert worker.SnapKVCPUModelRunner.__mro__[1] is worker.SnapKVModelRunnerMixin
    with pytest.raises(AttributeError):
        worker.NoSuchThing  # noqa: B018


def test_gpu_worker_points_a_bypassed_config_at_custom() -> None:
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_snapkv.integration import worker

    cfg = SimpleNamespace(attention_config=AttentionConfig())
    worker._require_custom_backend(cfg)
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
    with pytest.raises(ValueError, match="TRITON_ATTN"):
        worker._require_custom_backend(
            SimpleNamespace(attention_config=AttentionConfig(backend="TRITON_ATTN")))


# --------------------------------------------------------------------------------------------
# Needs a GPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of vLLM: would check "
                    "that vLLM's real reshape_and_cache_flash op writes, in every KVCacheLayout, "
                    "exactly where FlashAttnCacheAccessor reads (never run: no GPU here)")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_real_reshape_and_cache_flash_on_gpu(layout) -> None:
    from vllm import _custom_ops as ops

    hkv, bs, d, n, nb = 4, 16, 128, 100, 12
    kv = _caches(layout, nb, hkv, bs, d, torch.bfloat16, device="cuda")[0]
    block_ids, keys, values, _ = _request(n, bs, hkv, d, torch.bfloat16, nb, seed=8)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
    one = torch.ones(1, dtype=torch.float32, device="cuda")
    ops.reshape_and_cache_flash(keys.transpose(0, 1).contiguous().cuda(),
                                values.transpose(0, 1).contiguous().cuda(), key_cache,
                                value_cache, _slots(block_ids, torch.arange(n), bs).cuda(),
                                "auto", one, one)
    k, v = FlashAttnCacheAccessor(d).read_kv(kv, block_ids.cuda(), torch.arange(n))
    assert torch.equal(k.cpu(), keys) and torch.equal(v.cpu(), values)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of vLLM: would run "
                    "the engine with --kv-compression snapkv on FlashAttention and check that the "
                    "CUSTOM backend, the V1 SnapKVGPUModelRunner and compaction are in use and "
                    "that attention over the compacted cache equals dense attention over the "
                    "kept tokens (debug hook); see docs/cuda.md (never run: no GPU here)")
def test_engine_on_gpu(tiny_path) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tiny_path), dtype="bfloat16", max_model_len=4096, block_size=16,
              gpu_memory_utilization=0.3, enable_prefix_caching=False, seed=0,
              additional_config={"kv_compression": "snapkv",
                                 "snapkv": {"budget": 256, "window": 32, "kernel": 15}})
    try:
        assert llm.collective_rpc("snapkv_set_debug", args=(True,)) == [True]
        prompt = list(range(100, 1700))
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8
        (impls,) = llm.collective_rpc("snapkv_attention_impls")
        assert {v for k, v in impls.items() if ":" not in k} == {"SnapKVFlashAttentionImpl"}
        (rep,) = llm.collective_rpc("snapkv_report")
        assert rep["model_runner"] == "SnapKVGPUModelRunner"
        (comp,) = rep["compactions"].values()
        assert comp["prompt_len"] == 1600 and comp["evicted"] == (1600 - 256) // 16 * 16
        (err,), (ref,) = rep["debug"]["max_err"].values(), rep["debug"]["max_ref"].values()
        assert err <= 2e-2 * max(1.0, ref)  # bf16 FlashAttention vs fp64 dense
        assert set(rep["debug"]["slot_err"].values()) == {0.0}
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_parallel_refusal_rule() -> None:
    """TP up to the KV-head count runs (each rank owns whole GQA groups); more ranks than KV
    heads (replicated heads) are refused, naming the flag; pipeline stages run."""
    from vllm_snapkv.integration.plugin import parallel_refusal

    for tp, heads in ((1, 1), (2, 2), (2, 8), (4, 4), (8, 8)):
        for pp in (1, 2, 4):
            assert parallel_refusal(tp, pp, heads) is None
    for tp, heads in ((2, 1), (4, 2), (8, 4), (3, 2)):
        msg = parallel_refusal(tp, 1, heads)
        assert msg and f"--tensor-parallel-size {tp}" in msg and f"{heads} KV heads" in msg
    # Eager pipeline stages on vLLM-CPU: refused (vLLM's own failure), eager TP is not.
    assert parallel_refusal(2, 1, 2, cpu_eager=True) is None
    msg = parallel_refusal(1, 2, 2, cpu_eager=True)
    assert msg and "--pipeline-parallel-size 2" in msg and "--enforce-eager" in msg
