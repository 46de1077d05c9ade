"""Prompts larger than the KV pool: compaction while the prompt is read (``--snapkv-prefill-budget``),
on the real engine and the real HTTP server (no mocks).

* A prompt of 4,000 tokens runs in an 11-block pool (1,408 tokens; 2.8x smaller): the request's
  real blocks never exceed ``ceil((P + C) / bs) + 1`` while it is read, every intermediate
  compaction is exact (attention over the compacted cache equals dense attention over exactly the
  kept tokens), and the pool returns to its starting count. Vanilla vLLM refuses to start with
  that pool and ``max_model_len``.
* Over HTTP: the same prompt is answered (200); opted out, it could never fit, so it is refused
  with HTTP 400 naming ``max_tokens`` — as is a short prompt whose output could not fit — and the
  server keeps serving.
* Preemption in the middle of such a prefill: recomputed from 0, compacted again, exact.
* Prefix caching with a request compacted while read: only the blocks below its first
  compaction's eviction are valid cache entries (later ones are rewritten by compactions); other
  requests reuse exactly those, and outputs equal a run without prefix caching.

Expected values are computed by hand from the documented rule (compact to P once P + C are read).
"""

from __future__ import annotations

import random

import pytest
import requests
from engine_probe import run as run_probe

pytestmark = pytest.mark.engine

BLOCK, P, C, BUDGET = 128, 512, 256, 256
PREFILL = {"kv_compression": "snapkv",
           "snapkv": {"budget": BUDGET, "prefill_budget": P, "prefill_interval": C}}
POOL = 12  # num_gpu_blocks_override; vLLM keeps one as its null block: 11 usable
ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True,
          "kv_cache_memory_bytes": 1 << 28, "num_gpu_blocks_override": POOL,
          "max_num_batched_tokens": 512, "enable_prefix_caching": False}
ATOL = 1e-5


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def prefill_events(n: int) -> list[tuple[int, int]]:
    """(at, evicted) of the prefill compactions of an n-token prompt, by the rule."""
    out, e = [], 0
    for t in range(1, n):
        if t - e >= P + C:
            e = (t - P) // BLOCK * BLOCK
            out.append((t, e))
    return out


