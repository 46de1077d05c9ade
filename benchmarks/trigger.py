"""The ``trigger`` section: compression as a pressure valve (``--snapkv-trigger pressure``) against
vanilla vLLM and against compression on every request (``always``), under Poisson arrivals.

Three SmolLM2 servers with the same small KV pool and the same budgets: ``vanilla``
(``--kv-compression none``), ``always`` (SnapKV at a prompt budget and a decode budget) and
``pressure`` (the same, ``--snapkv-trigger pressure``). Each round sends one workload to each of
them in turn (the order rotates from round to round, so drift hits all three alike): requests
arrive at Poisson times at one rate; half are RULER-style prompts (``benchmarks.ruler``, tasks the
bundled model solves with the full cache, the question at the end) with short answers, graded;
half are long outputs (random prompt, ``ignore_eos``). The same prompts and arrival times go to
every server in a round; each round and rate has its own prompts, so accuracy samples are
distinct. Prefix caching is off on all three, so repeated rounds are honest.

What is measured per run: output tokens/s over the run's wall time, TTFT (client-side, streamed)
p50 and p99, queueing time from vLLM's ``vllm:request_queue_time_seconds`` histogram (mean, and
p99 as the bucket bound that covers 99 % of requests), preemptions, compactions by reason
(``vllm:snapkv_compaction_runs_total``), each request's text and grade. Ratios to vanilla are
taken per round (same workload) and summarised as median and spread.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import accuracy, client, ruler
from vllm_snapkv.testing import VllmServer

CONFIGS = ("vanilla", "always", "pressure")


@dataclass(frozen=True)
class TriggerProfile:
    """Sizes of the trigger section (``suite.Profile.trigger``)."""

    rates: tuple[float, ...] = (0.15, 0.5, 2.0)  # requests per second, light load to overload
    rounds: int = 3
    requests: int = 12  # per run: half RULER prompts, half long outputs
    tasks: tuple[str, ...] = ("niah_single_1", "niah_single_3_noise", "niah_multikey_noise")
    length: int = 2048
    long_prompt: int = 256
    long_output: int = 384
    block_size: int = 32
    # Light load fits (a RULER prompt, 65 blocks, beside three long outputs, 20 each); at
    # overload vanilla is short of blocks, not only of compute.
    pool_blocks: int = 128
    budget: int = 256  # the RULER prompts' 8x
    # no less than the budget plus an answer, so that a RULER prompt is compacted once; the long
    # outputs are compacted every interval once they attend more than this + the interval
    decode_budget: int = 256
    decode_interval: int = 64
    max_num_seqs: int = 32
    seed: int = 0


def server_flags(p: TriggerProfile, config: str) -> list[str]:
    common = ["--max-model-len", str(p.length + 256), "--block-size", str(p.block_size),
              "--num-gpu-blocks-override", str(p.pool_blocks), "--kv-cache-memory-bytes", "1G",
              "--max-num-seqs", str(p.max_num_seqs), "--no-enable-prefix-caching"]
    if config == "vanilla":
        return ["--kv-compression", "none", *common]
    snap = ["--kv-compression", "snapkv", "--snapkv-budget", str(p.budget),
            "--snapkv-decode-budget", str(p.decode_budget),
            "--snapkv-decode-interval", str(p.decode_interval), *common]
    return snap + (["--snapkv-trigger", "pressure"] if config == "pressure" else [])


@dataclass(frozen=True)
class Job:
    """One request of a workload: when it is sent (seconds after the run starts) and what."""

    id: str
    at: float
    prompt_ids: list[int]
    max_tokens: int
    kind: str  # "ruler" or "long"
    answers: tuple[str, ...] = ()


def workload(p: TriggerProfile, rate: float, cases: list[ruler.Case], seed: int) -> list[Job]:
    """``p.requests`` jobs at Poisson times of ``rate``: the given RULER ``cases`` and as many
    long-output requests, in a seeded random order."""
    rng = random.Random(seed)
    jobs = [Job(c.id, 0.0, c.prompt_ids, c.max_tokens, "ruler", tuple(c.answers)) for c in cases]
    for j in range(p.requests - len(cases)):
        ids = [rng.randrange(1000, 40000) for _ in range(p.long_prompt)]
        jobs.append(Job(f"long-{seed}-{j}", 0.0, ids, p.long_output, "long"))
    rng.shuffle(jobs)
    at, out = 0.0, []
    for job in jobs:
        out.append(Job(job.id, at, job.prompt_ids, job.max_tokens, job.kind, job.answers))
        at += rng.expovariate(rate)
    return out


def _series(families: list, name: str) -> dict[tuple, float]:
    """Every sample of the metric family ``name``: ``(sample name, sorted labels) -> value``."""
    out: dict[tuple, float] = {}
    for family in families:
        if family.name == name:
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _snapshot(server: VllmServer) -> dict[str, Any]:
    """One ``/metrics`` scrape: totals, and the two labelled series the run reads."""
    families = client.metric_families(server)
    return {"totals": client.summed(families),
            "queue": _series(families, "vllm:request_queue_time_seconds"),
            "runs": _series(families, "vllm:snapkv_compaction_runs")}


def quantile_bound(buckets: dict[float, float], q: float) -> float | None:
    """The smallest histogram bucket bound with at least ``q`` of the observations at or below
    it (``buckets``: upper bound -> cumulative count); None without observations."""
    if not buckets:
        return None
    total = buckets[max(buckets)]
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total - 1e-9:
            return le
    return math.inf


def _deltas(before: dict, after: dict) -> dict[str, Any]:
    tb, ta = before["totals"], after["totals"]
    queue_n = ta.get("vllm:request_queue_time_seconds_count", 0.0) - \
        tb.get("vllm:request_queue_time_seconds_count", 0.0)
    queue_sum = ta.get("vllm:request_queue_time_seconds_sum", 0.0) - \
        tb.get("vllm:request_queue_time_seconds_sum", 0.0)
    buckets: dict[float, float] = {}
    for (name, labels), v in after["queue"].items():
        if name.endswith("_bucket"):
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + v - before["queue"].get((name, labels), 0.0)
    reasons: dict[str, int] = {}
    for (name, labels), v in after["runs"].items():
        if name.endswith("_total"):
            r = dict(labels).get("reason", "?")
            reasons[r] = reasons.get(r, 0) + int(round(v - before["runs"].get((name, labels),
                                                                              0.0)))
    p99 = quantile_bound(buckets, 0.99)
    return {"preemptions": int(ta.get("vllm:num_preemptions_total", 0.0)
                               - tb.get("vllm:num_preemptions_total", 0.0)),
            "queue_mean_s": queue_sum / queue_n if queue_n else None,
            "queue_p99_bound_s": None if p99 is None or math.isinf(p99) else p99,
            "compaction_runs": reasons}


def nearest_rank(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile by nearest rank (p99 of 12 values is the largest)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def run_load(server: VllmServer, jobs: list[Job]) -> dict[str, Any]:
    """Send ``jobs`` at their times (one thread each), wait for all; what the run measured."""
    before = _snapshot(server)

    def send(job: Job, t0: float) -> client.Completion:
        delay = t0 + job.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return client.complete(server, job.prompt_ids, job.max_tokens, stream=True,
                               ignore_eos=job.kind == "long")

    with client.Watcher(server, ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                 "vllm:kv_cache_usage_perc")) as w:
        w.wait_for_sample()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            done = list(pool.map(lambda j: send(j, t0), jobs))
        wall = max(d.end for d in done) - t0
    after = _snapshot(server)
    rows = []
    for job, d in zip(jobs, done):
        s = d.snapkv or {}
        rows.append({"id": job.id, "kind": job.kind, "at": job.at, "text": d.text,
                     "correct": ruler.is_correct(d.text, list(job.answers))
                     if job.kind == "ruler" else None,
                     "ttft_s": d.ttft, "end_s": d.end - t0, "output_tokens": d.completion_tokens,
                     "s_per_token": d.decode_per_token, "compactions": s.get("compactions", 0),
                     "reasons": s.get("reasons") or {}})
    ttfts = [r["ttft_s"] for r in rows]
    out_tokens = sum(r["output_tokens"] for r in rows)
    longs = [r["s_per_token"] for r in rows if r["kind"] == "long" and r["s_per_token"]]
    return {"wall_s": wall, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall,
            "ttft_p50_s": nearest_rank(ttfts, 0.5), "ttft_p99_s": nearest_rank(ttfts, 0.99),
            "long_s_per_token": statistics.median(longs) if longs else None,
            "peak_running": int(w.peak["vllm:num_requests_running"]),
            "peak_waiting": int(w.peak["vllm:num_requests_waiting"]),
            "peak_kv_usage": w.peak["vllm:kv_cache_usage_perc"],
            "compacted_requests": sum(1 for r in rows if r["compactions"]),
            **_deltas(before, after), "rows": rows}


def _spread(xs: list[float | None]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarise(p: TriggerProfile, runs: list[dict]) -> dict[str, Any]:
    """Per rate and configuration: medians and spreads over rounds, ratios to vanilla taken per
    round, pooled accuracy with its 95 % interval, outputs identical to vanilla's, and the
    issue's checks (light load: the first rate; overload: the last)."""
    out: dict[str, Any] = {}
    for rate in p.rates:
        key = f"{rate:g}"
        at = [r for r in runs if r["rate"] == rate]
        by = {c: sorted((r for r in at if r["config"] == c), key=lambda r: r["round"])
              for c in CONFIGS}
        van = {r["round"]: r for r in by["vanilla"]}
        vtexts = {(r["round"], x["id"]): x["text"] for r in by["vanilla"] for x in r["rows"]}
        cell: dict[str, Any] = {}
        for c in CONFIGS:
            rs = by[c]
            rows = [x for r in rs for x in r["rows"]]
            graded = [x for x in rows if x["kind"] == "ruler"]
            correct = sum(1 for x in graded if x["correct"])
            texts = {(r["round"], x["id"]): x["text"] for r in rs for x in r["rows"]}
            whole = {(r["round"], x["id"]) for r in rs for x in r["rows"] if not x["compactions"]}
            cell[c] = {
                "throughput": _spread([r["output_tokens_per_s"] for r in rs]),
                "throughput_ratio": _spread([_ratio(r["output_tokens_per_s"],
                                                    van[r["round"]]["output_tokens_per_s"])
                                             for r in rs]),
                "ttft_p99_s": _spread([r["ttft_p99_s"] for r in rs]),
                "ttft_p50_s": _spread([r["ttft_p50_s"] for r in rs]),
                "ttft_p99_ratio": _spread([_ratio(r["ttft_p99_s"], van[r["round"]]["ttft_p99_s"])
                                           for r in rs]),
                "queue_mean_s": _spread([r["queue_mean_s"] for r in rs]),
                "long_s_per_token_ratio": _spread([
                    _ratio(r["long_s_per_token"], van[r["round"]]["long_s_per_token"])
                    for r in rs]),
                "preemptions": sum(r["preemptions"] for r in rs),
                "compaction_runs": {k: sum(r["compaction_runs"].get(k, 0) for r in rs)
                                    for k in sorted({k for r in rs for k in r["compaction_runs"]})},
                "compacted_requests": sum(r["compacted_requests"] for r in rs),
                "requests": len(rows),
                "identical_to_vanilla": sum(1 for k, t in texts.items() if vtexts.get(k) == t),
                # the requests this configuration left whole, and how many of them vanilla's
                # text equals (a request keeps its whole KV: its tokens should be vanilla's)
                "uncompacted": len(whole),
                "uncompacted_identical": sum(1 for k in whole if vtexts.get(k) == texts[k]),
                "accuracy": accuracy.cell(correct, len(graded)),
            }
        out[key] = cell
    light, over = f"{p.rates[0]:g}", f"{p.rates[-1]:g}"
    lp, op = out[light]["pressure"], out[over]
    acc = {k: v["accuracy"]["accuracy"] for k, v in op.items()}
    checks = {
        "light_no_compaction": lp["compacted_requests"] == 0,
        "light_identical_outputs": lp["identical_to_vanilla"] == lp["requests"],
        "light_uncompacted_identical": lp["uncompacted_identical"] == lp["uncompacted"],
        "light_throughput_ratio_0.97": (lp["throughput_ratio"]["median"] or 0) >= 0.97,
        "light_accuracy_is_vanilla": lp["accuracy"]["correct"]
        == out[light]["vanilla"]["accuracy"]["correct"],
        "overload_throughput_at_least_always": (op["pressure"]["throughput"]["median"] or 0)
        >= (op["always"]["throughput"]["median"] or 0),
        "overload_ttft_p99_below_vanilla": (op["pressure"]["ttft_p99_ratio"]["median"] or 9) < 1,
        "overload_queue_below_vanilla": (op["pressure"]["queue_mean_s"]["median"] or 0)
        < (op["vanilla"]["queue_mean_s"]["median"] or 0),
        "overload_no_preemption_where_vanilla_preempts": op["vanilla"]["preemptions"] == 0
        or op["pressure"]["preemptions"] == 0,
        "overload_accuracy_at_least_always": (acc["pressure"] or 0) >= (acc["always"] or 0),
    }
    return {"rates": out, "checks": checks, "light_rate": light, "overload_rate": over}


