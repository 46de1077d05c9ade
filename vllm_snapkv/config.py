"""Engine-level compression settings, and each request's effective settings.

One :class:`CompressionConfig` per engine, built from ``VllmConfig.additional_config`` (where the
``--kv-compression``/``--snapkv-*`` flags, ``--config`` YAML keys and ``LLM(additional_config=...)``
all end up). The scheduler and every worker build it from the same dict and call the same pure
functions on the same inputs — prompt length, block size, the request's ``extra_args`` — so they
agree on every request's placement without talking to each other.

Per-request control travels in ``SamplingParams.extra_args`` (the OpenAI API's ``vllm_xargs``):

* ``"kv_compression": "none"`` — this request opts out (behaves exactly as vanilla vLLM);
  ``"snapkv"`` / ``"recency"`` — this request uses that method (the recency baseline is there so
  the same server can show what SnapKV's selection buys over keeping the most recent tokens);
* ``"snapkv_budget": 2048`` or ``"snapkv_ratio": 0.25`` — a different amount for this request.

Anything else under a ``snapkv_`` prefix, or a bad value, is refused by
:meth:`CompressionConfig.request_settings` with a :class:`~vllm_snapkv.settings.SettingsError` that
names the request field, which the API server turns into an HTTP 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_snapkv.placement import Placement, plan
from vllm_snapkv.selection import kept_count
from vllm_snapkv.settings import RECENCY_SINK, SettingsError, SnapKVSettings

#: Key of ``additional_config`` holding the method (one of :data:`METHODS`).
METHOD_KEY = "kv_compression"
#: Key of ``additional_config`` holding the SnapKV settings dict (plus ``min_prompt``).
SETTINGS_KEY = "snapkv"
#: ``none`` = vanilla vLLM; ``snapkv`` = SnapKV's selection; ``recency`` = the baseline that keeps
#: sinks + the most recent tokens at the same budget and placement (settings' ``scorer``).
METHODS: tuple[str, ...] = ("none", "snapkv", "recency")

#: Default amount when neither budget nor ratio is given: the SnapKV paper's 1024-token budget.
DEFAULT_BUDGET = 1024

#: Per-request keys (in ``extra_args`` / ``vllm_xargs``) and the setting each one overrides.
REQUEST_METHOD_KEY = "kv_compression"
REQUEST_KEYS: dict[str, str] = {"snapkv_budget": "budget", "snapkv_ratio": "ratio"}
REQUEST_PREFIX = "snapkv_"


_REQUEST_KEY_OF = {setting: key for key, setting in REQUEST_KEYS.items()}


@dataclass(frozen=True)
class CompressionConfig:
    """What the engine does to long prompts.

    Attributes:
        method: ``"none"`` (vanilla vLLM), ``"snapkv"`` or ``"recency"``.
        settings: the selection settings as configured, scorer ``"snapkv"`` (``None`` when
            ``method == "none"``); :meth:`method_settings` derives the recency baseline's.
        min_prompt: prompts shorter than this many tokens are never compressed, whatever the
            budget/ratio says (useful with ``ratio``, which would otherwise shrink short prompts).
    """

    method: str = "none"
    settings: SnapKVSettings | None = None
    min_prompt: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingsError("kv_compression", self.method, f"must be one of {', '.join(METHODS)}")
        if self.method != "none" and self.settings is None:
            raise SettingsError("kv_compression", self.method, f"{self.method} needs settings")
        if isinstance(self.min_prompt, bool) or not isinstance(self.min_prompt, int) \
                or self.min_prompt < 0:
            raise SettingsError("min_prompt", self.min_prompt, "must be an integer >= 0")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def method_settings(self, method: str) -> SnapKVSettings:
        """The configured settings, scored by ``method`` (``"snapkv"`` or ``"recency"``).

        The recency baseline keeps StreamingLLM's :data:`~vllm_snapkv.settings.RECENCY_SINK` sinks
        unless ``sink`` was configured.
        """
        assert self.settings is not None
        if method == "recency":
            return self.settings.replace(scorer="recency",
                                         sink=self.settings.sink or RECENCY_SINK)
        return self.settings

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> CompressionConfig:
        """Parse ``{"kv_compression": ..., "snapkv": {...settings, "min_prompt": n}}``.

        Raises :class:`SettingsError` naming the offending key.
        """
        cfg = dict(additional_config or {})
        method = cfg.get(METHOD_KEY, "none")
        if method not in METHODS:
            raise SettingsError("kv_compression", method, f"must be one of {', '.join(METHODS)}")
        raw = cfg.get(SETTINGS_KEY) or {}
        if not isinstance(raw, Mapping):
            raise SettingsError(SETTINGS_KEY, raw, "must be a mapping of setting name to value")
        raw = {k: v for k, v in raw.items() if v is not None}
        if "scorer" in raw:
            raise SettingsError("scorer", raw["scorer"],
                                f"choose the scorer with kv_compression ({', '.join(METHODS[1:])})")
        min_prompt = raw.pop("min_prompt", 0)
        if method == "none":
            return cls(method="none", settings=None, min_prompt=min_prompt)
        if "budget" not in raw and "ratio" not in raw:
            raw["budget"] = DEFAULT_BUDGET
        return cls(method=method, settings=SnapKVSettings.from_dict(raw), min_prompt=min_prompt)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> CompressionConfig:
        """The engine's config, from ``vllm_config.additional_config``."""
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))

    def to_additional_config(self) -> dict[str, Any]:
        """Inverse of :meth:`from_additional_config`."""
        out: dict[str, Any] = {METHOD_KEY: self.method}
        if self.settings is not None:
            settings = self.settings.to_dict()
            del settings["scorer"]  # carried by the method
            out[SETTINGS_KEY] = {**settings, "min_prompt": self.min_prompt}
        return out

    # ------------------------------------------------------------------ per request

    def request_settings(self, extra_args: Mapping[str, Any] | None) -> SnapKVSettings | None:
        """The settings one request runs with, or ``None`` when it is not to be compressed.

        ``extra_args`` is the request's ``SamplingParams.extra_args``. Raises
        :class:`SettingsError` (``.setting`` = the request key) for bad values or unknown
        ``snapkv_*`` keys; keys of other plugins are ignored.
        """
        if not self.enabled:
            return None
        extra = dict(extra_args or {})
        method = extra.get(REQUEST_METHOD_KEY, self.method)
        if not isinstance(method, str) or method not in METHODS:
            raise SettingsError(REQUEST_METHOD_KEY, method, f"must be one of {', '.join(METHODS)}")
        if method == "none":
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
            changes[REQUEST_KEYS[key]] = value
        if "budget" in changes and "ratio" in changes:
            raise SettingsError(
                "snapkv_budget", changes["budget"],
                "give snapkv_budget or snapkv_ratio, not both",
            )
        base = self.method_settings(method)
        if not changes:
            return base
        try:
            return base.override(changes)
        except SettingsError as err:
            # Re-aim the error at the request field the client actually sent.
            key = _REQUEST_KEY_OF.get(err.setting, err.setting)
            raise SettingsError(key, err.value, err.allowed) from None

    def target_kept(self, prompt_len: int, extra_args: Mapping[str, Any] | None) -> int | None:
        """Tokens per KV head the selection wants to keep, or ``None`` to leave the prompt whole.

        ``None`` when compression is off, the request opted out, the prompt is shorter than
        ``min_prompt``, or the prompt already fits the budget.
        """
        settings = self.request_settings(extra_args)
        if settings is None or prompt_len < self.min_prompt:
            return None
        kept = kept_count(prompt_len, settings)
        return kept if kept < prompt_len else None

    def placement(self, prompt_len: int, block_size: int,
                  extra_args: Mapping[str, Any] | None) -> Placement | None:
        """Where this request's kept KV goes, or ``None`` when no block would be freed.

        A prompt whose surplus over the target is under one block frees nothing, so it is left
        whole (compacting it would cost work and buy no memory).
        """
        target = self.target_kept(prompt_len, extra_args)
        if target is None:
            return None
        p = plan(prompt_len, target, block_size)
        return p if p.compressed else None
