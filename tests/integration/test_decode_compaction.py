"""Compaction during decode (``--snapkv-decode-budget``) in the real vLLM engine (no mocks).

* SmolLM2, 600 generated tokens: after every decode compaction, attention over the compacted
  cache equals dense attention over exactly the kept tokens (debug oracle), and the kept sets of
  all 30 layers x 3 KV heads at every compaction equal a replay in plain HF transformers (the
  engine's tokens teacher-forced, the same compaction points, the textbook SnapKV formula).
* Greedy tokens equal vanilla vLLM's until the first decode compaction; an opted-out request in
  the same batch equals vanilla's throughout.
* Over a 2,100-token generation the request's real blocks (the scheduler's pool) never exceed
  ``ceil((B + S) / bs) + 1`` and the pool returns to its starting count.
* A request preempted after decode compactions is recomputed, compacted again, stays exact; an
  aborted request gives all its blocks back.

Schedules here are computed by hand (the documented rule: compact to B once B + S are attended,
evictions rounded down to whole blocks), not by the plugin.
"""

from __future__ import annotations

import gc
import random
from contextlib import contextmanager

import pytest
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
BLOCK = 128
B, S, WINDOW, KERNEL = 256, 128, 32, 15
DECODE = {"kv_compression": "snapkv",
          "snapkv": {"window": WINDOW, "kernel": KERNEL, "decode_budget": B,
                     "decode_interval": S}}
ATOL = 1e-5


def decode_events(n: int, total: int, b: int = B, s: int = S, bs: int = BLOCK,
                  e: int = 0) -> list[tuple[int, int, int]]:
    """(at, prior, evicted) of the decode compactions of a request whose prompt of ``n`` tokens
    ended with ``e`` evicted, processing ``total`` tokens: the rule, token by token."""
    out = []
    for t in range(n + 1, total + 1):
        if t - e >= b + s:
            new = (t - b) // bs * bs
            out.append((t, e, new))
            e = new
    return out


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


