"""Tests of the SnapKV selection core against an independent, textbook float64 reference.

The reference below is written plainly — one query head at a time, an explicit causal mask, a
full softmax, explicit padding for the pooling, Python's ``sorted`` with an explicit
(score descending, position ascending) key — and shares no code with ``vllm_snapkv.selection``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from snapkv_reference import reference_budget, reference_keep, reference_scores

from vllm_snapkv import select_tokens
from vllm_snapkv.methods.snapkv import (
    DEFAULT_TILE_ELEMENTS,
    MIN_TILE_SIZE,
    resolve_tile_size,
    window_scores,
)
from vllm_snapkv.selection import (
    effective_budget,
    kept_count,
    select_from_scores,
    select_tokens_with_settings,
)
from vllm_snapkv.settings import (
    KVPRESS_PRESET,
    SettingsError,
    CompressionSettings,
    kvpress_preset,
)

# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Random cases
# --------------------------------------------------------------------------------------------


def make_case(rng: random.Random, *, max_n: int = 4000):
    """One random configuration and Q/K tensors; attention is made peaky like real models."""
    group = rng.choice([1, 3, 4, 8])
    hkv = rng.choice([1, 2, 3])
    d = rng.choice([8, 24, 64, 80])
    window = rng.choice([1, 2, 5, 16, 32, 33, 64]) if rng.random() < 0.8 else rng.randint(1, 64)
    kernel = rng.choice([1, 3, 5, 7, 9, 11, 13])
    sink = rng.choice([0, 0, 0, 1, 4])
    pooling = rng.choice(["avg", "max"])
    reduction = rng.choice(["sum", "mean"])
    gqa = rng.choice(["mean", "max"])
    if rng.random() < 0.75:
        budget = window + sink + rng.choice([1, 2, 7, 50, 200, 600])
        ratio = None
        n_choices = [budget - 1, budget, budget + 1, rng.randint(budget + 2, max_n)]
        n = rng.choice(n_choices + [rng.randint(budget + 2, max_n)] * 3)
    else:
        budget = None
        ratio = rng.choice([0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
        n = rng.randint(window + 2, max_n)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q = torch.randn(hkv * group, window, d, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen)
    # A few "important" tokens: keys aligned with the query mean, so the top of the ranking is
    # driven by real peaks (as in trained models) and not only by noise.
    for kv in range(hkv):
        hot = torch.randint(0, n, (max(1, n // 50),), generator=gen)
        direction = q[kv * group : (kv + 1) * group].mean(dim=(0, 1))
        k[kv, hot] += 2.0 * direction / (direction.norm() + 1e-6) * math.sqrt(d) ** 0.5
    q *= rng.choice([0.5, 1.0, 2.0])
    settings = dict(
        budget=budget, ratio=ratio, window=window, kernel=kernel, pooling=pooling,
        reduction=reduction, gqa_aggregation=gqa, sink=sink,
    )
    return q, k, settings


def random_tile(rng: random.Random, n: int, window: int):
    """None (auto), a divisor of the prefix length, a non-divisor, or tiny tiles."""
    p = max(1, n - window)
    kind = rng.choice(["auto", "divides", "odd", "tiny", "single"])
    if kind == "auto":
        return None
    if kind == "single":
        return n  # forces the single-pass path
    if kind == "tiny":  # tiny tiles, but at most ~200 of them (each tile is a few small ops)
        return max(rng.randint(1, 17), -(-p // 200))
    if kind == "divides":
        divisors = [t for t in range(2, min(p, 2000) + 1) if p % t == 0 and t < n]
        return rng.choice(divisors) if divisors else 1
    t = rng.randint(2, max(2, p - 1))
    return t if t < n else None


def as_lists(t: torch.Tensor) -> list[list[int]]:
    return [row.tolist() for row in t]


# --------------------------------------------------------------------------------------------
# Exact agreement with the reference
# --------------------------------------------------------------------------------------------


def test_float64_matches_reference_index_for_index():
    """With float64 scoring the module must equal the reference exactly, on 100 random shapes."""
    rng = random.Random(1234)
    n_compressed = n_tiled = 0
    for _ in range(100):
        q, k, s = make_case(rng, max_n=3000)
        tile = random_tile(rng, k.shape[1], s["window"])
        got = select_tokens(q, k, **s, tile_size=tile, score_dtype=torch.float64)
        want, _ = reference_keep(q, k, **s)
        assert as_lists(got) == want, (s, tile, k.shape)
        n_compressed += int(got.shape[1] < k.shape[1])
        n_tiled += int(tile is not None and tile < k.shape[1] and got.shape[1] < k.shape[1])
    # the generator must really exercise compression and the tiled path
    assert n_compressed >= 50 and n_tiled >= 25, (n_compressed, n_tiled)


def test_float64_matches_reference_long_prompts():
    """A few prompts of several thousand tokens, tiled with non-dividing tiles."""
    rng = random.Random(99)
    for n, tile in [(6000, 1000), (7777, 1234), (5000, None)]:
        q, k, s = make_case(rng, max_n=n)
        k = torch.randn(k.shape[0], n, k.shape[2], generator=torch.Generator().manual_seed(n))
        s = dict(s, budget=s["window"] + s["sink"] + 300, ratio=None)
        got = select_tokens(q, k, **s, tile_size=tile, score_dtype=torch.float64)
        want, _ = reference_keep(q, k, **s)
        assert as_lists(got) == want


def test_fp32_default_matches_reference_up_to_near_ties():
    """fp32 scores carry ~1e-7 relative error, so a kept set may differ from the float64
    reference only where the reference's own scores sit within a tiny tolerance of the kept/evicted
    boundary. Everything else must match exactly, and the exempted cases must be rare."""
    rng = random.Random(4321)
    rel_tol = 1e-5
    heads_total = heads_exempt = 0
    for _ in range(100):
        q, k, s = make_case(rng, max_n=3000)
        tile = random_tile(rng, k.shape[1], s["window"])
        got = as_lists(select_tokens(q, k, **s, tile_size=tile))
        want, scores = reference_keep(q, k, **s)
        for kv, (mine, ref) in enumerate(zip(got, want)):
            heads_total += 1
            if mine == ref:
                continue
            assert scores is not None and len(mine) == len(ref)
            # boundary: the lowest kept reference score; every disputed position must be within
            # rel_tol of it
            row = scores[kv]
            kept_prefix = [i for i in ref if s["sink"] <= i < k.shape[1] - s["window"]]
            boundary = min(row[i].item() for i in kept_prefix)
            for i in set(mine) ^ set(ref):
                assert abs(row[i].item() - boundary) <= rel_tol * abs(boundary), (s, i)
            heads_exempt += 1
    assert heads_total > 150
    assert heads_exempt <= max(2, heads_total // 50), (heads_exempt, heads_total)


# --------------------------------------------------------------------------------------------
# Tiled == untiled
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_tiled_scores_equal_untiled(pooling, gqa):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(12, 32, 64, generator=gen)
    k = torch.randn(3, 5003, 64, generator=gen)
    s = CompressionSettings(budget=512, window=32, kernel=7, pooling=pooling, gqa_aggregation=gqa)
    for dtype, atol in [(torch.float64, 1e-15), (torch.float32, 2e-8)]:
        full = window_scores(q, k, s, tile_size=k.shape[1], score_dtype=dtype)
        for tile in [97, 1000, 4971, 5000]:  # 4971 == N - w: one prefix tile, still two-pass
            tiled = window_scores(q, k, s, tile_size=tile, score_dtype=dtype)
            assert tiled.shape == full.shape == (3, 5003 - 32)
            torch.testing.assert_close(tiled, full, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=atol)
    full_idx = select_tokens_with_settings(q, k, s, tile_size=10**9, score_dtype=torch.float64)
    for tile in [97, 1000, 4971]:
        idx = select_tokens_with_settings(q, k, s, tile_size=tile, score_dtype=torch.float64)
        assert torch.equal(idx, full_idx)
    # one-key and three-key tiles on a short prompt
    qs, ks = q[:, :8], k[:, :203]
    s8 = s.replace(window=8, budget=40)
    for dtype in [torch.float64, torch.float32]:
        full = window_scores(qs, ks, s8, tile_size=203, score_dtype=dtype)
        for tile in [1, 3]:
            torch.testing.assert_close(window_scores(qs, ks, s8, tile_size=tile, score_dtype=dtype),
                                       full, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=1e-15 if dtype == torch.float64 else 2e-8)
        assert torch.equal(select_tokens_with_settings(qs, ks, s8, tile_size=1, score_dtype=dtype),
                           select_tokens_with_settings(qs, ks, s8, score_dtype=dtype))


def test_auto_tile_size():
    assert resolve_tile_size(9, 32, None) == DEFAULT_TILE_ELEMENTS // (9 * 32)
    assert resolve_tile_size(1024, 64, None) == MIN_TILE_SIZE
    assert resolve_tile_size(9, 32, 77) == 77
    for bad in [0, -1, 2.5, True]:
        with pytest.raises(ValueError):
            resolve_tile_size(9, 32, bad)


# --------------------------------------------------------------------------------------------
# Output invariants, short prompts, sinks
# --------------------------------------------------------------------------------------------


def test_output_invariants():
    rng = random.Random(5)
    for _ in range(60):
        q, k, s = make_case(rng, max_n=2500)
        hkv, n, _ = k.shape
        idx = select_tokens(q, k, **s, tile_size=random_tile(rng, n, s["window"]))
        kept = kept_count(n, CompressionSettings(**s))
        assert idx.dtype == torch.long and idx.device == k.device
        assert idx.shape == (hkv, kept)
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "sorted and unique"
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        window_pos = torch.arange(n - s["window"], n) if kept < n else torch.arange(n)
        sink_pos = torch.arange(min(s["sink"], n))
        for row in idx:
            members = set(row.tolist())
            assert set(window_pos.tolist()) <= members
            assert set(sink_pos.tolist()) <= members


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 128])
def test_short_prompts_come_back_whole(n):
    """N <= budget: every KV head keeps 0..N-1; queries are not even looked at (a prompt shorter
    than the window has fewer than `window` queries)."""
    k = torch.randn(3, n, 16)
    q = torch.randn(6, min(n, 32), 16)
    idx = select_tokens(q, k, budget=128, window=32)
    assert torch.equal(idx, torch.arange(n).expand(3, n))
    idx = select_tokens(q, k, ratio=0.5, window=32)  # 0.5 * n clamps up to 33 >= n for n <= 33
    if n <= 33:
        assert torch.equal(idx, torch.arange(n).expand(3, n))
    else:
        assert idx.shape == (3, max(int(n * 0.5), 33))


def test_ratio_one_keeps_everything():
    q, k = torch.randn(4, 8, 16), torch.randn(2, 500, 16)
    assert torch.equal(select_tokens(q, k, ratio=1.0, window=8), torch.arange(500).expand(2, 500))


def test_sinks_are_kept_and_counted_in_budget():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, 16, generator=gen)
    k = torch.randn(2, 400, 16, generator=gen)
    k[:, :4] = -5 * q.mean(dim=(0, 1))  # sinks score terribly: kept only because they are sinks
    idx = select_tokens(q, k, budget=20, window=8, sink=4, kernel=1)
    assert idx.shape == (2, 20)
    for row in idx.tolist():
        assert row[:4] == [0, 1, 2, 3]
        assert row[-8:] == list(range(392, 400))
    no_sink = select_tokens(q, k, budget=20, window=8, sink=0, kernel=1)
    assert not set(range(4)) & set(no_sink.flatten().tolist())


# --------------------------------------------------------------------------------------------
# Ties
# --------------------------------------------------------------------------------------------


def test_ties_prefer_lower_positions_in_select_from_scores():
    s = CompressionSettings(budget=7, window=2, sink=1)
    #            pos: 0    1    2    3    4    5    6    7    8    9
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0]])
    idx = select_from_scores(scores, 12, s)
    # sink 0; top 4 of positions 1..9: three 5's (2,4,6), then the first 3 (position 3); window
    assert idx.tolist() == [[0, 2, 3, 4, 6, 10, 11]]
    # all equal: the lowest positions win
    flat = torch.zeros(2, 10)
    assert select_from_scores(flat, 12, s).tolist() == [[0, 1, 2, 3, 4, 10, 11]] * 2


def test_ties_prefer_lower_positions_end_to_end():
    """All-zero keys give exactly uniform attention: with kernel 1 every prefix score is the same
    float, so the kept prefix must be the lowest positions."""
    q = torch.randn(4, 4, 8)
    k = torch.zeros(2, 100, 8)
    for tile in [None, 7]:
        idx = select_tokens(q, k, budget=14, window=4, kernel=1, tile_size=tile)
        assert idx.tolist() == [list(range(10)) + [96, 97, 98, 99]] * 2
    # avg pooling counts the zero padding: borders score lower, so with kernel 3 position 0
    # loses to positions 1.. and the kept prefix is 1..10
    idx = select_tokens(q, k, budget=14, window=4, kernel=3, pooling="avg")
    assert idx.tolist() == [list(range(1, 11)) + [96, 97, 98, 99]] * 2
    # max pooling pads with -inf: no border penalty, ties everywhere -> 0..9
    idx = select_tokens(q, k, budget=14, window=4, kernel=3, pooling="max")
    assert idx.tolist() == [list(range(10)) + [96, 97, 98, 99]] * 2


# --------------------------------------------------------------------------------------------
# Semantics pinned by construction
# --------------------------------------------------------------------------------------------


def test_gqa_groups_are_contiguous_query_heads():
    """Query head h belongs to KV head h // G: KV head j's score row equals a 1-KV-head run on
    query heads [j*G, (j+1)*G)."""
    gen = torch.Generator().manual_seed(11)
    hkv, g, w, n = 3, 4, 8, 300
    q = torch.randn(hkv * g, w, 16, generator=gen)
    k = torch.randn(hkv, n, 16, generator=gen)
    for agg in ["mean", "max"]:
        s = CompressionSettings(budget=40, window=w, kernel=3, gqa_aggregation=agg)
        full = window_scores(q, k, s, score_dtype=torch.float64)
        for j in range(hkv):
            alone = window_scores(q[j * g : (j + 1) * g], k[j : j + 1], s, score_dtype=torch.float64)
            torch.testing.assert_close(full[j], alone[0], rtol=0, atol=1e-15)
    # and the selection follows the group: heads 0,1 look at key 10, heads 2,3 (slightly weaker)
    # at key 60. Contiguous groups -> KV head 0 keeps 10, KV head 1 keeps 60; an interleaved
    # mapping (h % Hkv) would give KV head 1 heads {1, 3} and keep 10.
    q = torch.zeros(4, w, 16)
    k = torch.zeros(2, n, 16)
    q[0:2, :, 0] = 10.0
    q[2:4, :, 1] = 9.0
    k[:, 10, 0] = 10.0
    k[:, 60, 1] = 10.0
    idx = select_tokens(q, k, budget=w + 1, window=w, kernel=1)
    assert idx[:, 0].tolist() == [10, 60]


def test_causal_mask_inside_window():
    """Window query i sees keys <= N - w + i. Changing the last key may therefore change only the
    last window query's distribution: the score change must equal exactly that query's change
    (as computed directly over all N keys), and nothing from the earlier window queries."""
    gen = torch.Generator().manual_seed(2)
    hq, w, d, n = 2, 4, 8, 50
    q = torch.randn(hq, w, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, n, d, generator=gen, dtype=torch.float64)
    k2 = k.clone()
    k2[0, -1] = 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    s = CompressionSettings(budget=10, window=w, kernel=1, reduction="sum")
    p = n - w

    def last_query_prefix_probs(keys):  # [Hq, P]: the last window query sees every key
        return torch.softmax(q[:, -1] @ keys[0].T / math.sqrt(d), dim=-1)[:, :p]

    expected = (last_query_prefix_probs(k2) - last_query_prefix_probs(k)).mean(dim=0)
    for tile in [None, 5]:
        delta = (window_scores(q, k2, s, tile_size=tile, score_dtype=torch.float64)
                 - window_scores(q, k, s, tile_size=tile, score_dtype=torch.float64))[0]
        assert float(expected.abs().max()) > 1e-3  # the change is not trivially zero
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-13)


def test_window_keys_are_in_the_softmax_denominator():
    """Scores are normalised over all N keys: keys in the window that attract attention lower
    the prefix scores (kvpress/reference semantics), rather than renormalising over the prefix."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 8, generator=gen)
    k = torch.randn(1, 60, 8, generator=gen)
    s = CompressionSettings(budget=10, window=4, kernel=1, reduction="sum")
    sc = window_scores(q, k, s, score_dtype=torch.float64)
    assert float(sc.sum()) < 4.0 - 1e-6  # the window's own share is missing
    ref = reference_scores(q, k, window=4, kernel=1, pooling="avg", reduction="sum",
                           gqa_aggregation="mean")
    torch.testing.assert_close(sc, ref, rtol=1e-12, atol=0)


