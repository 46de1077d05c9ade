"""The ``accuracy`` section of ``make bench``: what compression costs in answers, on RULER-style
tasks (``benchmarks.ruler``), in both regimes users meet, against the full cache and kvpress.

Regimes (``REGIMES``):

* ``question`` — the question inside the observation window: the prompt compaction runs at the
  prompt's end, after the question was read (what ``vllm serve`` does to a prompt that ends with
  its question);
* ``context`` — without the question: the request sets ``vllm_xargs.snapkv_compact_at`` to the
  context's end, so the context is compacted before the question is read, and the question is read
  on top of what was kept (what happens to every chunk compacted while a long prompt is read, and
  to compressed KV reused for another question).

Cells: every registered method at every ratio (2x, 4x, 8x: ``snapkv_ratio = 1/r``) in both
regimes, plus the full cache (``kv_compression: none``), on one ``vllm serve`` with 32-token KV
blocks. Each (task, length) first runs the full cache on its prompts; a task the full cache
answers under ``min_full`` of the time is shown with that score and not compressed (compression
cannot lose what the model never had) and stays out of the macro average. A macro cell pools the
included (task, length) cells, which all have the same number of prompts, so the pooled fraction
equals the macro average and its Wilson interval is that of the pooled count.

Cost: a compressed request reuses the full-cache request's prefix-cache blocks up to its own first
eviction (the plugin caps a compacting request's prefix hit there, so a compaction only rewrites
blocks it owns) and recomputes the rest, ``N / r`` tokens plus the question. So each prompt costs
about ``1 + 2 x methods x (1/2 + 1/4 + 1/8)`` prefills; this, not decoding, bounds the samples a
90-minute run affords on 2 cores.

kvpress (``benchmarks.kvpress_ruler``, its own venv): the same token ids, kvpress's presses at the
kept count the engine keeps for each case and regime, at ``kvpress_ratio`` on
``kvpress_length``-token prompts of the included tasks. The agreement table puts each method's
engine score next to kvpress's on exactly the same prompts.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import client, kvpress_ruler, ruler

REGIMES = ("question", "context")
Z95 = 1.959963984540054


def _registered_methods() -> tuple[str, ...]:
    from vllm_snapkv.methods import method_names

    return tuple(method_names())


@dataclass(frozen=True)
class RulerProfile:
    """Sizes of the accuracy section (``suite.Profile.ruler``)."""

    tasks: tuple[str, ...] = tuple(ruler.TASKS)
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    per_task: int = 6
    chat: bool = False
    ratios: tuple[int, ...] = (2, 4, 8)
    methods: tuple[str, ...] = ("snapkv", "keydiff", "knorm", "recency")  # run() checks: all
    regimes: tuple[str, ...] = REGIMES
    min_full: float = 0.5
    kvpress_length: int = 2048
    kvpress_ratio: int = 4
    kvpress_per_task: int = 6
    kvpress_tasks: tuple[str, ...] = ()  # () = every included task
    jobs: int = 2
    concurrency: int = 12
    seed: int = 0
    block_size: int = 32
    pool_blocks: int = 3000


def server_flags(p: RulerProfile) -> list[str]:
    return ["--kv-compression", "snapkv", "--max-model-len", str(max(p.lengths) + 256),
            "--block-size", str(p.block_size), "--num-gpu-blocks-override", str(p.pool_blocks),
            "--kv-cache-memory-bytes", "5G", "--max-num-seqs", "64", "--enable-prefix-caching"]


def column(method: str, ratio: int) -> str:
    return f"{method}@{ratio}x"


def xargs(method: str, ratio: int, regime: str, case: ruler.Case) -> dict[str, Any]:
    """The request's ``vllm_xargs`` for one cell."""
    out: dict[str, Any] = {"kv_compression": method, "snapkv_ratio": 1.0 / ratio}
    if regime == "context":
        out["snapkv_compact_at"] = case.context_len
    return out


def expected_kept(case: ruler.Case, ratio: int, regime: str, block_size: int,
                  method: str = "snapkv") -> tuple[int, int]:
    """(tokens the prompt compaction keeps, tokens attended after the prompt) by the plugin's
    schedule — what the engine must report, and the count kvpress is run at."""
    from vllm_snapkv.config import CompressionConfig

    config = CompressionConfig.from_additional_config({"kv_compression": "snapkv", "snapkv": {}})
    schedule = config.schedule(case.length, block_size, xargs(method, ratio, regime, case))
    c = schedule.prompt_compaction
    return c.kept, case.length - c.evicted


