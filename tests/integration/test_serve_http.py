"""The bundled SmolLM2 and the tiny random model answer real OpenAI requests over HTTP.

Each module-scoped fixture starts one real `vllm serve` on a free localhost port; the bundled
model is started from the same YAML preset `make serve` uses, so the preset is tested too.
"""

from __future__ import annotations

import pytest
import requests

from conftest import REPO, VllmServer

pytestmark = pytest.mark.engine

PRESET = REPO / "configs" / "smollm2-cpu-snapkv.yaml"


@pytest.fixture(scope="module")
def smollm2_server(start_server, smollm2_path) -> VllmServer:
    # --config supplies dtype, kv-compression etc.; the fixture's own flags come after it and
    # override host/port/cache size for the test.
    return start_server(smollm2_path, ["--config", str(PRESET)], name="smollm2")


@pytest.fixture(scope="module")
def tiny_server(start_server, tiny_path) -> VllmServer:
    return start_server(tiny_path, ["--kv-compression", "none"], name="tiny")


def _post(server: VllmServer, path: str, body: dict) -> dict:
    r = requests.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_endpoint_lists_served_name(smollm2_server: VllmServer) -> None:
    r = requests.get(f"{smollm2_server.url}/v1/models", timeout=10)
    assert [m["id"] for m in r.json()["data"]] == ["smollm2"]


def test_smollm2_completion_is_right(smollm2_server: VllmServer) -> None:
    out = _post(smollm2_server, "/v1/completions", {
        "model": "smollm2", "prompt": "The capital of France is",
        "max_tokens": 8, "temperature": 0,
    })
    choice = out["choices"][0]
    assert "Paris" in choice["text"], choice
    assert out["usage"]["prompt_tokens"] == 5
    assert 1 <= out["usage"]["completion_tokens"] <= 8


def test_smollm2_chat_completion_is_right(smollm2_server: VllmServer) -> None:
    out = _post(smollm2_server, "/v1/chat/completions", {
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
    log = smollm2_server.log()
    assert "'kv_compression': 'snapkv'" in log, "the preset's kv-compression did not reach vLLM"


def test_tiny_model_completion(tiny_server: VllmServer) -> None:
    out = _post(tiny_server, "/v1/completions", {
        "model": "tiny", "prompt": "Hello, my name is",
        "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })
    assert out["usage"]["completion_tokens"] == 12
    assert out["choices"][0]["finish_reason"] == "length"
    # Greedy decoding of the same prompt is deterministic.
    again = _post(tiny_server, "/v1/completions", {
        "model": "tiny", "prompt": "Hello, my name is",
        "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })
    assert again["choices"][0]["text"] == out["choices"][0]["text"]


def test_tiny_model_chat_completion(tiny_server: VllmServer) -> None:
    out = _post(tiny_server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True,
    })
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 6
