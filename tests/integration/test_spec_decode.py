"""Speculative decoding (vLLM's ngram proposer) with compression on, in the real engine.

Drafts make a step end at any of several positions, some of which are rejected and computed
again; the scheduler therefore cuts a step before a compaction point, and the window stash
accepts runs that restart inside its range. What must hold:

* greedy tokens with speculative decoding equal those without it, under the same compression
  (prompt + decode budgets), and vLLM's own counters show accepted drafts;
* the compactions are exactly the documented rule's (computed by hand here), each one exact
  (debug oracle: attention over the compacted cache vs dense fp64 over the kept tokens), the
  request's blocks stay bounded at every step and the pool returns to its start;
* ``vllm serve --speculative-config ... --kv-compression snapkv`` starts (per-request settings
  are validated without a logits processor, which vLLM refuses beside speculative decoding),
  serves compressed requests and answers a malformed setting with HTTP 400.
"""

from __future__ import annotations

import json
import math

import pytest
import requests
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
B, S, BLOCK, WINDOW = 256, 128, 128, 32
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
CONFIG = {"kv_compression": "snapkv",
          "snapkv": {"window": WINDOW, "kernel": 15, "decode_budget": B, "decode_interval": S}}
ATOL = 1e-5
TEXT = ("Here is a story about a lighthouse keeper who counts the ships that pass. " * 20 +
        "Write a long story about the keeper and the ships.")


def _events(n: int, total: int) -> list[tuple[int, int]]:
    """(at, evicted) of the decode compactions of an ``n``-token prompt (no prompt budget)
    while ``total`` tokens are processed: compact to B once B + S are attended, evictions
    rounded down to whole blocks."""
    out, e = [], 0
    for t in range(n + 1, total + 1):
        if t - e >= B + S:
            e = (t - B) // BLOCK * BLOCK
            out.append((t, e))
    return out


def _probe(model, prompt: list[int], m: int, spec: bool) -> dict:
    engine = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
              "enable_prefix_caching": False, "kv_cache_memory_bytes": 1 << 29,
              "block_size": BLOCK, "worker_cls": WORKER, "additional_config": CONFIG,
              "disable_log_stats": False}
    if spec:
        engine["speculative_config"] = NGRAM
    return run_probe({"model": str(model), "engine": engine, "debug": True, "metrics": True,
                      "requests": [{"id": "spec", "prompt_token_ids": prompt,
                                    "max_tokens": m}]})


def test_ngram_drafts_with_decode_compaction(smollm2_path):
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(str(smollm2_path))(TEXT)["input_ids"]
    n, m = len(prompt), 400
    plain, spec = _probe(smollm2_path, prompt, m, False), _probe(smollm2_path, prompt, m, True)
    accepted = spec["metrics"].get("vllm:spec_decode_num_accepted_tokens", 0)
    assert accepted > 0, spec["metrics"]
    assert not plain["metrics"].get("vllm:spec_decode_num_draft_tokens")
    a, b = plain["outputs"]["spec"], spec["outputs"]["spec"]
    assert a["token_ids"] == b["token_ids"]
    events = _events(n, n + m - 1)
    assert len(events) >= 2
    for res in (plain, spec):
        summary = res["outputs"]["spec"]["kv_transfer_params"]["snapkv"]
        assert summary["compactions"] == len(events)
        assert summary["evicted_tokens"] == events[-1][1]
        assert summary["final_kept_tokens"] == n + m - 1 - events[-1][1]
        dbg = res["snapkv_report"]["debug"]
        key = next(iter(dbg["max_err"]))
        assert dbg["slot_err"][key] == 0.0 and dbg["checks"][key] > 0
        assert dbg["max_err"][key] <= ATOL * max(1.0, dbg["max_ref"][key])
        assert res["free_end"] == res["free_start"]
        held = max(step["held"].get("spec", 0) for step in res["timeline"])
        assert held <= math.ceil((B + S) / BLOCK) + 1, held
    print(f"\n[snapkv] ngram drafts: {accepted} accepted of "
          f"{spec['metrics'].get('vllm:spec_decode_num_draft_tokens')}; tokens equal the "
          f"non-speculative run over {m} tokens, {len(events)} decode compactions")


def test_serve_with_speculative_config(start_server, tiny_path):
    server = start_server(tiny_path, ["--kv-compression", "snapkv", "--snapkv-budget", "128",
                                      "--snapkv-window", "16", "--snapkv-kernel", "5",
                                      "--speculative-config", json.dumps(NGRAM)],
                          name="spec")
    prompt = list(range(1000, 1300)) * 2
    r = requests.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": "spec", "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    summary = r.json()["kv_transfer_params"]["snapkv"]
    assert summary["compressed"] and summary["kept_tokens"] < len(prompt)
    bad = requests.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "spec", "prompt": prompt, "max_tokens": 4,
        "vllm_xargs": {"snapkv_budget": "lots"}})
    assert bad.status_code == 400 and "snapkv_budget" in bad.text, bad.text
    again = requests.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": "spec", "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == \
        r.json()["choices"][0]["text"]
