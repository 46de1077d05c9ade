"""Why decode compaction buys capacity but less throughput on this CPU: a decode step's cost
against the batch size, with and without compaction during decode.

The decode section (``benchmarks.phases``) fits 4.5x as many long-output requests into a pool
at 8x, yet output tokens/s rose far less. Throughput is batch / step time, so it only grows
with the batch if a step's cost grows more slowly than the batch. This measures that directly:
the tiny model in vLLM (offline ``LLM``, one engine per configuration, a pool large enough
that nothing is preempted), ``B`` requests of 256 prompt tokens decoding 512 tokens each; the
decode time per step is (wall - wall of the same requests with one output token) / 511.

    .venv/bin/python -m benchmarks.step_cost [--out results/step-cost.json] [--smoke]
        [--configs vanilla,prompt-only,pressure-idle] [--repeat 5]

(``--smoke``: batches 1 and 2, 16 output tokens; what the test suite runs so this cannot rot.)

The *idle tax* — what a step costs with compression on when nothing compacts — is the
configurations ``prompt-only`` (``always``, prompts below the budget) and ``pressure-idle``
(``--snapkv-trigger pressure`` with budgets these requests exceed, on a pool that never runs
short) against ``vanilla``. With ``--repeat N`` the configurations run N times, interleaved
(a fresh engine each time, the order rotated every round), and each configuration's step time
is divided by vanilla's *of the same round*: the summary gives the median ratio and its range.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

PROMPT, OUTPUT = 256, 512
BATCHES = (1, 8, 22, 44, 99)
CONFIGS = {
    "vanilla": None,
    # Decode budget 128 + interval 128: the attended KV stays within 128..256 tokens.
    "decode-128": {"kv_compression": "snapkv",
                   "snapkv": {"window": 32, "decode_budget": 128, "decode_interval": 128}},
    # Compression on, nothing ever compacts: the prompts are below the budget.
    "prompt-only": {"kv_compression": "snapkv", "snapkv": {"window": 32, "budget": 1024}},
    # Under `always` these budgets would compact every request; under pressure, with this pool,
    # nothing is compacted.
    "pressure-idle": {"kv_compression": "snapkv",
                      "snapkv": {"window": 32, "budget": 128, "decode_budget": 128,
                                 "decode_interval": 128, "trigger": "pressure"}},
}
DEFAULT_CONFIGS = ("vanilla", "decode-128")


def _engine(config: str, batches: tuple[int, ...], output: int) -> None:
    """One configuration, every batch size, in this process; prints one JSON line."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from vllm_snapkv import models

    extra = {}
    if CONFIGS[config]:
        extra = {"worker_cls": "vllm_snapkv.integration.worker.SnapKVCPUWorker",
                 "additional_config": CONFIGS[config]}
    llm = LLM(model=str(models.ensure_model(models.TINY)), dtype="float32",
              max_model_len=1024, enforce_eager=True, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 30, max_num_seqs=128, **extra)
    rng = random.Random(0)
    out = {}

    def timed(batch: int, tokens: int) -> float:
        prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(PROMPT)]}
                   for _ in range(batch)]
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0

    timed(4, 16)  # warm-up
    for batch in batches:
        floor, wall = timed(batch, 1), timed(batch, output)
        step = (wall - floor) / (output - 1)
        out[batch] = {"wall_s": wall, "prefill_s": floor, "step_ms": step * 1e3,
                      "per_token_us": step / batch * 1e6, "tokens_per_s": batch / step}
    print("STEP_COST " + json.dumps(out), flush=True)


def _run_engine(config: str, smoke: bool) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--engine", config,
                           *(["--smoke"] if smoke else [])],
                          capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("STEP_COST ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(lines[-1].split(" ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/step-cost.json")
    ap.add_argument("--engine", choices=list(CONFIGS))
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    batches, output = ((1, 2), 16) if args.smoke else (BATCHES, OUTPUT)
    if args.engine:
        _engine(args.engine, batches, output)
        return
    configs = args.configs.split(",")
    if unknown := set(configs) - set(CONFIGS):
        ap.error(f"--configs: unknown {sorted(unknown)}")
    rounds: list[dict] = []
    for r in range(max(1, args.repeat)):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        rounds.append({config: _run_engine(config, args.smoke) for config in order})
    # Each configuration's median round (by step time, per batch) as its row; every round's
    # step time kept beside it.
    results: dict[str, dict] = {}
    for config in configs:
        results[config] = {}
        for batch in rounds[0][config]:
            runs = sorted((rd[config][batch] for rd in rounds), key=lambda x: x["step_ms"])
            row = dict(runs[len(runs) // 2])
            row["step_ms_runs"] = [rd[config][batch]["step_ms"] for rd in rounds]
            results[config][batch] = row
    ratios: dict[str, dict] = {}
    if "vanilla" in configs and len(configs) > 1:
        for config in configs:
            if config == "vanilla":
                continue
            ratios[config] = {}
            for batch in rounds[0][config]:
                rs = sorted(rd[config][batch]["step_ms"] / rd["vanilla"][batch]["step_ms"]
                            for rd in rounds)
                ratios[config][batch] = {"median": statistics.median(rs), "min": rs[0],
                                         "max": rs[-1], "rounds": len(rs)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"prompt": PROMPT, "output": output, "repeat": len(rounds),
                   "results": results, "ratios_to_vanilla": ratios}, f, indent=1)
    print("| config | batch | step ms | per token us | output tok/s | step ms / batch-1 step |")
    print("|---|---|---|---|---|---|")
    for config, rows in results.items():
        for batch, r in rows.items():
            print(f"| {config} | {batch} | {r['step_ms']:.1f} | {r['per_token_us']:.0f} | "
                  f"{r['tokens_per_s']:.0f} | {r['step_ms'] / rows['1']['step_ms']:.1f} |")
    if ratios:
        print(f"\nstep time / vanilla's in the same round ({len(rounds)} rounds): median "
              "[min, max]")
        print("| config | " + " | ".join(f"batch {b}" for b in rounds[0]["vanilla"]) + " |")
        print("|---|" + "---|" * len(rounds[0]["vanilla"]))
        for config, rows in ratios.items():
            print(f"| {config} | " + " | ".join(
                f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]" for x in rows.values())
                + " |")


if __name__ == "__main__":
    main()
