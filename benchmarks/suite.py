"""The benchmark suite (``make bench``): vllm-snapkv against vanilla vLLM, the recency baseline and
NVIDIA kvpress, on this machine, each comparison run side by side in one invocation.

Usage (from the repository root)::

    python -m benchmarks.suite [--smoke] [--out results/bench-<time>] [--only accuracy,capacity]

What runs (sections; ``--only`` picks some):

* ``overhead`` — SmolLM2, a vanilla server (``--kv-compression none``) and a SnapKV server up at
  the same time, requests interleaved A/B/B/A so load drifts hit both: time to first token at
  1K/2K/4K-token prompts, and decode seconds per output token at 4K context with 1 and 8
  requests in flight.
* ``blocks`` — KV blocks a request holds after prefill, read from each server's own
  ``vllm:kv_cache_usage_perc`` × pool size while the request decodes, against the block
  arithmetic of the prompt compaction ``ceil((N - E) / bs)`` (+1 block for the decode tokens).
* ``accuracy`` — RULER-style tasks (``benchmarks.accuracy``, ``benchmarks.ruler``): every
  registered method at 2x/4x/8x with the question in the observation window and without it
  (``vllm_xargs.snapkv_compact_at``), the full cache, 95 % Wilson intervals, and kvpress on the
  same prompts (``benchmarks.kvpress_ruler``).
* ``needle`` — the needle task (``benchmarks.needle``): full cache (per-request opt-out), SnapKV
  and the recency baseline at every budget, all on the SnapKV server with 32-token blocks, so every
  budget is kept exactly. kvpress runs the same token ids in its own venv
  (``benchmarks.kvpress_runner``) and ``benchmarks.agreement`` compares kept sets of our kvpress
  preset with kvpress's.
* ``selection`` — selection cost vs one layer's prefill, 1K-32K tokens
  (``benchmarks.bench_selection``), and the server-side selection time histogram.
* ``decode`` / ``prefill`` — compaction during decode and while a prompt is read, each against
  vanilla in the same run (``benchmarks.phases``: capacity and throughput with long outputs, a
  copy task, the cost of a compaction; needle accuracy with prompts 2x and 4x the pool, capacity
  with the prefill budget on, TTFT).
* ``trigger`` — compression as a pressure valve (``benchmarks.trigger``): vanilla, ``always``
  and ``--snapkv-trigger pressure`` on one small pool, SmolLM2, Poisson arrivals from light load
  to overload, RULER prompts (graded) and long outputs mixed: throughput, TTFT p99, queueing,
  preemptions, compactions by reason, accuracy, outputs identical to vanilla.
* ``capacity`` / ``throughput`` — a fixed KV pool (``--num-gpu-blocks-override``) on the tiny
  random model (block accounting and scheduling are the model-independent part; the 2-core CPU
  cannot push enough SmolLM2 4K prompts through in a benchmark's time): the most concurrent
  4K-token requests that run without preemption, and output tokens/s of a queue of long prompts,
  vanilla vs 2x/4x/8x compression.

Writes ``results.json`` (everything measured; its structure is ``benchmarks.schema``, checked
before every write), ``summary.md`` and PNG plots into ``--out``.
``--smoke`` runs every section at toy sizes (the test suite runs it so the benchmarks cannot rot);
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import (REPO, accuracy, client, kvpress_runner, needle, phases, report, schema,
                        trigger)
from benchmarks.accuracy import RulerProfile
from benchmarks.trigger import TriggerProfile
from vllm_snapkv import models
from vllm_snapkv.integration import seam
from vllm_snapkv.schedule import Schedule
from vllm_snapkv.testing import VllmServer

#: The ``--only`` sections: :data:`benchmarks.schema.SECTIONS` (what each writes is there).
SECTIONS = tuple(schema.SECTIONS)


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. :data:`FULL` is what the issue asks for; :data:`SMOKE` exercises the code."""

    lengths: tuple[int, ...] = (1024, 2048, 4096)
    per_cell: int = 50
    budgets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    filler: str = "passkey"
    accuracy_concurrency: int = 2
    kvpress_per_cell: int = 50
    agreement_per_cell: int = 4
    agreement_budgets: tuple[int, ...] = (128, 512)
    ttft_reps: int = 6
    decode_len: int = 4096
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 64
    smol_blocks: int = 1400
    max_model_len: int = 8192
    smol_block_size: int = 32
    selection_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    pressure_len: int = 4096
    pressure_tokens: int = 128
    pressure_requests: int = 96
    tiny_blocks: int = 400
    compressions: tuple[int, ...] = (2, 4, 8)
    # decode section (benchmarks.phases)
    decode_prompt: int = 256
    decode_output: int = 2048
    decode_requests: int = 48
    decode_interval: int = 128
    copy_lengths: tuple[int, ...] = (300,)
    copy_per_cell: int = 12
    copy_interval: int = 64
    cost_prompt: int = 1024
    cost_output: int = 1024
    cost_budget: int = 512
    # prefill section (benchmarks.phases)
    prefill_lengths: tuple[int, ...] = (4096, 8064)
    prefill_per_cell: int = 8
    prefill_pool_blocks: int = 17
    prefill_budget: int = 1024
    prefill_interval: int = 512
    prefill_final_budget: int = 512
    prefill_budget_large: int = 1408
    prefill_methods: tuple[str, ...] = ("keydiff", "knorm", "snapkv", "recency")
    prefill_compressions: tuple[int, ...] = (4, 8)
    prefill_interval_tiny: int = 256
    prefill_ttft_lengths: tuple[int, ...] = (2048, 4096)
    # accuracy section (benchmarks.accuracy)
    ruler: RulerProfile = dataclasses.field(default_factory=RulerProfile)
    # trigger section (benchmarks.trigger)
    trigger: TriggerProfile = dataclasses.field(default_factory=TriggerProfile)


