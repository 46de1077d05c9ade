"""The ``SnapKV`` flag group of ``vllm serve`` and how it reaches the engine.

vLLM builds its ``vllm serve`` parser with ``EngineArgs.add_cli_args`` and turns the parsed
namespace into ``EngineArgs`` with ``EngineArgs.from_cli_args``, which copies dataclass fields
only. The plugin therefore adds its own argument group to the parser and folds the parsed values
into ``EngineArgs.additional_config``, the dict vLLM hands unchanged to the scheduler and the
workers (``VllmConfig.additional_config``), in the form :class:`~vllm_snapkv.config.CompressionConfig`
reads::

    {"kv_compression": "snapkv", "snapkv": {"budget": 1024, "window": 32, ..., "min_prompt": 0}}

The offline ``LLM(...)`` API takes that dict as ``additional_config=``; ``vllm serve --config``
YAML files take the flags' names as keys (``kv-compression: snapkv``, ``snapkv-budget: 1024``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vllm_snapkv.config import METHOD_KEY, OFF, SETTINGS_KEY, CompressionConfig, methods
from vllm_snapkv.methods import method_parameters, registered_methods
from vllm_snapkv.settings import (
    DEFAULT_DECODE_INTERVAL,
    DEFAULT_PREFILL_INTERVAL,
    DEFAULT_PREFILL_METHOD,
    PRESETS,
    SettingsError,
)

logger = logging.getLogger("vllm_snapkv")

#: Title of the flag group; ``vllm serve --help=snapkv`` prints just this group.
GROUP_TITLE = "SnapKV"
GROUP_DESCRIPTION = (
    "KV-cache compression (vllm-snapkv plugin): a method picks the tokens each KV head keeps, "
    "at the end of the prompt (--snapkv-budget/--snapkv-ratio), optionally while a long prompt "
    "is read (--snapkv-prefill-budget) and while the answer is generated "
    "(--snapkv-decode-budget); evicted KV blocks return to the block pool. Per request, "
    "`vllm_xargs` may carry kv_compression=none (opt out) or a method name, snapkv_budget, "
    "snapkv_ratio, snapkv_decode_budget, snapkv_prefill_budget."
)

#: (setting name, flag type, choices, help). Defaults are None = "not given": the settings
#: object's defaults apply, so they are stated once, in vllm_snapkv.settings.
_SETTING_FLAGS: tuple[tuple[str, type, tuple[str, ...] | None, str], ...] = (
    ("budget", int, None,
     "Tokens kept per KV head, observation window included (must exceed the window). Prompts "
     "not longer than this are left whole. Default 1024 unless --snapkv-ratio is given."),
    ("ratio", float, None,
     "Fraction of each prompt kept, in (0, 1]; instead of --snapkv-budget."),
    ("window", int, None,
     "Observation window: the last prompt tokens whose queries score the prompt; always kept. "
     "Default 32."),
    ("sink", int, None, "First prompt tokens always kept (inside the budget). Default 0."),
    ("min-prompt", int, None,
     "Prompts shorter than this many tokens are never compressed while read or at their end. "
     "Default 0."),
    ("decode-budget", int, None,
     "Compact during generation too: once a request attends more than this plus "
     "--snapkv-decode-interval tokens, keep this many per KV head. Default: off."),
    ("decode-interval", int, None,
     "Tokens between two decode compactions (a positive multiple of the KV block size). "
     f"Default {DEFAULT_DECODE_INTERVAL}, rounded up to whole blocks."),
    ("prefill-budget", int, None,
     "Compact while a long prompt is read in chunks: keep this many tokens per KV head of what "
     "has been read whenever it exceeds this plus --snapkv-prefill-interval; lets prompts "
     "larger than the KV pool run. At least --snapkv-budget. Default: off."),
    ("prefill-interval", int, None,
     "Prompt tokens read between two prefill compactions (a positive multiple of the KV "
     f"block size). Default {DEFAULT_PREFILL_INTERVAL}, rounded up to whole blocks."),
    ("prefill-method", str, None,
     "Method of the compactions made while a prompt is read (the question at its end is not "
     f"read yet). Default {DEFAULT_PREFILL_METHOD}."),
    ("preset", str, tuple(PRESETS),
     "Start from named settings: 'kvpress' (NVIDIA kvpress SnapKVPress: window 64, kernel 5, "
     "avg pool, mean reductions), 'paper' (window 32, max-pool 7), 'default'. Other flags "
     "override it."),
)


def _dest(name: str) -> str:
    return "snapkv_" + name.replace("-", "_")


def _flags() -> tuple[tuple[str, type, tuple[str, ...] | None, str], ...]:
    """The general settings' rows, then one per registered method parameter (from its field:
    type, ``metadata["choices"]``, ``metadata["help"]``)."""
    params = tuple(
        (name.replace("_", "-"), type(f.default) if f.default is not None else str,
         f.metadata.get("choices"), f.metadata.get("help", ""))
        for name, f in method_parameters().items())
    return (*_SETTING_FLAGS, *params)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flag group to a ``vllm serve`` (or ``EngineArgs``) parser. Idempotent."""
    if any(g.title == GROUP_TITLE for g in parser._action_groups):
        return parser
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    group.add_argument(
        "--kv-compression",
        choices=methods(),
        default=None,
        help="The method that picks the tokens each KV head keeps; 'none' (default) is vanilla "
             "vLLM. " + "; ".join(f"'{name}': {cls.summary} ({cls.paper})"
                                  for name, cls in registered_methods().items()) + ".",
    )
    for name, typ, choices, text in _flags():
        if name == "prefill-method":
            choices = tuple(registered_methods())
        group.add_argument(f"--snapkv-{name}", dest=_dest(name), type=typ, choices=choices,
                           default=None, help=text)
    return parser


def fold_cli_args(args: argparse.Namespace, additional_config: dict[str, Any]) -> dict[str, Any]:
    """Copy the plugin's parsed flags into ``additional_config`` (returned, updated in place).

    Explicit flags win over what ``--additional-config`` already holds; values not given leave
    it alone. Raises :class:`SettingsError` (naming the flag's setting) for invalid combinations.
    """
    method = getattr(args, "kv_compression", None)
    if method is not None:
        additional_config[METHOD_KEY] = method
    settings = dict(additional_config.get(SETTINGS_KEY) or {})
    for name, *_ in _flags():
        value = getattr(args, _dest(name), None)
        if value is None:
            continue
        key = name.replace("-", "_")
        if key in ("budget", "ratio"):
            settings.pop("ratio" if key == "budget" else "budget", None)
        settings[key] = value
    if settings:
        additional_config[SETTINGS_KEY] = settings
    additional_config.setdefault(METHOD_KEY, OFF)
    CompressionConfig.from_additional_config(additional_config)  # validate now, at start-up
    return additional_config


def flag_for(setting: str) -> str:
    """The CLI flag that sets ``setting`` (for error messages)."""
    if setting in (METHOD_KEY, "kv-compression"):
        return "--kv-compression"
    return "--snapkv-" + setting.replace("_", "-")


def error_message(err: SettingsError) -> str:
    """``--flag=value is invalid: allowed range`` for a refused setting."""
    return f"{flag_for(err.setting)}={err.value!r} is invalid: {err.allowed}"


def startup_error(err: SettingsError) -> SystemExit:
    """A clean start-up refusal (no traceback) that names the flag, the value and the range."""
    return SystemExit(f"vllm serve: error: {error_message(err)}")
