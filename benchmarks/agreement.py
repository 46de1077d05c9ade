"""Do our kept sets coincide with kvpress's? vLLM with the ``kvpress`` preset vs kvpress 0.5.5.

Why: issue 6 asks, for the same prompts at the same kept count, for the fraction of identical kept
sets between our plugin (preset ``kvpress``: window 64, kernel 5, avg pooling, means) running in the
real vLLM engine, and NVIDIA kvpress's ``SnapKVPress`` on HF transformers. ``kvpress_crosscheck.py``
already shows the *selection code* agrees bit for bit on the same keys; this checks the end to end
system, where keys and queries come from vLLM's CPU kernels instead of HF's, so scores differ by
float rounding and kept sets can differ where two positions nearly tie at the keep/evict boundary.

Runs in the main venv (vLLM). Pieces:

* :func:`vllm_kept_sets` — the real engine in-process (``vllm.LLM``, fp32, ``block_size=32`` so the
  prompt compaction keeps exactly the budget, ``enforce_eager``, prefix caching off, no chunking),
  the plugin's debug recorder on (``snapkv_set_debug`` RPC), one request per (case, budget) with
  ``extra_args={"snapkv_budget": b}`` and ``max_tokens=1``; the kept positions come back through
  the ``snapkv_kept`` RPC, per vLLM layer name (``model.layers.7.self_attn.attn`` -> layer 7).
* :func:`kvpress_kept_sets` — kvpress's kept sets (and scores) from
  ``benchmarks.kvpress_runner``'s output.
* :func:`compare` — pure: per (case, budget, layer, KV head) identical or not, Jaccard
  ``|A∩B|/|A∪B|`` and overlap ``|A∩B|/|A|``; broken down by budget, prompt length and layer, the
  first differing layer of each run, and — where kvpress's scores are given — how near a tie
  kvpress's own keep/evict boundary was in every set (``kvpress_boundary_margin_histogram``: the
  relative gap between its lowest kept and highest evicted prefix score, for identical and for
  differing sets) and how close the differing positions are to it (relative score gap, rank
  distance from the cutoff).

Both kept-set maps share one shape: ``{case_id: {"length": N, "budgets": {"128": kept}}}`` where
``kept[layer][kv_head]`` is the ascending list of kept prompt positions; kvpress's entries may add
``"scores": [layer][kv_head] -> list of the N - 64 prefix scores``.

Usage (from the repository root)::

    python -m benchmarks.agreement --kvpress-json results/kvpress_needle.json \\
        --out results/agreement.json [--model PATH] [--budgets 128 256 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from benchmarks import REPO
from benchmarks.kvpress_runner import DEFAULT_MODEL, decode_floats, decode_kept

#: kvpress's SnapKVPress window (our ``kvpress`` preset's); our budgets must exceed it.
KVPRESS_WINDOW = 64
BLOCK_SIZE = 32
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: Bins of relative score gaps on kvpress's scores (boundary margins; a differing position's gap
#: |s_p - boundary| / |boundary|) and of rank distances from kvpress's cutoff.
GAP_BINS = ((0.0, "exact tie"), (1e-6, "<=1e-6"), (1e-5, "<=1e-5"), (1e-4, "<=1e-4"),
            (1e-3, "<=1e-3"), (1e-2, "<=1e-2"), (float("inf"), ">1e-2"))
RANK_BINS = ((0, "0 (adjacent)"), (3, "1-3"), (15, "4-15"), (63, "16-63"),
             (float("inf"), ">=64"))


def layer_index(name: str) -> int:
    """``"model.layers.7.self_attn.attn"`` -> 7."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"no layer index in vLLM layer name {name!r}")
    return int(m.group(1))


# ------------------------------------------------------------------ kept sets from each side