FULL = Profile()
SMOKE = Profile(lengths=(512,), per_cell=2, budgets=(64, 128), accuracy_concurrency=2,
                kvpress_per_cell=1, agreement_per_cell=1, agreement_budgets=(128,), ttft_reps=1,
                decode_len=512, decode_batches=(1, 2), decode_tokens=8, smol_blocks=200, max_model_len=2048,
                selection_lengths=(1024, 2048), pressure_len=1024, pressure_tokens=64,
                pressure_requests=6, tiny_blocks=40, decode_prompt=64, decode_output=256,
                decode_requests=4, copy_lengths=(80,), copy_per_cell=1, cost_prompt=256,
                cost_output=160, cost_budget=96, prefill_lengths=(1024,), prefill_per_cell=1,
                prefill_pool_blocks=9, prefill_budget=512, prefill_interval=256,
                prefill_final_budget=256, prefill_budget_large=640,
                prefill_methods=("keydiff", "snapkv"), prefill_compressions=(4,),
                prefill_interval_tiny=256, prefill_ttft_lengths=(512,),
                ruler=RulerProfile(lengths=(1024,), per_task=1, ratios=(4,), methods=("snapkv",),
                                   min_full=0.0, kvpress_length=1024, kvpress_per_task=1,
                                   kvpress_tasks=("niah_single_1", "vt_easy"), concurrency=4,
                                   pool_blocks=600),
                trigger=TriggerProfile(rates=(0.5, 8.0), rounds=1, requests=4,
                                       tasks=("niah_single_1",), length=1024, long_prompt=64,
                                       long_output=256, pool_blocks=48, budget=256,
                                       decode_budget=256, decode_interval=32))

SERVED = "smollm2"


# ----------------------------------------------------------------------------------- servers


def smol_flags(p: Profile, compression: str) -> list[str]:
    return ["--kv-compression", compression, "--max-model-len", str(p.max_model_len),
            "--block-size", str(p.smol_block_size), "--num-gpu-blocks-override",
            str(p.smol_blocks), "--kv-cache-memory-bytes", "3G", "--max-num-seqs", "64"]


