"""The bundled SmolLM2 and the tiny random model answer real OpenAI requests over HTTP.

The server fixtures (conftest.py) start real `vllm serve` processes on free localhost ports; the
bundled model is started from the same YAML preset `make serve` uses, so the preset is tested too.
"""

from __future__ import annotations

import pytest
import requests

from conftest import VllmServer, post_ok

pytestmark = pytest.mark.engine


def test_models_endpoint_lists_served_name(smollm2_server: VllmServer) -> None:
    r = requests.get(f"{smollm2_server.url}/v1/models", timeout=10)
    assert [m["id"] for m in r.json()["data"]] == ["smollm2"]


def test_smollm2_completion_is_right(smollm2_server: VllmServer) -> None:
    out = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": "The capital of France is",
        "max_tokens": 8, "temperature": 0,
    })
    choice = out["choices"][0]
    assert "Paris" in choice["text"], choice
    assert out["usage"]["prompt_tokens"] == 5
    assert 1 <= out["usage"]["completion_tokens"] <= 8


def test_smollm2_chat_completion_is_right(smollm2_server: VllmServer) -> None:
    out = post_ok(smollm2_server, "/v1/chat/completions", {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0,
    })
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "Paris" in message["content"], message
    # The chat template wrapped the question, so the prompt is longer than the question itself.
    assert out["usage"]["prompt_tokens"] > 10


def test_smollm2_preset_turned_compression_flag_on(smollm2_server: VllmServer) -> None:
    # Compression on shows in every response and in the server's metrics (not in a log line).
    out = post_ok(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert out["kv_transfer_params"]["snapkv"]["method"] is None  # too short to compress
    metrics = requests.get(f"{smollm2_server.url}/metrics", timeout=30).text
    assert "# TYPE vllm:snapkv_compression_ratio histogram" in metrics


def test_tiny_model_completion(tiny_server: VllmServer) -> None:
    out = post_ok(tiny_server, "/v1/completions", {
        "model": "tiny", "prompt": "Hello, my name is",
        "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })
    assert out["usage"]["completion_tokens"] == 12
    assert out["choices"][0]["finish_reason"] == "length"
    # Greedy decoding of the same prompt is deterministic.
    again = post_ok(tiny_server, "/v1/completions", {
        "model": "tiny", "prompt": "Hello, my name is",
        "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })
    assert again["choices"][0]["text"] == out["choices"][0]["text"]


def test_tiny_model_chat_completion(tiny_server: VllmServer) -> None:
    out = post_ok(tiny_server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True,
    })
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 6
