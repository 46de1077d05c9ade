"""Benchmark: SnapKV selection time per layer vs prompt length, against one layer's prefill.

Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64, hidden 576, MLP 1536), fp32,
window 32, the default settings (kernel 15, avg pooling) and budget 512 (so that every N, 1K
included, is compressed; the cost barely depends on the budget). For each prompt length N:

* ``select``: wall time of ``select_tokens_with_settings`` for one layer (min and median of the
  repeats; 1 repeat above 16K), and its peak *extra* memory, measured through the allocator (CPU:
  the profiler's allocation events, i.e. every allocation/free and the running total; CUDA:
  ``max_memory_allocated`` delta). The untiled ``[Hq, w, N]`` fp32 score tensor size is shown for
  contrast.
* ``prefill``: one Llama decoder layer on N tokens: RMSNorm, Q/K/V projections, RoPE, causal GQA
  attention (``F.scaled_dot_product_attention``), O projection, RMSNorm, SwiGLU MLP. Measured while
  the estimated time stays under ``--prefill-cap-s``; beyond that it is *estimated* from the
  largest measured N: the attention part scaled by (N/N0)² (causal attention FLOPs), the rest by
  N/N0 — both parts are timed separately so the split is measured, not assumed.

Prints a Markdown table and writes JSON (``--out``, default ``results/selection_bench.json``).
``--quick`` is a small smoke run (seconds) for CI. Not a timed test: numbers depend on the machine.

Usage (from the repository root)::

    python -m benchmarks.bench_selection [--quick] [--lengths 1024 4096 ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import REPO
from vllm_snapkv.methods.snapkv import resolve_tile_size
from vllm_snapkv.selection import select_tokens_with_settings
from vllm_snapkv.settings import CompressionSettings

HQ, HKV, D, HIDDEN, INTER, WINDOW, BUDGET = 9, 3, 64, 576, 1536, 32, 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> float:
    """Minimum wall seconds of fn() over `repeats` runs, after one warm-up.

    The minimum, not the median: on a shared machine other processes only ever add time, so the
    fastest run is the best estimate of the cost itself (medians are kept in the JSON)."""
    times = _times(fn, device, repeats)
    return min(times)


def _times(fn, device, repeats: int) -> list[float]:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_extra_bytes(fn, device) -> int | None:
    """Peak bytes allocated by fn() on top of what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0

    def walk(nodes):
        nonlocal peak
        for node in nodes:
            if node.tag == _EventType.Allocation:
                peak = max(peak, node.extra_fields.total_allocated)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return peak


class LlamaLayer(torch.nn.Module):
    """One Llama decoder layer with SmolLM2-135M shapes (weights random: timing only)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, HQ * D, bias=False)
        self.k = torch.nn.Linear(HIDDEN, HKV * D, bias=False)
        self.v = torch.nn.Linear(HIDDEN, HKV * D, bias=False)
        self.o = torch.nn.Linear(HQ * D, HIDDEN, bias=False)
        self.gate = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.up = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.down = torch.nn.Linear(INTER, HIDDEN, bias=False)
        self.norm1 = torch.nn.RMSNorm(HIDDEN)
        self.norm2 = torch.nn.RMSNorm(HIDDEN)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def qkv(self, h: torch.Tensor, cos, sin):
        n = h.shape[0]
        x = self.norm1(h)
        q = self.rope(self.q(x).view(n, HQ, D).transpose(0, 1), cos, sin)
        k = self.rope(self.k(x).view(n, HKV, D).transpose(0, 1), cos, sin)
        v = self.v(x).view(n, HKV, D).transpose(0, 1)
        return x, q, k, v

    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
        )[0]

    def rest(self, h, attn):
        n = h.shape[0]
        h = h + self.o(attn.transpose(0, 1).reshape(n, HQ * D))
        x = self.norm2(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))

    def forward(self, h, cos, sin):
        _, q, k, v = self.qkv(h, cos, sin)
        return self.rest(h, self.attention(q, k, v))


def _rope_tables(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (100000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def bench_prefill(layer: LlamaLayer, n: int, device, repeats: int) -> dict:
    """Time one layer's prefill on n tokens, split into attention and everything else."""
    gen = torch.Generator(device=device).manual_seed(n)
    h = torch.randn(n, HIDDEN, device=device, generator=gen)
    cos, sin = _rope_tables(n, device)
    with torch.inference_mode():
        _, q, k, v = layer.qkv(h, cos, sin)
        attn_s = _time(lambda: layer.attention(q, k, v), device, repeats)
        attn = layer.attention(q, k, v)
        linear_s = _time(lambda: layer.qkv(h, cos, sin), device, repeats) + _time(
            lambda: layer.rest(h, attn), device, repeats
        )
    return dict(attention_s=attn_s, other_s=linear_s, total_s=attn_s + linear_s)


