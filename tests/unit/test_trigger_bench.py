"""The trigger benchmark's pure parts (``benchmarks.trigger``): the quantiles it reports and the
workloads it sends, checked against independent definitions."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest

from benchmarks import trigger
from benchmarks.trigger import TriggerProfile


@pytest.mark.parametrize("seed", range(20))
def test_nearest_rank_is_the_inverted_cdf_quantile(seed: int) -> None:
    rng = random.Random(seed)
    xs = [rng.random() for _ in range(rng.randrange(1, 40))]
    for q in (0.5, 0.9, 0.99):
        assert trigger.nearest_rank(xs, q) == pytest.approx(
            float(np.percentile(xs, 100 * q, method="inverted_cdf")))
    assert trigger.nearest_rank([], 0.5) is None


@pytest.mark.parametrize("seed", range(20))
def test_quantile_bound_is_the_first_bucket_holding_q_of_the_samples(seed: int) -> None:
    rng = random.Random(seed)
    bounds = sorted({round(rng.uniform(0.01, 5), 2) for _ in range(8)}) + [float("inf")]
    obs = [rng.expovariate(1.0) for _ in range(rng.randrange(1, 200))]
    buckets = {b: float(sum(1 for o in obs if o <= b)) for b in bounds}
    for q in (0.5, 0.99):
        want = min(b for b in bounds if sum(1 for o in obs if o <= b) >= q * len(obs))
        assert trigger.quantile_bound(buckets, q) == want
    assert trigger.quantile_bound({1.0: 0.0, float("inf"): 0.0}, 0.99) is None


def test_workload_is_poisson_seeded_and_mixed() -> None:
    p = TriggerProfile(requests=4000, long_prompt=8, long_output=16)
    cases = [trigger.ruler.Case(f"c{i}", "t", 10, 5, ["x"], 7, [1] * 10) for i in range(2000)]
    jobs = trigger.workload(p, 2.0, cases, seed=3)
    assert [j.kind for j in jobs].count("ruler") == 2000 and len(jobs) == 4000
    assert jobs[0].at == 0.0 and all(a.at < b.at for a, b in zip(jobs, jobs[1:]))
    gaps = [b.at - a.at for a, b in zip(jobs, jobs[1:])]
    # exponential gaps of mean 1/rate: mean within 5 standard errors, and sd = mean
    assert abs(statistics.mean(gaps) - 0.5) < 5 * 0.5 / len(gaps) ** 0.5
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)
    longs = [j for j in jobs if j.kind == "long"]
    assert all(len(j.prompt_ids) == 8 and j.max_tokens == 16 for j in longs)
    assert {tuple(j.prompt_ids) for j in jobs} == {tuple(j.prompt_ids) for j in
                                                   trigger.workload(p, 2.0, cases, seed=3)}
    assert [j.at for j in trigger.workload(p, 2.0, cases, seed=4)] != [j.at for j in jobs]


def _run(config: str, rate: float, rnd: int, tps: float, p99: float, queue: float,
         pre: int = 0, compacted: int = 0, texts: tuple[str, ...] = ("a", "b"),
         correct: tuple[bool, ...] = (True,)) -> dict:
    rows = [{"id": f"r{i}", "kind": "ruler", "text": t, "correct": c, "compactions": 0}
            for i, (t, c) in enumerate(zip(texts, correct))]
    rows += [{"id": f"l{i}", "kind": "long", "text": t, "correct": None, "compactions": 0}
             for i, t in enumerate(texts[len(correct):])]
    for row in rows[:compacted]:
        row["compactions"] = 1
    return {"config": config, "rate": rate, "round": rnd, "output_tokens_per_s": tps,
            "ttft_p99_s": p99, "ttft_p50_s": p99 / 2, "queue_mean_s": queue,
            "long_s_per_token": 0.1, "preemptions": pre, "compaction_runs": {},
            "compacted_requests": compacted, "rows": rows}


def test_summary_ratios_are_per_round_and_checks_follow() -> None:
    p = TriggerProfile(rates=(0.1, 2.0), rounds=2)
    runs = []
    for rnd, scale in ((0, 1.0), (1, 2.0)):  # round 1 twice as fast for everyone
        runs += [_run("vanilla", 0.1, rnd, 10 * scale, 1, 0),
                 _run("always", 0.1, rnd, 10 * scale, 1, 0, compacted=2, texts=("a", "x"),
                      correct=(False,)),
                 _run("pressure", 0.1, rnd, 9.8 * scale, 1, 0),
                 _run("vanilla", 2.0, rnd, 10 * scale, 8, 3, pre=2),
                 _run("always", 2.0, rnd, 12 * scale, 4, 1, compacted=2),
                 _run("pressure", 2.0, rnd, 12.5 * scale, 4, 1, compacted=1)]
    s = trigger.summarise(p, runs)
    light, over = s["rates"]["0.1"], s["rates"]["2"]
    assert light["pressure"]["throughput_ratio"] == {"median": pytest.approx(0.98),
                                                     "min": pytest.approx(0.98),
                                                     "max": pytest.approx(0.98)}
    assert light["pressure"]["identical_to_vanilla"] == 4
    assert light["always"]["identical_to_vanilla"] == 2
    assert light["always"]["uncompacted"] == 0 and light["pressure"]["uncompacted"] == 4
    assert light["pressure"]["uncompacted_identical"] == 4
    assert light["always"]["accuracy"]["correct"] == 0 and light["always"]["accuracy"]["total"] == 2
    assert over["pressure"]["ttft_p99_ratio"]["median"] == pytest.approx(0.5)
    assert over["vanilla"]["preemptions"] == 4
    assert all(s["checks"].values()), s["checks"]
    runs[2] = _run("pressure", 0.1, 0, 9.0, 1, 0, compacted=1, texts=("z", "b"))
    s = trigger.summarise(p, runs)
    assert not s["checks"]["light_no_compaction"]
    assert not s["checks"]["light_identical_outputs"]
    assert s["checks"]["light_uncompacted_identical"]  # the one that differs was compacted
    assert s["rates"]["0.1"]["pressure"]["uncompacted"] == 3
    assert s["rates"]["0.1"]["pressure"]["throughput_ratio"]["min"] == pytest.approx(0.9)
