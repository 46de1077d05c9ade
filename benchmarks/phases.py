"""Benchmarks of compaction during decode and while a prompt is read (``make bench`` sections
``decode`` and ``prefill``), each against vanilla vLLM in the same run.

``decode`` (``--snapkv-decode-budget``):

* **capacity / throughput** — the tiny model on a fixed pool, short prompts and long outputs: the
  most concurrent requests that run without preemption, and output tokens/s of a queue of them,
  for vanilla vLLM, prompt-only compression (its budget is above these prompts: it does nothing
  here, which is the point), and decode budgets of 1/2, 1/4, 1/8 of prompt + output; against the
  block arithmetic's ideal (pool / a request's peak blocks).
* **accuracy** — SmolLM2 copying a passage (``benchmarks.copying``): the output is as long as the
  passage and every token of it needs the prompt; full cache, SnapKV and the recency baseline at
  decode budgets of 1/2, 1/4, 1/8 of prompt + output.
* **cost** — one SmolLM2 request decoding with compactions: the inter-token time of the steps
  that ran a compaction against the median of the others.

``prefill`` (``--snapkv-prefill-budget``):

* **accuracy** — the needle task on SmolLM2 with prompts about 2x and 4x a fixed pool, read with
  compactions; the methods of those compactions (``keydiff``, ``knorm``, ``snapkv`` with the
  chunk's own last window, ``recency``) and a larger prefill budget, against the full cache (a
  pool large enough) and the recency baseline at the same budgets.
* **capacity** — the pressure section's capacity rerun (4K-token prompts, tiny model) with the
  prefill budget on at 4x and 8x, beside the same compression without it.
* **ttft** — time to first token against vanilla at prompt lengths vanilla can run.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import client, copying, needle
from vllm_snapkv import models
from vllm_snapkv.schedule import Schedule
from vllm_snapkv.testing import VllmServer


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------------- shared


def peak_blocks(n: int, total: int, bs: int, *, budget: int | None = None,
                decode_budget: int | None = None, decode_interval: int = 0,
                prefill_budget: int | None = None, prefill_interval: int = 0) -> int:
    """Most blocks one request holds (the schedule's arithmetic), ``total`` = prompt + output."""
    target = None if budget is None or budget >= n else budget
    s = Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=target,
                 decode_budget=decode_budget, decode_interval=decode_interval,
                 prefill_budget=prefill_budget, prefill_interval=prefill_interval,
                 prefill_method="keydiff")
    return s.max_held_blocks(total)


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
    out = sum(c.completion_tokens for c in done)
    return {"requests": len(prompts), "peak_running": int(w.peak["vllm:num_requests_running"]),
            "preemptions": int(after.get("vllm:num_preemptions_total", 0)
                               - before.get("vllm:num_preemptions_total", 0)),
            "wall_s": wall, "output_tokens": out, "output_tokens_per_s": out / wall}


def capacity(server: VllmServer, make_prompts, tokens: int, xargs: dict | None, start: int,
             name: str, limit: int) -> dict:
    """Largest K whose K simultaneous requests all run at once with no preemption, walked from
    ``start`` (the arithmetic's prediction) to the boundary: measured, not predicted."""
    trials: dict[int, dict] = {}

    def ok(k: int) -> bool:
        t = trials[k] = trial(server, make_prompts(k), tokens, xargs)
        good = t["preemptions"] == 0 and t["peak_running"] == k
        _log(f"capacity {name}: K={k} peak {t['peak_running']} preemptions {t['preemptions']}")
        return good

    k = max(1, min(start, limit))
    if ok(k):
        while k < limit and ok(k + 1):
            k += 1
    else:
        while k > 1:
            k -= 1
            if ok(k):
                break
    return {"capacity": k, "trials": {str(a): b for a, b in sorted(trials.items())}}


# ----------------------------------------------------------------------------------- decode


