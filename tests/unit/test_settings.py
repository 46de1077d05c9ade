"""Validation of SnapKV settings: every refusal names the setting, the value and the range."""

from __future__ import annotations

import pickle

import pytest

from vllm_snapkv import KVPRESS_PRESET, SettingsError, CompressionSettings
from vllm_snapkv.settings import (
    DEFAULT_GQA_AGGREGATION,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_REDUCTION,
    DEFAULT_WINDOW,
    PAPER_PRESET,
    PRESETS,
    kvpress_preset,
)


def test_defaults():
    s = CompressionSettings(budget=1024)
    assert (s.window, s.kernel, s.pooling, s.reduction, s.gqa_aggregation, s.sinks) == (
        DEFAULT_WINDOW, DEFAULT_KERNEL, DEFAULT_POOLING, DEFAULT_REDUCTION,
        DEFAULT_GQA_AGGREGATION, 0,
    )
    assert s.sink is None and s.method == "snapkv"  # sink: the method's default
    assert (s.decode_budget, s.prefill_budget) == (None, None)  # phases off
    assert (s.window, s.kernel, s.pooling, s.reduction, s.gqa_aggregation) == (
        32, 15, "avg", "sum", "mean"
    )
    assert s.ratio is None


def test_error_is_value_error_with_setting_attribute_and_message():
    with pytest.raises(SettingsError) as e:
        CompressionSettings(budget=16)
    err = e.value
    assert isinstance(err, ValueError)
    assert err.setting == "budget" and err.value == 16
    assert str(err) == "snapkv budget=16 is invalid: must be an integer > window (32)"


def test_error_survives_pickling():
    err = SettingsError("kernel", 4, "must be odd")
    back = pickle.loads(pickle.dumps(err))
    assert (back.setting, back.value, str(back)) == ("kernel", 4, str(err))


@pytest.mark.parametrize(
    "kwargs, setting, fragment",
    [
        (dict(budget=32), "budget", "> window (32)"),
        (dict(budget=31), "budget", "> window (32)"),
        (dict(budget=0), "budget", "integer > window"),
        (dict(budget=-5), "budget", "integer > window"),
        (dict(budget=100.0), "budget", "integer"),
        (dict(budget="1024"), "budget", "integer"),
        (dict(budget=True), "budget", "integer"),
        (dict(budget=40, sink=8), "budget", "> window + sink (32 + 8 = 40)"),
        (dict(budget=40, sink=10), "budget", "window + sink"),
        (dict(), "budget", "exactly one of budget or ratio"),
        (dict(budget=100, ratio=0.5), "budget", "exactly one of budget or ratio"),
        (dict(ratio=0.0), "ratio", "(0, 1]"),
        (dict(ratio=-0.1), "ratio", "(0, 1]"),
        (dict(ratio=1.5), "ratio", "(0, 1]"),
        (dict(ratio=float("nan")), "ratio", "(0, 1]"),
        (dict(ratio=float("inf")), "ratio", "(0, 1]"),
        (dict(ratio="0.5"), "ratio", "(0, 1]"),
        (dict(ratio=True), "ratio", "(0, 1]"),
        (dict(budget=100, window=0), "window", ">= 1"),
        (dict(budget=100, window=-3), "window", ">= 1"),
        (dict(budget=100, window=2.0), "window", "integer"),
        (dict(budget=100, kernel=4), "kernel", "odd"),
        (dict(budget=100, kernel=0), "kernel", "odd integer >= 1"),
        (dict(budget=100, kernel=-1), "kernel", "odd integer >= 1"),
        (dict(budget=100, kernel=5.0), "kernel", "odd integer"),
        (dict(budget=100, pooling="median"), "pooling", "'avg', 'max'"),
        (dict(budget=100, pooling="avgpool"), "pooling", "'avg', 'max'"),
        (dict(budget=100, pooling=None), "pooling", "'avg', 'max'"),
        (dict(budget=100, reduction="max"), "reduction", "'sum', 'mean'"),
        (dict(budget=100, gqa_aggregation="sum"), "gqa_aggregation", "'mean', 'max'"),
        (dict(budget=100, sink=-1), "sink", ">= 0"),
        (dict(budget=100, sink=1.5), "sink", "integer"),
    ],
)
def test_invalid_settings(kwargs, setting, fragment):
    with pytest.raises(SettingsError) as e:
        CompressionSettings(**kwargs)
    assert e.value.setting == setting
    msg = str(e.value)
    assert msg.startswith(f"snapkv {setting}=")
    assert " is invalid: " in msg
    assert fragment in msg, msg


def test_budget_message_with_sink_names_both():
    with pytest.raises(SettingsError) as e:
        CompressionSettings(budget=40, sink=8)
    assert str(e.value) == (
        "snapkv budget=40 is invalid: must be an integer > window + sink (32 + 8 = 40)"
    )


def test_valid_edges():
    assert CompressionSettings(budget=33).budget == 33
    assert CompressionSettings(budget=2, window=1).budget == 2
    assert CompressionSettings(budget=45, sink=12).sink == 12
    assert CompressionSettings(ratio=1).ratio == 1.0 and isinstance(CompressionSettings(ratio=1).ratio, float)
    assert CompressionSettings(ratio=1e-9).ratio == 1e-9
    assert CompressionSettings(budget=100, kernel=1).kernel == 1
    # numpy-like integer types are accepted and normalised
    import numpy as np

    s = CompressionSettings(budget=np.int64(100), window=np.int32(8))
    assert type(s.budget) is int and type(s.window) is int and s.budget == 100