def test_a_prompt_larger_than_the_pool_runs_bounded_and_exact(tiny_path):
    n = 4000
    result = run_probe({
        "model": str(tiny_path), "debug": True,
        "engine": {**ENGINE, "additional_config": PREFILL},
        "requests": [{"id": "big", "prompt_token_ids": _ids(n, 1), "max_tokens": 16}],
    })
    usable = result["num_blocks"] - 1
    assert usable * BLOCK < n / 2.5  # the pool holds well under half the prompt
    held = [s["held"]["big"] for s in result["timeline"] if "big" in s["held"]]
    bound = -(-(P + C) // BLOCK) + 1
    assert max(held) <= bound, (max(held), bound)
    out = result["outputs"]["big"]
    assert len(out["token_ids"]) == 16
    events = prefill_events(n)
    summary = out["kv_transfer_params"]["snapkv"]
    assert summary["compactions"] == len(events) + 1  # the prefill ones and the prompt's end
    # The prompt's end keeps the budget rounded to whole blocks: (n - E) in [256, 384).
    assert BUDGET <= summary["kept_tokens"] < BUDGET + BLOCK
    rep = result["snapkv_report"]
    (comp,) = rep["compactions"].values()
    assert comp["phases"] == ["prefill"] * len(events) + ["prompt"]
    (err,) = rep["debug"]["max_err"].values()
    (checks,) = rep["debug"]["checks"].values()
    assert checks > 2 * len(events) and err < ATOL, (checks, err)  # every layer, every chunk
    assert result["free_end"] == result["free_start"], "blocks leaked"


def test_vanilla_vllm_cannot_start_with_that_pool(tiny_path):
    """What vanilla vLLM does with the same pool and max_model_len: it refuses to start."""
    import subprocess
    import sys

    code = (f"from vllm import LLM\n"
            f"LLM(model={str(tiny_path)!r}, dtype='float32', max_model_len=4096, "
            f"enforce_eager=True, kv_cache_memory_bytes=1 << 28, num_gpu_blocks_override={POOL})\n"
            "print('STARTED')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "max seq len (4096)" in proc.stderr or "max_model_len" in proc.stderr, \
        proc.stderr[-3000:]


def test_over_http_what_can_never_fit_is_refused(start_server, tiny_path):
    server = start_server(tiny_path, [
        "--kv-compression", "snapkv", "--snapkv-budget", str(BUDGET),
        "--snapkv-prefill-budget", str(P), "--snapkv-prefill-interval", str(C),
        "--num-gpu-blocks-override", str(POOL), "--max-num-batched-tokens", "512",
        "--kv-cache-memory-bytes", str(1 << 28)], name="tiny")
    url = f"{server.url}/v1/completions"
    prompt = _ids(4000, 2)
    ok = requests.post(url, json={"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                  "temperature": 0, "ignore_eos": True}, timeout=600)
    assert ok.status_code == 200, ok.text
    assert ok.json()["kv_transfer_params"]["snapkv"]["compactions"] == \
        len(prefill_events(4000)) + 1
    for body in ({"prompt": prompt, "max_tokens": 8, "vllm_xargs": {"kv_compression": "none"}},
                 {"prompt": _ids(100, 3), "max_tokens": 3900}):
        r = requests.post(url, json={"model": "tiny", "temperature": 0, **body}, timeout=120)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "max_tokens" in msg and "more than the whole KV pool (11 blocks)" in msg, msg
    # Still serving.
    again = requests.post(url, json={"model": "tiny", "prompt": _ids(50, 4), "max_tokens": 4},
                          timeout=120)
    assert again.status_code == 200


def test_preempted_in_the_middle_of_a_compacted_prefill(tiny_path):
    # Four uncompressed requests (admitted first, 3 blocks each) each open a fourth block a few
    # decode steps after the big prompt was admitted into the remaining 7 blocks, so the big
    # prompt — the last admitted — is preempted while it is read; it is recomputed from 0 and
    # compacted again.
    hogs = [{"id": f"hog{i}", "prompt_token_ids": _ids(380, 20 + i), "max_tokens": 300,
             "extra_args": {"kv_compression": "none"}} for i in range(4)]
    result = run_probe({
        "model": str(tiny_path), "debug": True, "stagger": True,
        "engine": {**ENGINE, "num_gpu_blocks_override": 20, "additional_config": PREFILL},
        "requests": [*hogs, {"id": "big", "prompt_token_ids": _ids(3500, 6), "max_tokens": 8}],
    })
    assert result["preemptions"] > 0
    big_steps = [s["computed"].get("big") for s in result["timeline"]]
    assert any(b is None for b in big_steps[big_steps.index(next(
        b for b in big_steps if b)):])  # left the running set mid-way (preempted) ...
    out = result["outputs"]
    assert [len(out[f"hog{i}"]["token_ids"]) for i in range(4)] == [300] * 4
    assert len(out["big"]["token_ids"]) == 8  # ... and finished
    rep = result["snapkv_report"]
    big = next(v for k, v in rep["compactions"].items() if k.startswith("big"))
    assert big["times"] >= 2, big
    assert out["big"]["kv_transfer_params"]["snapkv"]["compactions"] == \
        len(prefill_events(3500)) + 1  # counted once despite the recompute
    assert max(rep["debug"]["max_err"].values()) < ATOL
    assert result["free_end"] == result["free_start"]


def test_prefix_caching_with_a_request_compacted_while_read(tiny_path):
    shared = _ids(2900, 7)
    reqs = [{"id": "A", "prompt_token_ids": shared + _ids(40, 8), "max_tokens": 8},
            {"id": "B", "prompt_token_ids": shared + _ids(50, 9), "max_tokens": 8, "after": "A"},
            {"id": "C", "prompt_token_ids": shared + _ids(60, 10), "max_tokens": 8,
             "after": "A", "extra_args": {"kv_compression": "none"}}]
    engine = {**ENGINE, "num_gpu_blocks_override": 64, "max_num_seqs": 1,
              "additional_config": PREFILL}
    cached = run_probe({"model": str(tiny_path), "stagger": True, "debug": True,
                        "engine": {**engine, "enable_prefix_caching": True}, "requests": reqs})
    fresh = run_probe({"model": str(tiny_path), "stagger": True,
                       "engine": {**engine, "enable_prefix_caching": False}, "requests": reqs})
    out = cached["outputs"]
    # A's first compaction (at P + C = 768) evicted slots [0, 256) and rewrote [256, 768): only
    # its first two blocks are valid cache entries, so B (compressed) and C (not) hit at most
    # those, while they do hit them.
    first_evicted = prefill_events(2940)[0][1]
    assert first_evicted == 256
    assert out["A"]["num_cached_tokens"] == 0
    assert 0 < out["B"]["num_cached_tokens"] <= first_evicted
    assert 0 < out["C"]["num_cached_tokens"] <= first_evicted
    for rid in "ABC":
        assert out[rid]["token_ids"] == fresh["outputs"][rid]["token_ids"], rid
    assert max(cached["snapkv_report"]["debug"]["max_err"].values()) < ATOL
    assert cached["free_end"] == cached["free_start"]