@contextmanager
def _llm(model, **kw):
    from vllm import LLM

    llm = LLM(model=str(model), dtype="float32", max_model_len=4096, enforce_eager=True,
              enable_prefix_caching=False, **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _sp(max_tokens, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def _find(mapping: dict, request_id: str):
    hits = [v for k, v in mapping.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, (request_id, list(mapping))
    return hits[0]


# ---------------------------------------------------------------------------------------------
# SmolLM2: exact attention and the kept sets of an HF replay, at every decode compaction
# ---------------------------------------------------------------------------------------------


def test_decode_compactions_are_exact_and_keep_what_hf_keeps(smollm2_path):
    from transformers import AutoTokenizer

    from hf_reference import decode_with_compactions
    from snapkv_reference import reference_keep

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = ("Here is a story about a lighthouse keeper who counts the ships that pass. " * 20 +
            "Write a long story about the keeper and the ships.")
    prompt = tok(text)["input_ids"]
    n, m = len(prompt), 600
    with _llm(smollm2_path, kv_cache_memory_bytes=1 << 29, worker_cls=WORKER,
              additional_config=DECODE) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        (out,) = llm.generate([{"prompt_token_ids": prompt}], _sp(m), use_tqdm=False)
        (rep,) = llm.collective_rpc("snapkv_report")
        (history,) = llm.collective_rpc("snapkv_kept", args=(out.request_id, "all"))
    output = list(out.outputs[0].token_ids)
    events = decode_events(n, n + m - 1)
    assert len(events) >= 4
    comp = _find(rep["compactions"], out.request_id)
    assert comp["compactions"] == len(events) and set(comp["phases"]) == {"decode"}
    summary = out.kv_transfer_params["snapkv"]
    assert summary["compactions"] == len(events)
    assert summary["evicted_tokens"] == events[-1][2]
    assert summary["final_kept_tokens"] == n + m - 1 - events[-1][2]
    # Attention over the compacted cache, every later step and layer, vs dense fp64.
    dbg = rep["debug"]
    err, ref = _find(dbg["max_err"], out.request_id), _find(dbg["max_ref"], out.request_id)
    assert _find(dbg["slot_err"], out.request_id) == 0.0
    assert _find(dbg["checks"], out.request_id) >= 30 * (m - (events[0][0] - n) - 1)
    assert err <= ATOL * max(1.0, ref), (err, ref)

    def keep(q, k, count):
        kept, _ = reference_keep(q, k, budget=count, window=WINDOW, kernel=KERNEL,
                                 pooling="avg", reduction="sum", gqa_aggregation="mean", sink=0)
        return kept

    replay = decode_with_compactions(smollm2_path, prompt, output, events, window=WINDOW,
                                     keep_fn=keep)
    assert [at for at, _ in replay] == [at for at, *_ in events]
    same = total = 0
    for c, (at, ref_layers) in enumerate(replay):
        for i, ref_heads in enumerate(ref_layers):
            at_engine, phase, ours = history[f"model.layers.{i}.self_attn.attn"][c]
            assert (at_engine, phase) == (at, "decode")
            for h, row in enumerate(ours):
                same += set(row) == set(ref_heads[h])
                total += 1
    print(f"\n[snapkv] decode compactions vs HF replay: {same}/{total} kept sets identical "
          f"({len(events)} compactions), max_err {err:.2e}")
    assert same >= 0.95 * total


# ---------------------------------------------------------------------------------------------
# Tiny model: tokens before the first compaction, opt-out beside compressed requests
# ---------------------------------------------------------------------------------------------


def test_tokens_equal_vanilla_until_the_first_decode_compaction(tiny_path):
    prompts = [_ids(300, 1), _ids(200, 2)]
    m = 400
    with _llm(tiny_path, kv_cache_memory_bytes=1 << 28) as llm:
        vanilla = [list(o.outputs[0].token_ids) for o in
                   llm.generate([{"prompt_token_ids": p} for p in prompts], _sp(m),
                                use_tqdm=False)]
    with _llm(tiny_path, kv_cache_memory_bytes=1 << 28, worker_cls=WORKER,
              additional_config=DECODE) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        outs = llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]}],
                            [_sp(m), _sp(m, snapkv_decode_budget=0)], use_tqdm=False)
        (rep,) = llm.collective_rpc("snapkv_report")
    ours = [list(o.outputs[0].token_ids) for o in outs]
    first_at = decode_events(300, 300 + m - 1)[0][0]
    same_until = first_at - 300 + 1  # outputs sampled before the compaction's effect
    assert ours[0][:same_until] == vanilla[0][:same_until]
    # The opted-out request decoding beside it is vanilla vLLM, token for token.
    assert ours[1] == vanilla[1]
    assert outs[1].kv_transfer_params["snapkv"]["compactions"] == 0
    c = _find(rep["compactions"], outs[0].request_id)
    assert c["compactions"] == len(decode_events(300, 300 + m - 1))
    assert _find(rep["debug"]["max_err"], outs[0].request_id) < ATOL


