"""``--snapkv-trigger pressure``: schedules whose prompt and decode budgets apply only where the
scheduler orders a compaction, against a token-by-token reference.

The reference shares no code with ``vllm_snapkv.schedule``. It walks a request one processed
token at a time with the documented rules: the prefill phase as scheduled (compact to ``P`` once
``P + C`` are attended, before the compaction point); at an ordered point ``a``, keep ``t(a)`` —
the prompt target when ``a`` is at most the prompt's length, else the decode budget (or, without
one, the prompt target) — by evicting ``floor((a - t) / bs) * bs`` if that exceeds what is
evicted already; nothing else.
"""

from __future__ import annotations

import random

import pytest

from vllm_snapkv import metrics
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.integration import cli
from vllm_snapkv.schedule import Schedule
from vllm_snapkv.settings import SettingsError


def reference(n, bs, target, p, c, b, orders, upto, a):
    out, e = [], 0
    for t in range(1, upto + 1):
        new, phase = e, None
        if t < a and p is not None and t - e >= p + c:
            new, phase = (t - p) // bs * bs, "prefill"
        elif t in orders:
            keep = target if t <= n else (b if b is not None else target)
            if keep is not None and (t - keep) // bs * bs > e:
                new = (t - keep) // bs * bs
                phase = "prompt" if t == a else "decode" if t > n else "prefill"
        if phase is not None:
            out.append((t, e, new, phase))
            e = new
    return out


def make(bs, n, target, p, c, b, a, orders=()) -> Schedule:
    return Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=target,
                    prefill_budget=p, prefill_interval=c or 0, prefill_method="keydiff",
                    decode_budget=b, decode_interval=bs * 2 if b is not None else 0,
                    prompt_at=a, trigger="pressure", orders=tuple(orders))


