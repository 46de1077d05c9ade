"""``--snapkv-trigger pressure`` in the real vLLM engine (no mocks), observed on the scheduler's
block pool step by step (:mod:`engine_probe`).

* Light load (the pool holds everything): no request is compacted (``always`` would compact
  each at its prompt's end), and greedy tokens equal vanilla vLLM's token for token.
* A pool driven short: the scheduler orders compactions (every one with reason ``pressure``),
  attention over the compacted caches equals dense attention over the kept tokens (the debug
  oracle), the freed blocks let waiting requests run beside the compacted ones, vanilla vLLM
  preempts where this preempts nothing, and every block returns to the pool.
* A request preempted after a pressure compaction recomputes through the same compactions and
  keeps the same token sets.
"""

from __future__ import annotations

import random

import pytest
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 28, "enable_prefix_caching": False}
ATOL = 1e-5


def config(trigger: str | None, **settings) -> dict:
    if trigger is None:
        return {"kv_compression": "none"}
    return {"kv_compression": "snapkv", "snapkv": {"budget": 256, "trigger": trigger,
                                                   **settings}}


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def _summaries(result: dict) -> dict[str, dict]:
    return {rid: (o.get("kv_transfer_params") or {}).get("snapkv")
            for rid, o in result["outputs"].items()}