def test_low_precision_inputs_are_scored_in_fp32():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(6, 16, 32, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 700, 32, generator=gen).to(torch.bfloat16)
    s = CompressionSettings(budget=100, window=16)
    sc = window_scores(q, k, s)
    assert sc.dtype == torch.float32
    torch.testing.assert_close(sc, window_scores(q.float(), k.float(), s), rtol=0, atol=0)
    assert torch.equal(select_tokens(q, k, budget=100, window=16),
                       select_tokens(q.float(), k.float(), budget=100, window=16))


def test_kvpress_preset_is_what_select_tokens_gets_with_kvpress_choices():
    q, k = torch.randn(6, 64, 16), torch.randn(2, 900, 16)
    s = kvpress_preset(compression_ratio=0.75)
    a = select_tokens_with_settings(q, k, s)
    b = select_tokens(q, k, ratio=0.25, window=64, kernel=5, pooling="avg", reduction="mean",
                      gqa_aggregation="mean")
    assert torch.equal(a, b) and a.shape == (2, 225)


# --------------------------------------------------------------------------------------------
# Kept count / ratio rounding
# --------------------------------------------------------------------------------------------


def test_kept_count_budget():
    s = CompressionSettings(budget=1024)
    assert [kept_count(n, s) for n in (0, 1, 1023, 1024, 1025, 10**6)] == [
        0, 1, 1023, 1024, 1024, 1024
    ]


