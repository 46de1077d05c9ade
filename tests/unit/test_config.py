"""Engine-level compression config and each request's plan (pure functions)."""

from __future__ import annotations

import pytest

from vllm_snapkv.config import DEFAULT_BUDGET, CompressionConfig, methods
from vllm_snapkv.methods import method_names
from vllm_snapkv.settings import SettingsError


def _cfg(method: str = "snapkv", **snapkv) -> CompressionConfig:
    return CompressionConfig.from_additional_config({"kv_compression": method, "snapkv": snapkv})


def _prompt_kept(cfg: CompressionConfig, n: int, extra=None, bs: int = 128) -> int | None:
    """Tokens per KV head kept at the prompt's end (None: the prompt is not compacted)."""
    schedule = cfg.schedule(n, bs, extra)
    c = schedule.prompt_compaction if schedule is not None else None
    return None if c is None else c.kept


def test_off_by_default() -> None:
    cfg = CompressionConfig.from_additional_config(None)
    assert not cfg.enabled
    assert cfg.request_settings(None) is None
    assert cfg.schedule(100_000, 128, None) is None


def test_methods_come_from_the_registry() -> None:
    assert methods() == ("none", *method_names())
    assert {"snapkv", "recency", "keydiff", "knorm"} <= set(method_names())


def test_default_amount_is_the_paper_budget() -> None:
    cfg = _cfg()
    assert cfg.settings is not None and cfg.settings.budget == DEFAULT_BUDGET
    # 4096 - 1024 = 3072 = 24 blocks evicted exactly: 1024 kept.
    assert _prompt_kept(cfg, 4096) == DEFAULT_BUDGET
    assert cfg.schedule(DEFAULT_BUDGET, 128, None) is None  # fits: left whole


def test_round_trip_through_additional_config() -> None:
    cfg = _cfg(ratio=0.25, window=16, kernel=7, min_prompt=512, decode_budget=300)
    assert CompressionConfig.from_additional_config(cfg.to_additional_config()) == cfg


def test_prompt_compaction_matches_the_arithmetic() -> None:
    cfg = _cfg(budget=1000)
    c = cfg.schedule(4096, 128, None).prompt_compaction
    assert (c.evicted, c.kept, c.at, c.prior) == (3072, 1024, 4096, 0)
    # Surplus under one block: nothing freed, so no compaction at all.
    assert cfg.schedule(1100, 128, None) is None


def test_min_prompt_skips_short_prompts() -> None:
    cfg = _cfg(ratio=0.25, min_prompt=2048)
    assert cfg.schedule(2047, 128, None) is None
    assert _prompt_kept(cfg, 4096) == 1024


def test_request_opt_out_and_overrides() -> None:
    cfg = _cfg(budget=1024)
    assert cfg.request_settings({"kv_compression": "none"}) is None
    assert cfg.schedule(8192, 128, {"kv_compression": "none"}) is None
    assert _prompt_kept(cfg, 8192, {"snapkv_budget": 2048}) == 2048
    assert _prompt_kept(cfg, 8192, {"snapkv_ratio": 0.125}) == 1024
    assert _prompt_kept(cfg, 8192, {"unrelated_plugin_key": 1}) == 1024


def test_request_phases_on_and_off() -> None:
    cfg = _cfg(budget=1024, decode_budget=512)
    on = cfg.schedule(4096, 128, None)
    assert on.decode_budget == 512 and on.decode_interval == 256  # default, whole blocks
    off = cfg.schedule(4096, 128, {"snapkv_decode_budget": 0})
    assert off.decode_budget is None and off.prompt_compaction is not None
    # A short prompt still compacts during decode.
    short = cfg.schedule(100, 128, None)
    assert short is not None and short.first.phase == "decode"
    pre = cfg.schedule(8192, 128, {"snapkv_prefill_budget": 2048})
    assert pre.first.phase == "prefill" and pre.first.method == "keydiff"


def test_request_chooses_the_method() -> None:
    cfg = _cfg(budget=512, window=16)
    snap = cfg.request_settings({"kv_compression": "snapkv"})
    rec = cfg.request_settings({"kv_compression": "recency", "snapkv_budget": 256})
    assert snap is not None and snap.method == "snapkv" and snap.sinks == 0
    assert rec is not None and (rec.method, rec.budget, rec.window) == ("recency", 256, 16)
    assert rec.sinks == 4  # StreamingLLM's sinks when none are configured
    kd = cfg.request_settings({"kv_compression": "keydiff"})
    assert kd is not None and kd.method == "keydiff"
    assert cfg.schedule(4096, 128, {"kv_compression": "keydiff"}).method == "keydiff"
    # A recency server: its sink setting holds, and an explicit 0 is honoured.
    server = _cfg("recency", budget=512, sink=2)
    assert server.enabled and server.request_settings(None).method == "recency"
    assert server.request_settings(None).sinks == 2
    assert _cfg("recency", budget=512, sink=0).request_settings(None).sinks == 0
    assert server.request_settings({"kv_compression": "snapkv"}).method == "snapkv"
    assert CompressionConfig.from_additional_config(server.to_additional_config()) == server


