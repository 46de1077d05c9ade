"""Validated SnapKV selection settings.

Every way of configuring SnapKV — ``vllm serve`` flags, config files, per-request overrides sent
over HTTP — ends in a :class:`SnapKVSettings`. Validation therefore lives here, once, and every
refusal is a :class:`SettingsError` that names the offending setting (``.setting``), the value, and
the allowed range, so the CLI can print it and the HTTP layer can turn it into a 400 that points at
the right field.

The knobs are those of SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
Generation", arXiv:2404.14469): the observation ``window``, the pooling ``kernel`` and kind, how
the window's attention is reduced, plus what serving needs on top: a token ``budget`` *or* a kept
``ratio``, GQA aggregation (selection must be per KV head, because vLLM's paged cache has one slot
per KV head), and optional attention-``sink`` tokens.

Defaults (see ``docs/selection.md`` for the reasoning):

* ``window=32`` — the reference implementation's default and the paper's LongBench setting.
* ``kernel=15``, ``pooling="avg"`` — wider than the paper's 5/7 on purpose: on SmolLM2 (which
  tokenizes digits one by one) a 7-wide pooling lost multi-digit needle answers (0/8 at budget 512)
  while 15 kept them (8/8); see DESIGN.md "A measured fact about accuracy". :data:`PAPER_PRESET`
  gives the paper's LongBench choice (max-pool 7) by name.
* ``reduction="sum"`` — the reference sums the window's probabilities (ranking-equivalent to mean).
* ``gqa_aggregation="mean"`` — as kvpress (one score per KV head, averaged over its query group).
* ``sink=0`` — plain SnapKV keeps no sink tokens.
* ``scorer="snapkv"`` — the SnapKV vote. ``"recency"`` is the baseline that shows what the vote
  buys: same budget, same placement, but it keeps the sinks plus the most recent tokens
  (StreamingLLM's rule, Xiao et al., arXiv:2309.17453); served as ``--kv-compression recency``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_GQA_AGGREGATION",
    "DEFAULT_KERNEL",
    "DEFAULT_POOLING",
    "DEFAULT_REDUCTION",
    "DEFAULT_SINK",
    "DEFAULT_WINDOW",
    "GQA_AGGREGATIONS",
    "KVPRESS_PRESET",
    "PAPER_PRESET",
    "POOLINGS",
    "PRESETS",
    "RECENCY_SINK",
    "REDUCTIONS",
    "SCORERS",
    "SettingsError",
    "SnapKVSettings",
    "kvpress_preset",
]

DEFAULT_WINDOW = 32
DEFAULT_KERNEL = 15
DEFAULT_POOLING = "avg"
DEFAULT_REDUCTION = "sum"
DEFAULT_GQA_AGGREGATION = "mean"
DEFAULT_SINK = 0
DEFAULT_SCORER = "snapkv"
#: Sinks the recency baseline keeps when ``sink`` is not set: StreamingLLM's four.
RECENCY_SINK = 4

POOLINGS: tuple[str, ...] = ("avg", "max")
REDUCTIONS: tuple[str, ...] = ("sum", "mean")
GQA_AGGREGATIONS: tuple[str, ...] = ("mean", "max")
SCORERS: tuple[str, ...] = ("snapkv", "recency")


class SettingsError(ValueError):
    """An invalid SnapKV setting.

    Attributes:
        setting: name of the offending setting (a :class:`SnapKVSettings` field, or the unknown
            key of a dict), so callers can map it to a CLI flag or an HTTP request field.
        value: the rejected value.
        allowed: human-readable allowed range.
    """

    def __init__(self, setting: str, value: Any, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"snapkv {setting}={value!r} is invalid: {allowed}")

    def __reduce__(self):  # keep the attributes across pickling (multiprocess engines)
        return (type(self), (self.setting, self.value, self.allowed))


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `budget=True` is a bug, not a budget.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SnapKVSettings:
    """SnapKV selection settings, validated on construction (immutable; hashable).

    Exactly one of ``budget`` and ``ratio`` must be set.

    Attributes:
        budget: tokens kept per KV head, window and sinks included. Integer > ``window + sink``.
            Prompts of at most ``budget`` tokens are kept whole.
        ratio: fraction of the prompt kept, in (0, 1]. The kept count for a prompt of N tokens is
            kvpress's ``int(N * (1 - compression_ratio))`` with ``compression_ratio = 1 - ratio``
            (evaluated literally as ``int(N * (1.0 - (1.0 - ratio)))``), raised to at least
            ``window + sink + 1`` and capped at N — see :func:`vllm_snapkv.selection.kept_count`.
        window: observation-window length ``w``: the last ``w`` prompt tokens, whose queries vote
            and which are always kept. Integer >= 1.
        kernel: width of the 1-D pooling that smooths scores along the prompt. Odd integer >= 1
            (odd so that "same" padding is symmetric and position i is the centre of its window).
        pooling: ``"avg"`` (zero padding counted, as ``F.avg_pool1d``) or ``"max"``.
        reduction: how the window queries' probabilities combine: ``"sum"`` or ``"mean"``.
        gqa_aggregation: how a KV head's query group combines: ``"mean"`` or ``"max"``.
        sink: the first ``sink`` prompt positions are always kept (inside the budget). >= 0.
        scorer: how the prefix positions are ranked: ``"snapkv"`` (the observation window's
            pooled attention) or ``"recency"`` (position: the most recent win; a baseline that
            ignores the queries, so window/kernel/pooling/reduction do not matter for it).
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    reduction: str = DEFAULT_REDUCTION
    gqa_aggregation: str = DEFAULT_GQA_AGGREGATION
    sink: int = DEFAULT_SINK
    scorer: str = DEFAULT_SCORER

    #: Extra key accepted by :meth:`from_dict` to start from a named preset.
    PRESET_KEY: ClassVar[str] = "preset"

    def __post_init__(self) -> None:
        # Each check names one setting. Order: types and ranges of independent fields first, then
        # the cross-field constraints, so the message blames the most specific cause.
        if not _is_int(self.window) or self.window < 1:
            raise SettingsError("window", self.window, "must be an integer >= 1")
        if not _is_int(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise SettingsError(
                "kernel", self.kernel, "must be an odd integer >= 1 (1, 3, 5, ...)"
            )
        if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:
            raise SettingsError("pooling", self.pooling, f"must be one of {_choices(POOLINGS)}")
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise SettingsError(
                "reduction", self.reduction, f"must be one of {_choices(REDUCTIONS)}"
            )
        if not isinstance(self.gqa_aggregation, str) or self.gqa_aggregation not in GQA_AGGREGATIONS:
            raise SettingsError(
                "gqa_aggregation",
                self.gqa_aggregation,
                f"must be one of {_choices(GQA_AGGREGATIONS)}",
            )
        if not _is_int(self.sink) or self.sink < 0:
            raise SettingsError("sink", self.sink, "must be an integer >= 0")
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise SettingsError("scorer", self.scorer, f"must be one of {_choices(SCORERS)}")

        if self.budget is None and self.ratio is None:
            raise SettingsError(
                "budget", None, "exactly one of budget or ratio must be set (got neither)"
            )
        if self.budget is not None and self.ratio is not None:
            raise SettingsError(
                "budget",
                self.budget,
                f"exactly one of budget or ratio must be set (got both, ratio={self.ratio!r})",
            )
        if self.budget is not None:
            floor = self.window + self.sink
            if not _is_int(self.budget) or self.budget <= floor:
                if self.sink:
                    allowed = (
                        f"must be an integer > window + sink "
                        f"({self.window} + {self.sink} = {floor})"
                    )
                else:
                    allowed = f"must be an integer > window ({self.window})"
                raise SettingsError("budget", self.budget, allowed)
            object.__setattr__(self, "budget", int(self.budget))
        else:
            r = self.ratio
            if not _is_real(r) or not math.isfinite(float(r)) or not 0.0 < float(r) <= 1.0:
                raise SettingsError(
                    "ratio", r, "must be a number in (0, 1] (the fraction of the prompt kept)"
                )
            object.__setattr__(self, "ratio", float(r))
        # Normalise integer-like types (e.g. numpy ints) so equality/hash/JSON behave.
        for name in ("window", "kernel", "sink"):
            object.__setattr__(self, name, int(getattr(self, name)))

    # ------------------------------------------------------------------ constructors / copies

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all settings, in declaration order (the keys :meth:`from_dict` accepts)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SnapKVSettings:
        """Build settings from a plain mapping (config file, JSON request body, CLI namespace).

        Unknown keys are refused (a :class:`SettingsError` naming the key and listing the allowed
        ones) rather than ignored, so that a typo such as ``"kernal"`` cannot silently fall back to
        a default. An optional ``"preset"`` key (``"default"``, ``"kvpress"``, ``"paper"``) selects
        the starting point; the other keys override it (see :meth:`override` for how ``budget`` and
        ``ratio`` replace each other).
        """
        if not isinstance(data, Mapping):
            raise SettingsError("settings", data, "must be a mapping of setting name to value")
        data = dict(data)
        base: SnapKVSettings | None = None
        if cls.PRESET_KEY in data:
            name = data.pop(cls.PRESET_KEY)
            if not isinstance(name, str) or name not in PRESETS:
                raise SettingsError(cls.PRESET_KEY, name, f"must be one of {_choices(PRESETS)}")
            base = PRESETS[name]
        _check_keys(data, cls.field_names())
        if base is None:
            return cls(**data)
        return base.override(data)

    def override(self, changes: Mapping[str, Any]) -> SnapKVSettings:
        """Return a validated copy with ``changes`` applied (e.g. one request's overrides).

        Keys are checked as in :meth:`from_dict`. Because exactly one of ``budget``/``ratio`` may
        be set, giving only one of them switches the mode: ``{"budget": 1024}`` on ratio-based
        settings clears ``ratio`` (and vice versa). Giving both is refused unless one is ``None``.
        """
        if not isinstance(changes, Mapping):
            raise SettingsError("settings", changes, "must be a mapping of setting name to value")
        changes = dict(changes)
        _check_keys(changes, self.field_names())
        if "budget" in changes and "ratio" not in changes:
            changes["ratio"] = None
        elif "ratio" in changes and "budget" not in changes:
            changes["budget"] = None
        return dataclasses.replace(self, **changes)

    def replace(self, **changes: Any) -> SnapKVSettings:
        """Keyword form of :meth:`override`."""
        return self.override(changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable); ``from_dict(s.to_dict()) == s``."""
        return dataclasses.asdict(self)


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise SettingsError(
                str(key),
                data[key],
                f"unknown setting (allowed keys: {', '.join(allowed)})",
            )


#: kvpress 0.5.5 ``SnapKVPress`` defaults, reproduced exactly: window 64, kernel 5, average pooling
#: (zero padding counted), mean over the window queries, mean over each query group. ``ratio=1.0``
#: mirrors kvpress's default ``compression_ratio=0.0`` (keep everything); derive a usable copy with
#: ``KVPRESS_PRESET.replace(ratio=0.5)`` or :func:`kvpress_preset`.
KVPRESS_PRESET = SnapKVSettings(
    ratio=1.0, window=64, kernel=5, pooling="avg", reduction="mean", gqa_aggregation="mean", sink=0
)

#: The SnapKV paper's LongBench configuration (window 32, max-pool 7, summed window scores);
#: supply a budget with ``PAPER_PRESET.replace(budget=1024)``.
PAPER_PRESET = SnapKVSettings(
    budget=1024, window=32, kernel=7, pooling="max", reduction="sum", gqa_aggregation="mean"
)

#: Named starting points accepted by :meth:`SnapKVSettings.from_dict` under ``"preset"``.
PRESETS: dict[str, SnapKVSettings] = {
    "default": SnapKVSettings(ratio=1.0),
    "kvpress": KVPRESS_PRESET,
    "paper": PAPER_PRESET,
}


def kvpress_preset(
    ratio: float | None = None,
    *,
    compression_ratio: float | None = None,
    budget: int | None = None,
) -> SnapKVSettings:
    """kvpress ``SnapKVPress`` settings with the amount to keep filled in.

    Give exactly one of ``ratio`` (fraction kept, ours), ``compression_ratio`` (fraction removed,
    kvpress's; converted as ``ratio = 1.0 - compression_ratio``, and the kept count then equals
    kvpress's bit for bit, see :func:`vllm_snapkv.selection.kept_count`), or ``budget``.
    """
    given = [x is not None for x in (ratio, compression_ratio, budget)]
    if sum(given) != 1:
        raise SettingsError(
            "ratio",
            ratio,
            "give exactly one of ratio, compression_ratio or budget to kvpress_preset",
        )
    if compression_ratio is not None:
        if not _is_real(compression_ratio) or not 0.0 <= float(compression_ratio) < 1.0:
            raise SettingsError(
                "compression_ratio", compression_ratio, "must be a number in [0, 1) (kvpress)"
            )
        ratio = 1.0 - float(compression_ratio)
    if budget is not None:
        return KVPRESS_PRESET.replace(budget=budget)
    return KVPRESS_PRESET.replace(ratio=ratio)