def test_ratio_kept_count_equals_kvpress_compute_n_kept():
    """kvpress 0.5.5: n_kept = max(1, int(k_len * (1 - compression_ratio))). For every
    compression ratio cr and N, kvpress_preset(compression_ratio=cr) must keep exactly that many
    tokens (when that is above the window floor and below N)."""
    rng = random.Random(0)
    crs = [i / 100 for i in range(100)] + [rng.random() for _ in range(300)] + [0.7, 0.9, 0.3]
    checked = 0
    for cr in crs:
        s = kvpress_preset(compression_ratio=cr)
        for n in list(range(65, 400)) + [rng.randint(400, 200_000) for _ in range(20)]:
            n_kvpress = max(1, int(n * (1 - cr)))
            if s.window < n_kvpress < n:
                assert kept_count(n, s) == n_kvpress, (cr, n)
                checked += 1
    assert checked > 10_000


def test_ratio_rounding_is_kvpress_expression_not_naive_product():
    """ratio=0.018, N=1500: N*ratio = 26.999999999999996 -> 26, but kvpress at
    compression_ratio = 1 - 0.018 computes int(1500 * (1 - 0.982)) = int(27.000000000000025) = 27.
    We follow kvpress."""
    s = CompressionSettings(ratio=0.018, window=4)
    assert int(1500 * 0.018) == 26
    assert kept_count(1500, s) == 27
    assert kept_count(1500, s) == max(1, int(1500 * (1 - (1 - 0.018))))


