"""The ``--kv-compression`` flags of ``vllm serve`` and how they reach the engine.

vLLM builds its ``vllm serve`` parser with ``EngineArgs.add_cli_args`` and turns the parsed
namespace into ``EngineArgs`` with ``EngineArgs.from_cli_args``, which copies dataclass fields
only. The plugin therefore adds its own argument group to the parser and folds the parsed values
into ``EngineArgs.additional_config``, the dict vLLM hands unchanged to the scheduler and the
workers (``VllmConfig.additional_config``). The offline ``LLM(...)`` API takes the same settings
as ``LLM(..., additional_config={"kv_compression": "snapkv"})`` and ``vllm serve --config`` YAML
files as ``kv-compression: snapkv`` (vLLM turns YAML keys into flags).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger("vllm_snapkv")

#: Title of the flag group; ``vllm serve --help=snapkv`` prints just this group.
GROUP_TITLE = "SnapKV"
GROUP_DESCRIPTION = (
    "SnapKV KV-cache compression (vllm-snapkv plugin): at the end of prefill, keep per KV head "
    "the prompt tokens the last prompt tokens attend to most, and return evicted KV blocks to "
    "the block pool."
)

#: Compression methods offered by ``--kv-compression``.
METHODS: tuple[str, ...] = ("none", "snapkv")

#: Key under which the settings travel in ``additional_config``.
CONFIG_KEY = "kv_compression"


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's flag group to a ``vllm serve`` (or ``EngineArgs``) parser. Idempotent."""
    if any(g.title == GROUP_TITLE for g in parser._action_groups):
        return parser
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    group.add_argument(
        "--kv-compression",
        choices=METHODS,
        default="none",
        help=(
            "KV-cache compression applied to each prompt at the end of prefill. "
            "'none' (default) is vanilla vLLM. 'snapkv' selects the prompt tokens each KV head "
            "keeps (SnapKV, arXiv 2404.14469). In this release the flag is accepted and "
            "recorded, but no compression is applied yet."
        ),
    )
    return parser


def fold_cli_args(args: argparse.Namespace, additional_config: dict[str, Any]) -> dict[str, Any]:
    """Copy the plugin's parsed flags into ``additional_config`` (returned, updated in place).

    A value the user already put in ``--additional-config`` wins over the flag's default, so that
    ``--additional-config '{"kv_compression": "snapkv"}'`` works too; an explicit flag wins over
    both.
    """
    method = getattr(args, "kv_compression", None)
    if method is None:
        return additional_config
    if method != "none" or CONFIG_KEY not in additional_config:
        additional_config[CONFIG_KEY] = method
    return additional_config


def compression_method(additional_config: dict[str, Any] | None) -> str:
    """The compression method configured in ``additional_config`` (``"none"`` when unset).

    Raises ``ValueError`` naming the setting and the allowed values for anything else.
    """
    method = (additional_config or {}).get(CONFIG_KEY, "none")
    if method not in METHODS:
        raise ValueError(
            f"kv_compression={method!r} is invalid: allowed values are {', '.join(METHODS)}"
        )
    return method