@pytest.mark.parametrize("extra,setting,fragment", [
    ({"snapkv_budget": 8}, "snapkv_budget", "> window (32)"),
    ({"snapkv_budget": "lots"}, "snapkv_budget", "integer"),
    ({"snapkv_ratio": 1.5}, "snapkv_ratio", "(0, 1]"),
    ({"snapkv_ratio": 0}, "snapkv_ratio", "(0, 1]"),
    ({"snapkv_window": 8}, "snapkv_window", "unknown request setting"),
    ({"kv_compression": "h2o"}, "kv_compression", "none, "),
    ({"snapkv_budget": 2048, "snapkv_ratio": 0.5}, "snapkv_budget", "not both"),
    ({"snapkv_decode_budget": 16}, "snapkv_decode_budget", "> window (32)"),
    ({"snapkv_decode_budget": 1.5}, "snapkv_decode_budget", "integer"),
    ({"snapkv_prefill_budget": 512}, "snapkv_prefill_budget", ">= budget (1024)"),
    ({"snapkv_compact_at": 0}, "snapkv_compact_at", "non-zero integer"),
    ({"snapkv_compact_at": 1.5}, "snapkv_compact_at", "non-zero integer"),
    ({"snapkv_compact_at": True}, "snapkv_compact_at", "non-zero integer"),
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
    ({"kv_compression": "snapkv", "snapkv": {"method": "recency"}}, "method"),
    ({"kv_compression": "snapkv", "snapkv": {"decode_budget": 20}}, "decode_budget"),
    ({"kv_compression": "snapkv", "snapkv": {"decode_interval": 0}}, "decode_interval"),
    ({"kv_compression": "snapkv", "snapkv": {"prefill_method": "h2o"}}, "prefill_method"),
])
def test_bad_engine_settings_are_refused(additional, setting) -> None:
    with pytest.raises(SettingsError) as err:
        CompressionConfig.from_additional_config(additional)
    assert err.value.setting == setting


def test_intervals_must_be_whole_blocks() -> None:
    cfg = _cfg(decode_budget=512, decode_interval=200)
    cfg.check_block_size(8)  # 200 = 25 blocks of 8
    with pytest.raises(SettingsError) as err:
        cfg.check_block_size(128)
    assert err.value.setting == "decode_interval" and "multiple of the KV block size (128)" \
        in str(err.value)


def test_compact_at_moves_the_prompt_compaction() -> None:
    cfg = _cfg(ratio=0.25)
    # -48: before the last 48 of 2048 tokens, at 2000: kept_count(2000) = int(2000 * 0.25) = 500,
    # E = floor((2000 - 500) / 128) * 128 = 1408; a positive value counts from the start, and one
    # past the prompt means its end.
    for extra, at, evicted in (({"snapkv_compact_at": -48}, 2000, 1408),
                               ({"snapkv_compact_at": 2000}, 2000, 1408),
                               ({"snapkv_compact_at": 9999}, 2048, 1536),
                               (None, 2048, 1536)):
        c = cfg.schedule(2048, 128, extra).prompt_compaction
        assert (c.at, c.evicted) == (at, evicted), extra
    with pytest.raises(SettingsError) as err:
        cfg.schedule(2048, 128, {"snapkv_compact_at": -2048})
    assert err.value.setting == "snapkv_compact_at"
    assert "[-2047, -1] for this 2048-token prompt" in str(err.value)


def test_the_engine_config_is_built_once_per_process_and_content() -> None:
    a = {"kv_compression": "snapkv", "snapkv": {"budget": 512, "decode_budget": 256}}
    b = {"snapkv": {"decode_budget": 256, "budget": 512}, "kv_compression": "snapkv"}
    first = CompressionConfig.from_additional_config(a)
    assert CompressionConfig.from_additional_config(b) is first
    assert CompressionConfig.from_additional_config(
        {**a, "snapkv": {"budget": 1024}}) is not first
    with pytest.raises(SettingsError):  # a refusal is not cached as a config
        CompressionConfig.from_additional_config({"kv_compression": "snapkv",
                                                  "snapkv": {"budget": 1}})


def test_one_name_per_setting_across_flag_request_key_and_error() -> None:
    """Every setting's flag, request key and error messages spell one public name, from the
    settings table: ``--snapkv-x`` and ``vllm_xargs.snapkv_x``."""
    import argparse

    from vllm_snapkv.integration import cli
    from vllm_snapkv.settings import request_keys, settings_table

    parser = cli.add_cli_args(argparse.ArgumentParser())
    flags = {o for a in parser._actions for o in a.option_strings}
    for s in settings_table():
        assert s.key == "snapkv_" + s.name
        assert (("--" + s.key.replace("_", "-")) in flags) == s.flag, s.name
    for name in ("kernel", "pooling", "reduction", "gqa_aggregation"):  # SnapKV's parameters
        assert "--snapkv-" + name.replace("_", "-") in flags
    cfg = CompressionConfig.from_additional_config({"kv_compression": "snapkv"})
    assert set(request_keys()) == {"snapkv_budget", "snapkv_ratio", "snapkv_decode_budget",
                                   "snapkv_prefill_budget", "snapkv_prefill_method",
                                   "snapkv_compact_at"}
    for key in request_keys():
        with pytest.raises(SettingsError) as err:
            cfg.request_settings({key: "bogus"})
        assert err.value.setting == key  # the HTTP 400 names vllm_xargs.<key>
    for name in ("budget", "window", "kernel", "decode_interval"):
        with pytest.raises(SettingsError) as err:
            CompressionConfig.from_additional_config({"kv_compression": "snapkv",
                                                      "snapkv": {name: "bogus"}})
        assert cli.error_message(err.value).startswith(
            "--snapkv-" + name.replace("_", "-") + "='bogus' is invalid")