def test_ratio_small_prompt_clamps_to_window_plus_sink_plus_one():
    s = CompressionSettings(ratio=0.1, window=32, sink=4)
    assert effective_budget(300, s) == 37  # int(30.0) = 30 < 32 + 4 + 1
    assert kept_count(300, s) == 37
    assert kept_count(37, s) == 37 and kept_count(20, s) == 20
    # kvpress's expression at work: 1000 * (1 - (1 - 0.1)) = 99.99999999999997 -> 99, exactly what
    # kvpress keeps at compression_ratio=0.9 (int(1000 * (1 - 0.9)) == 99)
    assert kept_count(1000, s) == 99 == int(1000 * (1 - 0.9))
    assert kept_count(2001, s) == 200
    # monotone non-decreasing in N
    counts = [kept_count(n, s) for n in range(0, 3000)]
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    q, k = torch.randn(2, 32, 8), torch.randn(1, 300, 8)
    idx = select_tokens(q, k, ratio=0.1, window=32, sink=4)
    assert idx.shape == (1, 37)  # 4 sinks + 1 scored + 32 window
    assert idx[0, :4].tolist() == [0, 1, 2, 3] and idx[0, 5:].tolist() == list(range(268, 300))


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def test_invalid_settings_raise_settings_error():
    q, k = torch.randn(2, 32, 8), torch.randn(1, 300, 8)
    with pytest.raises(SettingsError) as e:
        select_tokens(q, k, budget=16)
    assert e.value.setting == "budget"
    with pytest.raises(SettingsError):
        select_tokens(q, k)  # neither budget nor ratio


