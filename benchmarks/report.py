"""Turn a benchmark run's ``results.json`` into ``summary.md`` and PNG plots.

Each figure is printed next to the target the project holds itself to (issue #6), with "met" /
"not met" computed from the numbers, never written by hand. The results are checked against
:mod:`benchmarks.schema` before anything is drawn. Also usable on its own, from the repository
root (writes next to ``results.json``, or into ``--out``)::

    python -m benchmarks.report results/bench-.../results.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import accuracy, phases, schema, trigger  # noqa: E402


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def accuracy_series(results: dict) -> dict[str, dict[str, dict[int, float]]]:
    """``{length: {peer: {budget: accuracy %}}}`` for ours, recency, kvpress; ``full`` at key 0."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    table = results.get("needle", {}).get("table", {})
    for n, cols in table.items():
        peers: dict[str, dict[int, float]] = {"snapkv": {}, "recency": {}, "full": {}}
        for col, cell in cols.items():
            if col == "full":
                peers["full"][0] = cell["accuracy"]
            else:
                method, budget = col.split("@")
                peers.setdefault(method, {})[int(budget)] = cell["accuracy"]
        out[n] = peers
    kv = results.get("kvpress", {}).get("kvpress", {}).get("accuracy", {})
    for n, cols in kv.items():
        # kvpress_runner reports fractions; the table is in %.
        out.setdefault(n, {})["kvpress"] = {int(b): 100 * c["accuracy"] for b, c in cols.items()
                                            if b != "full"}
        if "full" in cols:
            out[n]["hf-full"] = {0: 100 * cols["full"]["accuracy"]}
    return out


