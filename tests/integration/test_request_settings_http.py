"""Per-request SnapKV settings over the OpenAI API: bad ones are HTTP 400s naming the field, and
the server keeps serving."""

from __future__ import annotations

import pytest
import requests

from conftest import VllmServer, post_ok

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("path,body_extra", [
    ("/v1/completions", {"prompt": "Hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
])
@pytest.mark.parametrize("xargs,field,fragment", [
    ({"snapkv_budget": 8}, "snapkv_budget", "must be an integer > window (32)"),
    ({"snapkv_ratio": 1.5}, "snapkv_ratio", "(0, 1]"),
    ({"snapkv_kernel": 5}, "snapkv_kernel", "unknown request setting"),
    ({"kv_compression": "h2o"}, "kv_compression",
     "must be one of none, keydiff, knorm, recency, snapkv"),
    ({"snapkv_decode_budget": 16}, "snapkv_decode_budget", "must be an integer > window (32)"),
    ({"snapkv_prefill_budget": 64}, "snapkv_prefill_budget", ">= budget (1024)"),
    ({"snapkv_compact_at": 0}, "snapkv_compact_at", "must be a non-zero integer"),
    ({"snapkv_compact_at": "end"}, "snapkv_compact_at", "must be a non-zero integer"),
    ({"snapkv_compact_at": -500}, "snapkv_compact_at", "-token prompt"),
])
def test_bad_request_setting_is_a_400_naming_it(smollm2_server: VllmServer, path, body_extra,
                                                xargs, field, fragment) -> None:
    body = {"model": "smollm2", "max_tokens": 4, "vllm_xargs": xargs, **body_extra}
    r = requests.post(f"{smollm2_server.url}{path}", json=body, timeout=120)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"vllm_xargs.{field}" in message and fragment in message, message


def test_server_keeps_serving_and_accepts_good_settings(smollm2_server: VllmServer) -> None:
    requests.post(f"{smollm2_server.url}/v1/completions", timeout=120, json={
        "model": "smollm2", "prompt": "x", "max_tokens": 2, "vllm_xargs": {"snapkv_budget": -1}})
    for xargs in ({"kv_compression": "none"}, {"snapkv_budget": 512}, {"snapkv_ratio": 0.25},
                  {"snapkv_compact_at": -2}):
        out = post_ok(smollm2_server, "/v1/completions", {
            "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, "vllm_xargs": xargs})
        assert "Paris" in out["choices"][0]["text"]