@pytest.mark.parametrize("seed", range(200))
def test_ordered_compactions_match_the_token_by_token_reference(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([1, 16, 128])
    n = rng.randint(1, 5000)
    target = rng.choice([None, rng.randint(33, 3000)])
    p = c = None
    if rng.random() < 0.3:
        p, c = rng.randint(max(target or 0, 40), 4000), bs * rng.randint(1, 8)
    b = rng.choice([None, rng.randint(40, 2000)])
    a = rng.choice([n, rng.randint(1, n)])
    window = rng.choice([1, 8, 32, 64])
    upto = n + rng.randint(0, 3000)
    # Drive it as the scheduler does: at random moments, order what pressure_order offers.
    sched = make(bs, n, target, p, c, b, a)
    assert sched.compactions_done(upto) == sum(1 for *_, ph in reference(
        n, bs, target, p, c, b, (), upto, a) if ph == "prefill")  # no order: prefill phase only
    t = 0
    while t < upto:
        t += rng.randint(1, 400)
        offer = sched.pressure_order(t, window)
        if offer is None:
            continue
        # The window's queries are all computed after the order.
        assert offer.at - window >= t and offer.reason == "pressure"
        assert offer.at == a or offer.at == t + window
        assert offer.evicted > offer.prior == sched.evicted_at(t)
        sched = sched.with_order(offer.at)
        # One order pending at a time.
        assert sched.pressure_order(t, window) is None
    ref = reference(n, bs, target, p, c, b, set(sched.orders), upto, a)
    got = [(x.at, x.prior, x.evicted, x.phase) for x in sched.compactions(upto)]
    assert got == ref
    for x in sched.compactions(upto):
        assert x.reason == ("schedule" if x.phase == "prefill" and x.at not in sched.orders
                            else "pressure")
    for probe in sorted({0, n, upto, *(rng.randint(0, upto) for _ in range(15))}):
        done = [r for r in ref if r[0] <= probe]
        assert sched.evicted_at(probe) == (done[-1][2] if done else 0)
    # Recomputing after a preemption: the same orders give the same compactions.
    again = make(bs, n, target, p, c, b, a, sched.orders)
    assert list(again.compactions(upto)) == list(sched.compactions(upto))


def test_without_pressure_nothing_compacts_and_budgets_are_ceilings() -> None:
    s = make(16, 3000, 1024, None, None, 512, 3000)
    assert s.compresses and s.first is None and s.cache_limit is None
    assert s.evicted_at(10**6) == 0 and s.next_after(0) is None
    # Ordered at the prompt's end while 64 tokens of it remain: the prompt target.
    c = s.pressure_order(2936, 64)
    assert (c.at, c.evicted, c.phase, c.kept) == (3000, 1968, "prompt", 1032)
    s = s.with_order(c.at)
    assert s.cache_limit == 1968
    # Then in decode: the decode budget, window tokens ahead.
    d = s.pressure_order(3100, 32)
    assert (d.at, d.prior, d.evicted, d.phase) == (3132, 1968, 2608, "decode")
    assert d.kept >= 512 and d.kept - 512 < 16


def test_a_request_without_a_ceiling_is_never_ordered() -> None:
    s = make(16, 500, None, None, None, None, 500)
    assert not s.compresses and s.pressure_order(100, 8) is None


def test_orders_need_the_pressure_trigger_and_must_ascend() -> None:
    with pytest.raises(ValueError):
        Schedule(prompt_len=100, block_size=16, method="snapkv", prompt_target=40,
                 orders=(100,))
    with pytest.raises(ValueError):
        make(16, 100, 40, None, None, None, 100, orders=(100, 90))


def test_summary_counts_compactions_by_reason() -> None:
    s = make(16, 3000, 1024, None, None, 512, 3000, orders=(3000, 3400))
    summary = metrics.request_summary(3000, s, progress=3400, processed=3410)
    assert summary["reasons"] == {"schedule": 0, "pressure": 2}
    assert summary["compactions"] == 2 and summary["evicted_tokens"] == (3400 - 512) // 16 * 16
    rec = metrics.StatsRecorder()
    rec.compacted("r", list(s.compactions(3400)), 16)
    rec.compacted("r", list(s.compactions(3400)), 16)  # a recompute counts once
    assert rec.take()["runs"] == {"pressure": 2}


def test_trigger_is_an_engine_setting_with_a_flag() -> None:
    cfg = CompressionConfig.from_additional_config(
        {"kv_compression": "snapkv", "snapkv": {"trigger": "pressure", "decode_budget": 256}})
    assert cfg.pressure and cfg.to_additional_config()["snapkv"]["trigger"] == "pressure"
    assert CompressionConfig.from_additional_config(
        cfg.to_additional_config()) == cfg
    plan = cfg.request_plan(2000, 16, None)
    assert plan is not None and plan.schedule.first is None
    assert cfg.request_plan(2000, 16, None, (2000,)).schedule.first.reason == "pressure"
    assert not CompressionConfig.from_additional_config({"kv_compression": "snapkv"}).pressure
    with pytest.raises(SettingsError) as err:
        CompressionConfig.from_additional_config(
            {"kv_compression": "snapkv", "snapkv": {"trigger": "sometimes"}})
    assert err.value.setting == "trigger" and "always, pressure" in err.value.allowed
    flags = {key: choices for key, _, choices, _ in cli._flags()}
    assert flags["snapkv_trigger"] == ("always", "pressure")
    assert cli.flag("trigger") == "--snapkv-trigger"


def test_idle_means_no_compaction_at_any_length() -> None:
    s = make(16, 3000, 1024, None, None, 512, 3000)
    assert s.idle and s.evicted_at(10**6) == 0
    assert not s.with_order(3000).idle
    assert not make(16, 3000, 1024, 1100, 64, None, 3000).idle  # the prefill phase runs
    periodic = Schedule(prompt_len=100, block_size=16, method="snapkv", decode_budget=64,
                        decode_interval=32)
    assert not periodic.idle and periodic.evicted_at(10**4) > 0
    assert Schedule(prompt_len=100, block_size=16, method="snapkv").idle