def _find(mapping: dict, request_id: str):
    hits = [v for k, v in mapping.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, (request_id, list(mapping))
    return hits[0]


def test_light_load_is_vanilla_token_for_token(tiny_path) -> None:
    requests = [{"id": f"r{i}", "prompt_token_ids": _ids(1500, i), "max_tokens": 60}
                for i in range(3)]
    runs = {trigger: run_probe({"model": str(tiny_path), "requests": requests,
                                "engine": {**ENGINE,
                                           "additional_config": config(trigger,
                                                                       decode_budget=256)}})
            for trigger in (None, "pressure")}
    vanilla, pressure = runs[None], runs["pressure"]
    assert pressure["scheduler"] == "SnapKVScheduler"
    # Under `always` each of these prompts would compact at its end (the arithmetic: budget 256
    # of 1500 tokens frees floor((1500 - 256) / 128) = 9 blocks; test_block_accounting runs it).
    # Under pressure, with a pool that holds them all, nothing is compacted.
    assert pressure["block_size"] == 128 and (1500 - 256) // 128 == 9
    for rid, s in _summaries(pressure).items():
        assert s["compactions"] == 0 and s["evicted_tokens"] == 0, (rid, s)
        assert s["reasons"] == {"schedule": 0, "pressure": 0}
        assert pressure["outputs"][rid]["token_ids"] == vanilla["outputs"][rid]["token_ids"]
    assert pressure["snapkv_report"]["num_compactions"] == 0
    assert pressure["preemptions"] == vanilla["preemptions"] == 0
    # Held blocks never shrink (nothing evicted), and all come back.
    assert [s["free"] for s in pressure["timeline"]] == [s["free"] for s in vanilla["timeline"]]
    assert pressure["free_end"] == pressure["free_start"]


def test_a_short_pool_compacts_on_pressure_exactly_and_admits_waiting_requests(
        tiny_path) -> None:
    # 25 usable blocks of 128; four 1530-token prompts need 12 each. Vanilla vLLM runs two at a
    # time and preempts as they grow.
    requests = [{"id": f"r{i}", "prompt_token_ids": [1000 + i] + list(range(2000, 3529)),
                 "max_tokens": 100} for i in range(4)]
    common = {**ENGINE, "num_gpu_blocks_override": 26, "max_num_seqs": 4}
    vanilla = run_probe({"model": str(tiny_path), "engine": common, "requests": requests})
    ours = run_probe({"model": str(tiny_path), "requests": requests, "debug": True,
                      "engine": {**common, "additional_config": config("pressure")}})
    assert vanilla["preemptions"] > 0, "the workload must force preemption in vanilla vLLM"
    assert ours["preemptions"] == 0
    # The freed blocks went to waiting requests: more ran at once than vanilla could.
    assert max(s["running"] for s in vanilla["timeline"]) == 2
    assert max(s["running"] for s in ours["timeline"]) == 4
    assert len(ours["timeline"]) < len(vanilla["timeline"])
    summaries = _summaries(ours)
    assert all(len(o["token_ids"]) == 100 for o in ours["outputs"].values())
    assert sum(s["reasons"]["pressure"] for s in summaries.values()) >= 3
    assert all(s["reasons"]["schedule"] == 0 for s in summaries.values())
    rep = ours["snapkv_report"]
    assert rep["fallbacks"] == 0  # every ordered compaction had its window's queries
    for rid, s in summaries.items():
        if not s["compactions"]:
            continue
        # budget 256 kept (+ < one block of rounding), the window's queries ranked it
        assert _find(rep["compactions"], rid)["kept"] >= 256
        assert _find(rep["debug"]["slot_err"], rid) == 0.0
        assert _find(rep["debug"]["max_err"], rid) <= ATOL * max(
            1.0, _find(rep["debug"]["max_ref"], rid))
    assert ours["free_end"] == ours["free_start"], "blocks leaked"


def test_preempted_after_a_pressure_compaction_recomputes_the_same_kept_sets(
        tiny_path) -> None:
    # 20 usable blocks. Two uncompressed requests grow until the pool runs out; the compressed
    # one (admitted last, so preempted first) is compacted on pressure first.
    result = run_probe({
        "model": str(tiny_path), "debug": True, "kept": True,
        "engine": {**ENGINE, "num_gpu_blocks_override": 21,
                   "additional_config": config("pressure", decode_budget=256)},
        "requests": [
            {"id": "hog1", "prompt_token_ids": _ids(700, 11), "max_tokens": 900,
             "extra_args": {"kv_compression": "none"}},
            {"id": "hog2", "prompt_token_ids": _ids(300, 12), "max_tokens": 1300,
             "extra_args": {"kv_compression": "none"}},
            {"id": "dec", "prompt_token_ids": _ids(300, 13), "max_tokens": 1200},
        ],
    })
    assert result["preemptions"] > 0
    out = result["outputs"]
    assert [len(out[r]["token_ids"]) for r in ("hog1", "hog2", "dec")] == [900, 1300, 1200]
    summary = out["dec"]["kv_transfer_params"]["snapkv"]
    assert summary["reasons"]["pressure"] >= 1 and summary["reasons"]["schedule"] == 0
    rep = result["snapkv_report"]
    dec = _find(rep["compactions"], "dec")
    assert dec["times"] >= 2, dec  # compacted, preempted, recomputed, compacted again
    before, after = result["kept_before_recompute"]["dec"][0], result["kept"]["dec"][0]
    assert before and set(before) == set(after)
    for layer, first_run in before.items():
        again = {at: kept for at, _, kept in after[layer]}
        assert first_run and all(again[at] == kept for at, _, kept in first_run), layer
    assert _find(rep["debug"]["max_err"], "dec") <= ATOL * max(
        1.0, _find(rep["debug"]["max_ref"], "dec"))
    assert result["free_end"] == result["free_start"], "blocks leaked"


def test_prefix_cache_never_serves_what_a_pressure_compaction_rewrote(tiny_path) -> None:
    # "a" is read and hashed whole while the pool has room, then compacted on pressure as "b"
    # and "b2" arrive: the blocks it will rewrite leave the prefix cache first. "c", the same
    # prompt, arrives after "a" finished; its tokens must equal vanilla vLLM's for that prompt
    # (prefix cache on in both).
    shared = _ids(1530, 21)
    requests = [
        {"id": "a", "prompt_token_ids": shared, "max_tokens": 100},
        {"id": "b", "prompt_token_ids": _ids(1530, 22), "max_tokens": 100},
        {"id": "b2", "prompt_token_ids": _ids(1530, 23), "max_tokens": 100},
        {"id": "c", "prompt_token_ids": shared, "max_tokens": 100, "after": "a"},
    ]
    common = {**ENGINE, "num_gpu_blocks_override": 26, "max_num_seqs": 4,
              "enable_prefix_caching": True}
    vanilla = run_probe({"model": str(tiny_path), "engine": common, "requests": requests,
                         "stagger": True})
    ours = run_probe({"model": str(tiny_path), "requests": requests, "stagger": True,
                      "debug": True,
                      "engine": {**common, "additional_config": config("pressure")}})
    summaries = _summaries(ours)
    assert summaries["a"]["reasons"]["pressure"] >= 1, summaries
    # The path ran: hashed blocks of "a" were taken out of the prefix cache before the
    # rewrite, and no block a compaction rewrites was ever in it after a step.
    assert ours["unhashed_blocks"] > 0
    assert ours["hashed_rewritable_steps"] == []
    assert ours["outputs"]["c"]["token_ids"] == vanilla["outputs"]["c"]["token_ids"] == \
        vanilla["outputs"]["a"]["token_ids"]
    rep = ours["snapkv_report"]
    for rid in ("a", "b", "b2", "c"):
        if summaries[rid]["compactions"]:
            assert _find(rep["debug"]["slot_err"], rid) == 0.0
    assert ours["free_end"] == ours["free_start"]


def test_tp2_ranks_apply_the_same_orders_as_one_device(tiny_path) -> None:
    # The orders travel in the connector metadata to every worker: with TP=2, each rank runs
    # the same ordered compactions as one device does, keeping the same tokens for its KV heads.
    requests = [{"id": f"r{i}", "prompt_token_ids": [1000 + i] + list(range(2000, 3529)),
                 "max_tokens": 60} for i in range(4)]
    engine = {**ENGINE, "num_gpu_blocks_override": 26, "max_num_seqs": 4,
              "additional_config": config("pressure")}
    runs = {tp: run_probe({"model": str(tiny_path), "debug": True, "kept": True,
                           "all_ranks": True, "requests": requests,
                           "engine": {**engine, "tensor_parallel_size": tp}},
                          env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else None)
            for tp in (1, 2)}
    one, two = runs[1], runs[2]
    assert len(two["rank_reports"]) == 2
    ordered = 0
    for rid in one["outputs"]:
        sa = one["outputs"][rid]["kv_transfer_params"]["snapkv"]
        assert two["outputs"][rid]["kv_transfer_params"]["snapkv"] == sa
        assert two["outputs"][rid]["token_ids"] == one["outputs"][rid]["token_ids"]
        ordered += sa["reasons"]["pressure"]
        (ref,), ranks = one["kept"][rid], two["kept"][rid]
        for t, rank in enumerate(ranks):
            for layer, events in rank.items():
                assert len(events) == len(ref[layer]) == sa["compactions"]
                for (at, phase, heads), (at_r, phase_r, heads_r) in zip(ref[layer], events):
                    per_rank = len(heads) // 2
                    assert (at_r, phase_r) == (at, phase)
                    assert heads_r == heads[t * per_rank:(t + 1) * per_rank]
        for rep in two["rank_reports"] if sa["compactions"] else ():
            key = next(k for k in rep["debug"]["max_err"] if k.startswith(rid + "-"))
            assert rep["debug"]["slot_err"][key] == 0.0
            assert rep["compactions"][key]["compactions"] == sa["compactions"]
    assert ordered >= 3
    assert two["free_end"] == two["free_start"]
