"""The SnapKV workers: ``parallel_config.worker_cls`` is

* ``"vllm_snapkv.worker.SnapKVCPUWorker"`` on vLLM's CPU platform, and
* ``"vllm_snapkv.worker.SnapKVGPUWorker"`` on CUDA (not run on a GPU yet: ``docs/cuda.md``).

In the worker process each

1. installs the SnapKV attention backend before the model is built: on CPU
   :class:`vllm_snapkv.backends.cpu.SnapKVCPUBackend` in place of ``CPU_ATTN``
   (``register_backend``; the CPU platform always picks ``CPU_ATTN``); on CUDA
   :class:`vllm_snapkv.backends.cuda.SnapKVFlashAttentionBackend` as ``CUSTOM`` (the plugin sets
   ``attention_config.backend = CUSTOM``), and
2. runs a model runner (:class:`SnapKVCPUModelRunner` / :class:`SnapKVGPUModelRunner`, both
   V1 model runners with :class:`SnapKVModelRunnerMixin`), which, each step, publishes per batch
   row what the attention backend needs (request id, prompt length N, ``num_computed_tokens``
   before the step, the request's :class:`~vllm_snapkv.placement.Placement` and settings) —
   see :mod:`vllm_snapkv.backends.core`.

``num_computed_tokens`` is never touched: positions, slot mapping and the scheduler keep their
true values; only what attention reads shrinks.

The worker classes are built on first access (module ``__getattr__``): importing vLLM's CPU
worker module monkeypatches ``torch.cuda`` (``vllm/v1/worker/cpu/shm.py``), so it must never be
imported in a CUDA worker, and this module imports neither platform's worker until asked.

Worker RPCs (``LLM.collective_rpc(name)``): ``snapkv_report`` (compactions done, debug errors),
``snapkv_set_debug(enabled)``, ``snapkv_attention_impls`` (impl class per attention layer).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_snapkv.backends import CPU_BACKEND_PATH, core
from vllm_snapkv.config import CompressionConfig

logger = logging.getLogger("vllm_snapkv")

# The platform classes (SnapKVCPUWorker, SnapKVCPUModelRunner, SnapKVGPUWorker,
# SnapKVGPUModelRunner) are left out of __all__ on purpose: a star-import must not build (and
# import the vLLM worker modules of) both platforms.
__all__ = [
    "SnapKVModelRunnerMixin",
    "SnapKVWorkerMixin",
    "install_cpu_backend",
    "install_cuda_backend",
]

WORKER_CLS = "vllm_snapkv.worker.SnapKVCPUWorker"
GPU_WORKER_CLS = "vllm_snapkv.worker.SnapKVGPUWorker"
#: Dotted path of the CUDA backend class, registered as ``AttentionBackendEnum.CUSTOM``.
CUDA_BACKEND_PATH = "vllm_snapkv.backends.cuda.SnapKVFlashAttentionBackend"

_V2_RUNNER_ERROR = ("vllm-snapkv needs vLLM's V1 model runner (input_batch); Model Runner V2 "
                    "is not supported (set VLLM_USE_V2_MODEL_RUNNER=0)")


def install_cpu_backend() -> None:
    """Make ``CPU_ATTN`` resolve to the SnapKV CPU backend in this process (idempotent)."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.CPU_ATTN.get_path() != CPU_BACKEND_PATH:
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
        # A backend resolved earlier in this process would otherwise stay cached.
        selector._cached_get_attn_backend.cache_clear()


def _custom_backend_path() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # CUSTOM not registered yet
        return None


