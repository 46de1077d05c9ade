"""`vllm serve --kv-compression snapkv` over HTTP on the bundled SmolLM2: long prompts are
compressed inside the engine (the server reports each compaction), short ones are not, and a
planted number in ~2.4K tokens of filler is still retrieved at a 4x kept ratio."""

from __future__ import annotations

import random
import re
import time

import pytest

from conftest import VllmServer, post_ok

pytestmark = pytest.mark.engine

COMPRESSED = re.compile(r"SnapKV compressed request (\S+): (\d+) -> (\d+) prompt tokens per KV "
                        r"head, (\d+) of (\d+) blocks freed")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def needle_prompt(depth: float, code: int, reps: int = 100) -> str:
    before = int(reps * depth)
    return (FILLER * before + f"The secret number is {code}. Remember it. "
            + FILLER * (reps - before) + "\nWhat is the secret number? The secret number is")


def compactions(server: VllmServer, expect: int, timeout: float = 30.0) -> list[tuple]:
    """The server's compaction reports, waiting until at least ``expect`` are logged."""
    deadline = time.monotonic() + timeout
    while True:
        found = COMPRESSED.findall(server.log())
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_long_prompt_is_compressed_and_short_one_is_not(smollm2_server: VllmServer) -> None:
    before = len(compactions(smollm2_server, 0))
    short = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4,
        "temperature": 0})
    assert len(compactions(smollm2_server, before + 1, timeout=3)) == before
    long = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": needle_prompt(0.5, 12345), "max_tokens": 8,
        "temperature": 0})
    found = compactions(smollm2_server, before + 1)
    assert len(found) == before + 1
    _, n, kept, freed, total = found[-1]
    n, kept, freed, total = map(int, (n, kept, freed, total))
    # The preset's budget is 1024 and CPU blocks hold 128 tokens.
    assert n == long["usage"]["prompt_tokens"] and short["usage"]["prompt_tokens"] == 5
    assert 1024 <= kept < 1024 + 128 and kept == n - freed * 128
    assert total == -(-n // 128)


def test_needle_survives_4x_compression(smollm2_server: VllmServer) -> None:
    rng = random.Random(0)
    full_hits = snap_hits = 0
    depths = (0.1, 0.3, 0.5, 0.7, 0.9)
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
        full_hits += answers["full"]
        snap_hits += answers["snapkv"]
    # Full cache finds them (sanity of the task), and 4x compression loses none of them.
    assert full_hits == len(depths)
    assert snap_hits == full_hits
    reports = compactions(smollm2_server, 1)
    ratios = [int(n) / int(kept) for _, n, kept, _, _ in reports[-len(depths):]]
    assert all(3.5 < r <= 4.0 for r in ratios), ratios