def plot_accuracy(results: dict, path: Path) -> None:
    series = accuracy_series(results)
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (n, peers) in zip(axes[0], sorted(series.items(), key=lambda kv: int(kv[0]))):
        for peer, style in (("snapkv", "o-"), ("kvpress", "s--"), ("recency", "^:")):
            pts = sorted(peers.get(peer, {}).items())
            if pts:
                ax.plot([b for b, _ in pts], [a for _, a in pts], style, label=peer)
        if 0 in peers.get("full", {}):
            ax.axhline(peers["full"][0], color="k", lw=1, label="full cache (vLLM)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n}-token prompts")
        ax.set_xlabel("budget (tokens kept per KV head)")
        ax.set_ylabel("needle accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pressure(results: dict, path: Path) -> None:
    pressure = results.get("pressure")
    if not pressure:
        return
    names = [k for k in ("vanilla", "2x", "4x", "8x") if k in pressure.get("throughput", {})
             or k in pressure.get("capacity", {})]
    xs = [1 if k == "vanilla" else int(k[:-1]) for k in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if "throughput" in pressure:
        axes[0].plot(xs, [pressure["throughput"][k]["output_tokens_per_s"] for k in names], "o-")
        axes[0].set_title("output tokens/s under a fixed KV pool")
    if "capacity" in pressure:
        axes[1].plot(xs, [pressure["capacity"][k]["capacity"] for k in names], "o-")
        axes[1].set_title("concurrent requests without preemption")
    for ax in axes:
        ax.set_xlabel("compression (prompt / kept tokens); 1 = vanilla")
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft(results: dict, path: Path) -> None:
    ttft = results.get("overhead", {}).get("ttft")
    if not ttft:
        return
    ns = sorted(ttft, key=int)
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (("median_vanilla_s", "vanilla vLLM"), ("median_snapkv_s", "vllm-snapkv")):
        ax.plot([int(n) for n in ns], [ttft[n][key] for n in ns], "o-", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("median time to first token (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    p, m = results["profile"], results["machine"]
    vllm = ", ".join(f"{dist} {v}" for dist, v in m["vllm"].items())
    lines = ["# vllm-snapkv benchmark summary", ""]
    if results.get("smoke"):
        lines += ["**Smoke run (toy sizes): the numbers below mean nothing.**", ""]
    lines += [f"Run {results['started']}, {results['wall_s'] / 60:.0f} min wall. Machine: "
              f"{m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}, "
              f"torch {m['torch']}, vLLM {vllm}. Sections: {', '.join(results['sections'])}.",
              "", "Settings: " + ", ".join(  # tuples as lists, as a redraw from JSON reads
                  f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in p.items()), ""]
    lines += _blocks_md(results) + _capacity_md(results) + _throughput_md(results)
    lines += _overhead_md(results) + _selection_md(results) + _accuracy_md(results)
    lines += phases.render(results)
    if "trigger" in results:
        lines += trigger.summary_md(results["trigger"], results["profile"]["trigger"])
    if "accuracy" in results:
        lines += accuracy.summary_md(results["accuracy"], results["profile"]["ruler"])
    return "\n".join(lines) + "\n"


def _blocks_md(results: dict) -> list[str]:
    rows = results.get("blocks", {}).get("rows")
    if not rows:
        return []
    out = ["## KV blocks held per request", "",
           "Target: equal to the placement arithmetic ceil((N − E)/bs) (+1 decode block here). "
           f"Met in {sum(r['matches_arithmetic'] for r in rows)}/{len(rows)} cases: "
           f"{_verdict(all(r['matches_arithmetic'] for r in rows))}.", "",
           *_readings_md(rows),
           "| prompt N | budget | E (evicted) | vanilla blocks | SnapKV blocks | arithmetic | "
           "N/(N−E) | vanilla/SnapKV |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['prompt']} | {r['budget']} | {r['evicted']} | {r['vanilla_blocks']} | "
                   f"{r['snapkv_blocks']} | {r['expected_blocks']} | "
                   f"{r['prompt'] / (r['prompt'] - r['evicted']):.1f} | {_fmt(r['reduction'])} |")
    return out + [""]


def _readings_md(rows: list[dict]) -> list[str]:
    """How the block counts were read (runs that recorded every reading)."""
    if "snapkv_readings" not in rows[0]:
        return []
    readings = [r[k] for r in rows for k in ("vanilla_readings", "snapkv_readings")]
    agreed = sum(len(x) == 1 for x in readings)  # one distinct reading in the tally
    return ["Blocks in use = vLLM's `vllm:kv_cache_usage_perc` × pool size, from `/metrics` "
            "scrapes that show the request decoding (1 running, 4 to bs − 1 tokens generated, "
            "all read from the same scrape); the table shows the most common reading. "
            f"All readings of a request agreed for {agreed}/{len(readings)} requests "
            f"({sum(sum(x.values()) for x in readings)} readings).", ""]


def _capacity_md(results: dict) -> list[str]:
    cap = results.get("pressure", {}).get("capacity")
    if not cap:
        return []
    pr = results["pressure"]
    base = cap["vanilla"]["capacity"]
    out = ["## Capacity (fixed KV pool)", "",
           f"{pr['prompt']}-token prompts, {pr['output_tokens']} output tokens each, pool of "
           f"{pr['pool_blocks']} blocks × {pr['block_size']} tokens, tiny random model. The most "
           "requests sent at once that all ran concurrently with zero preemptions.", "",
           "| config | capacity | × vanilla | target (0.9 × N/budget × vanilla) | |",
           "|---|---|---|---|---|"]
    for name, c in cap.items():
        if name == "vanilla":
            out.append(f"| vanilla | {base} | 1.00 | | |")
            continue
        target = 0.9 * int(name[:-1]) * base
        out.append(f"| {name} | {c['capacity']} | {c['capacity'] / base:.2f} | {target:.1f} | "
                   f"{_verdict(c['capacity'] >= target)} |")
    return out + [""]


def _throughput_md(results: dict) -> list[str]:
    thr = results.get("pressure", {}).get("throughput")
    if not thr:
        return []
    base = thr["vanilla"]["output_tokens_per_s"]
    out = ["## Throughput under memory pressure", "",
           f"{thr['vanilla']['requests']} requests sent at once to the same fixed pool. Target: "
           "≥ 3× vanilla at 8×.", "",
           "| config | output tok/s | × vanilla | peak running | preemptions | wall s |",
           "|---|---|---|---|---|---|"]
    for name, t in thr.items():
        out.append(f"| {name} | {t['output_tokens_per_s']:.1f} | "
                   f"{t['output_tokens_per_s'] / base:.2f} | {t['peak_running']} | "
                   f"{t['preemptions']} | {t['wall_s']:.1f} |")
    if "8x" in thr:
        out += ["", "8× target: " + _verdict(thr["8x"]["output_tokens_per_s"] >= 3 * base)]
    return out + [""] + _split_md(results)


def _split_md(results: dict) -> list[str]:
    """Prefill floor vs decode phase (runs that measured the floor)."""
    split = results.get("pressure", {}).get("throughput_split")
    if not split:
        return []
    bound = split["bound_if_decode_were_free"]
    rows = {k: v for k, v in split.items() if isinstance(v, dict)}
    out = ["### Where the time goes: prefill floor and decode phase", "",
           "Each configuration also ran the same load with 1 output token (fresh prompts of the "
           "same length): the prefill floor, which compression cannot shrink because every prompt "
           "is still prefilled in full. Wall time minus floor is the decode phase, the part "
           "compression acts on (an approximation: vLLM mixes prefill and decode in one step).", "",
           "| config | prefill floor s | share of wall | decode phase s | decode phase × vanilla |",
           "|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['prefill_floor_s']:.1f} | {r['floor_share']:.0%} | "
                   f"{r['decode_phase_s']:.1f} | {_fmt(r['decode_phase_speedup'])} |")
    return out + ["", f"Vanilla's floor is {rows['vanilla']['floor_share']:.0%} of its wall time, "
                  f"so on this load no configuration can exceed {bound:.2f}× vanilla's throughput "
                  "even if decoding cost nothing.", ""]


def _overhead_md(results: dict) -> list[str]:
    ov = results.get("overhead")
    if not ov:
        return []
    out = ["## Overhead without memory pressure", "",
           f"SnapKV server at its default budget ({ov['snapkv_budget']}), requests interleaved "
           "with the vanilla server's.", "", "| prompt N | TTFT vanilla (median s) | "
           "TTFT SnapKV | ratio |", "|---|---|---|---|"]
    for n, t in sorted(ov["ttft"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {n} | {_fmt(t['median_vanilla_s'], '.3f')} | "
                   f"{_fmt(t['median_snapkv_s'], '.3f')} | {_fmt(t['ratio'], '.3f')} |")
    longest = max(ov["ttft"], key=int)
    r = ov["ttft"][longest]["ratio"]
    out += ["", f"Target: TTFT at the longest prompt within 5 % of vanilla: "
            f"{_fmt(r, '.3f')} → {_verdict(None if r is None else r <= 1.05)}", "",
            f"Decode seconds per output token at {ov['decode_context']}-token context:", "",
            "| requests in flight | vanilla | SnapKV | ratio |", "|---|---|---|---|"]
    for b, d in sorted(ov["decode"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {b} | {_fmt(d['vanilla_s_per_token'], '.4f')} | "
                   f"{_fmt(d['snapkv_s_per_token'], '.4f')} | {_fmt(d['ratio'], '.3f')} |")
    return out + [""]


def _selection_md(results: dict) -> list[str]:
    sel = results.get("selection")
    if not sel:
        return []
    out = ["## Selection cost", "", "One layer, SmolLM2 shapes: selection time vs that layer's "
           "prefill (bench_selection.py).", "", "| N | selection ms | prefill ms | share |",
           "|---|---|---|---|"]
    for row in sel["layer_bench"]["rows"]:
        out.append(f"| {row['n']} | {row['select_s'] * 1e3:.1f} | {row['prefill_s'] * 1e3:.0f}"
                   f"{'' if row['prefill_measured'] else ' (est.)'} | "
                   f"{100 * row['select_over_prefill']:.2f} % |")
    server = results.get("server_selection") or {}
    if server.get("mean_s") is not None:
        out += ["", f"In the SmolLM2 server (all 30 layers of a request): mean selection "
                f"{server['mean_s'] * 1e3:.0f} ms over {server['requests']:.0f} compressed "
                "requests (`vllm:snapkv_selection_seconds`)."]
    return out + [""]


def _accuracy_md(results: dict) -> list[str]:
    series = accuracy_series(results)
    if not series:
        return []
    budgets = results["profile"]["budgets"]
    cells = {n: c for n, c in results["needle"]["table"].items()}
    out = ["## Needle accuracy (SmolLM2)", "",
           f"Filler `{results['profile']['filler']}`, prompts per cell: see n. Same token ids "
           "for every peer.", "",
           "| N | peer | full | " + " | ".join(str(b) for b in budgets) + " |",
           "|---|---|---|" + "---|" * len(budgets)]
    for n, peers in sorted(series.items(), key=lambda kv: int(kv[0])):
        full = peers.get("full", {}).get(0)
        for peer in ("snapkv", "recency", "kvpress"):
            if peer not in peers:
                continue
            full_col = _fmt(full, ".0f") if peer != "kvpress" else \
                _fmt(peers.get("hf-full", {}).get(0), ".0f") + " (HF)"
            out.append(f"| {n} | {peer} | {full_col} | "
                       + " | ".join(_fmt(peers[peer].get(b), ".0f") for b in budgets) + " |")
        ncount = cells.get(n, {}).get("full", {}).get("n")
        out.append(f"| {n} | prompts | {ncount} |" + " |" * len(budgets))
    out += ["", "Targets:"]
    for n, peers in sorted(series.items(), key=lambda kv: int(kv[0])):
        full = peers.get("full", {}).get(0)
        b4 = int(n) // 4
        snap4 = peers["snapkv"].get(b4)
        if full is not None and snap4 is not None:
            out.append(f"- N={n}, 4× (budget {b4}): SnapKV {snap4:.0f} % vs full {full:.0f} % "
                       f"(within 5 points: {_verdict(snap4 >= full - 5)})")
        if full is not None and full >= 50:
            beats = [b for b in budgets if b in peers["snapkv"]
                     and peers["snapkv"][b] > peers["recency"].get(b, 101)]
            out.append(f"- N={n}: SnapKV beats recency at budgets {beats} of "
                       f"{sorted(peers['snapkv'])} "
                       f"({_verdict(len(beats) == len(peers['snapkv']))})")
    kv = results.get("kvpress", {}).get("kvpress", {})
    if kv.get("accuracy"):
        totals = {n: max(c["total"] for c in cols.values()) for n, cols in kv["accuracy"].items()}
        checks = kv.get("meta", {}).get("equivalence_checks", [])
        out += ["", "kvpress prompts per cell: " + ", ".join(
            f"{t} at N={n}" for n, t in sorted(totals.items(), key=lambda kv: int(kv[0])))
            + ("." if all(t >= results["profile"]["per_cell"] for t in totals.values())
               else " (the first of each cell).")
            + (f" One prefill per prompt served every budget; on {len(checks)} prompt(s) "
               "(the first of each length) one prefill per budget, the plain kvpress way, gave "
               "identical kept positions and answers." if checks else "")]
    ag = results.get("kvpress", {}).get("agreement", {}).get("comparison")
    if ag:
        out += ["", "Kept-set agreement, our `kvpress` preset in vLLM vs kvpress on HF: "
                f"{ag['identical']}/{ag['sets']} (prompt, budget, layer, KV head) sets identical "
                f"({_fmt(ag['fraction_identical'], '.4f')}); mean Jaccard "
                f"{_fmt(ag['mean_jaccard'], '.4f')}. Budget 64 is not compared: kvpress's window "
                "is 64, so it keeps only the window there."]
    return out + [""]


def write(results: dict, out: Path) -> None:
    """``summary.md`` and the plots into ``out`` (a finished run's results: raises
    :class:`~benchmarks.schema.SchemaError` before drawing anything if they do not match the
    schema)."""
    schema.check(results, what="results to draw")
    plot_accuracy(results, out / "accuracy_vs_budget.png")
    plot_pressure(results, out / "throughput_capacity.png")
    plot_ttft(results, out / "ttft_vs_prompt.png")
    if "accuracy" in results:
        accuracy.plot(results["accuracy"], results["profile"]["ruler"],
                      out / "ruler_accuracy_vs_compression.png")
    (out / "summary.md").write_text(summary(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a run's results.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for summary.md and the plots (default: next to results)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    problems = schema.validate(results)
    if problems:
        print(f"{args.results} does not match benchmarks/schema.py; nothing drawn:",
              *problems, sep="\n  ", file=sys.stderr)
        return 1
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    write(results, out)
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
