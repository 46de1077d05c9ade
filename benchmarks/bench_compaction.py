"""Benchmark: per-head KV compaction in vLLM's paged CPU cache vs the kernel writing the prompt.

Shapes are SmolLM2-135M's (3 KV heads, head_dim 64, 30 layers), fp32, block size 128, the ISA
vLLM picks on this machine. For each prompt length N a request with a shuffled block table gets its
prompt K/V written by the kernel's own op, then, with keep fraction ``--keep`` (budget
``b = keep * N``, window 32) and the design's tail placement ``E = floor((N - b) / bs) * bs``:

* ``write prompt``: ``ops.cpu_attn_reshape_and_cache`` for all N tokens of one layer — what vLLM
  already spends per layer in that step, the yardstick.
* ``read K+V``: :func:`~vllm_snapkv.paged_kv.read_kv` of all N positions of one layer (SnapKV
  scoring reads the keys).
* ``compact``: :func:`~vllm_snapkv.backends.compaction.move_kept` of one layer (through the
  paged-cache accessor the CPU adapter uses) — per head ``N - E`` kept tokens (random, sorted,
  plus the window) moved into logical slots ``[E, N)``.

Times are the best of ``--repeats`` runs (after a warm-up; best, not median, because the
machines this runs on are often shared) on one layer's cache (reused; each compaction works on a
fresh, untimed copy of the written cache); the ``x30`` columns are per-layer time x 30 layers.
Prints a Markdown table. ``--quick`` is a smoke run (a few seconds). Numbers depend on the
machine and on what else runs on it. Needs vLLM's CPU ops (the main venv), no server.

Usage (from the repository root)::

    python -m benchmarks.bench_compaction [--quick] [--keep 0.25] [--lengths 1024,4096]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from vllm_snapkv.backends.compaction import move_kept
from vllm_snapkv.integration import seam
from vllm_snapkv.paged_kv import TokenLayout, probe_cpu_layout, read_kv, slot_mapping, write_kv

HKV, D, BS, LAYERS, WINDOW = 3, 64, 128, 30, 32


class PagedAccessor:
    """:class:`~vllm_snapkv.backends.compaction.CacheAccessor` over a CPU cache of a known
    layout (what the CPU adapter's ``CPUCacheAccessor`` does for the engine's own cache)."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout

    def read_kv(self, kv_cache, block_ids, positions):
        return read_kv(kv_cache, block_ids, positions, self.layout)

    def write_kv(self, kv_cache, block_ids, positions, keys, values):
        write_kv(kv_cache, block_ids, positions, keys, values, self.layout)


def _best_s(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats + 1):  # first run is a warm-up
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def bench(n: int, keep: float, repeats: int, dtype: torch.dtype, isa: str) -> dict:
    from vllm import _custom_ops as ops

    layout = probe_cpu_layout(seam.get("cpu_attn_reshape_and_cache"), D, BS, dtype, isa)
    gen = torch.Generator().manual_seed(n)
    nblk = -(-n // BS)
    kv = torch.zeros(nblk + 4, HKV, BS, 2 * D, dtype=dtype)
    block_ids = torch.randperm(nblk + 4, generator=gen)[:nblk]
    key = torch.randn(n, HKV, D, generator=gen).to(dtype)
    value = torch.randn(n, HKV, D, generator=gen).to(dtype)
    slots = slot_mapping(block_ids, torch.arange(n), BS)
    key_cache, value_cache = kv.view(kv.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)

    def write(_):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    t_write = _best_s(write, repeats)
    t_read = _best_s(lambda _: read_kv(kv, block_ids, torch.arange(n), layout), repeats)

    budget = int(keep * n)
    e = max(0, (n - budget) // BS * BS)
    k = n - e
    kept = torch.stack([
        torch.cat([torch.randperm(n - WINDOW, generator=gen)[: k - WINDOW].sort().values,
                   torch.arange(n - WINDOW, n)])
        for _ in range(HKV)])
    accessor = PagedAccessor(layout)
    t_compact = _best_s(lambda c: move_kept(accessor, c, block_ids, kept, e), repeats,
                        setup=kv.clone)
    return {"n": n, "kept": k, "write": t_write, "read": t_read, "compact": t_compact}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_compaction", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 1K, 4K, 1 repeat")
    parser.add_argument("--keep", type=float, default=0.25, help="kept fraction (budget / N)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: leave torch's default); 1 is steadier on a "
                             "shared machine")
    parser.add_argument("--lengths", type=str, default="1024,2048,4096,8192,16384,32768")
    args = parser.parse_args(argv)

    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    isa = _get_attn_isa(dtype, BS, D, "auto")
    lengths = [1024, 4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    repeats = 1 if args.quick else args.repeats
    layout = probe_cpu_layout(seam.get("cpu_attn_reshape_and_cache"), D, BS, dtype, isa)
    print(f"# compaction vs prompt write — {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, {args.dtype}, isa {isa}, "
          f"H_kv={HKV}, D={D}, bs={BS}, keep {args.keep:.0%}, window {WINDOW}")
    print(f"# layout: {layout.describe()}\n")
    print("| N | kept/head | write prompt ms/layer | read K+V ms/layer | compact ms/layer "
          "| compact x30 ms | write x30 ms | compact / write |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        r = bench(n, args.keep, repeats, dtype, isa)
        print(f"| {n} | {r['kept']} | {r['write'] * 1e3:.2f} | {r['read'] * 1e3:.2f} "
              f"| {r['compact'] * 1e3:.2f} | {r['compact'] * 1e3 * LAYERS:.1f} "
              f"| {r['write'] * 1e3 * LAYERS:.1f} | {r['compact'] / r['write']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