# ---------------------------------------------------------------------------------------------
# Block accounting on the scheduler's real pool
# ---------------------------------------------------------------------------------------------

ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 28, "enable_prefix_caching": False}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_blocks_stay_bounded_over_a_long_generation(tiny_path, prefix_caching):
    n, m = 200, 2100
    result = run_probe({
        "model": str(tiny_path),
        "engine": {**ENGINE, "enable_prefix_caching": prefix_caching,
                   "additional_config": DECODE},
        "requests": [{"id": "long", "prompt_token_ids": _ids(n, 5), "max_tokens": m}],
    })
    assert result["block_size"] == BLOCK
    held = [step["held"].get("long") for step in result["timeline"] if "long" in step["held"]]
    bound = -(-(B + S) // BLOCK) + 1
    assert len(held) >= m - 5 and max(held) <= bound, (max(held), bound)
    assert max(held) >= bound - 1  # the bound is what the request really uses
    assert len(result["outputs"]["long"]["token_ids"]) == m
    summary = result["outputs"]["long"]["kv_transfer_params"]["snapkv"]
    assert summary["compactions"] == len(decode_events(n, n + m - 1))
    assert result["free_end"] == result["free_start"], "blocks leaked"


def test_preempted_after_decode_compactions_and_aborted_requests(tiny_path):
    # 20 usable blocks of 128. Two uncompressed requests grow until the pool runs out; the
    # decode-compressed one (admitted last) is preempted after compacting, recomputed and
    # compacted again. A fourth request is aborted mid-generation.
    result = run_probe({
        "model": str(tiny_path), "debug": True,
        "engine": {**ENGINE, "max_model_len": 2048, "num_gpu_blocks_override": 21,
                   "additional_config": DECODE},
        "requests": [
            {"id": "hog1", "prompt_token_ids": _ids(700, 11), "max_tokens": 900,
             "extra_args": {"kv_compression": "none"}},
            {"id": "hog2", "prompt_token_ids": _ids(300, 12), "max_tokens": 1300,
             "extra_args": {"kv_compression": "none"}},
            {"id": "dec", "prompt_token_ids": _ids(300, 13), "max_tokens": 1200},
            {"id": "gone", "prompt_token_ids": _ids(200, 14), "max_tokens": 1500},
        ],
        "aborts": [{"id": "gone", "after_step": 400}],
    })
    assert result["preemptions"] > 0
    out = result["outputs"]
    assert [len(out[r]["token_ids"]) for r in ("hog1", "hog2", "dec")] == [900, 1300, 1200]
    assert out["gone"] == {"aborted_at_step": 400}
    rep = result["snapkv_report"]
    dec = _find(rep["compactions"], "dec")
    assert dec["times"] >= 2, dec  # compacted, preempted, recomputed, compacted again
    assert out["dec"]["kv_transfer_params"]["snapkv"]["compactions"] == \
        len(decode_events(300, 300 + 1200 - 1))  # each compaction counted once
    assert max(_find(rep["debug"]["max_err"], "dec"), 0) < ATOL
    assert result["free_end"] == result["free_start"], "blocks leaked"


def test_n2_sequences_compact_each_on_their_own(tiny_path):
    # n = 2 sampled sequences of one request share the prompt but generate different tokens:
    # each is its own engine request, with its own schedule, compactions and bound.
    n, m = 300, 700
    result = run_probe({
        "model": str(tiny_path), "debug": True,
        "engine": {**ENGINE, "additional_config": DECODE},
        "requests": [{"id": "pair", "prompt_token_ids": _ids(n, 21), "max_tokens": m, "n": 2,
                      "temperature": 1.0}],
    })
    a, b = result["outputs"]["pair"]["completions"]
    assert len(a) == len(b) == m and a != b
    events = decode_events(n, n + m - 1)
    rep = result["snapkv_report"]
    children = [k for k in rep["compactions"] if "pair" in k]
    assert len(children) == 2, list(rep["compactions"])
    for k in children:
        assert rep["compactions"][k]["compactions"] == len(events) >= 3
        assert rep["debug"]["slot_err"][k] == 0.0 and rep["debug"]["checks"][k] > 0
        assert rep["debug"]["max_err"][k] <= ATOL * max(1.0, rep["debug"]["max_ref"][k])
    bound = -(-(B + S) // BLOCK) + 1
    held = {}
    for step in result["timeline"]:
        for rid, blocks in step["held"].items():
            held[rid] = max(held.get(rid, 0), blocks)
    assert len(held) == 2 and max(held.values()) <= bound, (held, bound)
    assert result["free_end"] == result["free_start"], "blocks leaked"