def kvpress_kept_sets(report: dict) -> dict:
    """kvpress's recorded kept sets (and prefix scores) from a ``kvpress_runner.py`` report."""
    return {cid: dict(length=e["length"],
                      scores=[[decode_floats(h) for h in heads] for heads in e["scores"]],
                      budgets={b: decode_kept(layers) for b, layers in e["budgets"].items()})
            for cid, e in report["kept"].items()}


def vllm_kept_sets(cases: list[Any], budgets: list[int], model_path: str | Path,
                   log: Callable[[str], None] = print) -> dict:
    """Our kept sets from the real vLLM engine (kvpress preset), for every case and budget
    ``window < b < len(prompt)``.

    ``cases``: ``needle.Case`` objects or dicts with ``id`` and ``prompt_ids``. Returns
    ``{"kept": {case_id: {"length", "budgets": {"128": [layer][kv_head] -> positions}}},
    "seconds": {case_id: {"128": s}}, "engine_start_s": s, "engine": {...kwargs}}``.
    """
    # Engine core in this process (as tests/integration/engine_probe.py): the workers' debug
    # recorder is then reached without IPC, and start-up is cheaper on 2 cores.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    cases = [c if isinstance(c, dict) else c.to_dict() for c in cases]
    budgets = sorted(int(b) for b in budgets if int(b) > KVPRESS_WINDOW)
    if not budgets:
        raise ValueError(f"no budget > {KVPRESS_WINDOW} (the kvpress window) to compare")
    max_len = max(len(c["prompt_ids"]) for c in cases) + BLOCK_SIZE
    engine = dict(
        model=str(model_path), dtype="float32", block_size=BLOCK_SIZE, enforce_eager=True,
        max_model_len=max_len, max_num_batched_tokens=max_len, enable_prefix_caching=False,
        kv_cache_memory_bytes=1 << 29, seed=0,
        additional_config={"kv_compression": "snapkv",
                           "snapkv": {"preset": "kvpress", "budget": budgets[0]}},
    )
    t0 = time.perf_counter()
    llm = LLM(**engine)
    start_s = time.perf_counter() - t0
    kept: dict[str, dict] = {}
    seconds: dict[str, dict[str, float]] = {}
    try:
        if llm.collective_rpc("snapkv_set_debug", args=(True,)) != [True]:
            raise RuntimeError("could not turn on the SnapKV debug recorder")
        for case in cases:
            ids = list(case["prompt_ids"])
            n = len(ids)
            entry = kept[case["id"]] = {"length": n, "budgets": {}}
            for b in (b for b in budgets if b < n):
                sp = SamplingParams(max_tokens=1, temperature=0.0,
                                    extra_args={"snapkv_budget": b})
                t = time.perf_counter()
                (out,) = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
                seconds.setdefault(case["id"], {})[str(b)] = round(time.perf_counter() - t, 3)
                (by_name,) = llm.collective_rpc("snapkv_kept", args=(out.request_id,))
                layers = sorted((layer_index(name), heads) for name, heads in by_name.items())
                if [i for i, _ in layers] != list(range(len(layers))) or not layers:
                    raise RuntimeError(f"{case['id']} b={b}: kept sets for layers "
                                       f"{[i for i, _ in layers]}")
                bad = {len(h) for _, heads in layers for h in heads} - {b}
                if bad:
                    raise RuntimeError(f"{case['id']} b={b}: vLLM kept {bad} tokens, not {b}")
                entry["budgets"][str(b)] = [heads for _, heads in layers]
            log(f"[vllm] {case['id']} N={n}: " + ", ".join(
                f"b{b} {s:.2f}s" for b, s in seconds.get(case["id"], {}).items()))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return dict(kept=kept, seconds=seconds, engine_start_s=round(start_s, 1), engine=engine)


# ------------------------------------------------------------------ comparison (pure)


def _bin(value: float, bins) -> str:
    return next(label for limit, label in bins if value <= limit)