def install_cuda_backend() -> None:
    """Register the SnapKV FlashAttention backend as ``CUSTOM`` in this process (idempotent).

    Only stores a class path: the backend module (which imports FlashAttention) is imported
    when vLLM selects the backend."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if _custom_backend_path() != CUDA_BACKEND_PATH:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND_PATH)
        selector._cached_get_attn_backend.cache_clear()


# ---------------------------------------------------------------------------------------------
# Shared by the CPU and GPU model runners / workers
# ---------------------------------------------------------------------------------------------


class SnapKVModelRunnerMixin:
    """Per-step publishing of the batch's compression facts; mixed into a V1 model runner
    (``GPUModelRunner`` or its subclass ``CPUModelRunner``), before it in the MRO."""

    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)  # type: ignore[call-arg]
        self.snapkv_config = CompressionConfig.from_vllm_config(vllm_config)
        # The block size the scheduler allocates with (placement must match its E exactly).
        self.snapkv_block_size = int(vllm_config.cache_config.block_size)
        # req_id -> (prompt_len, placement, settings); pure functions of the request, cached.
        self._snapkv_requests: dict[str, tuple[int, Any, Any]] = {}
        self._snapkv_in_step = False
        self._snapkv_step = 0

    # -- request lifecycle --------------------------------------------------------------------

    def _update_states(self, scheduler_output):
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        if gone:
            for rid in gone:
                self._snapkv_requests.pop(rid, None)
            core.forget_requests(gone)
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _snapkv_request(self, req_id: str, prompt_len: int):
        cached = self._snapkv_requests.get(req_id)
        if cached is not None and cached[0] == prompt_len:
            return cached[1], cached[2]
        placement = settings = None
        if self.snapkv_config.enabled:
            req = self.requests.get(req_id)  # type: ignore[attr-defined]
            sp = getattr(req, "sampling_params", None) if req is not None else None
            if sp is not None:  # pooling requests are never compressed
                extra = sp.extra_args
                placement = self.snapkv_config.placement(prompt_len, self.snapkv_block_size,
                                                         extra)
                if placement is not None:
                    settings = self.snapkv_config.request_settings(extra)
                    if settings is None:
                        placement = None
        self._snapkv_requests[req_id] = (prompt_len, placement, settings)
        return placement, settings

    def snapkv_batch_info(self) -> core.BatchCompressionInfo:
        """Per-row compression facts of the current persistent batch (pre-step values)."""
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        prompt = ib.num_prompt_tokens[:n].tolist()
        computed = ib.num_computed_tokens_cpu[:n].tolist()
        rows = []
        for i, req_id in enumerate(ib.req_ids[:n]):
            placement, settings = self._snapkv_request(req_id, int(prompt[i]))
            rows.append(core.RowState(req_id, int(prompt[i]), int(computed[i]), placement,
                                      settings))
        return core.BatchCompressionInfo(tuple(rows), self._snapkv_step)

    # -- per-step hooks -----------------------------------------------------------------------

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._snapkv_in_step = True
        self._snapkv_step += 1
        try:
            return super().execute_model(  # type: ignore[misc]
                scheduler_output, intermediate_tensors)
        finally:
            self._snapkv_in_step = False
            core.publish_batch(None)

    def _build_attention_metadata(self, *args, **kwargs):
        # Runs after _update_states/_prepare_inputs (rows in their final order, num_computed
        # still the pre-step value) and right before every group's builder. Dummy/profile runs
        # (outside execute_model) publish nothing, so their builders act as vanilla.
        core.publish_batch(self.snapkv_batch_info()
                           if self._snapkv_in_step and self.snapkv_config.enabled else None)
        return super()._build_attention_metadata(*args, **kwargs)  # type: ignore[misc]


class SnapKVWorkerMixin:
    """The SnapKV worker RPCs (``LLM.collective_rpc``), shared by the CPU and GPU workers."""

    def snapkv_report(self) -> dict:
        """Compactions done in this worker, and the debug recorder's errors (if enabled)."""
        out = core.state().report()
        out["model_runner"] = type(self.model_runner).__name__  # type: ignore[attr-defined]
        return out

    def snapkv_set_debug(self, enabled: bool = True) -> bool:
        core.set_debug(bool(enabled))
        return core.state().debug is not None

    def snapkv_kept(self, req_id_prefix: str) -> dict[str, list[list[int]]]:
        """Debug mode: layer -> kept positions per KV head of the request(s) whose worker-side
        id starts with ``req_id_prefix`` (the offline API appends a suffix to request ids)."""
        dbg = core.state().debug
        if dbg is None:
            return {}
        return {layer: kept.tolist() for (rid, layer), kept in dbg.kept_positions.items()
                if rid == req_id_prefix or rid.startswith(req_id_prefix + "-")}

    def snapkv_attention_impls(self) -> dict[str, str]:
        """Attention layer name -> impl class name, and the backend each group uses."""
        runner = self.model_runner  # type: ignore[attr-defined]
        ctx = runner.compilation_config.static_forward_context
        out = {}
        for name, layer in ctx.items():
            impl = getattr(layer, "impl", None)
            if impl is not None:
                out[name] = type(impl).__name__
        for groups in getattr(runner, "attn_groups", []):
            for g in groups:
                out[f"backend:{g.layer_names[0]}"] = g.backend.__name__
                builder = g.get_metadata_builder(0)
                out[f"builder:{g.layer_names[0]}"] = type(builder).__name__
        return out


# ---------------------------------------------------------------------------------------------
# Platform classes, built on first access
# ---------------------------------------------------------------------------------------------


def _named(cls: type, name: str) -> type:
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    return cls


