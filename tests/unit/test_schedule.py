"""The compaction schedule against a token-by-token reference simulation.

The reference below shares no code with ``vllm_snapkv.schedule``: it walks the request one
processed token at a time and applies the documented rules literally — while the prompt is read
(before the compaction point ``a``: the prompt's end ``N`` or the request's ``compact_at``),
compact to ``P`` once ``P + C`` are attended; at ``a``, evict ``floor((a - target) / bs) * bs``
if that frees a block; during decode, compact to ``B`` once
``B + S`` are attended — always rounding the eviction down to whole blocks.
"""

from __future__ import annotations

import random

import pytest

from vllm_snapkv.schedule import Schedule, round_to_blocks


def reference(n, bs, target, p, c, b, s, upto, a=None):
    """[(at, prior, evicted, phase)] of a request processing ``upto`` tokens."""
    out, e = [], 0
    a = n if a is None else a
    for t in range(1, upto + 1):
        new, phase = e, None
        if t < a and p is not None and t - e >= p + c:
            new, phase = (t - p) // bs * bs, "prefill"
        elif t == a and target is not None and target < a:
            cand = (a - target) // bs * bs
            if cand > e:
                new, phase = cand, "prompt"
        elif t > n and b is not None and t - e >= b + s:
            new, phase = (t - b) // bs * bs, "decode"
        if phase is not None:
            assert new > e
            out.append((t, e, new, phase))
            e = new
    return out


def random_case(rng: random.Random):
    bs = rng.choice([1, 16, 32, 128])
    n = rng.randint(1, 6000)
    target = rng.choice([None, rng.randint(33, 3000)])
    p = c = b = s = None
    if rng.random() < 0.5:
        p = rng.randint(max(target or 0, 40), 4000)
        c = bs * rng.randint(1, 8)
    if rng.random() < 0.6:
        b = rng.randint(40, 2000)
        s = bs * rng.randint(1, 8)
    a = rng.choice([None, rng.randint(1, n)])
    return bs, n, target, p, c, b, s, a


def make(bs, n, target, p, c, b, s, a=None) -> Schedule:
    return Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=target,
                    prefill_budget=p, prefill_interval=c or 0, prefill_method="keydiff",
                    decode_budget=b, decode_interval=s or 0, prompt_at=a)


@pytest.mark.parametrize("seed", range(300))
def test_schedule_matches_the_token_by_token_reference(seed: int) -> None:
    rng = random.Random(seed)
    bs, n, target, p, c, b, s, a = random_case(rng)
    sched = make(bs, n, target, p, c, b, s, a)
    upto = n + rng.randint(0, 4000)
    ref = reference(n, bs, target, p, c, b, s, upto, a)
    got = [(x.at, x.prior, x.evicted, x.phase) for x in sched.compactions(upto)]
    assert got == ref
    # Every lookup agrees with the list.
    for x in sched.compactions(upto):
        assert x.method == ("keydiff" if x.phase == "prefill" else "snapkv")
        assert x.evicted % bs == 0 and x.kept == x.at - x.evicted
    probes = sorted({0, 1, n - 1, n, n + 1, upto, *(rng.randint(0, upto) for _ in range(20)),
                     *(a for a, *_ in ref), *(a - 1 for a, *_ in ref)})
    for t in probes:
        if t < 0:
            continue
        done = [r for r in ref if r[0] <= t]
        assert sched.evicted_at(t) == (done[-1][2] if done else 0)
        assert sched.compactions_done(t) == len(done)
        later = [r for r in ref if r[0] > t]
        nxt = sched.next_after(t)
        if later:
            assert nxt is not None and (nxt.at, nxt.prior, nxt.evicted) == later[0][:3]
        elif t + (b or 0) + (s or 0) < upto or b is None:
            # Beyond the simulated range the decode phase goes on: only check the off cases.
            assert b is not None or nxt is None
    lo = rng.randint(0, upto)
    hi = rng.randint(lo, upto)
    assert [(x.at, x.evicted) for x in sched.between(lo, hi)] == \
        [(a, e) for a, _, e, _ in ref if lo < a <= hi]
    assert sched.cache_limit == (ref[0][2] if ref else None) or \
        (sched.cache_limit == sched.first.evicted and sched.first.at > upto)
    assert sched.compresses == (sched.first is not None)


def test_decode_phase_keeps_exactly_the_budget_and_bounds_held_blocks() -> None:
    bs, b, s = 128, 1000, 256
    sched = make(bs, 3000, 1024, None, None, b, s)
    comps = list(sched.compactions(20000))
    decode = [x for x in comps if x.phase == "decode"]
    assert len(decode) > 50
    assert all(x.kept == b for x in decode[1:])  # every later one keeps exactly B
    assert all(x.evicted - x.prior == s for x in decode[1:])  # and evicts exactly S
    # While generating, at most ceil((B + S) / bs) + 1 blocks at any output length: the blocks
    # spanning what step t attends (tokens [E, t), E as of the previous step) ...
    held = max(-(-t // bs) - sched.evicted_at(t - 1) // bs for t in range(3001, 20001))
    assert held <= -(-(b + s) // bs) + 1
    # ... while the unchunked prompt itself held all its blocks before its compaction.
    assert sched.max_held_blocks(20000) == -(-3000 // bs)


def test_prefill_phase_bounds_what_a_long_prompt_holds() -> None:
    bs, p, c = 16, 2048, 512
    sched = make(bs, 30000, 1024, p, c, None, None)
    prefill = [x for x in sched.compactions(30000) if x.phase == "prefill"]
    assert prefill and all(x.kept == p for x in prefill)
    assert sched.max_held_blocks(30000) == -(-(p + c) // bs)
    assert sched.prompt_compaction.kept < 1024 + bs


def test_no_phase_no_schedule_and_bad_intervals() -> None:
    assert not make(16, 5000, None, None, None, None, None).compresses
    assert make(16, 5000, None, None, None, None, None).next_after(0) is None
    with pytest.raises(ValueError, match="multiple of the block size"):
        make(16, 5000, None, None, None, 500, 100)
    assert round_to_blocks(256, 128) == 256 and round_to_blocks(100, 128) == 128
    assert round_to_blocks(256, 48) == 288


def test_compaction_before_the_question_leaves_the_question_whole() -> None:
    # 2048-token prompt whose last 48 tokens are the question; compact the context (2000 tokens)
    # to 500 before it is read: E = floor(1500 / 32) * 32 = 1472, kept 528 of the context.
    sched = make(32, 2048, 500, None, None, None, None, a=2000)
    (c,) = sched.compactions(2048)
    assert (c.at, c.prior, c.evicted, c.phase) == (2000, 0, 1472, "prompt")
    # The question's 48 tokens come after it: attention then reads 528 + 48 slots.
    assert sched.evicted_at(2048) == 1472 and 2048 - sched.evicted_at(2048) == 576
    assert sched.cache_limit == 1472
    with pytest.raises(ValueError, match="prompt_at"):
        make(32, 2048, 500, None, None, None, None, a=2049)