def run(p: TriggerProfile, out: Path, servers: Callable, log: Callable[[str], None]
        ) -> dict[str, Any]:
    """Run the section; ``servers`` is ``suite.servers`` (starts and stops ``vllm serve``)."""
    from transformers import AutoTokenizer

    from vllm_snapkv import models

    started = time.time()
    smol = models.ensure_model(models.SMOLLM2)
    tok = AutoTokenizer.from_pretrained(smol)
    n_ruler = p.requests // 2
    need = p.rounds * len(p.rates) * n_ruler
    per_task = -(-need // len(p.tasks))
    cases = ruler.build_cases(tok, list(p.tasks), [p.length], per_task, seed=p.seed + 17,
                              chat=False)
    rng = random.Random(p.seed)
    rng.shuffle(cases)
    runs: list[dict] = []
    specs = [(f"trigger-{c}", smol, server_flags(p, c)) for c in CONFIGS]
    with servers(out, specs) as started_servers:
        by_name = dict(zip(CONFIGS, started_servers))
        for server in started_servers:  # a first request pays one-time costs outside the runs
            client.complete(server, cases[-1].prompt_ids[:64], 4)
        k = 0
        for rnd in range(p.rounds):
            for i, rate in enumerate(p.rates):
                mine, k = cases[k:k + n_ruler], k + n_ruler
                jobs = workload(p, rate, mine, seed=p.seed + 1000 * rnd + i)
                order = CONFIGS[rnd % 3:] + CONFIGS[:rnd % 3]
                for config in order:
                    t0 = time.time()
                    r = run_load(by_name[config], jobs)
                    runs.append({"config": config, "rate": rate, "round": rnd, **r})
                    log(f"[trigger] round {rnd} rate {rate:g}/s {config}: "
                        f"{r['output_tokens_per_s']:.1f} tok/s, TTFT p99 {r['ttft_p99_s']:.2f}s, "
                        f"preemptions {r['preemptions']}, runs {r['compaction_runs']}, "
                        f"{time.time() - t0:.0f}s")
    return {"runs": runs, **summarise(p, runs), "wall_s": time.time() - started}


def summary_md(res: dict, p: dict) -> list[str]:
    """The section's tables for ``summary.md``."""
    out = ["## Compression as a pressure valve (`--snapkv-trigger`)", "",
           f"SmolLM2, three servers on one pool of {p['pool_blocks']} blocks of "
           f"{p['block_size']} tokens (prefix caching off): vanilla, `always` and `pressure` at "
           f"`--snapkv-budget {p['budget']}` (the {p['length']}-token RULER prompts' "
           f"{p['length'] / p['budget']:g}x) and "
           f"`--snapkv-decode-budget {p['decode_budget']}`. Each run: {p['requests']} requests at "
           f"Poisson times, half RULER prompts ({', '.join(p['tasks'])}; graded), half "
           f"{p['long_prompt']}-token prompts with {p['long_output']} output tokens; "
           f"{p['rounds']} rounds, the configurations' order rotating. Medians over rounds "
           "[min, max]; ratios to vanilla per round; accuracy pooled over rounds with its 95 % "
           "Wilson interval.", "",
           "| rate /s | config | tok/s × vanilla | TTFT p99 s | TTFT p99 × vanilla | "
           "queue mean s | preemptions | compactions (reason: runs) | compacted req. | "
           "= vanilla text | uncompacted = vanilla | accuracy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def sp(s: dict, fmt: str = ".2f") -> str:
        if s["median"] is None:
            return "—"
        return f"{s['median']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    for rate, cell in res["rates"].items():
        for c in CONFIGS:
            x = cell[c]
            a = x["accuracy"]
            runs = ", ".join(f"{k}: {v}" for k, v in x["compaction_runs"].items()) or "0"
            out.append(f"| {rate} | {c} | {sp(x['throughput_ratio'])} | {sp(x['ttft_p99_s'])} | "
                       f"{sp(x['ttft_p99_ratio'])} | {sp(x['queue_mean_s'])} | "
                       f"{x['preemptions']} | {runs} | {x['compacted_requests']}/{x['requests']} |"
                       f" {x['identical_to_vanilla']}/{x['requests']} | "
                       f"{x['uncompacted_identical']}/{x['uncompacted']} | "
                       f"{a['correct']}/{a['total']} ({a['lo']:.0f}–{a['hi']:.0f} %) |")
    out += ["", "Checks (light load = the lowest rate, overload = the highest): "
            + ", ".join(f"{k} {'yes' if v else '**no**'}" for k, v in res["checks"].items()), ""]
    return out