def tiny_flags(p: Profile, compression: str) -> list[str]:
    return ["--kv-compression", compression, "--max-model-len", str(p.max_model_len),
            "--num-gpu-blocks-override", str(p.tiny_blocks), "--kv-cache-memory-bytes", "2G",
            "--max-num-seqs", "256", "--max-num-batched-tokens", str(p.pressure_len * 2)]


@contextmanager
def servers(out: Path, specs: list[tuple[str, Path, list[str]]]) -> Iterator[list[VllmServer]]:
    """Start the servers in parallel (each start is mostly torch.compile), stop them after."""
    started = [VllmServer(model, args, out / f"server-{name}.log", SERVED) for name, model, args
               in specs]
    with ExitStack() as stack:
        for s in started:
            stack.callback(s.stop)
        client.run_all(lambda s: s.start(), [(s,) for s in started], len(started))
        yield started


# ----------------------------------------------------------------------------------- helpers


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """Unique random token ids (no prefix-cache hits between them)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(n)]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------- sections


def bench_overhead(p: Profile, vanilla: VllmServer, snap: VllmServer, tok: Any) -> dict:
    """TTFT per prompt length, decode s/token at batch 1 and 8 (A/B interleaved)."""
    ttft: dict[str, Any] = {}
    for n in p.lengths:
        cases = needle.build_cases(tok, [n], p.ttft_reps, seed=100 + n, filler=p.filler)
        rows = {"vanilla": [], "snapkv": []}
        for i, case in enumerate(cases):
            order = [("vanilla", vanilla), ("snapkv", snap)]
            for name, server in (order if i % 2 == 0 else order[::-1]):
                rows[name].append(client.complete(server, case.prompt_ids, 2, stream=True).ttft)
        ttft[str(n)] = {"vanilla_s": rows["vanilla"], "snapkv_s": rows["snapkv"],
                        "median_vanilla_s": median(rows["vanilla"]),
                        "median_snapkv_s": median(rows["snapkv"]),
                        "ratio": ratio(median(rows["snapkv"]), median(rows["vanilla"]))}
        log(f"ttft N={n}: {ttft[str(n)]['ratio']:.3f}x vanilla")
    decode: dict[str, Any] = {}
    for batch in p.decode_batches:
        rows = {}
        for k, (name, server) in enumerate((("vanilla", vanilla), ("snapkv", snap))):
            prompts = random_prompts(batch, p.decode_len, seed=7 * batch + k)
            done = client.run_all(
                lambda ids, s=server: client.complete(s, ids, p.decode_tokens, stream=True,
                                                      ignore_eos=True),
                [(ids,) for ids in prompts], batch)
            rows[name] = [c.decode_per_token for c in done]
        decode[str(batch)] = {"vanilla_s_per_token": median(rows["vanilla"]),
                              "snapkv_s_per_token": median(rows["snapkv"]),
                              "ratio": ratio(median(rows["snapkv"]), median(rows["vanilla"]))}
        log(f"decode batch {batch}: {decode[str(batch)]['ratio']:.3f}x vanilla")
    return {"ttft": ttft, "decode": decode, "decode_context": p.decode_len,
            "snapkv_budget": 1024}


def held_blocks(server: VllmServer, ids: list[int], xargs: dict | None, pool: int,
                decode_tokens: int, attempts: int = 5) -> list[int]:
    """Blocks in use while one request decodes, after its prefill (server otherwise idle): one
    reading per ``/metrics`` scrape that fell inside the decode.

    Which ``/metrics`` scrapes show the decode is read from the server's own state, not from
    client-side clocks: vLLM updates the KV-usage and running-requests gauges and the
    generation-token counter together, from the same engine step. A scrape counts when it shows
    this request running with at least 4 and at most ``decode_tokens - 1`` tokens generated: well
    past the prefill step and the step that frees the evicted blocks (one token of slack for a
    counter that lags the previous request's last output), before the finish. With
    ``decode_tokens`` one block's worth, every such scrape should show the same count. A fast
    machine can finish the decode between two scrapes; then the request is sent again (same
    prompt, same blocks), up to ``attempts`` times.
    """
    usage, running, generated = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                                 "vllm:generation_tokens_total")
    for _ in range(attempts):
        with client.Watcher(server, (usage, running, generated), period_s=0.002) as w:
            w.wait_for_sample()
            before = w.samples[-1][generated]
            client.complete(server, ids, decode_tokens, xargs=xargs, stream=True,
                            ignore_eos=True)
        seen = [round(v[usage] * pool) for v in w.samples
                if v[running] == 1 and 4 <= v[generated] - before <= decode_tokens - 1]
        if seen:
            return seen
    raise RuntimeError(f"{server.name}: no /metrics scrape during {attempts} decodes of "
                       f"{decode_tokens} tokens")


def evicted_tokens(n: int, budget: int, bs: int) -> int:
    """Tokens the prompt compaction evicts from an ``n``-token prompt kept to ``budget`` per KV
    head with ``bs``-token blocks: ``floor((n - budget) / bs) * bs`` (0 without a compaction)."""
    c = Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=budget
                 ).prompt_compaction
    return c.evicted if c is not None else 0


def tally(readings: list[int]) -> dict[str, int]:
    """``{reading: how many times}`` (JSON keys)."""
    return {str(k): v for k, v in sorted(Counter(readings).items())}


def bench_blocks(p: Profile, vanilla: VllmServer, snap: VllmServer) -> dict:
    bs = p.smol_block_size
    pool = client.num_kv_blocks(snap)
    decode_tokens = bs  # positions N .. N+bs-1: exactly one block beyond the prompt's
    rows = []
    for n in p.lengths:
        ids = random_prompts(1, n, seed=n)[0]
        base_seen = held_blocks(vanilla, ids, None, pool, decode_tokens)
        base = statistics.mode(base_seen)
        for b in p.budgets:
            evicted = evicted_tokens(n, b, bs)
            seen = held_blocks(snap, random_prompts(1, n, seed=n + b)[0], {"snapkv_budget": b},
                               pool, decode_tokens)
            got = statistics.mode(seen)
            want = math.ceil((n - evicted) / bs) + 1
            rows.append({"prompt": n, "budget": b, "block_size": bs, "evicted": evicted,
                         "vanilla_blocks": base, "snapkv_blocks": got, "expected_blocks": want,
                         "vanilla_readings": tally(base_seen), "snapkv_readings": tally(seen),
                         "matches_arithmetic": got == want,
                         "reduction": base / got if got else None})
            log(f"blocks N={n} b={b}: vanilla {base}, snapkv {got} (arithmetic {want})")
    return {"rows": rows, "decode_blocks_included": 1}


ACCURACY_METHODS = ("snapkv", "recency")


def bench_accuracy(p: Profile, snap: VllmServer, cases: list[needle.Case]) -> dict:
    """Full cache, SnapKV and recency at every budget, same server, same token ids."""

    def run_case(case: needle.Case) -> dict:
        # Full first: its blocks stay in the prefix cache, so the compressed runs of the same
        # prompt recompute only from their own E (vLLM's prefix caching with our cap at E).
        full = client.complete(snap, case.prompt_ids, 8, xargs={"kv_compression": "none"})
        row = {"id": case.id, "length": case.length, "depth": case.depth, "answer": case.answer,
               "full": full.text}
        for method in ACCURACY_METHODS:
            for b in p.budgets:
                if b >= case.length:
                    continue
                out = client.complete(snap, case.prompt_ids, 8,
                                      xargs={"kv_compression": method, "snapkv_budget": b})
                row[f"{method}@{b}"] = out.text
        return row

    started = time.time()
    rows = client.run_all(run_case, [(c,) for c in cases], p.accuracy_concurrency)
    log(f"accuracy: {len(rows)} prompts in {time.time() - started:.0f}s")
    columns = ["full"] + [f"{m}@{b}" for m in ACCURACY_METHODS for b in p.budgets]
    return {"rows": rows, "table": accuracy_table(rows, p.lengths, columns)}


def accuracy_table(rows: list[dict], lengths: tuple[int, ...], columns: list[str]) -> dict:
    """``{length: {column: {"accuracy": %, "n": cases}}}`` over the cases that have the column."""
    table: dict[str, dict[str, Any]] = {}
    for n in lengths:
        table[str(n)] = {}
        for col in columns:
            got = [needle.is_correct(r[col], r["answer"]) for r in rows
                   if r["length"] == n and col in r]
            if got:
                table[str(n)][col] = {"accuracy": 100.0 * sum(got) / len(got), "n": len(got)}
    return table


def bench_kvpress(p: Profile, cases: list[needle.Case], out: Path) -> dict:
    """kvpress on the same token ids (its own venv), then kept-set agreement with our preset."""
    by_length = {n: [c for c in cases if c.length == n] for n in p.lengths}
    chosen = [c for n in p.lengths for c in by_length[n][:p.kvpress_per_cell]]
    recorded = min(p.agreement_per_cell, p.kvpress_per_cell)  # kept sets of prompts kvpress ran
    record = [c.id for n in p.lengths for c in by_length[n][:recorded]]
    spec = {"cases": [c.to_dict() for c in chosen], "budgets": list(p.budgets),
            "max_new_tokens": 8, "record_kept": record,
            "model": str(models.ensure_model(models.SMOLLM2))}
    result_path = out / "kvpress.json"
    started = time.time()
    kvpress = kvpress_runner.run_subprocess(spec, result_path,
                                            spec_path=out / "kvpress_input.json")
    kvpress.pop("kept", None)  # bulky (bitmaps, scores); stays in kvpress.json for agreement.py
    log(f"kvpress: {len(chosen)} prompts in {time.time() - started:.0f}s")
    agreement_path = out / "agreement.json"
    subprocess.run([sys.executable, "-m", "benchmarks.agreement", "--kvpress-json",
                    str(result_path), "--budgets", *map(str, p.agreement_budgets),
                    "--out", str(agreement_path)], check=True, cwd=REPO)
    return {"kvpress": kvpress, "agreement": json.loads(agreement_path.read_text())}


def bench_selection(p: Profile, out: Path) -> dict:
    """Selection vs one layer's prefill, SmolLM2 shapes (``benchmarks.bench_selection``)."""
    path = out / "selection.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_selection", "--lengths",
                    *map(str, p.selection_lengths), "--repeats", "1", "--out", str(path)],
                   check=True, cwd=REPO)
    return {"layer_bench": json.loads(path.read_text())}


