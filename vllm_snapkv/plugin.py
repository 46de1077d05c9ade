"""Registration with vLLM: the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (CLI/API server, engine core, workers)
and, in the CLI, before it builds the ``vllm serve`` parser — which is what lets a plugin add
flags. Registration must therefore be cheap and idempotent; it only wraps three ``EngineArgs``
methods:

* ``add_cli_args`` — adds the ``SnapKV`` flag group;
* ``from_cli_args`` — folds the flags into ``additional_config`` and refuses bad values at
  start-up with a message naming the flag;
* ``create_engine_config`` — for every way of starting an engine (CLI, ``LLM(...)``, YAML),
  validates ``additional_config`` and, when compression is on, wires in what it needs (the
  per-request validator, the scheduler and the worker), so the user types nothing but the flags.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vllm_snapkv import cli
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.settings import SettingsError

logger = logging.getLogger("vllm_snapkv")

_registered = False

#: vLLM's CPU worker (what ``worker_cls="auto"`` resolves to on CPU) and the plugin's subclass.
CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
WORKER = "vllm_snapkv.worker.SnapKVCPUWorker"


def _wire_engine_args(engine_args: Any) -> CompressionConfig:
    """Validate the compression config and add what it needs to ``engine_args``."""
    from vllm_snapkv import request_validation

    config = CompressionConfig.from_additional_config(engine_args.additional_config)
    request_validation.set_engine_config(config)
    if config.enabled:
        procs = list(engine_args.logits_processors or [])
        if request_validation.QUALNAME not in procs:
            procs.append(request_validation.QUALNAME)
        engine_args.logits_processors = procs
        if engine_args.scheduler_cls is not None:
            raise ValueError(
                f"--kv-compression snapkv brings its own scheduler; it cannot be combined with "
                f"--scheduler-cls {engine_args.scheduler_cls}"
            )
    return config


def _wire_vllm_config(vllm_config: Any) -> None:
    """Point the engine at the plugin's scheduler and worker (compression on)."""
    from vllm.platforms import current_platform

    from vllm_snapkv.scheduler import scheduler_class_for

    if not current_platform.is_cpu():
        raise ValueError(
            "--kv-compression snapkv currently runs on vLLM's CPU platform only; the CUDA "
            "adapter is not built yet"
        )
    parallel = vllm_config.parallel_config
    if parallel.worker_cls not in (CPU_WORKER, WORKER):
        raise ValueError(
            f"--kv-compression snapkv brings its own worker class; it cannot be combined with "
            f"--worker-cls {parallel.worker_cls}"
        )
    parallel.worker_cls = WORKER
    scheduler = vllm_config.scheduler_config
    scheduler.scheduler_cls = scheduler_class_for(bool(scheduler.async_scheduling))


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]
    original_create = EngineArgs.create_engine_config

    def add_cli_args(parser: Any) -> Any:
        return cli.add_cli_args(original_add(parser))

    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        engine_args = original_from(cls, args)
        try:
            engine_args.additional_config = cli.fold_cli_args(
                args, dict(engine_args.additional_config or {})
            )
        except SettingsError as err:
            raise cli.startup_error(err) from None
        return engine_args

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = _wire_engine_args(self)
        vllm_config = original_create(self, *args, **kwargs)
        if config.enabled:
            _wire_vllm_config(vllm_config)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign,assignment]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


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
