"""Tensor, pipeline and data parallelism with compression on, in the real vLLM engine (no mocks).

vLLM's CPU platform runs two ranks here with their threads bound by hand
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``, one core per rank). The reference is one engine on one
device, run once for the module; the same requests — prompt, decode and prefill-phase compactions,
prompts read in chunks — then run:

* **TP=2**: each rank holds half of the KV heads and, since a GQA group never straddles ranks,
  ranks its own heads with its own query heads. Rank r's kept sets (every compaction, every
  layer) equal the reference's KV head r.
* **PP=2**: each stage holds half of the layers, with every KV head, in the same blocks; both
  evaluate the same schedule and compact their own layers at the same step. Stage s's kept sets
  are the reference's for exactly its layers, and the stages' layers together are all of them.
  vLLM schedules a prompt's next chunk while the previous one is still in the pipeline, which
  the prefill-phase request exercises.

For both: greedy tokens and logprobs equal the reference's, the debug oracle (attention over the
compacted cache vs dense fp64 attention over exactly the kept tokens) holds on every rank, the
summaries are equal and the pool returns to its start (the one scheduler frees each block once).

Over HTTP, a TP=2 and a PP=2 ``vllm serve`` each count every request once in Prometheus (their
workers' stats are merged by vLLM: selection time is the slowest rank of a stage, summed over
stages). **DP=2** (two engines behind two API servers) serves a mixed load: every response's
summary equals the documented rule's, and a real Prometheus holds, per ``engine`` label, exactly
the requests that engine finished, with totals equal to the responses' sums.

Refused at start-up, naming the flags: more ranks than KV heads (vLLM would replicate heads), and
pipeline stages in an eager vLLM-CPU engine (vLLM itself fails on the first step there).

The tiny random Llama has 4 query heads and 2 KV heads in 2 layers (SmolLM2's 9 query heads do
not split over 2 ranks in vLLM itself).
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import shutil

import pytest
import requests
from conftest import metric_sum, post_ok, stream_summary
from engine_probe import run as run_probe
from prometheus import Prometheus

pytestmark = pytest.mark.engine

BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
BLOCK, BUDGET = 128, 256
CONFIG = {"kv_compression": "snapkv",
          "snapkv": {"window": 16, "kernel": 5, "budget": BUDGET, "decode_budget": 256,
                     "decode_interval": 128, "prefill_interval": 256}}
ATOL = 1e-5
SERVER_FLAGS = ["--kv-compression", "snapkv", "--snapkv-budget", str(BUDGET), "--snapkv-window",
                "16", "--snapkv-kernel", "5", "--max-model-len", "2048",
                "--kv-cache-memory-bytes", "128M", "--no-enable-prefix-caching"]


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def _probe(tiny_path, tp: int = 1, pp: int = 1) -> dict:
    # An eager vLLM-CPU engine never allocates a later pipeline stage's input buffers (vanilla
    # vLLM fails on the first step; the plugin refuses it): pipeline stages run compiled.
    spec = {
        "model": str(tiny_path),
        "engine": {"dtype": "float32", "max_model_len": 2048, "enforce_eager": pp == 1,
                   "enable_prefix_caching": False, "kv_cache_memory_bytes": 1 << 27,
                   "max_num_batched_tokens": 256,
                   "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                   "worker_cls": WORKER, "additional_config": CONFIG},
        "requests": [{"id": "pa", "prompt_token_ids": _ids(700, 1), "max_tokens": 300,
                      "logprobs": 1},
                     {"id": "pb", "prompt_token_ids": _ids(450, 2), "max_tokens": 200,
                      "logprobs": 1},
                     # read in chunks of 256 and compacted while read (prefill phase)
                     {"id": "pc", "prompt_token_ids": _ids(1300, 3), "max_tokens": 40,
                      "logprobs": 1, "extra_args": {"snapkv_prefill_budget": 384}}],
        "debug": True, "kept": True, "all_ranks": True,
    }
    return run_probe(spec, timeout=900, env=BIND)


@pytest.fixture(scope="module")
def single_device(tiny_path) -> dict:
    """The reference: the same requests on one device (TP=1, PP=1)."""
    return _probe(tiny_path)


def _assert_like_single_device(one: dict, many: dict, tp: int, pp: int) -> tuple[int, int]:
    """Everything but the split equals the reference; returns (identical kept sets, total)."""
    assert len(one["rank_reports"]) == 1 and len(many["rank_reports"]) == tp * pp
    for res in (one, many):
        assert res["free_end"] == res["free_start"] and res["preemptions"] == 0
    same = total = 0
    for rid in ("pa", "pb", "pc"):
        a, b = one["outputs"][rid], many["outputs"][rid]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
        sa, sb = a["kv_transfer_params"]["snapkv"], b["kv_transfer_params"]["snapkv"]
        assert sa == sb and sa["compactions"] >= 2 and sa["freed_blocks"] >= 2
        (ref,), ranks = one["kept"][rid], many["kept"][rid]
        assert len(ref) == 2  # both layers
        # vLLM's ranks: global rank = stage * tp + tensor-parallel rank.
        for stage in range(pp):
            group = ranks[stage * tp:(stage + 1) * tp]
            assert len({frozenset(r) for r in group}) == 1  # a stage's ranks hold its layers
        layers = [set(ranks[stage * tp]) for stage in range(pp)]
        assert set().union(*layers) == set(ref) and sum(map(len, layers)) == len(ref)
        for i, rank in enumerate(ranks):
            t = i % tp
            for layer, events in rank.items():
                assert len(events) == len(ref[layer]) == sa["compactions"]
                for (at, phase, heads), (at_r, phase_r, heads_r) in zip(ref[layer], events):
                    per_rank = len(heads) // tp
                    assert (at_r, phase_r) == (at, phase) and len(heads_r) == per_rank
                    for h in range(per_rank):
                        same += heads_r[h] == heads[t * per_rank + h]
                        total += 1
        phases = {phase for events in ref.values() for _, phase, _ in events}
        assert ("prefill" in phases) == (rid == "pc")
        # The debug oracle, on every rank, for every later step of its own layers.
        for rep in many["rank_reports"]:
            dbg = rep["debug"]
            key = next(k for k in dbg["max_err"] if k == rid or k.startswith(rid + "-"))
            assert dbg["slot_err"][key] == 0.0 and dbg["checks"][key] > 0
            assert dbg["max_err"][key] <= ATOL * max(1.0, dbg["max_ref"][key])
            assert rep["compactions"][key]["compactions"] == sa["compactions"]
    return same, total


def test_tp2_keeps_what_one_device_keeps_on_every_rank(single_device, tiny_path):
    same, total = _assert_like_single_device(single_device, _probe(tiny_path, tp=2), tp=2, pp=1)
    print(f"\n[snapkv] TP=2 vs one device: {same}/{total} kept sets identical (per layer, KV "
          f"head, compaction)")
    assert same == total > 0


def test_pp2_keeps_what_one_device_keeps_on_every_stage(single_device, tiny_path):
    two = _probe(tiny_path, pp=2)
    for stage, rep in enumerate(two["rank_reports"]):  # each stage reports only its own layers
        assert list(rep["layouts"]) == [f"model.layers.{stage}.self_attn.attn"]
    same, total = _assert_like_single_device(single_device, two, tp=1, pp=2)
    print(f"\n[snapkv] PP=2 vs one device: {same}/{total} kept sets identical (per layer, KV "
          f"head, compaction)")
    assert same == total > 0


@pytest.mark.parametrize("split", ["tensor", "pipeline"])
def test_a_split_server_counts_each_request_once(start_server, tiny_path, monkeypatch, split):
    for k, v in BIND.items():
        monkeypatch.setenv(k, v)
    # torch.compile on (vLLM's default), as a user serves it: every rank warms up with a
    # compiled profile run before the pool is sized.
    server = start_server(tiny_path, [f"--{split}-parallel-size", "2", *SERVER_FLAGS],
                          name=split)
    summaries = []
    for seed in range(3):
        r = requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": split, "prompt": _ids(600 + 50 * seed, 10 + seed), "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        summaries.append(r.json()["kv_transfer_params"]["snapkv"])
    assert all(s["compressed"] for s in summaries)
    text = ""
    for _ in range(30):  # the API server folds in the engine's stats at its next step/log
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        if metric_sum(text, "vllm:snapkv_compressed_requests_total") >= 3:
            break
        requests.post(f"{server.url}/v1/completions", timeout=300, json={
            "model": split, "prompt": "hi", "max_tokens": 1,
            "vllm_xargs": {"kv_compression": "none"}})
    assert metric_sum(text, "vllm:snapkv_compressed_requests_total") == 3
    assert metric_sum(text, "vllm:snapkv_selection_seconds_count") == 3
    assert metric_sum(text, "vllm:snapkv_evicted_tokens_total") == sum(
        s["evicted_tokens"] for s in summaries)
    assert metric_sum(text, "vllm:snapkv_freed_blocks_total") == sum(
        s["freed_blocks"] for s in summaries)


def _rule(n: int, max_tokens: int, budget: int | None) -> dict:
    """The summary the documented rule gives a request of ``n`` prompt tokens: with a budget,
    the whole blocks beyond it are evicted at the end of the prompt when there is one."""
    evicted = (n - budget) // BLOCK * BLOCK if budget is not None and n > budget else 0
    return {"compressed": evicted > 0, "prompt_tokens": n, "evicted_tokens": evicted,
            "kept_tokens": n - evicted, "freed_blocks": evicted // BLOCK,
            "compactions": int(evicted > 0), "final_kept_tokens": n - evicted + max_tokens - 1}


def _dp_load() -> list[tuple[dict, dict]]:
    """(request body, expected summary) of a mixed load; every request gets 8 tokens."""
    load = []
    for i in range(16):
        n, xargs, budget = 400 + 41 * i, {}, BUDGET
        if i % 4 == 1:
            xargs, budget = {"kv_compression": "none"}, None
        elif i % 4 == 2:
            xargs, budget = {"snapkv_budget": 384}, 384
        elif i % 8 == 3:
            n = 300  # fits the budget: less than one block beyond it
        body = {"model": "dp", "prompt": _ids(n, 100 + i), "max_tokens": 8, "temperature": 0,
                "stream": i % 4 == 3}
        if xargs:
            body["vllm_xargs"] = xargs
        load.append((body, _rule(n, 8, budget)))
    return load


def _send(server, body: dict) -> dict:
    """A completion's summary; a stream's is in its chunk with the finish reason."""
    if body["stream"]:
        return stream_summary(server, "/v1/completions", body)
    return post_ok(server, "/v1/completions", body)["kv_transfer_params"]["snapkv"]


def _numa_nodes() -> int:
    from pathlib import Path

    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1


def test_dp2_serves_a_mixed_load_and_counts_it_per_engine(start_server, tiny_path, monkeypatch,
                                                          tmp_path):
    import vllm

    if vllm.__version__.startswith("0.33") and _numa_nodes() < 2:
        # vLLM 0.33 assigns DP rank r the NUMA node r (assigned_physical_gpu_ids) and its
        # CPUWorker indexes an empty node list where that node does not exist: plain
        # `vllm serve --data-parallel-size 2` fails the same way (docs/install.md).
        pytest.skip("vLLM 0.33's CPU data parallelism needs a NUMA node per DP rank; this "
                    f"host has {_numa_nodes()} (vanilla vLLM 0.33 cannot start DP=2 here)")
    for k, v in BIND.items():
        monkeypatch.setenv(k, v)
    server = start_server(tiny_path, ["--data-parallel-size", "2", *SERVER_FLAGS], name="dp")
    prom = Prometheus(server.port, tmp_path)
    try:
        load = _dp_load()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda item: _send(server, item[0]), load))
        for (body, want), summary in zip(load, got):
            assert {k: summary[k] for k in want} == want, (body.get("vllm_xargs"), summary)
        r = requests.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "dp", "prompt": "hi", "vllm_xargs": {"snapkv_budget": 3}})
        assert r.status_code == 400 and "snapkv_budget" in r.text

        compressed = [s for s in got if s["compressed"]]
        finished = len(load)
        assert prom.wait_value("sum(vllm:request_success_total)", finished, 60) == finished
        assert prom.wait_value("sum(vllm:snapkv_compressed_requests_total)",
                               len(compressed)) == len(compressed)
        assert prom.wait_value("sum(vllm:snapkv_skipped_requests_total)",
                               finished - len(compressed)) == finished - len(compressed)
        assert prom.value('sum(vllm:snapkv_skipped_requests_total{reason="opted_out"})') == 4
        assert prom.value("sum(vllm:snapkv_evicted_tokens_total)") == sum(
            s["evicted_tokens"] for s in got)
        assert prom.value("sum(vllm:snapkv_freed_blocks_total)") == sum(
            s["freed_blocks"] for s in got)
        assert prom.value("sum(vllm:snapkv_selection_seconds_count)") == len(compressed)
        # Per engine: what each engine counted is exactly what it finished, and both served.
        per_engine = {}
        for engine in ("0", "1"):
            done = prom.value(f'sum(vllm:request_success_total{{engine="{engine}"}})')
            ours = (prom.value(f'sum(vllm:snapkv_compressed_requests_total{{engine="{engine}"}})')
                    + prom.value(f'sum(vllm:snapkv_skipped_requests_total{{engine="{engine}"}})'))
            assert done == ours, (engine, done, ours)
            per_engine[engine] = done
        print(f"\n[snapkv] DP=2: requests finished per engine {per_engine}")
        assert all(n > 0 for n in per_engine.values())
    finally:
        prom.stop()


def _one_kv_head_copy(tiny_path, tmp_path):
    """The tiny model's config with one KV head (refused before any weight is read)."""
    dst = tmp_path / "tiny-1kv"
    shutil.copytree(tiny_path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case", ["replicated-kv-heads", "eager-pipeline"])
def test_what_cannot_run_is_refused_at_start_up(start_server, tiny_path, tmp_path, monkeypatch,
                                                case):
    for k, v in BIND.items():
        monkeypatch.setenv(k, v)
    if case == "eager-pipeline":
        model, flags = tiny_path, ["--pipeline-parallel-size", "2", "--enforce-eager"]
        want = "--pipeline-parallel-size 2 cannot run with --enforce-eager"
    else:
        model, flags = _one_kv_head_copy(tiny_path, tmp_path), ["--tensor-parallel-size", "2"]
        want = "--tensor-parallel-size 2 exceeds the model's 1 KV"
    with pytest.raises(RuntimeError, match="vllm serve exited") as err:
        start_server(model, [*flags, "--kv-compression", "snapkv"], name=case)
    assert re.search(re.escape(want), str(err.value)), str(err.value)[-3000:]
