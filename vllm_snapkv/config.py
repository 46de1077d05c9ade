"""Engine-level compression settings, and what each request gets: its settings and its schedule.

One :class:`CompressionConfig` per engine, built from ``VllmConfig.additional_config`` (where the
``--kv-compression``/``--snapkv-*`` flags, ``--config`` YAML keys and ``LLM(additional_config=...)``
all end up). The scheduler and every worker build it from the same dict and call
:meth:`CompressionConfig.request_plan` on the same inputs — prompt length, block size, the
request's ``extra_args`` — so they agree on every request's compactions without talking to each
other. That call is the one place a request's budget, method and schedule are decided.

Per-request control travels in ``SamplingParams.extra_args`` (the OpenAI API's ``vllm_xargs``):

* ``"kv_compression": "none"`` — this request opts out (behaves exactly as vanilla vLLM); a
  method name (``"snapkv"``, ``"recency"``, ``"keydiff"``, ...) — this request uses that method;
* ``"snapkv_budget": 2048`` or ``"snapkv_ratio": 0.25`` — a different amount kept at the end of
  the prompt;
* ``"snapkv_decode_budget": 512`` / ``"snapkv_prefill_budget": 4096`` — compaction during decode
  / while the prompt is read, for this request (``0`` turns that phase off for it);
  ``"snapkv_prefill_method": "keydiff"`` — the method of the compactions while it is read;
* ``"snapkv_compact_at": -40`` — the prompt compaction runs before the prompt's last 40 tokens
  (a positive value: once that many prompt tokens are read) instead of at its end, so the part
  after it (the question) is neither ranked nor evicted: the question-less regime.

Anything else under a ``snapkv_`` prefix, or a bad value, is refused by
:meth:`CompressionConfig.request_settings` with a :class:`~vllm_snapkv.settings.SettingsError` that
names the request field, which the API server turns into an HTTP 400.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_snapkv.methods import method_names
from vllm_snapkv.schedule import TRIGGERS, Schedule, round_to_blocks
from vllm_snapkv.selection import kept_count
from vllm_snapkv.settings import (
    DEFAULT_DECODE_INTERVAL,
    DEFAULT_PREFILL_INTERVAL,
    METHOD_NAME,
    PREFIX,
    SettingsError,
    CompressionSettings,
    compaction_point,
    public_name,
    request_keys,
)

#: Key of ``additional_config`` holding the method (``none`` or a registered method name).
METHOD_KEY = METHOD_NAME
#: Key of ``additional_config`` holding the settings dict (plus ``min_prompt``).
SETTINGS_KEY = "snapkv"
#: ``--kv-compression none``: vanilla vLLM.
OFF = "none"

#: Default amount when neither budget nor ratio is given: the SnapKV paper's 1024-token budget.
DEFAULT_BUDGET = 1024

#: Per-request keys (in ``extra_args`` / ``vllm_xargs``): the method's, and the per-request rows
#: of the settings table (:func:`vllm_snapkv.settings.request_keys`).
REQUEST_METHOD_KEY = METHOD_NAME
REQUEST_KEYS: dict[str, str] = {key: s.name for key, s in request_keys().items()}
#: Per-request keys whose value 0 turns the phase off for the request.
REQUEST_OFF_BY_ZERO = tuple(key for key, s in request_keys().items() if s.zero_turns_off)
REQUEST_PREFIX = PREFIX


def methods() -> tuple[str, ...]:
    """What ``--kv-compression`` accepts: ``none`` and every registered method."""
    return (OFF, *method_names())


@dataclass(frozen=True)
class RequestPlan:
    """What one request gets: its effective settings and its compactions."""

    settings: CompressionSettings
    schedule: Schedule


@dataclass(frozen=True)
class CompressionConfig:
    """What the engine does to requests' KV.

    Attributes:
        method: ``"none"`` (vanilla vLLM) or a registered method name.
        settings: the settings as configured (``None`` when ``method == "none"``); their
            ``method`` is :attr:`method`.
        min_prompt: prompts shorter than this many tokens are never compressed while read or at
            their end (decode compaction, when on, still bounds their output).
        trigger: ``"always"`` (compactions at their scheduled points) or ``"pressure"`` (the
            prompt and decode budgets apply when the scheduler runs short of blocks:
            :mod:`vllm_snapkv.schedule`).
    """

    method: str = OFF
    settings: CompressionSettings | None = None
    min_prompt: int = 0
    trigger: str = "always"

    def __post_init__(self) -> None:
        if self.method not in methods():
            raise SettingsError(METHOD_KEY, self.method, f"must be one of {', '.join(methods())}")
        if self.method != OFF and self.settings is None:
            raise SettingsError(METHOD_KEY, self.method, f"{self.method} needs settings")
        if isinstance(self.min_prompt, bool) or not isinstance(self.min_prompt, int) \
                or self.min_prompt < 0:
            raise SettingsError("min_prompt", self.min_prompt, "must be an integer >= 0")
        if self.trigger not in TRIGGERS:
            raise SettingsError("trigger", self.trigger, f"must be one of {', '.join(TRIGGERS)}")

    @property
    def enabled(self) -> bool:
        return self.method != OFF

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> CompressionConfig:
        """Parse ``{"kv_compression": ..., "snapkv": {...settings, "min_prompt": n}}``.

        Built once per process and content: the API server, the scheduler and every worker
        (several places each) ask for the engine's config, and get the same immutable object
        back. Raises :class:`SettingsError` naming the offending key.
        """
        try:
            key = json.dumps(additional_config or {}, sort_keys=True)
        except (TypeError, ValueError):  # not JSON (e.g. numpy ints): parse, uncached
            return cls._parse(additional_config)
        return _parsed(cls, key)

    @classmethod
    def _parse(cls, additional_config: Mapping[str, Any] | None) -> CompressionConfig:
        cfg = dict(additional_config or {})
        method = cfg.get(METHOD_KEY, OFF)
        if method not in methods():
            raise SettingsError(METHOD_KEY, method, f"must be one of {', '.join(methods())}")
        raw = cfg.get(SETTINGS_KEY) or {}
        if not isinstance(raw, Mapping):
            raise SettingsError(SETTINGS_KEY, raw, "must be a mapping of setting name to value")
        raw = {k: v for k, v in raw.items() if v is not None}
        if "method" in raw:
            raise SettingsError("method", raw["method"],
                                f"choose the method with kv_compression ({', '.join(methods())})")
        min_prompt = raw.pop("min_prompt", 0)
        trigger = raw.pop("trigger", "always")
        if method == OFF:
            return cls(method=OFF, settings=None, min_prompt=min_prompt, trigger=trigger)
        if "budget" not in raw and "ratio" not in raw:
            raw["budget"] = DEFAULT_BUDGET
        raw["method"] = method
        return cls(method=method, settings=CompressionSettings.from_dict(raw),
                   min_prompt=min_prompt, trigger=trigger)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> CompressionConfig:
        """The engine's config, from ``vllm_config.additional_config``."""
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))

    def to_additional_config(self) -> dict[str, Any]:
        """Inverse of :meth:`from_additional_config`."""
        out: dict[str, Any] = {METHOD_KEY: self.method}
        if self.settings is not None:
            settings = {k: v for k, v in self.settings.to_dict().items() if v is not None}
            del settings["method"]  # carried by kv_compression
            out[SETTINGS_KEY] = {**settings, "min_prompt": self.min_prompt,
                                 "trigger": self.trigger}
        return out

    def check_block_size(self, block_size: int) -> None:
        """Refuse intervals that are not whole KV blocks (known once the engine's block size
        is); :class:`SettingsError` names the setting."""
        s = self.settings
        if s is None:
            return
        for name in ("decode_interval", "prefill_interval"):
            value = getattr(s, name)
            if value is not None and value % block_size:
                raise SettingsError(name, value, f"must be a positive multiple of the KV block "
                                    f"size ({block_size})")

    # ------------------------------------------------------------------ per request

    def request_settings(self, extra_args: Mapping[str, Any] | None) -> CompressionSettings | None:
        """The settings one request runs with, or ``None`` when it is not to be compressed.

        ``extra_args`` is the request's ``SamplingParams.extra_args``. Raises
        :class:`SettingsError` (``.setting`` = the request key) for bad values or unknown
        ``snapkv_*`` keys; keys of other plugins are ignored.
        """
        if not self.enabled:
            return None
        assert self.settings is not None
        extra = dict(extra_args or {})
        method = extra.get(REQUEST_METHOD_KEY, self.method)
        if not isinstance(method, str) or method not in methods():
            raise SettingsError(REQUEST_METHOD_KEY, method,
                                f"must be one of {', '.join(methods())}")
        if method == OFF:
            return None
        changes: dict[str, Any] = {}
        for key, value in extra.items():
            if not key.startswith(REQUEST_PREFIX):
                continue
            if key not in REQUEST_KEYS:
                raise SettingsError(
                    key, value, f"unknown request setting (allowed: {', '.join(REQUEST_KEYS)}, "
                    f"{REQUEST_METHOD_KEY})"
                )
            if key in REQUEST_OFF_BY_ZERO and value == 0 and not isinstance(value, bool):
                value = None
            changes[REQUEST_KEYS[key]] = value
        if "budget" in changes and "ratio" in changes:
            raise SettingsError(
                "snapkv_budget", changes["budget"],
                "give snapkv_budget or snapkv_ratio, not both",
            )
        if method != self.settings.method:
            changes["method"] = method
        if not changes:
            return self.settings
        try:
            return self.settings.override(changes)
        except SettingsError as err:
            # Name the request field the client actually sent: the setting's public name.
            raise SettingsError(public_name(err.setting), err.value, err.allowed) from None

    @property
    def pressure(self) -> bool:
        """Whether budgets apply only when the scheduler runs short of blocks."""
        return self.enabled and self.trigger == "pressure"

    def request_plan(self, prompt_len: int, block_size: int,
                     extra_args: Mapping[str, Any] | None,
                     orders: tuple[int, ...] = ()) -> RequestPlan | None:
        """The request's settings and compactions, or ``None`` when it never compacts.

        The prompt compacts at its end (or at ``compact_at``) when it is at least ``min_prompt``
        long and the part before that point is longer than its kept count (and that frees a
        block); while it is read when ``prefill_budget`` is set (same ``min_prompt`` rule);
        during decode when ``decode_budget`` is set. Under ``trigger="pressure"`` the prompt
        and decode budgets are ceilings applied at ``orders``, the points the scheduler ordered
        compactions at (the plan exists whenever a ceiling does). Raises
        :class:`SettingsError` for a ``compact_at`` outside this prompt.
        """
        settings = self.request_settings(extra_args)
        if settings is None:
            return None
        try:
            point = compaction_point(settings.compact_at, prompt_len)
        except SettingsError as err:
            raise SettingsError(public_name("compact_at"), err.value, err.allowed) from None
        long_enough = prompt_len >= self.min_prompt
        target = kept_count(point, settings) if long_enough else point
        schedule = Schedule(
            prompt_len=prompt_len,
            block_size=block_size,
            method=settings.method,
            prompt_target=target if target < point else None,
            prompt_at=point,
            prefill_budget=settings.prefill_budget if long_enough else None,
            prefill_interval=_interval(settings.prefill_interval, DEFAULT_PREFILL_INTERVAL,
                                       block_size),
            prefill_method=settings.prefill_method_name,
            decode_budget=settings.decode_budget,
            decode_interval=_interval(settings.decode_interval, DEFAULT_DECODE_INTERVAL,
                                      block_size),
            trigger=self.trigger,
            orders=tuple(orders),
        )
        return RequestPlan(settings, schedule) if schedule.compresses else None

    def schedule(self, prompt_len: int, block_size: int,
                 extra_args: Mapping[str, Any] | None) -> Schedule | None:
        """:meth:`request_plan`'s schedule (``None``: the request never compacts)."""
        plan = self.request_plan(prompt_len, block_size, extra_args)
        return None if plan is None else plan.schedule


@functools.lru_cache(maxsize=64)
def _parsed(cls: type[CompressionConfig], key: str) -> CompressionConfig:
    return cls._parse(json.loads(key))


def _interval(value: int | None, default: int, block_size: int) -> int:
    return value if value is not None else round_to_blocks(default, block_size)