def server_selection(snap_metrics: dict[str, float]) -> dict:
    """The SnapKV server's own selection-time histogram (all layers of each request)."""
    count = snap_metrics.get("vllm:snapkv_selection_seconds_count", 0.0)
    total = snap_metrics.get("vllm:snapkv_selection_seconds_sum", 0.0)
    return {"mean_s": total / count if count else None, "requests": count}


def trial(server: VllmServer, prompts: list[list[int]], tokens: int, xargs: dict | None) -> dict:
    """All ``prompts`` at once: peak running requests, preemptions, wall time, output tokens."""
    before = client.metrics(server)
    started = time.perf_counter()
    with client.Watcher(server, ("vllm:num_requests_running",)) as w:
        done = client.run_all(
            lambda ids: client.complete(server, ids, tokens, xargs=xargs, ignore_eos=True),
            [(ids,) for ids in prompts], len(prompts))
    wall = time.perf_counter() - started
    after = client.metrics(server)

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    return {"requests": len(prompts), "peak_running": int(w.peak["vllm:num_requests_running"]),
            "preemptions": delta("vllm:num_preemptions_total"),
            "prefix_cache_hit_tokens": delta("vllm:prefix_cache_hits_total"),
            "wall_s": wall, "output_tokens": sum(c.completion_tokens for c in done),
            "output_tokens_per_s": sum(c.completion_tokens for c in done) / wall}


