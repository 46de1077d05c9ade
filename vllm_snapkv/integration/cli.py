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
from vllm_snapkv.schedule import TRIGGERS
from vllm_snapkv.settings import PREFIX, PRESETS, SettingsError, public_name, settings_table

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

def _flags() -> tuple[tuple[str, type, tuple[Any, ...] | None, str], ...]:
    """(public name, type, choices, help) of every setting offered as a flag: the settings
    table's general rows, then every registered method's parameters (from its fields)."""
    params = method_parameters()
    rows = []
    for s in settings_table():
        if not s.flag:
            continue
        field = params.get(s.name)
        choices = field.metadata.get("choices") if field is not None else None
        if s.name == "prefill_method":
            choices = tuple(registered_methods())
        elif s.name == "preset":
            choices = tuple(PRESETS)
        elif s.name == "trigger":
            choices = TRIGGERS
        rows.append((s.key, s.type, choices, s.help))
    return tuple(rows)


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
    for key, typ, choices, text in _flags():
        group.add_argument(flag(key), dest=key, type=typ, choices=choices, default=None,
                           help=text)
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
    for public, *_ in _flags():
        value = getattr(args, public, None)
        if value is None:
            continue
        key = public.removeprefix(PREFIX)
        if key in ("budget", "ratio"):
            settings.pop("ratio" if key == "budget" else "budget", None)
        settings[key] = value
    if settings:
        additional_config[SETTINGS_KEY] = settings
    additional_config.setdefault(METHOD_KEY, OFF)
    CompressionConfig.from_additional_config(additional_config)  # validate now, at start-up
    return additional_config


def flag(setting: str) -> str:
    """The flag of ``setting`` (a field or public name): its public name, dashed."""
    return "--" + public_name(setting).replace("_", "-")


def error_message(err: SettingsError) -> str:
    """``--flag=value is invalid: allowed range`` for a refused setting."""
    return f"{flag(err.setting)}={err.value!r} is invalid: {err.allowed}"


def startup_error(err: SettingsError) -> SystemExit:
    """A clean start-up refusal (no traceback) that names the flag, the value and the range."""
    return SystemExit(f"vllm serve: error: {error_message(err)}")
