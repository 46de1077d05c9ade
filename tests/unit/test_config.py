"""Engine-level compression config and per-request settings (pure functions)."""

from __future__ import annotations

import pytest

from vllm_snapkv.config import DEFAULT_BUDGET, CompressionConfig
from vllm_snapkv.settings import SettingsError


def _cfg(**snapkv) -> CompressionConfig:
    return CompressionConfig.from_additional_config({"kv_compression": "snapkv", "snapkv": snapkv})


def test_off_by_default() -> None:
    cfg = CompressionConfig.from_additional_config(None)
    assert not cfg.enabled
    assert cfg.target_kept(100_000, None) is None
    assert cfg.placement(100_000, 128, None) is None


def test_default_amount_is_the_paper_budget() -> None:
    cfg = _cfg()
    assert cfg.settings is not None and cfg.settings.budget == DEFAULT_BUDGET
    assert cfg.target_kept(4096, None) == DEFAULT_BUDGET
    assert cfg.target_kept(DEFAULT_BUDGET, None) is None  # fits: left whole


def test_round_trip_through_additional_config() -> None:
    cfg = _cfg(ratio=0.25, window=16, kernel=7, min_prompt=512)
    assert CompressionConfig.from_additional_config(cfg.to_additional_config()) == cfg


def test_placement_matches_the_arithmetic() -> None:
    cfg = _cfg(budget=1000)
    p = cfg.placement(4096, 128, None)
    assert p is not None and (p.evicted, p.kept) == (3072, 1024)
    # Surplus under one block: nothing freed, so no compression at all.
    assert cfg.placement(1100, 128, None) is None


def test_min_prompt_skips_short_prompts() -> None:
    cfg = _cfg(ratio=0.25, min_prompt=2048)
    assert cfg.target_kept(2047, None) is None
    assert cfg.target_kept(4096, None) == 1024


def test_request_opt_out_and_overrides() -> None:
    cfg = _cfg(budget=1024)
    assert cfg.request_settings({"kv_compression": "none"}) is None
    assert cfg.target_kept(8192, {"snapkv_budget": 2048}) == 2048
    assert cfg.target_kept(8192, {"snapkv_ratio": 0.125}) == 1024
    assert cfg.target_kept(8192, {"unrelated_plugin_key": 1}) == 1024


def test_request_chooses_the_method() -> None:
    cfg = _cfg(budget=512, window=16)
    snap = cfg.request_settings({"kv_compression": "snapkv"})
    rec = cfg.request_settings({"kv_compression": "recency", "snapkv_budget": 256})
    assert snap is not None and snap.scorer == "snapkv" and snap.sink == 0
    assert rec is not None and (rec.scorer, rec.budget, rec.window) == ("recency", 256, 16)
    assert rec.sink == 4  # StreamingLLM's sinks when none are configured
    # A recency server: same settings, recency scorer; a request may ask for SnapKV instead.
    server = CompressionConfig.from_additional_config(
        {"kv_compression": "recency", "snapkv": {"budget": 512, "sink": 2}})
    assert server.enabled and server.request_settings(None).scorer == "recency"
    assert server.request_settings(None).sink == 2
    assert server.request_settings({"kv_compression": "snapkv"}).scorer == "snapkv"
    assert CompressionConfig.from_additional_config(server.to_additional_config()) == server


@pytest.mark.parametrize("extra,setting,fragment", [
    ({"snapkv_budget": 8}, "snapkv_budget", "> window (32)"),
    ({"snapkv_budget": "lots"}, "snapkv_budget", "integer"),
    ({"snapkv_ratio": 1.5}, "snapkv_ratio", "(0, 1]"),
    ({"snapkv_ratio": 0}, "snapkv_ratio", "(0, 1]"),
    ({"snapkv_window": 8}, "snapkv_window", "unknown request setting"),
    ({"kv_compression": "h2o"}, "kv_compression", "none, snapkv"),
    ({"snapkv_budget": 2048, "snapkv_ratio": 0.5}, "snapkv_budget", "not both"),
])
def test_bad_request_settings_name_the_field(extra, setting, fragment) -> None:
    with pytest.raises(SettingsError) as err:
        _cfg(budget=1024).request_settings(extra)
    assert err.value.setting == setting
    assert fragment in str(err.value)


@pytest.mark.parametrize("additional,setting", [
    ({"kv_compression": "h2o"}, "kv_compression"),
    ({"kv_compression": "snapkv", "snapkv": {"kernel": 4}}, "kernel"),
    ({"kv_compression": "snapkv", "snapkv": {"budget": 16}}, "budget"),
    ({"kv_compression": "snapkv", "snapkv": {"min_prompt": -1}}, "min_prompt"),
    ({"kv_compression": "snapkv", "snapkv": {"kernal": 5}}, "kernal"),
    ({"kv_compression": "snapkv", "snapkv": {"scorer": "recency"}}, "scorer"),
])
def test_bad_engine_settings_are_refused(additional, setting) -> None:
    with pytest.raises(SettingsError) as err:
        CompressionConfig.from_additional_config(additional)
    assert err.value.setting == setting