def predicted_capacity(pool: int, n: int, kept: int, tokens: int, bs: int) -> int:
    """Block arithmetic: one prefill's full prompt in flight + K compressed requests."""
    held = math.ceil((kept + tokens) / bs)
    transient = math.ceil(n / bs) - math.ceil(kept / bs)
    return max(1, (pool - transient) // held)


def capacity(server: VllmServer, p: Profile, xargs: dict | None, kept: int, seed: int) -> dict:
    """Largest K whose K simultaneous requests all run at once with no preemption.

    Starts at the block arithmetic's prediction and walks to the boundary (K ok, K+1 not), so
    the answer is measured, not predicted.
    """
    pool, n, bs = p.tiny_blocks, p.pressure_len, 128

    def ok(k: int) -> tuple[bool, dict]:
        t = trial(server, random_prompts(k, n, seed + k), p.pressure_tokens, xargs)
        good = t["preemptions"] == 0 and t["peak_running"] == k
        log(f"capacity {xargs}: K={k} peak {t['peak_running']} preemptions {t['preemptions']}")
        return good, t

    k = predicted_capacity(pool, n, kept, p.pressure_tokens, bs)
    trials = {}
    good, trials[k] = ok(k)
    if good:
        while True:
            nxt, t = ok(k + 1)
            trials[k + 1] = t
            if not nxt:
                break
            k += 1
    else:
        while k > 1:
            k -= 1
            good, trials[k] = ok(k)
            if good:
                break
    return {"capacity": k, "trials": {str(key): v for key, v in sorted(trials.items())}}


def bench_pressure(p: Profile, vanilla: VllmServer, snap: VllmServer, sections: set[str]
                   ) -> dict:
    n = p.pressure_len
    configs = [("vanilla", vanilla, None, n)] + [
        (f"{c}x", snap, {"snapkv_budget": n // c}, n // c) for c in p.compressions]
    out: dict[str, Any] = {"prompt": n, "output_tokens": p.pressure_tokens,
                           "pool_blocks": p.tiny_blocks, "block_size": 128}
    if "capacity" in sections:
        out["capacity"] = {name: capacity(server, p, xargs, kept, seed=1000 * i)
                           for i, (name, server, xargs, kept) in enumerate(configs)}
    if "throughput" in sections:
        out["throughput"] = {}
        for i, (name, server, xargs, _) in enumerate(configs):
            # Every run its own random prompts of the same length (the same cost on the tiny
            # model), seeded apart from the capacity trials' (1000 * config + K): a run after
            # another on the same server must not hit the blocks the earlier run freed in the
            # prefix cache. (``prefix_cache_hit_tokens`` shows it did not.)
            seed = 500_000 + 2 * i
            t = trial(server, random_prompts(p.pressure_requests, n, seed), p.pressure_tokens,
                      xargs)
            t["prefill_only"] = trial(server, random_prompts(p.pressure_requests, n, seed + 1),
                                      1, xargs)
            out["throughput"][name] = t
            log(f"throughput {name}: {t['output_tokens_per_s']:.1f} tok/s; the same load with "
                f"1 output token: {t['prefill_only']['wall_s']:.1f}s of {t['wall_s']:.1f}s")
        out["throughput_split"] = throughput_split(out["throughput"])
    return out


def throughput_split(thr: dict[str, dict]) -> dict[str, dict]:
    """Split each throughput run's wall time into its prefill floor and the rest.

    The floor is the same requests with one output token (prefill plus one sampling step):
    compression cannot shrink it, since every prompt is still prefilled in full. What remains
    (wall − floor) is the decode phase that compression can speed up. So vanilla's wall / its own
    floor bounds any configuration's speed-up on this load (Amdahl), and the decode-phase ratio
    says how much compression sped up the part it can act on.
    """
    van = thr["vanilla"]
    van_rest = van["wall_s"] - van["prefill_only"]["wall_s"]
    out = {}
    for name, t in thr.items():
        floor = t["prefill_only"]["wall_s"]
        rest = t["wall_s"] - floor
        out[name] = {"prefill_floor_s": floor, "decode_phase_s": rest,
                     "floor_share": floor / t["wall_s"],
                     "decode_phase_speedup": van_rest / rest if rest > 0 else None}
    out["bound_if_decode_were_free"] = van["wall_s"] / van["prefill_only"]["wall_s"]
    return out


# ----------------------------------------------------------------------------------- main


def save(results: dict, out: Path, *, complete: bool = False) -> None:
    """Write what has been measured so far (after every section: a crash keeps the rest).

    Checked against :mod:`benchmarks.schema` first; the file is written either way (the
    measurements are not lost), then a mismatch stops the run with
    :class:`~benchmarks.schema.SchemaError` (a suite that writes what the report cannot read is
    a bug, better found at the first section than after the last)."""
    text = json.dumps(results, indent=1)
    problems = schema.validate(json.loads(text), complete=complete)  # what the file holds
    (out / "results.json").write_text(text)
    if problems:
        raise schema.SchemaError(problems, f"{out / 'results.json'}")


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "vllm": seam.installed_vllm_versions(),
            "processor": platform.processor() or platform.machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CI): numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--per-cell", type=int, default=None, help="needle prompts per cell")
    parser.add_argument("--kvpress-per-cell", type=int, default=None)
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(sections - set(SECTIONS))}")
    p = SMOKE if args.smoke else FULL
    if args.per_cell is not None:
        p = dataclasses.replace(p, per_cell=args.per_cell)
    if args.kvpress_per_cell is not None:
        p = dataclasses.replace(p, kvpress_per_cell=args.kvpress_per_cell)
    out = args.out or REPO / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"profile": dataclasses.asdict(p), "smoke": args.smoke,
                               "machine": machine(), "sections": sorted(sections),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    save(results, out)  # the meta block checked before anything runs
    started = time.time()

    # Timing-sensitive sections first; the long accuracy runs (timings unused) last.
    if "selection" in sections:
        results["selection"] = bench_selection(p, out)
        save(results, out)
    if sections & {"capacity", "throughput"}:
        tiny = models.ensure_model(models.TINY)
        with servers(out, [("tiny-vanilla", tiny, tiny_flags(p, "none")),
                           ("tiny-snapkv", tiny, tiny_flags(p, "snapkv"))]) as (van, snap):
            results["pressure"] = bench_pressure(p, van, snap, sections)
            save(results, out)
    if "trigger" in sections:
        results["trigger"] = trigger.run(p.trigger, out, servers, log)
        save(results, out)
    smol = models.ensure_model(models.SMOLLM2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    cases = needle.build_cases(tok, list(p.lengths), p.per_cell, seed=0, filler=p.filler)
    if sections & {"overhead", "blocks", "needle"}:
        with servers(out, [("smollm2-vanilla", smol, smol_flags(p, "none")),
                           ("smollm2-snapkv", smol, smol_flags(p, "snapkv"))]) as (van, snap):
            if "overhead" in sections:
                results["overhead"] = bench_overhead(p, van, snap, tok)
                save(results, out)
            if "blocks" in sections:
                results["blocks"] = bench_blocks(p, van, snap)
                save(results, out)
            if "needle" in sections:
                results["needle"] = bench_accuracy(p, snap, cases)
                save(results, out)
            results["server_selection"] = server_selection(client.metrics(snap))
    if "needle" in sections:
        results["kvpress"] = bench_kvpress(p, cases, out)
    if "accuracy" in sections:
        results["accuracy"] = accuracy.run(p.ruler, out, servers, log, smoke=args.smoke)
        save(results, out)
    if "decode" in sections:
        results["decode"] = phases.bench_decode(p, out, servers, random_prompts, tok)
        save(results, out)
    if "prefill" in sections:
        results["prefill"] = phases.bench_prefill(p, out, servers, random_prompts, tok)
        save(results, out)
    results["wall_s"] = time.time() - started
    save(results, out, complete=True)
    report.write(results, out)
    log(f"done in {results['wall_s']:.0f}s: {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
