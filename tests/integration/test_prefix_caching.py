"""Prefix caching stays usable with SnapKV: a shared-prefix workload with prefix caching on.

Blocks [0, E) of a compressed request are never written after the prompt, so they stay valid
cache entries once freed; blocks from E on hold compacted KV and are never hashed; a compressed
request's prefix hit is capped at its own E, so compaction only rewrites blocks it owns alone.
"""

from __future__ import annotations

import random

import pytest

from engine_probe import run as run_probe

ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 28}


def snapkv(**settings) -> dict:
    return {"kv_compression": "snapkv", "snapkv": settings}


pytestmark = pytest.mark.engine

N_PREFIX = 1400
rng = random.Random(7)
PREFIX = [rng.randrange(100, 40000) for _ in range(N_PREFIX)]
SUFFIXES = [[rng.randrange(100, 40000) for _ in range(40 + 10 * i)] for i in range(3)]


def _requests(extra_args: dict | None = None) -> list[dict]:
    # A first, then B and C once A has finished (so A's freed head blocks sit in the cache),
    # C opted out of compression.
    reqs = [{"id": "A", "prompt_token_ids": PREFIX + SUFFIXES[0], "max_tokens": 12},
            {"id": "B", "prompt_token_ids": PREFIX + SUFFIXES[1], "max_tokens": 12,
             "after": "A"},
            {"id": "C", "prompt_token_ids": PREFIX + SUFFIXES[2], "max_tokens": 12,
             "after": "A", "extra_args": {"kv_compression": "none"}}]
    return reqs


def test_shared_prefix_workload_with_prefix_caching(tiny_path) -> None:
    common = {**ENGINE, "additional_config": snapkv(budget=256)}
    cached = run_probe({"model": str(tiny_path), "stagger": True, "debug": True,
                        "engine": {**common, "enable_prefix_caching": True},
                        "requests": _requests()})
    fresh = run_probe({"model": str(tiny_path), "stagger": True,
                       "engine": {**common, "enable_prefix_caching": False},
                       "requests": _requests()})
    bs = cached["block_size"]
    out = cached["outputs"]
    # A had nothing to hit; B reused A's freed head blocks, capped at B's own E
    # (E = floor((N - 256) / 128) * 128 = 1152 for B's 1450 tokens).
    assert out["A"]["num_cached_tokens"] == 0
    n_b = N_PREFIX + len(SUFFIXES[1])
    e_b = (n_b - 256) // bs * bs
    assert 0 < out["B"]["num_cached_tokens"] <= e_b
    # C (uncompressed) may only hit blocks that were never compacted: below A's E (1152).
    e_a = (N_PREFIX + len(SUFFIXES[0]) - 256) // bs * bs
    assert 0 < out["C"]["num_cached_tokens"] <= e_a
    # Same tokens as without prefix caching, for compressed and uncompressed requests alike.
    for rid in "ABC":
        assert out[rid]["token_ids"] == fresh["outputs"][rid]["token_ids"], rid
    # Attention over every compacted cache equals dense attention over the kept tokens.
    debug = cached["snapkv_report"]["debug"]
    assert debug["checks"] and max(debug["max_err"].values()) < 1e-5, debug
    assert cached["snapkv_report"]["num_compactions"] >= 2  # A and B, not C
    assert cached["free_end"] == cached["free_start"]