def decode_pressure(p: Any, vanilla: VllmServer, snap: VllmServer, prompts) -> dict:
    n, m, bs, pool = p.decode_prompt, p.decode_output, 128, p.tiny_blocks - 1
    total = n + m
    configs: list[tuple[str, VllmServer, dict | None, int]] = [
        ("vanilla", vanilla, None, peak_blocks(n, total, bs)),
        ("prompt-only", snap, {"snapkv_decode_budget": 0}, peak_blocks(n, total, bs)),
    ] + [(f"{c}x", snap, {"snapkv_decode_budget": total // c},
          peak_blocks(n, total, bs, decode_budget=total // c,
                      decode_interval=p.decode_interval)) for c in p.compressions]
    out: dict[str, Any] = {"prompt": n, "output": m, "pool_blocks": pool, "block_size": bs,
                           "decode_interval": p.decode_interval, "configs": {}}
    for i, (name, server, xargs, peak) in enumerate(configs):
        ideal = pool // peak
        cap = capacity(server, lambda k, i=i: prompts(k, n, 10_000 * (i + 1) + k), m, xargs,
                       ideal, name, limit=250)
        thr = trial(server, prompts(p.decode_requests, n, 900_000 + i), m, xargs)
        out["configs"][name] = {"xargs": xargs, "peak_blocks": peak, "ideal_capacity": ideal,
                                **cap, "throughput": thr}
        _log(f"decode {name}: capacity {cap['capacity']} (ideal {ideal}), "
             f"{thr['output_tokens_per_s']:.1f} tok/s")
    van = out["configs"]["vanilla"]
    for name, c in out["configs"].items():
        c["capacity_ratio"] = c["capacity"] / van["capacity"]
        c["capacity_vs_ideal"] = c["capacity"] / c["ideal_capacity"]
        c["throughput_ratio"] = (c["throughput"]["output_tokens_per_s"]
                                 / van["throughput"]["output_tokens_per_s"])
    return out


def decode_accuracy(p: Any, server: VllmServer, tok: Any) -> dict:
    cases = copying.build_cases(tok, list(p.copy_lengths), p.copy_per_cell, seed=11)
    columns = ["full"] + [f"{m}@{c}x" for m in ("snapkv", "recency") for c in p.compressions]

    def run(case: copying.CopyCase) -> dict:
        total = len(case.prompt_ids) + case.length
        row: dict[str, Any] = {"id": case.id, "length": case.length,
                               "prompt": len(case.prompt_ids)}
        for col in columns:
            if col == "full":
                xargs: dict = {"kv_compression": "none"}
            else:
                method, c = col.split("@")
                xargs = {"kv_compression": method,
                         "snapkv_decode_budget": max(total // int(c[:-1]), 64)}
            out = client.complete(server, case.prompt_ids, case.length, xargs=xargs,
                                  ignore_eos=True, token_ids=True)
            row[col] = copying.score(case.answer_ids, out.token_ids or [])
            row[f"{col}:compactions"] = (out.snapkv or {}).get("compactions", 0)
        return row

    started = time.time()
    rows = client.run_all(run, [(c,) for c in cases], p.accuracy_concurrency)
    table = {col: 100.0 * statistics.mean(r[col] for r in rows) for col in columns}
    _log(f"decode accuracy: {len(rows)} passages in {time.time() - started:.0f}s: "
         + ", ".join(f"{k} {v:.1f}" for k, v in table.items()))
    return {"rows": rows, "table": table, "block_size": p.smol_block_size,
            "decode_interval": p.copy_interval}


def decode_cost(p: Any, server: VllmServer) -> dict:
    """Inter-token times of one request: the steps that compacted vs the others."""
    n, m, b, s, bs = p.cost_prompt, p.cost_output, p.cost_budget, p.copy_interval, \
        p.smol_block_size
    ids = [1000 + (i * 7919) % 30000 for i in range(n)]
    done = client.complete(server, ids, m, xargs={"snapkv_decode_budget": b}, stream=True,
                           ignore_eos=True)
    sched = Schedule(prompt_len=n, block_size=bs, method="snapkv", decode_budget=b,
                     decode_interval=s)
    gaps = [t1 - t0 for t0, t1 in zip(done.token_times, done.token_times[1:])]
    # Output token j (0-based) is sampled in the step that processes position n + j - 1; a
    # compaction at `at` runs in the step processing at - 1, i.e. before token at - n arrives.
    steps = {c.at - n for c in sched.compactions(n + m - 1) if c.at > n}
    comp = [g for j, g in enumerate(gaps, start=1) if j in steps]
    rest = [g for j, g in enumerate(gaps, start=1) if j not in steps]
    out = {"prompt": n, "output": m, "decode_budget": b, "interval": s,
           "compaction_steps": len(comp), "median_compaction_step_s": _median(comp),
           "median_other_step_s": _median(rest),
           "ratio": (_median(comp) / _median(rest)) if comp and rest else None,
           "summary": done.snapkv}
    _log(f"decode cost: {out['ratio']}")
    return out


def bench_decode(p: Any, out: Path, servers, random_prompts, tok: Any) -> dict:
    tiny = models.ensure_model(models.TINY)
    common = ["--max-model-len", "4096", "--num-gpu-blocks-override", str(p.tiny_blocks),
              "--kv-cache-memory-bytes", "2G", "--max-num-seqs", "256"]
    result: dict[str, Any] = {}
    with servers(out, [("decode-tiny-vanilla", tiny, ["--kv-compression", "none", *common]),
                       ("decode-tiny-snapkv", tiny,
                        ["--kv-compression", "snapkv", "--snapkv-decode-interval",
                         str(p.decode_interval), *common])]) as (van, snap):
        result["pressure"] = decode_pressure(p, van, snap, random_prompts)
    smol = models.ensure_model(models.SMOLLM2)
    flags = ["--kv-compression", "snapkv", "--max-model-len", "4096", "--block-size",
             str(p.smol_block_size), "--snapkv-decode-interval", str(p.copy_interval),
             "--kv-cache-memory-bytes", "2G", "--max-num-seqs", "8"]
    with servers(out, [("decode-smollm2", smol, flags)]) as (snap,):
        result["accuracy"] = decode_accuracy(p, snap, tok)
        result["cost"] = decode_cost(p, snap)
    return result


# ----------------------------------------------------------------------------------- prefill


def prefill_accuracy(p: Any, small: VllmServer, full: VllmServer, tok: Any) -> dict:
    cases = needle.build_cases(tok, list(p.prefill_lengths), p.prefill_per_cell, seed=21,
                               filler=p.filler)
    b, pb = p.prefill_final_budget, p.prefill_budget
    columns: dict[str, dict | None] = {"full": None}
    for method in p.prefill_methods:
        columns[f"{method}@{pb}"] = {"snapkv_prefill_method": method}
    columns[f"keydiff@{p.prefill_budget_large}"] = {"snapkv_prefill_method": "keydiff",
                                                     "snapkv_prefill_budget":
                                                         p.prefill_budget_large}
    columns[f"recency-all@{pb}"] = {"kv_compression": "recency",
                                    "snapkv_prefill_method": "recency"}

    def run(case: needle.Case) -> dict:
        row: dict[str, Any] = {"id": case.id, "length": case.length, "answer": case.answer}
        for col, xargs in columns.items():
            if xargs is None:
                out = client.complete(full, case.prompt_ids, 8,
                                      xargs={"kv_compression": "none"})
            else:
                out = client.complete(small, case.prompt_ids, 8, xargs={
                    "snapkv_budget": b, "snapkv_prefill_budget": pb, **xargs})
            row[col] = out.text
            row[f"{col}:compactions"] = (out.snapkv or {}).get("compactions", 0)
        return row

    started = time.time()
    rows = client.run_all(run, [(c,) for c in cases], 1)
    table: dict[str, dict[str, float]] = {}
    for n in p.prefill_lengths:
        sub = [r for r in rows if r["length"] == n]
        table[str(n)] = {col: 100.0 * sum(needle.is_correct(r[col], r["answer"]) for r in sub)
                         / len(sub) for col in columns}
    _log(f"prefill accuracy: {len(rows)} prompts in {time.time() - started:.0f}s: {table}")
    return {"rows": rows, "table": table, "pool_blocks": p.prefill_pool_blocks - 1,
            "block_size": 128, "final_budget": b, "prefill_budget": pb,
            "prefill_interval": p.prefill_interval}


def prefill_capacity(p: Any, van: VllmServer, snap: VllmServer, random_prompts) -> dict:
    n, m, bs, pool = p.pressure_len, p.pressure_tokens, 128, p.tiny_blocks - 1
    configs: list[tuple[str, VllmServer, dict | None, int]] = [
        ("vanilla", van, None, peak_blocks(n, n + m, bs))]
    for c in p.prefill_compressions:
        budget = n // c
        configs.append((f"{c}x", snap, {"snapkv_budget": budget},
                        peak_blocks(n, n + m, bs, budget=budget)))
        configs.append((f"{c}x+prefill", snap,
                        {"snapkv_budget": budget, "snapkv_prefill_budget": budget},
                        peak_blocks(n, n + m, bs, budget=budget, prefill_budget=budget,
                                    prefill_interval=p.prefill_interval_tiny)))
    out: dict[str, Any] = {"prompt": n, "output": m, "pool_blocks": pool, "block_size": bs,
                           "prefill_interval": p.prefill_interval_tiny, "configs": {}}
    for i, (name, server, xargs, peak) in enumerate(configs):
        # Ideal: pool / the blocks a request holds once its prompt is compacted (no transient).
        c = int(name.split("x")[0]) if name != "vanilla" else 1
        held = math.ceil((n // c + m) / bs) if c > 1 else math.ceil((n + m) / bs)
        ideal = pool // held
        cap = capacity(server, lambda k, i=i: random_prompts(k, n, 20_000 * (i + 1) + k), m,
                       xargs, min(ideal, pool // peak + 1), name, limit=250)
        out["configs"][name] = {"xargs": xargs, "peak_blocks": peak, "held_blocks": held,
                                "ideal_capacity": ideal, **cap}
    van_cap = out["configs"]["vanilla"]["capacity"]
    for name, cfg in out["configs"].items():
        c = int(name.split("x")[0]) if name != "vanilla" else 1
        cfg["target"] = 0.9 * c * van_cap
        cfg["meets_target"] = cfg["capacity"] >= cfg["target"]
        cfg["capacity_vs_ideal"] = cfg["capacity"] / cfg["ideal_capacity"]
    return out


def prefill_ttft(p: Any, van: VllmServer, snap: VllmServer, tok: Any) -> dict:
    out = {}
    for n in p.prefill_ttft_lengths:
        cases = needle.build_cases(tok, [n], p.ttft_reps, seed=300 + n, filler=p.filler)
        rows: dict[str, list[float]] = {"vanilla": [], "prefill": []}
        for i, case in enumerate(cases):
            order = [("vanilla", van, None),
                     ("prefill", snap, {"snapkv_budget": p.prefill_final_budget,
                                        "snapkv_prefill_budget": p.prefill_budget})]
            for name, server, xargs in (order if i % 2 == 0 else order[::-1]):
                rows[name].append(client.complete(server, case.prompt_ids, 2, xargs=xargs,
                                                  stream=True).ttft)
        out[str(n)] = {"vanilla_s": rows["vanilla"], "prefill_s": rows["prefill"],
                       "ratio": _median(rows["prefill"]) / _median(rows["vanilla"])}
        _log(f"prefill ttft N={n}: {out[str(n)]['ratio']:.3f}x vanilla")
    return out


def bench_prefill(p: Any, out: Path, servers, random_prompts, tok: Any) -> dict:
    smol = models.ensure_model(models.SMOLLM2)
    result: dict[str, Any] = {}
    small = ["--kv-compression", "snapkv", "--max-model-len", "8192",
             "--num-gpu-blocks-override", str(p.prefill_pool_blocks),
             "--snapkv-budget", str(p.prefill_final_budget),
             "--snapkv-prefill-budget", str(p.prefill_budget),
             "--snapkv-prefill-interval", str(p.prefill_interval),
             "--kv-cache-memory-bytes", "1G", "--max-num-seqs", "4"]
    large = ["--kv-compression", "none", "--max-model-len", "8192",
             "--kv-cache-memory-bytes", "2G", "--max-num-seqs", "4"]
    with servers(out, [("prefill-smollm2-pool", smol, small),
                       ("prefill-smollm2-full", smol, large)]) as (snap, van):
        result["accuracy"] = prefill_accuracy(p, snap, van, tok)
        result["ttft"] = prefill_ttft(p, van, snap, tok)
    tiny = models.ensure_model(models.TINY)
    common = ["--max-model-len", str(p.max_model_len), "--num-gpu-blocks-override",
              str(p.tiny_blocks), "--kv-cache-memory-bytes", "2G", "--max-num-seqs", "256",
              "--max-num-batched-tokens", str(p.pressure_len * 2)]
    with servers(out, [("prefill-tiny-vanilla", tiny, ["--kv-compression", "none", *common]),
                       ("prefill-tiny-snapkv", tiny,
                        ["--kv-compression", "snapkv", "--snapkv-prefill-interval",
                         str(p.prefill_interval_tiny), *common])]) as (van, snap):
        result["capacity"] = prefill_capacity(p, van, snap, random_prompts)
    return result


# ----------------------------------------------------------------------------------- report


def render(results: dict) -> list[str]:
    """Summary lines for the two sections (``benchmarks.report`` appends them)."""
    lines: list[str] = []
    dec = results.get("decode")
    if dec:
        pr = dec["pressure"]
        lines += ["", "## Compaction during decode", "",
                  f"Tiny model, pool {pr['pool_blocks']} blocks of {pr['block_size']}, prompts "
                  f"of {pr['prompt']} tokens, {pr['output']} output tokens, decode interval "
                  f"{pr['decode_interval']}; decode budgets are (prompt + output) / factor.", "",
                  "| config | peak blocks | ideal capacity | capacity | vs ideal | x vanilla | "
                  "output tok/s | x vanilla |", "|---|---|---|---|---|---|---|---|"]
        for name, c in pr["configs"].items():
            lines.append(f"| {name} | {c['peak_blocks']} | {c['ideal_capacity']} | "
                         f"{c['capacity']} | {c['capacity_vs_ideal']:.2f} | "
                         f"{c['capacity_ratio']:.2f} | "
                         f"{c['throughput']['output_tokens_per_s']:.1f} | "
                         f"{c['throughput_ratio']:.2f} |")
        acc = dec["accuracy"]
        lines += ["", f"Copy task (SmolLM2, {len(acc['rows'])} passages, "
                      f"{', '.join(str(r) for r in sorted({r['length'] for r in acc['rows']}))}"
                      f" tokens; block {acc['block_size']}, interval {acc['decode_interval']}): "
                      "fraction of the passage reproduced, %.", "",
                  "| " + " | ".join(acc["table"]) + " |",
                  "|" + "---|" * len(acc["table"]),
                  "| " + " | ".join(f"{v:.1f}" for v in acc["table"].values()) + " |"]
        cost = dec["cost"]
        if cost.get("ratio") is not None:
            lines += ["", f"Cost of a decode compaction (SmolLM2, prompt {cost['prompt']}, "
                          f"budget {cost['decode_budget']}, {cost['compaction_steps']} "
                          f"compactions): a step that compacts takes {cost['ratio']:.2f}x the "
                          f"median other step ({cost['median_compaction_step_s'] * 1000:.1f} "
                          f"vs {cost['median_other_step_s'] * 1000:.1f} ms)."]
    pre = results.get("prefill")
    if pre:
        acc = pre["accuracy"]
        cols = list(next(iter(acc["table"].values())))
        lines += ["", "## Compaction while a prompt is read", "",
                  f"Needle accuracy, SmolLM2, pool {acc['pool_blocks']} blocks of "
                  f"{acc['block_size']} ({acc['pool_blocks'] * acc['block_size']} tokens), final "
                  f"budget {acc['final_budget']}, prefill budget {acc['prefill_budget']} + "
                  f"interval {acc['prefill_interval']}; columns are the prefill method@budget "
                  "(full: a pool large enough, no compression), %.", "",
                  "| prompt | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for n, row in acc["table"].items():
            lines.append(f"| {n} | " + " | ".join(f"{row[c]:.0f}" for c in cols) + " |")
        cap = pre["capacity"]
        lines += ["", f"Capacity (tiny model, pool {cap['pool_blocks']} blocks, "
                      f"{cap['prompt']}-token prompts, {cap['output']} output tokens, prefill "
                      f"interval {cap['prefill_interval']}):", "",
                  "| config | peak blocks | ideal | capacity | target 0.9 x c x vanilla | met |",
                  "|---|---|---|---|---|---|"]
        for name, c in cap["configs"].items():
            lines.append(f"| {name} | {c['peak_blocks']} | {c['ideal_capacity']} | "
                         f"{c['capacity']} | {c['target']:.1f} | "
                         f"{'yes' if c['meets_target'] else 'no'} |")
        lines += ["", "TTFT with the prefill budget on, vs vanilla (median): " + ", ".join(
            f"{n} tokens {v['ratio']:.2f}x" for n, v in pre["ttft"].items()) + "."]
    return lines
