"""Streaming `/v1/completions` and `/v1/chat/completions` carry the request's SnapKV summary: the
chunk with the `finish_reason` has `kv_transfer_params.snapkv`, equal to the non-streaming
response's for the same request (greedy), and the streamed text equals the non-streamed text.
Compressed, opted-out and short prompts on the `make serve` preset; with compression off
(the tiny model) neither response has the field.
"""

from __future__ import annotations

import json

import pytest
import requests

from conftest import VllmServer, post_ok

pytestmark = pytest.mark.engine

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
LONG = FILLER * 70 + "What colour is the sky?"
CASES = {
    "compressed": (LONG, {}),
    "ratio": (LONG, {"vllm_xargs": {"snapkv_ratio": 0.25}}),
    "opted_out": (LONG, {"vllm_xargs": {"kv_compression": "none"}}),
    "short": ("What colour is the sky?", {}),
}


def stream(server: VllmServer, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed request, in order (``[DONE]`` checked and dropped)."""
    with requests.post(f"{server.url}{path}", json={**body, "stream": True}, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _request(server: VllmServer, endpoint: str, prompt: str, extra: dict) -> tuple[str, dict]:
    if endpoint == "completions":
        return "/v1/completions", {"model": server.name, "prompt": prompt, "max_tokens": 8,
                                   "temperature": 0, **extra}
    return "/v1/chat/completions", {"model": server.name, "max_tokens": 8, "temperature": 0,
                                    "messages": [{"role": "user", "content": prompt}], **extra}


def _streamed_text(chunks: list[dict]) -> str:
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                   for chunk in chunks for c in chunk["choices"])


def _full_text(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_final_chunk_carries_the_non_streaming_summary(smollm2_server: VllmServer,
                                                       endpoint: str, case: str) -> None:
    prompt, extra = CASES[case]
    path, body = _request(smollm2_server, endpoint, prompt, extra)
    full = post_ok(smollm2_server, path, body)
    chunks = stream(smollm2_server, path, {**body, "stream_options": {"include_usage": True}})

    finals = [i for i, c in enumerate(chunks) if any(ch.get("finish_reason")
                                                     for ch in c["choices"])]
    # The finish_reason chunk, then the usage-only chunk include_usage adds.
    assert finals == [len(chunks) - 2], chunks[-3:]
    # (vLLM 0.33 writes the field as null on the other chunks; 0.32 leaves it out)
    assert chunks[-1]["choices"] == [] and chunks[-1].get("kv_transfer_params") is None
    assert [i for i, c in enumerate(chunks) if c.get("kv_transfer_params") is not None] == finals
    summary = chunks[finals[0]]["kv_transfer_params"]["snapkv"]
    assert summary == full["kv_transfer_params"]["snapkv"]
    assert summary["compressed"] is (case in ("compressed", "ratio"))
    assert summary["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]
    assert _streamed_text(chunks) == _full_text(full)


def test_without_stream_options_the_last_chunk_has_it(smollm2_server: VllmServer) -> None:
    path, body = _request(smollm2_server, "completions", LONG, {})
    chunks = stream(smollm2_server, path, body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["kv_transfer_params"]["snapkv"] == \
        post_ok(smollm2_server, path, body)["kv_transfer_params"]["snapkv"]


def test_compression_off_streams_without_the_field(tiny_server: VllmServer) -> None:
    path, body = _request(tiny_server, "completions", FILLER * 30, {})
    full = post_ok(tiny_server, path, body)
    chunks = stream(tiny_server, path, body)
    assert full.get("kv_transfer_params") is None
    assert not any(c.get("kv_transfer_params") is not None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert _streamed_text(chunks) == _full_text(full)
