"""Validated SnapKV selection settings.

Every way of configuring SnapKV — ``vllm serve`` flags, config files, per-request overrides sent
over HTTP — ends in a :class:`CompressionSettings`. Validation therefore lives here, once, and every
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
  while 15 kept them (8/8); see ``docs/selection.md``, "Why these defaults". :data:`PAPER_PRESET`
  gives the paper's LongBench choice (max-pool 7) by name.
* ``reduction="sum"`` — the reference sums the window's probabilities (ranking-equivalent to mean).
* ``gqa_aggregation="mean"`` — as kvpress (one score per KV head, averaged over its query group).
* ``sink=None`` — the method's own default (SnapKV keeps none, the recency baseline four); an
  explicit value, 0 included, always wins.
* ``method="snapkv"`` — which registered method ranks the positions (:mod:`vllm_snapkv.methods`:
  ``snapkv``, the ``recency`` baseline, the query-agnostic ``keydiff`` and ``knorm``).

Besides what is kept, the settings say *when* a request compacts (:mod:`vllm_snapkv.schedule`):
at the end of its prompt (``budget``/``ratio``), while a long prompt is read
(``prefill_budget``, ``prefill_interval``, ``prefill_method``) and while it generates
(``decode_budget``, ``decode_interval``). All of them are off unless set, except the end of the
prompt.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from vllm_snapkv.errors import SettingsError

__all__ = [
    "METHOD_NAME",
    "PREFIX",
    "SETTINGS",
    "Setting",
    "public_name",
    "request_keys",
    "settings_table",
    "DEFAULT_GQA_AGGREGATION",
    "DEFAULT_KERNEL",
    "DEFAULT_POOLING",
    "DEFAULT_REDUCTION",
    "DEFAULT_DECODE_INTERVAL",
    "DEFAULT_METHOD",
    "DEFAULT_PREFILL_INTERVAL",
    "DEFAULT_PREFILL_METHOD",
    "DEFAULT_WINDOW",
    "GQA_AGGREGATIONS",
    "KVPRESS_PRESET",
    "PAPER_PRESET",
    "POOLINGS",
    "PRESETS",
    "REDUCTIONS",
    "SettingsError",
    "CompressionSettings",
    "SnapKVSettings",
    "compaction_point",
    "kvpress_preset",
]

DEFAULT_WINDOW = 32
DEFAULT_METHOD = "snapkv"
#: Tokens between two decode compactions when ``decode_interval`` is not given (rounded up to
#: whole KV blocks).
DEFAULT_DECODE_INTERVAL = 256
#: Tokens read between two compactions of a prompt when ``prefill_interval`` is not given
#: (rounded up to whole KV blocks).
DEFAULT_PREFILL_INTERVAL = 1024
#: The method of compactions made while a prompt is read, unless ``prefill_method`` says.
DEFAULT_PREFILL_METHOD = "keydiff"

# SnapKV's own parameters are the SnapKV method's (vllm_snapkv/methods/snapkv.py); their
# defaults and choices are re-exported here for the selection API.
from vllm_snapkv.methods.snapkv import (  # noqa: E402
    DEFAULT_GQA_AGGREGATION,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_REDUCTION,
    GQA_AGGREGATIONS,
    POOLINGS,
    REDUCTIONS,
)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `budget=True` is a bug, not a budget.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True, init=False)
class CompressionSettings:
    """Compression settings of an engine or one request, validated on construction (immutable;
    hashable). Exactly one of ``budget`` and ``ratio`` must be set.

    What is kept (:mod:`vllm_snapkv.selection`):
        method: the registered method that ranks positions (``--kv-compression``).
        budget: tokens kept per KV head at the end of the prompt, window and sinks included.
            Integer > ``window + sinks``. Prompts of at most ``budget`` tokens are kept whole.
        ratio: fraction of the prompt kept, in (0, 1]. The kept count for a prompt of N tokens is
            kvpress's ``int(N * (1 - compression_ratio))`` with ``compression_ratio = 1 - ratio``
            (evaluated literally as ``int(N * (1.0 - (1.0 - ratio)))``), raised to at least
            ``window + sinks + 1`` and capped at N — see :func:`vllm_snapkv.selection.kept_count`.
        window: the last ``w`` positions, always kept; for SnapKV their queries vote.
        sink: the first ``sink`` positions are always kept (inside the budget); ``None`` = the
            method's default (:attr:`sinks` is the value in force).

    When the request compacts (:mod:`vllm_snapkv.schedule`):
        decode_budget: while generating, once the attended KV exceeds
            ``decode_budget + decode_interval`` tokens, keep ``decode_budget`` per KV head.
            ``None``: never compact during decode. Integer > ``window + sinks``.
        decode_interval: the slack between decode compactions, in tokens (a positive multiple
            of the KV block size, checked where the block size is known); ``None``: the default,
            :data:`DEFAULT_DECODE_INTERVAL` rounded up to whole blocks.
        prefill_budget: while a prompt is read in chunks, compact what has been read to this many
            tokens per KV head whenever it exceeds ``prefill_budget + prefill_interval``; the end
            of the prompt then brings it to ``budget``. ``None``: off. Integer >= ``budget`` and >
            ``window + sinks``.
        prefill_interval: tokens read between prefill compactions (a positive multiple of the
            block size); ``None``: :data:`DEFAULT_PREFILL_INTERVAL` rounded up to whole blocks.
        prefill_method: the method of the compactions made while the prompt is read; ``None``:
            :data:`DEFAULT_PREFILL_METHOD` (query-agnostic, since the question at the end of the
            prompt has not been read yet).
        compact_at: where in the prompt the prompt compaction runs, instead of the prompt's end:
            ``p > 0`` once ``p`` prompt tokens are read (``p >= N``: the end), ``-k`` before the
            last ``k`` (``N - k``, which must be >= 1: :func:`compaction_point`). The tokens after
            it (typically the question) are read on top of the kept ones and kept whole; the
            budget or ratio applies to the part before it. ``None``: the prompt's end. This is
            the question-less regime: a context compressed before the question is read, as every
            chunk compacted while a long prompt is read is, and as kvpress's pipeline does.

    The methods' own parameters (:mod:`vllm_snapkv.methods`), e.g. SnapKV's ``kernel``,
    ``pooling``, ``reduction`` and ``gqa_aggregation``, are settings too, by their names:
    ``CompressionSettings(budget=512, kernel=7)``; ``settings.kernel`` reads one (its default when not
    set), :attr:`params` holds the ones set to other than their default, and
    :meth:`scorer` gives the configured method. Each method validates its own.
    """

    budget: int | None = None
    ratio: float | None = None
    window: int = DEFAULT_WINDOW
    sink: int | None = None
    method: str = DEFAULT_METHOD
    decode_budget: int | None = None
    decode_interval: int | None = None
    prefill_budget: int | None = None
    prefill_interval: int | None = None
    prefill_method: str | None = None
    compact_at: int | None = None
    params: tuple[tuple[str, Any], ...] = ()

    #: Extra key accepted by :meth:`from_dict` to start from a named preset.
    PRESET_KEY: ClassVar[str] = "preset"

    def __init__(self, **kwargs: Any) -> None:
        # The general fields by name, and every registered method's parameters by theirs
        # (``kernel=7`` is SnapKV's): one flat namespace, as flags and config keys are.
        fields = {f.name for f in dataclasses.fields(self)}
        params = dict(kwargs.pop("params", ()) or ())
        method_params = _method_parameters()
        for key in list(kwargs):
            if key not in fields:
                if key not in method_params:
                    _check_keys({key: kwargs[key]}, (*_public_fields(), *method_params))
                params[key] = kwargs.pop(key)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, kwargs.pop(f.name, f.default))
        # Only values that differ from their default are kept, so equal settings compare equal.
        object.__setattr__(self, "params", tuple(sorted(
            (k, v) for k, v in params.items()
            if not _same(v, method_params[k].default))))
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # A method parameter not set explicitly reads as its default.
        if name.startswith("_") or name == "params":
            raise AttributeError(name)
        field = _method_parameters().get(name)
        if field is None:
            raise AttributeError(f"{type(self).__name__!s} has no setting {name!r}")
        return dict(self.params).get(name, field.default)

    def __post_init__(self) -> None:
        # Each check names one setting. Order: types and ranges of independent fields first, then
        # the cross-field constraints, so the message blames the most specific cause.
        methods = _method_names()
        if not isinstance(self.method, str) or self.method not in methods:
            raise SettingsError("method", self.method, f"must be one of {_choices(methods)}")
        if not _is_int(self.window) or self.window < 1:
            raise SettingsError("window", self.window, "must be an integer >= 1")
        for name in methods:  # each method validates its own parameters
            self.scorer(name)
        if self.sink is not None and (not _is_int(self.sink) or self.sink < 0):
            raise SettingsError("sink", self.sink, "must be an integer >= 0")
        for name in ("decode_interval", "prefill_interval"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise SettingsError(name, value,
                                    "must be a positive integer (a multiple of the block size)")
        if self.prefill_method is not None and (
                not isinstance(self.prefill_method, str) or self.prefill_method not in methods):
            raise SettingsError("prefill_method", self.prefill_method,
                                f"must be one of {_choices(methods)}")

        if self.compact_at is not None and (not _is_int(self.compact_at) or self.compact_at == 0):
            raise SettingsError("compact_at", self.compact_at,
                                "must be a non-zero integer (a prompt position p > 0, or -k: "
                                "before the prompt's last k tokens)")

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
            self._check_above_floor("budget", self.budget)
            object.__setattr__(self, "budget", int(self.budget))
        else:
            r = self.ratio
            if not _is_real(r) or not math.isfinite(float(r)) or not 0.0 < float(r) <= 1.0:
                raise SettingsError(
                    "ratio", r, "must be a number in (0, 1] (the fraction of the prompt kept)"
                )
            object.__setattr__(self, "ratio", float(r))
        if self.decode_budget is not None:
            self._check_above_floor("decode_budget", self.decode_budget)
        if self.prefill_budget is not None:
            self._check_above_floor("prefill_budget", self.prefill_budget)
            if self.budget is not None and self.prefill_budget < self.budget:
                raise SettingsError("prefill_budget", self.prefill_budget,
                                    f"must be an integer >= budget ({self.budget})")
        # Normalise integer-like types (e.g. numpy ints) so equality/hash/JSON behave.
        for name in ("window", "sink", "decode_budget", "decode_interval",
                     "prefill_budget", "prefill_interval", "compact_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))

    def _check_above_floor(self, name: str, value: Any) -> None:
        floor = self.window + self.sinks
        if not _is_int(value) or value <= floor:
            if self.sinks:
                allowed = (f"must be an integer > window + sink "
                           f"({self.window} + {self.sinks} = {floor})")
            else:
                allowed = f"must be an integer > window ({self.window})"
            raise SettingsError(name, value, allowed)

    # ------------------------------------------------------------------ derived values

    @property
    def sinks(self) -> int:
        """First positions always kept: ``sink``, or the method's default when not given."""
        if self.sink is not None:
            return self.sink
        from vllm_snapkv.methods import get_method

        return get_method(self.method).default_sink

    def scorer(self, name: str | None = None) -> Any:
        """The instance of method ``name`` (default :attr:`method`) configured with these
        settings' parameters (:func:`vllm_snapkv.methods.get_method`)."""
        from vllm_snapkv.methods import get_method

        return get_method(name or self.method, dict(self.params))

    @property
    def prefill_method_name(self) -> str:
        """The method of the compactions made while a prompt is read."""
        return self.prefill_method or DEFAULT_PREFILL_METHOD


    # ------------------------------------------------------------------ constructors / copies

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of all settings (the keys :meth:`from_dict` accepts): the general ones in
        declaration order, then every registered method's parameters."""
        return (*_public_fields(), *_method_parameters())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionSettings:
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
        base: CompressionSettings | None = None
        if cls.PRESET_KEY in data:
            name = data.pop(cls.PRESET_KEY)
            if not isinstance(name, str) or name not in PRESETS:
                raise SettingsError(cls.PRESET_KEY, name, f"must be one of {_choices(PRESETS)}")
            base = PRESETS[name]
        _check_keys(data, cls.field_names())
        if base is None:
            return cls(**data)
        return base.override(data)

    def override(self, changes: Mapping[str, Any]) -> CompressionSettings:
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
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        params = dict(current.pop("params"))
        params.update({k: v for k, v in changes.items() if k in _method_parameters()})
        current.update({k: v for k, v in changes.items() if k not in _method_parameters()})
        return type(self)(**current, params=tuple(params.items()))

    def replace(self, **changes: Any) -> CompressionSettings:
        """Keyword form of :meth:`override`."""
        return self.override(changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable, flat: every method parameter under its name);
        ``from_dict(s.to_dict()) == s``."""
        out = {f: getattr(self, f) for f in _public_fields()}
        out.update({name: getattr(self, name) for name in _method_parameters()})
        return out


#: The name this class had before it served every method (kept for the public API).
SnapKVSettings = CompressionSettings


def compaction_point(compact_at: int | None, prompt_len: int) -> int:
    """The prompt position at which the prompt compaction runs: the prompt's end ``N`` unless
    ``compact_at`` says otherwise (``p > 0``: ``min(p, N)``; ``-k``: ``N - k``).

    Raises :class:`SettingsError` (``compact_at``) when ``-k`` lies before the prompt's start, so
    the API server can refuse the request naming the allowed range for its prompt length.
    """
    if compact_at is None:
        return prompt_len
    point = min(compact_at, prompt_len) if compact_at > 0 else prompt_len + compact_at
    if point < 1:
        raise SettingsError("compact_at", compact_at,
                            f"must be >= 1 or in [-{prompt_len - 1}, -1] for this "
                            f"{prompt_len}-token prompt")
    return point


# ------------------------------------------------------------------------------ the one table

#: Prefix of every setting's public name.
PREFIX = "snapkv_"
#: Public name of the method setting (``--kv-compression``, ``vllm_xargs.kv_compression``).
METHOD_NAME = "kv_compression"


@dataclass(frozen=True)
class Setting:
    """One engine setting: its field, and everything derived from it.

    A setting has one name, its *public name* :attr:`key` (``snapkv_decode_budget``), spelled as a
    flag (``--snapkv-decode-budget``, also the ``vllm serve --config`` YAML key), as a request key
    (``vllm_xargs.snapkv_decode_budget``, when :attr:`per_request`) and in every error message;
    inside ``additional_config["snapkv"]`` and :class:`CompressionSettings` it is the field
    :attr:`name` (``decode_budget``).
    """

    name: str
    type: type
    help: str
    per_request: bool = False
    #: a request's value 0 turns the phase off for it
    zero_turns_off: bool = False
    #: offered as a ``vllm serve`` flag
    flag: bool = True

    @property
    def key(self) -> str:
        return public_name(self.name)


#: The general settings, in ``--help`` order. The methods' own parameters follow them in
#: :func:`settings_table` (their fields carry type, choices and help).
SETTINGS: tuple[Setting, ...] = (
    Setting("budget", int,
            "Tokens kept per KV head, observation window included (must exceed the window). "
            "Prompts not longer than this are left whole. Default 1024 unless --snapkv-ratio "
            "is given.", per_request=True),
    Setting("ratio", float, "Fraction of each prompt kept, in (0, 1]; instead of --snapkv-budget.",
            per_request=True),
    Setting("window", int,
            "Observation window: the last prompt tokens whose queries score the prompt; always "
            f"kept. Default {DEFAULT_WINDOW}."),
    Setting("sink", int,
            "First prompt tokens always kept (inside the budget). Default: the method's (0; 4 "
            "for recency)."),
    Setting("min_prompt", int,
            "Prompts shorter than this many tokens are never compressed while read or at their "
            "end. Default 0."),
    Setting("trigger", str,
            "When the prompt and decode budgets apply: 'always' (at their points, every "
            "request) or 'pressure' (they are ceilings: requests keep their whole KV until the "
            "scheduler runs short of blocks, then it compacts running requests to them, most "
            "blocks freed first). Default always."),
    Setting("decode_budget", int,
            "Compact during generation too: once a request attends more than this plus "
            "--snapkv-decode-interval tokens, keep this many per KV head. Default: off.",
            per_request=True, zero_turns_off=True),
    Setting("decode_interval", int,
            "Tokens between two decode compactions (a positive multiple of the KV block size). "
            f"Default {DEFAULT_DECODE_INTERVAL}, rounded up to whole blocks."),
    Setting("prefill_budget", int,
            "Compact while a long prompt is read in chunks: keep this many tokens per KV head of "
            "what has been read whenever it exceeds this plus --snapkv-prefill-interval; lets "
            "prompts larger than the KV pool run. At least --snapkv-budget. Default: off.",
            per_request=True, zero_turns_off=True),
    Setting("prefill_interval", int,
            "Prompt tokens read between two prefill compactions (a positive multiple of the KV "
            f"block size). Default {DEFAULT_PREFILL_INTERVAL}, rounded up to whole blocks."),
    Setting("prefill_method", str,
            "Method of the compactions made while a prompt is read (the question at its end is "
            f"not read yet). Default {DEFAULT_PREFILL_METHOD}.", per_request=True),
    Setting("compact_at", int,
            "Where the prompt compaction runs: p > 0 once p prompt tokens are read, -k before "
            "the prompt's last k (its question). Per request only.", per_request=True,
            flag=False),
    Setting("preset", str,
            "Start from named settings: 'kvpress' (NVIDIA kvpress SnapKVPress: window 64, "
            "kernel 5, avg pool, mean reductions), 'paper' (window 32, max-pool 7), 'default'. "
            "Other flags override it."),
)


def public_name(name: str) -> str:
    """The one public name of setting ``name`` (a field, a method parameter, ``method``, or a
    public name already): ``budget`` -> ``snapkv_budget``, ``method`` -> ``kv_compression``."""
    if name in ("method", METHOD_NAME):
        return METHOD_NAME
    return name if name.startswith(PREFIX) else PREFIX + name


def settings_table() -> tuple[Setting, ...]:
    """:data:`SETTINGS` and one row per registered method parameter."""
    rows = [Setting(name, type(f.default), f.metadata.get("help", ""))
            for name, f in _method_parameters().items()]
    return (*SETTINGS, *rows)


def request_keys() -> dict[str, Setting]:
    """Request key (``vllm_xargs``) -> setting, for the per-request ones."""
    return {s.key: s for s in SETTINGS if s.per_request}


def _method_names() -> tuple[str, ...]:
    from vllm_snapkv.methods import method_names

    return method_names()


def _method_parameters() -> dict[str, Any]:
    from vllm_snapkv.methods import method_parameters

    return method_parameters()


def _public_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CompressionSettings) if f.name != "params")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


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
KVPRESS_PRESET = CompressionSettings(
    ratio=1.0, window=64, kernel=5, pooling="avg", reduction="mean", gqa_aggregation="mean", sink=0
)

#: The SnapKV paper's LongBench configuration (window 32, max-pool 7, summed window scores);
#: supply a budget with ``PAPER_PRESET.replace(budget=1024)``.
PAPER_PRESET = CompressionSettings(
    budget=1024, window=32, kernel=7, pooling="max", reduction="sum", gqa_aggregation="mean"
)

#: Named starting points accepted by :meth:`CompressionSettings.from_dict` under ``"preset"``.
PRESETS: dict[str, CompressionSettings] = {
    "default": CompressionSettings(ratio=1.0),
    "kvpress": KVPRESS_PRESET,
    "paper": PAPER_PRESET,
}


def kvpress_preset(
    ratio: float | None = None,
    *,
    compression_ratio: float | None = None,
    budget: int | None = None,
) -> CompressionSettings:
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
