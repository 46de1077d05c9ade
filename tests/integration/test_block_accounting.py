"""Evicted blocks really return to vLLM's block pool, nothing leaks, and fewer requests are
preempted under a small fixed pool — observed on the real engine's block pool, step by step."""

from __future__ import annotations

import pytest
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 28}


def snapkv(**settings) -> dict:
    return {"kv_compression": "snapkv", "snapkv": settings}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_freed_blocks_return_to_the_pool_and_nothing_leaks(tiny_path, prefix_caching) -> None:
    n, budget, out_tokens = 1500, 256, 8
    result = run_probe({
        "model": str(tiny_path),
        "engine": {**ENGINE, "enable_prefix_caching": prefix_caching,
                   "additional_config": snapkv(budget=budget)},
        "requests": [{"id": "long", "prompt_token_ids": list(range(1000, 1000 + n)),
                      "max_tokens": out_tokens}],
    })
    bs = result["block_size"]
    assert bs == 128 and result["scheduler"] == "SnapKVScheduler"
    # The arithmetic, by hand: E = floor((1500 - 256) / 128) * 128 = 1152 -> 9 blocks freed.
    freed = (n - budget) // bs
    assert freed == 9
    used = [result["free_start"] - step["free"] for step in result["timeline"]]
    total_blocks = -(-(n + out_tokens) // bs)
    # During prefill the request holds every block of its prompt ...
    assert max(used) == total_blocks
    # ... and after compaction exactly the evicted head blocks are back in the pool.
    assert min(used[used.index(max(used)):-1]) == total_blocks - freed
    assert result["free_end"] == result["free_start"], "blocks leaked"


def test_short_and_opted_out_requests_keep_all_their_blocks(tiny_path) -> None:
    result = run_probe({
        "model": str(tiny_path),
        "engine": {**ENGINE, "additional_config": snapkv(budget=256)},
        "requests": [{"id": "optout", "prompt_token_ids": list(range(1000, 2500)),
                      "max_tokens": 4, "extra_args": {"kv_compression": "none"}}],
    })
    used = [result["free_start"] - step["free"] for step in result["timeline"][:-1]]
    assert set(used) == {12}  # ceil(1500 / 128): never shrinks
    assert result["free_end"] == result["free_start"]


def test_fewer_preemptions_than_vanilla_under_a_small_pool(tiny_path) -> None:
    requests = [{"id": f"r{i}", "prompt_token_ids": [1000 + i] + list(range(2000, 3529)),
                 "max_tokens": 100} for i in range(4)]
    common = {**ENGINE, "num_gpu_blocks_override": 26, "enable_prefix_caching": False,
              "max_model_len": 2048,
              "max_num_seqs": 4}
    vanilla = run_probe({"model": str(tiny_path), "engine": common, "requests": requests})
    ours = run_probe({"model": str(tiny_path), "requests": requests,
                      "engine": {**common, "additional_config": snapkv(budget=256)}})
    assert vanilla["preemptions"] > 0, "the workload must force preemption in vanilla vLLM"
    assert ours["preemptions"] < vanilla["preemptions"]
    assert len(ours["outputs"]) == len(vanilla["outputs"]) == 4
    assert all(len(o["token_ids"]) == 100 for o in ours["outputs"].values())
    assert ours["free_end"] == ours["free_start"]