def test_frozen_and_hashable():
    s = CompressionSettings(budget=100)
    with pytest.raises(AttributeError):
        s.budget = 200  # type: ignore[misc]
    assert hash(s) == hash(CompressionSettings(budget=100))


def test_from_dict_and_to_dict_round_trip():
    d = {"budget": 512, "window": 16, "kernel": 7, "pooling": "max", "sink": 4}
    s = CompressionSettings.from_dict(d)
    assert (s.budget, s.window, s.kernel, s.pooling, s.sink) == (512, 16, 7, "max", 4)
    assert CompressionSettings.from_dict(s.to_dict()) == s
    assert set(s.to_dict()) == set(CompressionSettings.field_names())


def test_from_dict_refuses_unknown_keys_naming_them():
    with pytest.raises(SettingsError) as e:
        CompressionSettings.from_dict({"budget": 512, "kernal": 7})
    assert e.value.setting == "kernal"
    msg = str(e.value)
    assert msg.startswith("snapkv kernal=7 is invalid: unknown setting")
    for key in CompressionSettings.field_names():
        assert key in msg


def test_from_dict_validates_values():
    with pytest.raises(SettingsError) as e:
        CompressionSettings.from_dict({"ratio": 2})
    assert e.value.setting == "ratio"
    with pytest.raises(SettingsError) as e:
        CompressionSettings.from_dict(["budget", 5])  # type: ignore[arg-type]
    assert e.value.setting == "settings"


def test_from_dict_presets():
    s = CompressionSettings.from_dict({"preset": "kvpress", "ratio": 0.25})
    assert s == KVPRESS_PRESET.replace(ratio=0.25)
    s = CompressionSettings.from_dict({"preset": "paper", "budget": 2048})
    assert (s.kernel, s.pooling, s.budget, s.window) == (7, "max", 2048, 32)
    s = CompressionSettings.from_dict({"preset": "kvpress", "budget": 300})
    assert s.ratio is None and s.budget == 300 and s.window == 64
    with pytest.raises(SettingsError) as e:
        CompressionSettings.from_dict({"preset": "h2o"})
    assert e.value.setting == "preset" and "'kvpress'" in str(e.value)
    assert set(PRESETS) == {"default", "kvpress", "paper"}


def test_override_is_validated_and_switches_budget_ratio_mode():
    base = CompressionSettings(ratio=0.5, window=32)
    per_request = base.override({"budget": 1024})
    assert per_request.budget == 1024 and per_request.ratio is None
    assert base.ratio == 0.5 and base.budget is None  # the base is untouched
    back = per_request.replace(ratio=0.3)
    assert back.ratio == 0.3 and back.budget is None
    with pytest.raises(SettingsError) as e:
        base.override({"budget": 16})
    assert e.value.setting == "budget"
    with pytest.raises(SettingsError) as e:
        base.override({"budget": 100, "ratio": 0.3})
    assert e.value.setting == "budget" and "got both" in str(e.value)
    with pytest.raises(SettingsError) as e:
        base.override({"windw": 8})
    assert e.value.setting == "windw"
    # a window override that makes the inherited budget invalid is refused, naming budget
    with pytest.raises(SettingsError) as e:
        CompressionSettings(budget=64).replace(window=64)
    assert e.value.setting == "budget" and "(64)" in str(e.value)
    assert base.replace(kernel=5).kernel == 5


def test_kvpress_preset_matches_kvpress_snapkvpress_defaults():
    # kvpress 0.5.5 SnapKVPress: window_size=64, kernel_size=5, avg_pool1d, .mean over the window,
    # .mean over each query group, compression_ratio=0.0 (keep all)
    p = KVPRESS_PRESET
    assert (p.window, p.kernel, p.pooling, p.reduction, p.gqa_aggregation, p.sink) == (
        64, 5, "avg", "mean", "mean", 0
    )
    assert p.ratio == 1.0 and p.budget is None
    assert kvpress_preset(0.25) == p.replace(ratio=0.25)
    assert kvpress_preset(compression_ratio=0.75).ratio == 0.25
    assert kvpress_preset(compression_ratio=0.0).ratio == 1.0
    assert kvpress_preset(budget=256).budget == 256
    with pytest.raises(SettingsError) as e:
        kvpress_preset(compression_ratio=1.0)
    assert e.value.setting == "compression_ratio"
    with pytest.raises(SettingsError):
        kvpress_preset()
    with pytest.raises(SettingsError):
        kvpress_preset(0.5, budget=100)


def test_compression_ratio_round_trip_is_exact():
    """ratio = 1.0 - cr, then kept uses 1.0 - (1.0 - ratio): this must reproduce kvpress's
    (1 - cr) bit for bit for every cr (Sterbenz), so the kept counts agree."""
    import random

    rng = random.Random(0)
    for cr in [i / 1000 for i in range(1000)] + [rng.random() for _ in range(20000)]:
        ratio = kvpress_preset(compression_ratio=cr).ratio
        assert 1.0 - (1.0 - ratio) == 1.0 - cr, cr


def test_paper_preset():
    assert (PAPER_PRESET.window, PAPER_PRESET.kernel, PAPER_PRESET.pooling) == (32, 7, "max")