def bench_select(n: int, device, repeats: int, tile_size: int | None) -> dict:
    gen = torch.Generator(device=device).manual_seed(n + 1)
    q = torch.randn(HQ, WINDOW, D, device=device, generator=gen)
    k = torch.randn(HKV, n, D, device=device, generator=gen)
    s = CompressionSettings(budget=BUDGET, window=WINDOW)

    def fn():
        return select_tokens_with_settings(q, k, s, tile_size=tile_size)

    times = _times(fn, device, repeats)
    peak = _peak_extra_bytes(fn, device)
    tile = resolve_tile_size(HQ, WINDOW, tile_size)
    return dict(
        select_s=min(times),
        select_median_s=statistics.median(times),
        repeats=repeats,
        select_peak_extra_bytes=peak,
        untiled_scores_bytes=HQ * WINDOW * n * 4,
        path="single-pass" if n <= tile else f"tiled ({tile})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run for CI: N in 1K/2K/4K, 1 repeat (~10 s on an idle 2-core CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=None, help="default: automatic")
    parser.add_argument("--prefill-cap-s", type=float, default=30.0,
                        help="run a layer's prefill only while (estimated time) x (runs) stays "
                             "below this many seconds; estimate beyond")
    parser.add_argument("--out", default=str(REPO / "results" / "selection_bench.json"))
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    lengths = [1024, 2048, 4096] if args.quick else args.lengths
    repeats = 1 if args.quick else args.repeats

    torch.manual_seed(0)
    layer = LlamaLayer().to(device).eval()
    rows = []
    last_measured = None  # (n, attention_s, other_s)
    started = time.time()
    for n in sorted(lengths):
        reps = repeats if n <= 16384 else 1
        row = dict(n=n, **bench_select(n, device, reps, args.tile_size))
        estimate = None
        if last_measured is not None:
            n0, a0, o0 = last_measured
            estimate = a0 * (n / n0) ** 2 + o0 * (n / n0)
        if estimate is None or estimate * (reps + 1) <= args.prefill_cap_s:
            pf = bench_prefill(layer, n, device, reps)
            last_measured = (n, pf["attention_s"], pf["other_s"])
            row.update(prefill_s=pf["total_s"], prefill_attention_s=pf["attention_s"],
                       prefill_other_s=pf["other_s"], prefill_measured=True)
        else:
            n0, a0, o0 = last_measured
            row.update(prefill_s=estimate, prefill_attention_s=a0 * (n / n0) ** 2,
                       prefill_other_s=o0 * (n / n0), prefill_measured=False,
                       prefill_estimated_from_n=n0)
        row["select_over_prefill"] = row["select_s"] / row["prefill_s"]
        rows.append(row)
        print(f"N={n}: select {row['select_s'] * 1e3:.1f} ms, prefill "
              f"{row['prefill_s'] * 1e3:.0f} ms ({'measured' if row['prefill_measured'] else 'est.'})"
              f"  [{time.time() - started:.0f}s]", flush=True)

    def mib(b):
        return "n/a" if b is None else f"{b / 2**20:.1f}"

    print()
    print(f"SnapKV selection vs one-layer prefill — {device.type}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SmolLM2-135M shapes (Hq={HQ}, Hkv={HKV}, d={D}), "
          f"window {WINDOW}, budget {BUDGET}, fp32")
    print()
    print("| N | selection min / median (ms) | path | selection peak extra (MiB) | untiled [Hq,w,N] fp32 (MiB) "
          "| one-layer prefill (ms) | selection / prefill |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        pf = f"{r['prefill_s'] * 1e3:.0f}" + ("" if r["prefill_measured"] else " (est.)")
        print(f"| {r['n']} | {r['select_s'] * 1e3:.1f} / {r['select_median_s'] * 1e3:.1f} | {r['path']} | "
              f"{mib(r['select_peak_extra_bytes'])} | {mib(r['untiled_scores_bytes'])} | {pf} | "
              f"{100 * r['select_over_prefill']:.1f}% |")
    est = [r for r in rows if not r["prefill_measured"]]
    if est:
        n0 = est[0]["prefill_estimated_from_n"]
        print(f"\n(est.): prefill not run; attention time of N={n0} scaled by (N/{n0})², the rest "
              f"by N/{n0}.")

    report = dict(
        config=dict(hq=HQ, hkv=HKV, head_dim=D, hidden=HIDDEN, intermediate=INTER, window=WINDOW,
                    budget=BUDGET, settings=CompressionSettings(budget=BUDGET, window=WINDOW).to_dict(),
                    tile_size=args.tile_size, dtype="float32", quick=args.quick),
        env=dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                 python=platform.python_version(), machine=platform.machine(),
                 processor=platform.processor()),
        rows=rows,
        seconds=round(time.time() - started, 1),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
