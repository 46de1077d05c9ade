"""`vllm serve --kv-compression snapkv` over HTTP on the bundled SmolLM2: long prompts are
compressed inside the engine (each response's ``kv_transfer_params.snapkv`` says how), short ones
are not, and a planted number in ~2.4K tokens of filler is still retrieved at a 4x kept ratio."""

from __future__ import annotations

import random

import pytest

from conftest import VllmServer, post_ok

pytestmark = pytest.mark.engine

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def needle_prompt(depth: float, code: int, reps: int = 100) -> str:
    before = int(reps * depth)
    return (FILLER * before + f"The secret number is {code}. Remember it. "
            + FILLER * (reps - before) + "\nWhat is the secret number? The secret number is")


def test_long_prompt_is_compressed_and_short_one_is_not(smollm2_server: VllmServer) -> None:
    short = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4,
        "temperature": 0})
    assert short["usage"]["prompt_tokens"] == 5
    assert short["kv_transfer_params"]["snapkv"]["compressed"] is False
    long = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": needle_prompt(0.5, 12345), "max_tokens": 8,
        "temperature": 0})
    s = long["kv_transfer_params"]["snapkv"]
    n = long["usage"]["prompt_tokens"]
    # The preset's budget is 1024 and CPU blocks hold 128 tokens: E = floor((N - 1024) / 128)
    # * 128, computed here by hand.
    evicted = (n - 1024) // 128 * 128
    assert s["compressed"] and s["compactions"] == 1 and s["prompt_tokens"] == n
    assert s["kept_tokens"] == n - evicted and 1024 <= s["kept_tokens"] < 1024 + 128
    assert s["freed_blocks"] == evicted // 128 and s["evicted_tokens"] == evicted


def test_needle_survives_4x_compression(smollm2_server: VllmServer) -> None:
    rng = random.Random(0)
    full_hits = snap_hits = 0
    depths = (0.1, 0.3, 0.5, 0.7, 0.9)
    ratios: list[float] = []
    for depth in depths:
        code = rng.randrange(10000, 99999)
        prompt = needle_prompt(depth, code)
        answers = {}
        for name, xargs in (("full", {"kv_compression": "none"}),
                            ("snapkv", {"snapkv_ratio": 0.25})):
            out = post_ok(smollm2_server, "/v1/completions", {
                "model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "vllm_xargs": xargs})
            answers[name] = str(code) in out["choices"][0]["text"]
            if name == "snapkv":
                s = out["kv_transfer_params"]["snapkv"]
                ratios.append(s["prompt_tokens"] / s["kept_tokens"])
        full_hits += answers["full"]
        snap_hits += answers["snapkv"]
    # Full cache finds them (sanity of the task), and 4x compression loses none of them.
    assert full_hits == len(depths)
    assert snap_hits == full_hits
    assert all(3.5 < r <= 4.0 for r in ratios), ratios