def _against_scores(ours: set[int], theirs: set[int], scores: list[float]) -> dict:
    """A kept set pair measured on kvpress's prefix scores: kvpress's boundary ``margin`` (relative
    gap between its lowest kept and highest evicted prefix score: how near a tie the selection
    was) and, where the sets differ, the largest relative gap between a differing position's score
    and that boundary and the largest rank distance from kvpress's cutoff (0: right at it)."""
    prefix = len(scores)
    kept_prefix = [p for p in theirs if p < prefix]
    if not kept_prefix:  # kvpress kept only its window: no boundary to measure
        return {}
    kept_set = set(kept_prefix)
    boundary = min(scores[p] for p in kept_prefix)
    evicted = max((scores[p] for p in range(prefix) if p not in kept_set), default=-math.inf)
    info: dict[str, Any] = dict(margin=(boundary - evicted) / abs(boundary) if boundary
                                else math.inf)
    diff = ours ^ theirs
    if not diff:
        return info
    if any(p >= prefix for p in diff):
        return dict(info, window_differs=True)
    order = sorted(range(prefix), key=lambda p: -scores[p])  # kvpress's ranking (ties: any)
    rank = {p: r for r, p in enumerate(order)}
    cut = len(kept_prefix)
    gap = max(abs(scores[p] - boundary) for p in diff) / abs(boundary) if boundary else math.inf
    dist = max(rank[p] - cut if p in ours else cut - 1 - rank[p] for p in diff)
    return dict(info, max_rel_gap=gap, max_rank_distance=dist)


def _histogram(values: list[float], bins) -> dict[str, int]:
    hist = {label: 0 for _, label in bins}
    for v in values:
        hist[_bin(v, bins)] += 1
    return hist


def _stats(rows: list[dict]) -> dict:
    n = len(rows)
    same = sum(r["identical"] for r in rows)
    return dict(sets=n, identical=same, fraction_identical=same / n if n else None,
                mean_jaccard=statistics.fmean(r["jaccard"] for r in rows) if n else None,
                mean_overlap=statistics.fmean(r["overlap"] for r in rows) if n else None)