def _build_cpu_classes() -> dict[str, type]:
    from vllm.v1.worker import cpu_worker as _cpu_worker_mod
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    class SnapKVCPUModelRunner(SnapKVModelRunnerMixin, CPUModelRunner):
        """``CPUModelRunner`` that publishes each step's per-row compression facts."""

    class SnapKVCPUWorker(SnapKVWorkerMixin, CPUWorker):
        """``CPUWorker`` with the SnapKV attention backend and model runner."""

        def __init__(self, vllm_config, local_rank: int, rank: int,
                     distributed_init_method: str, is_driver_worker: bool = False) -> None:
            super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                             is_driver_worker=is_driver_worker)
            self.snapkv_config = CompressionConfig.from_vllm_config(vllm_config)
            install_cpu_backend()

        def init_device(self):
            if getattr(self, "use_v2_model_runner", False):
                raise RuntimeError(_V2_RUNNER_ERROR)
            install_cpu_backend()
            # CPUWorker.init_device builds `CPUModelRunner(...)` by its module-global name;
            # point that name at our subclass for the duration of the call (this process only).
            original = _cpu_worker_mod.CPUModelRunner
            _cpu_worker_mod.CPUModelRunner = SnapKVCPUModelRunner
            try:
                return super().init_device()
            finally:
                _cpu_worker_mod.CPUModelRunner = original

    return {"SnapKVCPUModelRunner": _named(SnapKVCPUModelRunner, "SnapKVCPUModelRunner"),
            "SnapKVCPUWorker": _named(SnapKVCPUWorker, "SnapKVCPUWorker")}


def _build_gpu_classes() -> dict[str, type]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class SnapKVGPUModelRunner(SnapKVModelRunnerMixin, GPUModelRunner):
        """The V1 ``GPUModelRunner`` that publishes each step's per-row compression facts."""

    class SnapKVGPUWorker(SnapKVWorkerMixin, Worker):
        """vLLM's GPU ``Worker`` with the SnapKV FlashAttention backend (``CUSTOM``) and the V1
        model runner (:class:`SnapKVGPUModelRunner`)."""

        def __init__(self, vllm_config, local_rank: int, rank: int,
                     distributed_init_method: str, is_driver_worker: bool = False) -> None:
            super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                             is_driver_worker=is_driver_worker)
            self.snapkv_config = CompressionConfig.from_vllm_config(vllm_config)
            if self.snapkv_config.enabled:
                _require_custom_backend(vllm_config)
            install_cuda_backend()

        def init_device(self):
            if self.use_v2_model_runner:
                raise RuntimeError(_V2_RUNNER_ERROR)
            install_cuda_backend()
            return super().init_device()

        def _make_model_runner(self):
            # Worker.init_device -> _init_workspace_and_model_runner -> here.
            if self.use_v2_model_runner:
                raise RuntimeError(_V2_RUNNER_ERROR)
            return SnapKVGPUModelRunner(self.vllm_config, self.device)

    return {"SnapKVGPUModelRunner": _named(SnapKVGPUModelRunner, "SnapKVGPUModelRunner"),
            "SnapKVGPUWorker": _named(SnapKVGPUWorker, "SnapKVGPUWorker")}


def _require_custom_backend(vllm_config) -> None:
    """The GPU worker's attention must be the SnapKV backend: the scheduler frees evicted
    blocks, which a vanilla backend would still read. The plugin sets ``CUSTOM``; a config that
    bypassed it (``--worker-cls`` by hand) is pointed at ``CUSTOM`` here, or refused."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    att = vllm_config.attention_config
    if att.backend_per_kind:
        raise ValueError("vllm-snapkv: --kv-compression cannot be combined with per-kind "
                         "attention backends (attention_config.backend_per_kind)")
    if att.backend in (None, AttentionBackendEnum.FLASH_ATTN):
        logger.info("snapkv: attention backend %s -> CUSTOM (SnapKV FlashAttention)",
                    att.backend.name if att.backend is not None else "auto")
        att.backend = AttentionBackendEnum.CUSTOM
    elif att.backend != AttentionBackendEnum.CUSTOM:
        raise ValueError(f"vllm-snapkv: --kv-compression on CUDA runs on FlashAttention; "
                         f"--attention-backend {att.backend.name} is not supported")


_PLATFORM_CLASSES = {
    "SnapKVCPUModelRunner": _build_cpu_classes,
    "SnapKVCPUWorker": _build_cpu_classes,
    "SnapKVGPUModelRunner": _build_gpu_classes,
    "SnapKVGPUWorker": _build_gpu_classes,
}
_built: dict[str, type] = {}


def __getattr__(name: str) -> type:
    builder = _PLATFORM_CLASSES.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        _built.update(builder())
    return _built[name]