def wilson(correct: int, total: int) -> tuple[float, float]:
    """95 % Wilson score interval of ``correct / total`` (fractions)."""
    if total == 0:
        return 0.0, 1.0
    phat, z2 = correct / total, Z95 * Z95
    centre = (phat + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(phat * (1 - phat) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(correct: int, total: int) -> dict[str, Any]:
    lo, hi = wilson(correct, total)
    return {"correct": correct, "total": total,
            "accuracy": 100.0 * correct / total if total else None,
            "lo": 100.0 * lo, "hi": 100.0 * hi}


# ------------------------------------------------------------------------------------ running


def run(p: RulerProfile, out: Path, servers: Callable, log: Callable[[str], None],
        smoke: bool = False) -> dict[str, Any]:
    """Run the section; ``servers`` is ``suite.servers`` (starts and stops ``vllm serve``)."""
    from transformers import AutoTokenizer

    from vllm_snapkv import models

    if set(p.methods) != set(_registered_methods()) and not smoke:
        raise ValueError(f"the full run covers every registered method: {_registered_methods()}")
    started = time.time()
    smol = models.ensure_model(models.SMOLLM2)
    tok = AutoTokenizer.from_pretrained(smol)
    cases = ruler.build_cases(tok, list(p.tasks), list(p.lengths), p.per_task, seed=p.seed,
                              chat=p.chat)
    by_cell: dict[tuple[str, int], list[ruler.Case]] = defaultdict(list)
    for c in cases:
        by_cell[(c.task, c.length)].append(c)
    rows: list[dict] = []
    included: dict[str, list[str]] = {str(n): [] for n in p.lengths}

    def record(case, regime, col, done, expect=None) -> None:
        summary = done.snapkv or {}
        row = dict(id=case.id, task=case.task, length=case.length, regime=regime, column=col,
                   correct=ruler.is_correct(done.text, case.answers), text=done.text,
                   kept=summary.get("kept_tokens"))
        if expect is not None and summary.get("kept_tokens") != expect:
            raise AssertionError(f"{case.id} {regime} {col}: the engine kept "
                                 f"{summary.get('kept_tokens')}, its schedule says {expect}")
        rows.append(row)

    with servers(out, [("smollm2-ruler", smol, server_flags(p))]) as (server,):
        def full(case):
            return client.complete(server, case.prompt_ids, case.max_tokens,
                                   xargs={"kv_compression": "none"})

        def compressed(case):
            # the full prompt's blocks first (a prefix-cache hit when still cached), then every
            # cell of this prompt at once
            client.complete(server, case.prompt_ids, 1, xargs={"kv_compression": "none"})
            jobs = [(m, r, g) for g in p.regimes for m in p.methods for r in p.ratios]
            done = client.run_all(
                lambda m, r, g: client.complete(server, case.prompt_ids, case.max_tokens,
                                                xargs=xargs(m, r, g, case)),
                jobs, p.concurrency)
            for (m, r, g), d in zip(jobs, done):
                record(case, g, column(m, r), d,
                       expect=expected_kept(case, r, g, p.block_size, m)[1])

        for (task, length), cell_cases in by_cell.items():
            t0 = time.time()
            outs = client.run_all(full, [(c,) for c in cell_cases], 4)
            for c, d in zip(cell_cases, outs):
                for g in p.regimes:  # the full cache has no regime: one answer, both tables
                    record(c, g, "full", d)
            score = sum(ruler.is_correct(d.text, c.answers) for c, d in zip(cell_cases, outs))
            keep = score >= p.min_full * len(cell_cases)
            if keep:
                included[str(length)].append(task)
                client.run_all(compressed, [(c,) for c in cell_cases], p.jobs)
            log(f"[accuracy] {task}@{length}: full {score}/{len(cell_cases)}"
                + (" -> compressed cells" if keep else " (below min_full: not compressed)")
                + f" ({time.time() - t0:.0f}s)")

    engine_s = time.time() - started
    kv_cases = [c for c in cases if c.length == p.kvpress_length
                and c.task in included.get(str(p.kvpress_length), [])
                and (not p.kvpress_tasks or c.task in p.kvpress_tasks)
                and int(c.id.rsplit("-", 1)[1]) < p.kvpress_per_task]
    kvpress: dict[str, Any] = {"meta": {}, "rows": []}
    if kv_cases:
        r = p.kvpress_ratio
        spec = dict(model=str(smol), threads=None, window=32, kernel=15, sink=4,
                    presses=list(kvpress_ruler.PRESSES),
                    cases=[c.to_dict() for c in kv_cases],
                    kept={c.id: {g: {str(r): expected_kept(c, r, g, p.block_size)[0]}
                                 for g in kvpress_ruler.REGIMES} for c in kv_cases})
        log(f"[accuracy] kvpress: {len(kv_cases)} prompts of {p.kvpress_length} tokens")
        kvpress = kvpress_ruler.run_subprocess(spec, out / "kvpress_ruler.json")
    return dict(rows=rows, included=included, tasks=ruler.describe(),
                kvpress=kvpress, engine_s=engine_s, wall_s=time.time() - started,
                **tables(p, rows, included, kvpress))


# ------------------------------------------------------------------------------------ tables


def _count(rows: list[dict], pred: Callable[[dict], bool]) -> dict[str, Any]:
    sel = [r for r in rows if pred(r)]
    return cell(sum(r["correct"] for r in sel), len(sel))


def tables(p: RulerProfile, rows: list[dict], included: dict[str, list[str]],
           kvpress: dict) -> dict[str, Any]:
    """Per-task, macro and agreement tables from the rows (pure: the report redraws them)."""
    inc = {(t, int(n)) for n, ts in included.items() for t in ts}
    cols = ["full"] + [column(m, r) for m in p.methods for r in p.ratios]
    per_task = {f"{t}@{n}": {g: {col: _count(rows, lambda r, t=t, n=n, g=g, col=col:
                                             r["task"] == t and r["length"] == n
                                             and r["regime"] == g and r["column"] == col)
                                 for col in cols}
                             for g in p.regimes}
                for t in p.tasks for n in p.lengths}
    for key, regs in per_task.items():
        for g in regs:
            regs[g] = {c: v for c, v in regs[g].items() if v["total"]}
    macro = {g: {col: _count(rows, lambda r, g=g, col=col: (r["task"], r["length"]) in inc
                             and r["regime"] == g and r["column"] == col) for col in cols}
             for g in p.regimes}
    by_length = {str(n): {g: {col: _count(rows, lambda r, n=n, g=g, col=col:
                                          (r["task"], r["length"]) in inc and r["length"] == n
                                          and r["regime"] == g and r["column"] == col)
                              for col in cols} for g in p.regimes} for n in p.lengths}
    agreement: dict[str, Any] = {}
    kv_rows = kvpress.get("rows") or []
    ids = {r["id"] for r in kv_rows}
    if kv_rows:
        ratio = p.kvpress_ratio
        for g in p.regimes:
            agreement[g] = {}
            for name in ["full", *kvpress_ruler.PRESSES]:
                method = name.split("+")[0]  # "keydiff+window" is compared with keydiff
                if name != "full" and method not in p.methods:
                    continue
                kv_col = "full" if name == "full" else f"{name}@{ratio}x"
                eng_col = "full" if name == "full" else column(method, ratio)
                kv = {r["id"]: r["correct"] for r in kv_rows
                      if r["regime"] == g and r["column"] == kv_col}
                eng = {r["id"]: r["correct"] for r in rows
                       if r["id"] in ids and r["regime"] == g and r["column"] == eng_col}
                common = sorted(set(kv) & set(eng))
                e = cell(sum(eng[i] for i in common), len(common))
                k = cell(sum(kv[i] for i in common), len(common))
                agreement[g][name] = dict(
                    engine=e, kvpress=k, same_answer_correctness=sum(
                        eng[i] == kv[i] for i in common),
                    within=(k["lo"] <= e["accuracy"] <= k["hi"]) if common else None)
    return dict(per_task=per_task, macro=macro, macro_by_length=by_length,
                agreement=agreement)


# ------------------------------------------------------------------------------------ report


def _pct(c: dict) -> str:
    if not c or not c.get("total"):
        return "–"
    return f"{c['accuracy']:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]"


def summary_md(res: dict, p: dict) -> list[str]:
    """The section's part of ``summary.md``."""
    methods, ratios, regimes = p["methods"], p["ratios"], p["regimes"]
    cols = ["full"] + [column(m, r) for m in methods for r in ratios]
    lines = ["## Accuracy on RULER-style tasks (SmolLM2-135M-Instruct)", "",
             f"{p['per_task']} prompts per task and length ({', '.join(map(str, p['lengths']))} "
             f"tokens), greedy; a case counts when every reference answer is in the completion. "
             f"Cells: % correct [95 % Wilson interval]. Tasks whose full-cache score is under "
             f"{100 * p['min_full']:.0f} % are shown with that score, not compressed, and left "
             "out of the macro average. Regimes: **question** = the prompt compaction after the "
             "question was read (`vllm serve`'s default); **context** = the context compacted "
             "before the question is read (`vllm_xargs.snapkv_compact_at`).", ""]
    lines += ["### Macro average (included tasks, all lengths)", "",
              "| regime | method | full cache | " + " | ".join(f"{r}x" for r in ratios) + " |",
              "|---|---|---|" + "---|" * len(ratios)]
    for g in regimes:
        full = _pct(res["macro"][g]["full"])
        for m in methods:
            lines.append(f"| {g} | {m} | {full} | " + " | ".join(
                _pct(res["macro"][g][column(m, r)]) for r in ratios) + " |")
    lines.append("")
    for n, regs in res["macro_by_length"].items():
        lines += [f"Macro at {n} tokens: tasks " + ", ".join(
            f"`{t}`" for t in res["included"].get(n, [])) + ".", "",
            "| regime | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for g in regimes:
            lines.append(f"| {g} | " + " | ".join(_pct(regs[g][c]) for c in cols) + " |")
        lines.append("")
    for g in regimes:
        lines += [f"### Per task, {g} regime", "",
                  "| task@length | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for key, regs in res["per_task"].items():
            row = regs.get(g, {})
            lines.append(f"| {key} | " + " | ".join(_pct(row.get(c, {})) for c in cols) + " |")
        lines.append("")
    if res.get("agreement"):
        r = p["kvpress_ratio"]
        lines += [f"### Agreement with kvpress ({p['kvpress_length']}-token prompts, {r}x, same "
                  "token ids and kept counts)", "",
                  "| regime | method | engine | kvpress | same outcome | engine within kvpress's "
                  "interval |", "|---|---|---|---|---|---|"]
        for g, methods_ in res["agreement"].items():
            for name, a in methods_.items():
                lines.append(f"| {g} | {name} | {_pct(a['engine'])} | {_pct(a['kvpress'])} | "
                             f"{a['same_answer_correctness']}/{a['engine']['total']} | "
                             f"{'yes' if a['within'] else 'no'} |")
        lines += ["", "`keydiff+window` / `knorm+window`: kvpress's own scores with the last 32 "
                  "positions always kept, as the engine keeps every method's window; their "
                  "engine column is the plain method's.", ""]
    lines += ["### Tasks", "", res["tasks"], ""]
    return lines


def plot(res: dict, p: dict, path: Path) -> None:
    """Macro accuracy against compression, a line per method, a panel per regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = p["regimes"]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4), sharey=True)
    axes = axes if len(regimes) > 1 else [axes]
    for ax, g in zip(axes, regimes):
        macro = res["macro"][g]
        full = macro["full"]
        for m in p["methods"]:
            xs, ys, lo, hi = [1], [full["accuracy"]], [full["lo"]], [full["hi"]]
            for r in p["ratios"]:
                c = macro[column(m, r)]
                if c["total"]:
                    xs.append(r)
                    ys.append(c["accuracy"])
                    lo.append(c["lo"])
                    hi.append(c["hi"])
            if None in ys:
                continue
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)],
                                      [b - y for y, b in zip(ys, hi)]],
                        marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, *p["ratios"]], ["full", *[f"{r}x" for r in p["ratios"]]])
        ax.set_title(f"{g} regime")
        ax.set_xlabel("compression")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("macro accuracy % (95 % Wilson)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