def compare(ours: dict, theirs: dict) -> dict:
    """Compare two kept-set maps (shape in the module docstring) on their common (case, budget)
    runs. ``theirs`` (kvpress) may carry ``scores``, which adds the near-tie breakdown."""
    rows: list[dict] = []
    runs: list[dict] = []
    missing = []
    for cid in sorted(set(ours) | set(theirs)):
        a_case, b_case = ours.get(cid), theirs.get(cid)
        a_b = set(a_case["budgets"]) if a_case else set()
        b_b = set(b_case["budgets"]) if b_case else set()
        missing += [dict(case=cid, budget=b, only_in="ours" if b in a_b else "theirs")
                    for b in sorted(a_b ^ b_b, key=int)]
        for budget in sorted(a_b & b_b, key=int):
            a_layers, b_layers = a_case["budgets"][budget], b_case["budgets"][budget]
            if len(a_layers) != len(b_layers):
                raise ValueError(f"{cid} b={budget}: {len(a_layers)} vs {len(b_layers)} layers")
            run_rows = []
            for li, (a_heads, b_heads) in enumerate(zip(a_layers, b_layers)):
                for h, (a, b) in enumerate(zip(a_heads, b_heads)):
                    sa, sb = set(a), set(b)
                    row = dict(case=cid, length=b_case["length"], budget=budget, layer=li,
                               head=h, identical=sa == sb,
                               jaccard=len(sa & sb) / len(sa | sb), overlap=len(sa & sb) / len(sa),
                               n_diff=len(sa - sb))
                    if "scores" in b_case:
                        row.update(_against_scores(sa, sb, b_case["scores"][li][h]))
                    run_rows.append(row)
            differing = [r["layer"] for r in run_rows if not r["identical"]]
            runs.append(dict(case=cid, length=b_case["length"], budget=int(budget),
                             first_differing_layer=min(differing, default=None),
                             **_stats(run_rows)))
            rows += run_rows

    def grouped(key: str) -> dict:
        groups: dict[Any, list[dict]] = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r)
        return {str(k): _stats(v) for k, v in sorted(groups.items(), key=lambda kv: int(kv[0]))}

    diff_rows = [r for r in rows if not r["identical"]]
    differences: dict[str, Any] = dict(
        sets=len(diff_rows),
        positions_swapped_mean=statistics.fmean(r["n_diff"] for r in diff_rows)
        if diff_rows else None,
        positions_swapped_max=max((r["n_diff"] for r in diff_rows), default=None),
    )
    scored = [r for r in diff_rows if "max_rel_gap" in r]
    if scored:
        differences.update(
            max_rel_score_gap_histogram=_histogram([r["max_rel_gap"] for r in scored], GAP_BINS),
            max_rank_distance_histogram=_histogram([r["max_rank_distance"] for r in scored],
                                                   RANK_BINS),
            max_rel_score_gap=max(r["max_rel_gap"] for r in scored),
            median_max_rel_score_gap=statistics.median(r["max_rel_gap"] for r in scored))
    differences["window_differs"] = sum(1 for r in diff_rows if r.get("window_differs"))
    margins = {kind: _histogram([r["margin"] for r in rows
                                 if "margin" in r and r["identical"] == (kind == "identical")],
                                GAP_BINS)
               for kind in ("identical", "differing")}
    first = defaultdict(int)
    for r in runs:
        first[str(r["first_differing_layer"])] += 1
    return dict(
        **_stats(rows),
        by_budget=grouped("budget"), by_length=grouped("length"), by_layer=grouped("layer"),
        first_differing_layer_histogram=dict(first),
        differences=differences,
        kvpress_boundary_margin_histogram=margins,
        runs=runs,
        missing=missing,
    )


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvpress-json", required=True,
                        help="output of benchmarks.kvpress_runner (with record_kept cases)")
    parser.add_argument("--out", default=str(REPO / "results" / "agreement.json"))
    parser.add_argument("--model", default=None,
                        help="model folder (default: the one kvpress_runner used)")
    parser.add_argument("--budgets", type=int, nargs="*", default=None,
                        help="only these budgets (default: every recorded budget > 64)")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.kvpress_json).read_text())
    theirs = kvpress_kept_sets(report)
    if not theirs:
        sys.exit(f"{args.kvpress_json} has no recorded kept sets (spec 'record_kept')")
    recorded = {int(b) for e in theirs.values() for b in e["budgets"]}
    budgets = sorted(b for b in recorded if b > KVPRESS_WINDOW
                     and (args.budgets is None or b in args.budgets))
    cases = [dict(id=cid, prompt_ids=e["prompt_ids"]) for cid, e in report["kept"].items()]
    model = args.model or report["meta"]["model"] or str(DEFAULT_MODEL)
    ours = vllm_kept_sets(cases, budgets, model)
    result = compare(ours["kept"], theirs)
    out_report = dict(
        meta=dict(model=model, budgets=budgets, kvpress=report["meta"],
                  vllm_engine=ours["engine"], vllm_engine_start_s=ours["engine_start_s"],
                  note="budgets <= 64 are not compared: our kvpress preset needs budget > window"),
        vllm_seconds=ours["seconds"], comparison=result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(out_report, indent=1))
    print(f"identical kept sets: {result['identical']}/{result['sets']} "
          f"({100 * (result['fraction_identical'] or 0):.2f}%), mean Jaccard "
          f"{result['mean_jaccard']:.4f}, mean overlap {result['mean_overlap']:.4f}")
    for b, s in result["by_budget"].items():
        print(f"  budget {b}: {s['identical']}/{s['sets']} identical, "
              f"Jaccard {s['mean_jaccard']:.4f}")
    print("  per layer identical: " + " ".join(
        f"{s['fraction_identical']:.2f}" for s in result["by_layer"].values()))
    print(f"  differences: {json.dumps(result['differences'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