def test_invalid_shapes():
    s = CompressionSettings(budget=40, window=8)
    with pytest.raises(ValueError, match="multiple"):
        window_scores(torch.randn(5, 8, 16), torch.randn(2, 100, 16), s)
    with pytest.raises(ValueError, match="head_dim"):
        window_scores(torch.randn(4, 8, 16), torch.randn(2, 100, 32), s)
    with pytest.raises(ValueError, match="window"):
        select_tokens_with_settings(torch.randn(4, 7, 16), torch.randn(2, 100, 16), s)
    with pytest.raises(ValueError, match="expected"):
        window_scores(torch.randn(4, 8), torch.randn(2, 100, 16), s)
    with pytest.raises(ValueError):
        kept_count(-1, s)


# --------------------------------------------------------------------------------------------
# Memory bound, measured through the CPU allocator's own accounting
# --------------------------------------------------------------------------------------------


def _allocations(fn):
    """Run fn under the profiler and return [(time_ns, alloc_size, total_allocated)] for every
    CPU allocator event (frees have negative sizes). ``total_allocated`` is the allocator's
    running count of live bytes allocated since profiling started."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                f = node.extra_fields
                events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    return result, events


def test_tiled_scoring_memory_is_bounded():
    hq, hkv, w, d, n, tile = 8, 2, 32, 64, 65536, 2048
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(hq, w, d, generator=gen)
    k = torch.randn(hkv, n, d, generator=gen)
    full_bytes = hq * w * n * 4  # the [Hq, w, N] fp32 tensor the tiled path must never build
    s = CompressionSettings(budget=2048, window=w)

    # The measurement really measures: the single-pass path does allocate [Hq, w, N].
    _, untiled = _allocations(lambda: select_tokens_with_settings(q, k, s, tile_size=n))
    assert max(size for _, size, _ in untiled) >= full_bytes
    assert max(total for _, _, total in untiled) >= full_bytes

    idx, tiled = _allocations(lambda: select_tokens_with_settings(q, k, s, tile_size=tile))
    assert len(tiled) > 20 and idx.shape == (hkv, 2048)
    largest = max(size for _, size, _ in tiled)
    peak = max(total for _, _, total in tiled)
    # documented bound O(Hq·w·tile + Hq·N): here at most 3 fp32 [Hq, w, tile] tiles plus 3 fp32
    # [Hq, N] rows (measured on torch 2.13 CPU: largest 2 MiB, peak ~4.5 MiB, vs 64 MiB full)
    bound = 3 * hq * w * tile * 4 + 3 * hq * n * 4
    assert largest <= hq * w * tile * 4, (largest, full_bytes)
    assert peak <= bound, (peak, bound)
    assert peak < full_bytes // 4, (peak, full_bytes)


def test_recency_method_keeps_sinks_and_the_most_recent_tokens():
    torch.manual_seed(0)
    n, w = 300, 16
    q, k = torch.randn(8, w, 64), torch.randn(2, n, 64)
    settings = CompressionSettings(budget=100, window=w, sink=4, method="recency")
    kept = select_tokens_with_settings(q, k, settings)
    expected = torch.cat([torch.arange(4), torch.arange(n - 96, n)])
    assert torch.equal(kept, expected.expand(2, 100))
    # The queries and keys play no part in it (no queries needed at all).
    assert torch.equal(select_tokens_with_settings(None, k * 3, settings), kept)
    # Whereas SnapKV's vote, on the same inputs, keeps something else.
    assert not torch.equal(select_tokens_with_settings(q, k, settings.replace(method="snapkv")),
                           kept)


def test_recency_sinks_default_to_four_and_an_explicit_zero_is_honoured():
    k = torch.randn(1, 200, 8)
    assert CompressionSettings(budget=50, window=8, method="recency").sinks == 4
    kept = select_tokens(None, k, method="recency", budget=50, window=8, sink=0)
    assert torch.equal(kept[0], torch.arange(150, 200))  # no sinks: the 50 most recent
    kept = select_tokens(None, k, method="recency", budget=50, window=8)
    assert torch.equal(kept[0], torch.cat([torch.arange(4), torch.arange(154, 200)]))
