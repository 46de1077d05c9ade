"""Registration with vLLM: the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (CLI/API server, engine core, workers)
and, in the CLI, before it builds the ``vllm serve`` parser — which is what lets a plugin add
flags. Registration must therefore be cheap and idempotent.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vllm_snapkv import cli

logger = logging.getLogger("vllm_snapkv")

_registered = False


def _patch_engine_args() -> None:
    """Teach ``EngineArgs`` the plugin's flags and fold them into ``additional_config``."""
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    def add_cli_args(parser: Any) -> Any:
        parser = original_add(parser)
        return cli.add_cli_args(parser)

    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        engine_args = original_from(cls, args)
        engine_args.additional_config = cli.fold_cli_args(
            args, dict(engine_args.additional_config or {})
        )
        if cli.compression_method(engine_args.additional_config) == "snapkv":
            logger.warning(
                "vllm-snapkv: --kv-compression snapkv is accepted, but this release does not "
                "compress the KV cache yet; the server behaves as vanilla vLLM."
            )
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign,assignment]


def register() -> None:
    """Entry point of ``vllm.general_plugins``: install the plugin's hooks (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True
    _patch_engine_args()


def is_registered() -> bool:
    """Whether :func:`register` has run in this process (vLLM's loader calls it)."""
    return _registered
