"""The per-request checks the API server runs before a request reaches the engine (HTTP 400s);
the arithmetic they rely on is computed here by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_snapkv import capacity
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.integration.request_validation import check_request

VLLMValidationError = pytest.importorskip("vllm.exceptions").VLLMValidationError


def _cfg(**snapkv) -> CompressionConfig:
    return CompressionConfig.from_additional_config({"kv_compression": "snapkv",
                                                     "snapkv": snapkv})


def _sp(max_tokens=16, seed=None, **extra):
    return SimpleNamespace(max_tokens=max_tokens, seed=seed, extra_args=extra or None)


def test_bad_vllm_xargs_name_the_field() -> None:
    with pytest.raises(VLLMValidationError) as err:
        check_request(_cfg(), 100, _sp(snapkv_budget=8), 128, None)
    assert "vllm_xargs.snapkv_budget=8 is invalid: must be an integer > window (32)" in \
        str(err.value)
    assert err.value.parameter == "vllm_xargs.snapkv_budget"
    with pytest.raises(VLLMValidationError, match="vllm_xargs.kv_compression='h2o'"):
        check_request(_cfg(), 100, _sp(kv_compression="h2o"), 128, None)
    check_request(_cfg(), 100, _sp(kv_compression="keydiff"), 128, None)
    check_request(_cfg(), 100, None, 128, None)  # pooling request: nothing to check
    # A compaction point before the prompt's start names the range for this prompt.
    with pytest.raises(VLLMValidationError) as err:
        check_request(_cfg(), 100, _sp(snapkv_compact_at=-100), 128, None)
    assert err.value.parameter == "vllm_xargs.snapkv_compact_at"
    assert "must be >= 1 or in [-99, -1] for this 100-token prompt" in str(err.value)
    check_request(_cfg(), 100, _sp(snapkv_compact_at=-99), 128, None)


def test_capacity_is_checked_only_when_prompts_are_compacted_while_read() -> None:
    # Without a prefill budget vLLM's own max_model_len rule holds: nothing to check here.
    check_request(_cfg(), 8000, _sp(8000), 128, 5)
    cfg = _cfg(prefill_budget=512, prefill_interval=256, budget=256)
    # 4000-token prompt: peak while reading 768 tokens = 6 blocks (+1 slack); 11 usable.
    assert capacity.request_peak_blocks(cfg, 4000, 8, 128, None) == 6 + 1
    check_request(cfg, 4000, _sp(8), 128, 12)
    # Opted out, the same prompt holds all of it: 4008 tokens = 32 blocks (+1).
    with pytest.raises(VLLMValidationError) as err:
        check_request(cfg, 4000, _sp(8, kv_compression="none"), 128, 12)
    assert err.value.parameter == "max_tokens"
    assert "needs 33 KV blocks of 128 tokens" in str(err.value)
    assert "more than the whole KV pool (11 blocks)" in str(err.value)
    # A short prompt with a long output (no decode budget): the output is never compacted.
    with pytest.raises(VLLMValidationError, match="max_tokens=3900"):
        check_request(cfg, 100, _sp(3900), 128, 12)
    # With a decode budget it is bounded too.
    bounded = _cfg(prefill_budget=512, prefill_interval=256, budget=256, decode_budget=256,
                   decode_interval=128)
    check_request(bounded, 100, _sp(3900), 128, 12)


def test_seeded_requests_prefilled_in_chunks_are_refused_on_cpu() -> None:
    cfg = _cfg(prefill_budget=512, prefill_interval=256, budget=256)
    check_request(cfg, 300, _sp(seed=7), 128, 100, chunk_tokens=2048)  # one chunk: fine
    with pytest.raises(VLLMValidationError) as err:
        check_request(cfg, 3000, _sp(seed=7), 128, 100, chunk_tokens=2048)
    assert err.value.parameter == "seed" and "CPU Generator does not use offset" in \
        str(err.value)
    # Shorter than a chunk, but cut at a compaction while it is read: refused too.
    with pytest.raises(VLLMValidationError, match="cut at compactions"):
        check_request(cfg, 1500, _sp(seed=7), 128, 100, chunk_tokens=2048)
    check_request(cfg, 3000, _sp(), 128, 100, chunk_tokens=2048)  # no seed: fine
    check_request(cfg, 3000, _sp(seed=7), 128, 100, chunk_tokens=None)  # not CPU: fine
