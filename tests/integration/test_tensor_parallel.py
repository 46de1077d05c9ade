"""Tensor parallelism with compression on, in the real vLLM engine (no mocks).

vLLM's CPU platform runs TP=2 here with its threads bound by hand
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``, one core per rank). Each rank holds half of the KV heads
and, since a GQA group never straddles ranks, ranks its own heads with its own query heads. So:

* the kept sets of every compaction (prompt and decode, every layer) of rank r's KV head equal
  TP=1's head r, and greedy tokens and their logprobs equal TP=1's;
* the debug oracle (attention over the compacted cache vs dense fp64 attention over exactly the
  kept tokens) holds on every rank;
* the scheduler frees each evicted block once (the pool returns to its start; the summary equals
  TP=1's), and the Prometheus counters of a TP=2 server count each request once;
* more ranks than KV heads (vLLM would replicate heads) and pipeline parallelism are refused at
  start-up, naming the flag.

The tiny random Llama has 4 query heads and 2 KV heads (SmolLM2's 9 query heads do not split
over 2 ranks in vLLM itself).
"""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import requests
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
WORKER = "vllm_snapkv.worker.SnapKVCPUWorker"
CONFIG = {"kv_compression": "snapkv",
          "snapkv": {"window": 16, "kernel": 5, "budget": 256, "decode_budget": 256,
                     "decode_interval": 128}}
ATOL = 1e-5


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def _probe(tiny_path, tp: int) -> dict:
    spec = {
        "model": str(tiny_path),
        "engine": {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
                   "enable_prefix_caching": False, "kv_cache_memory_bytes": 1 << 27,
                   "tensor_parallel_size": tp, "worker_cls": WORKER,
                   "additional_config": CONFIG},
        "requests": [{"id": "tpa", "prompt_token_ids": _ids(700, 1), "max_tokens": 300,
                      "logprobs": 1},
                     {"id": "tpb", "prompt_token_ids": _ids(450, 2), "max_tokens": 200,
                      "logprobs": 1}],
        "debug": True, "kept": True, "all_ranks": True,
    }
    return run_probe(spec, timeout=900, env=BIND)


def test_tp2_keeps_what_tp1_keeps_on_every_rank(tiny_path):
    one, two = _probe(tiny_path, 1), _probe(tiny_path, 2)
    assert len(one["rank_reports"]) == 1 and len(two["rank_reports"]) == 2
    for res in (one, two):
        assert res["free_end"] == res["free_start"] and res["preemptions"] == 0
    same = total = 0
    for rid in ("tpa", "tpb"):
        a, b = one["outputs"][rid], two["outputs"][rid]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
        sa, sb = a["kv_transfer_params"]["snapkv"], b["kv_transfer_params"]["snapkv"]
        assert sa == sb and sa["compactions"] >= 2 and sa["freed_blocks"] >= 2
        (hist1,), (rank0, rank1) = one["kept"][rid], two["kept"][rid]
        assert set(hist1) == set(rank0) == set(rank1) and len(hist1) == 2  # both layers
        for layer, events in hist1.items():
            assert len(events) == sa["compactions"]
            for c, (at, phase, heads) in enumerate(events):
                assert len(heads) == 2
                for r, rank in enumerate((rank0, rank1)):
                    at_r, phase_r, heads_r = rank[layer][c]
                    assert (at_r, phase_r) == (at, phase) and len(heads_r) == 1
                    same += heads_r[0] == heads[r]
                    total += 1
        # The debug oracle, on every rank, for every later step and layer.
        for rep in two["rank_reports"]:
            dbg = rep["debug"]
            key = next(k for k in dbg["max_err"] if k == rid or k.startswith(rid + "-"))
            assert dbg["slot_err"][key] == 0.0 and dbg["checks"][key] > 0
            assert dbg["max_err"][key] <= ATOL * max(1.0, dbg["max_ref"][key])
            comp = rep["compactions"][key]
            assert comp["compactions"] == sa["compactions"]
    print(f"\n[snapkv] TP=2 vs TP=1: {same}/{total} kept sets identical (per layer, KV head, "
          f"compaction)")
    assert same == total


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_tp2_server_counts_each_request_once(start_server, tiny_path, monkeypatch):
    for k, v in BIND.items():
        monkeypatch.setenv(k, v)
    # torch.compile on (vLLM's default), as a user serves it: both ranks warm up with a compiled
    # profile run before the pool is sized.
    server = start_server(tiny_path, ["--tensor-parallel-size", "2", "--kv-compression",
                                      "snapkv", "--snapkv-budget", "256", "--snapkv-window",
                                      "16", "--snapkv-kernel", "5", "--max-model-len", "2048",
                                      "--kv-cache-memory-bytes", "128M",
                                      "--no-enable-prefix-caching"], name="tp2")
    summaries = []
    for seed in range(3):
        r = requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": "tp2", "prompt": _ids(600 + 50 * seed, 10 + seed), "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        summaries.append(r.json()["kv_transfer_params"]["snapkv"])
    assert all(s["compressed"] for s in summaries)
    text = ""
    for _ in range(30):  # the API server folds in the engine's stats at its next step/log
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        if _metric(text, "vllm:snapkv_compressed_requests_total") >= 3:
            break
        requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": "tp2", "prompt": "hi", "max_tokens": 1,
            "vllm_xargs": {"kv_compression": "none"}})
    assert _metric(text, "vllm:snapkv_compressed_requests_total") == 3
    assert _metric(text, "vllm:snapkv_selection_seconds_count") == 3
    assert _metric(text, "vllm:snapkv_evicted_tokens_total") == sum(
        s["evicted_tokens"] for s in summaries)
    assert _metric(text, "vllm:snapkv_freed_blocks_total") == sum(
        s["freed_blocks"] for s in summaries)


def _one_kv_head_copy(tiny_path, tmp_path):
    """The tiny model's config with one KV head (refused before any weight is read)."""
    dst = tmp_path / "tiny-1kv"
    shutil.copytree(tiny_path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", ["replicated-kv-heads", "pipeline"])
def test_unsupported_parallelism_is_refused_at_start_up(start_server, tiny_path, tmp_path,
                                                        monkeypatch, case):
    for k, v in BIND.items():
        monkeypatch.setenv(k, v)
    if case == "pipeline":
        model, flags, want = tiny_path, ["--pipeline-parallel-size", "2"], \
            "--pipeline-parallel-size 2"
    else:
        model, flags, want = _one_kv_head_copy(tiny_path, tmp_path), \
            ["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 exceeds the model's 1 KV"
    with pytest.raises(RuntimeError, match="vllm serve exited") as err:
        start_server(model, [*flags, "--kv-compression", "snapkv"], name=case)
    assert re.search(re.escape(want), str(err.value)), str(err.value)[-3000:]
