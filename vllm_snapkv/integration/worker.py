"""The SnapKV workers: ``parallel_config.worker_cls`` is

* ``"vllm_snapkv.integration.worker.SnapKVCPUWorker"`` on vLLM's CPU platform, and
* ``"vllm_snapkv.integration.worker.SnapKVGPUWorker"`` on CUDA (not run on a GPU yet: ``docs/cuda.md``).

In the worker process each

1. installs the SnapKV attention backend before the model is built: on CPU
   :class:`vllm_snapkv.integration.attention_cpu.SnapKVCPUBackend` in place of ``CPU_ATTN``
   (``register_backend``; the CPU platform always picks ``CPU_ATTN``); on CUDA
   :class:`vllm_snapkv.integration.attention_cuda.SnapKVFlashAttentionBackend` as ``CUSTOM`` (the plugin sets
   ``attention_config.backend = CUSTOM``), and
2. registers the SnapKV KV-cache spec (:mod:`vllm_snapkv.integration.kv_cache`), which the SnapKV backends
   give every full-attention layer, and
3. runs a model runner (:class:`SnapKVCPUModelRunner` / :class:`SnapKVGPUModelRunner`, both
   V1 model runners with :class:`SnapKVModelRunnerMixin`) that owns a
   :class:`~vllm_snapkv.backends.state.RunnerState` and, each step, publishes per batch row what
   the attention backend needs (request id, ``num_computed_tokens`` before the step, the
   request's :class:`~vllm_snapkv.config.RequestPlan`) — see :mod:`vllm_snapkv.backends.plan`.

``num_computed_tokens`` is never touched: positions, slot mapping and the scheduler keep their
true values; only what attention reads shrinks.

The worker classes are built on first access (module ``__getattr__``): importing vLLM's CPU
worker module monkeypatches ``torch.cuda`` (``vllm/v1/worker/cpu/shm.py``), so it must never be
imported in a CUDA worker, and this module imports neither platform's worker until asked.

Worker RPCs (``LLM.collective_rpc(name)``): ``snapkv_report`` (compactions done, debug errors,
cache layouts), ``snapkv_set_debug(enabled)``, ``snapkv_kept(req_id)`` (debug: kept positions per
compaction), ``snapkv_attention_impls`` (impl class per attention layer).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_snapkv.integration import seam
from vllm_snapkv.backends.plan import RowState
from vllm_snapkv.backends.state import RunnerState
from vllm_snapkv.config import CompressionConfig

#: Dotted path of the CPU backend class, as ``register_backend`` wants it.
CPU_BACKEND_PATH = "vllm_snapkv.integration.attention_cpu.SnapKVCPUBackend"
#: Dotted path of the CUDA backend class, registered as ``AttentionBackendEnum.CUSTOM``.
CUDA_BACKEND_PATH = "vllm_snapkv.integration.attention_cuda.SnapKVFlashAttentionBackend"

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

_V2_RUNNER_ERROR = ("vllm-snapkv needs vLLM's V1 model runner (input_batch); Model Runner V2 "
                    "is not supported (set VLLM_USE_V2_MODEL_RUNNER=0)")


def _install_backend(slot: str, path: str) -> None:
    """Make ``AttentionBackendEnum.<slot>`` resolve to ``path`` in this process (idempotent).
    Only stores a class path: the backend module is imported when vLLM selects it."""
    member = seam.get(f"AttentionBackendEnum.{slot}")
    try:
        current = member.get_path()
    except ValueError:  # CUSTOM not registered yet
        current = None
    if current != path:
        seam.get("register_backend")(member, path)
        # A backend resolved earlier in this process would otherwise stay cached.
        seam.get("_cached_get_attn_backend").cache_clear()


@seam.uses("AttentionBackendEnum.CPU_ATTN")
def install_cpu_backend() -> None:
    """Make ``CPU_ATTN`` resolve to the SnapKV CPU backend in this process (idempotent)."""
    _install_backend("CPU_ATTN", CPU_BACKEND_PATH)


def install_cuda_backend() -> None:
    """Register the SnapKV FlashAttention backend as ``CUSTOM`` in this process (idempotent)."""
    _install_backend("CUSTOM", CUDA_BACKEND_PATH)


def _worker_setup(vllm_config) -> CompressionConfig:
    """What both workers do first: the engine's config and the SnapKV KV-cache spec."""
    from vllm_snapkv.integration.kv_cache import register_spec

    register_spec(vllm_config)
    return CompressionConfig.from_vllm_config(vllm_config)


# ---------------------------------------------------------------------------------------------
# Shared by the CPU and GPU model runners / workers
# ---------------------------------------------------------------------------------------------


class SnapKVModelRunnerMixin:
    """Per-step publishing of the batch's compression facts; mixed into a V1 model runner
    (``GPUModelRunner`` or its subclass ``CPUModelRunner``), before it in the MRO."""

    @seam.overrides("CPUModelRunner.__init__")
    def __init__(self, vllm_config, device: torch.device) -> None:
        # The state first: the attention builders (made during super().__init__ or later, with
        # this vllm_config) look it up.
        self.snapkv_state = RunnerState(vllm_config)
        super().__init__(vllm_config, device)  # type: ignore[call-arg]
        self.snapkv_config = CompressionConfig.from_vllm_config(vllm_config)
        # req_id -> (prompt_len, orders, RequestPlan | None): pure functions of the request and
        # of the scheduler's pressure orders, cached.
        self._snapkv_plans: dict[str, tuple[int, tuple[int, ...], Any]] = {}
        # This step's pressure orders (the connector metadata): req_id -> ordered points.
        self._snapkv_orders: dict[str, tuple[int, ...]] = {}
        self._snapkv_in_step = False

    @property
    @seam.uses("GPUModelRunner.vllm_config", "CacheConfig.block_size")
    def snapkv_block_size(self) -> int:
        """The block size the scheduler allocates with (schedules must match its exactly).

        Read when used, not at construction: vLLM 0.33 resolves the CPU default (128) in the
        worker process after the model runner is built (``update_block_size_for_backend``, in
        place on this config); while ``__init__`` runs it is still ``CacheConfig``'s 16."""
        return int(self.vllm_config.cache_config.block_size)  # type: ignore[attr-defined]

    # -- request lifecycle --------------------------------------------------------------------

    @seam.overrides("GPUModelRunner._update_states")
    def _update_states(self, scheduler_output):
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        if gone:
            for rid in gone:
                self._snapkv_plans.pop(rid, None)
            self.snapkv_state.forget(gone)
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    @seam.uses("GPUModelRunner.requests")
    def _snapkv_plan(self, req_id: str, prompt_len: int):
        orders = self._snapkv_orders.get(req_id, ())
        cached = self._snapkv_plans.get(req_id)
        if cached is not None and cached[0] == prompt_len and cached[1] == orders:
            return cached[2]
        plan = None
        req = self.requests.get(req_id)  # type: ignore[attr-defined]
        sp = getattr(req, "sampling_params", None) if req is not None else None
        if sp is not None:  # pooling requests are never compressed
            plan = self.snapkv_config.request_plan(prompt_len, self.snapkv_block_size,
                                                   sp.extra_args, orders)
        self._snapkv_plans[req_id] = (prompt_len, orders, plan)
        return plan

    @seam.uses(
        "GPUModelRunner.input_batch",
        "InputBatch.num_computed_tokens_cpu",
        "InputBatch.num_prompt_tokens",
        "InputBatch.req_ids",
        "InputBatch.num_reqs",
    )
    def snapkv_rows(self) -> tuple[RowState, ...]:
        """Per-row facts of the current persistent batch (pre-step values)."""
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        prompt = ib.num_prompt_tokens[:n].tolist()
        computed = ib.num_computed_tokens_cpu[:n].tolist()
        return tuple(RowState(req_id, int(computed[i]), self._snapkv_plan(req_id, int(prompt[i])))
                     for i, req_id in enumerate(ib.req_ids[:n]))

    # -- per-step hooks -----------------------------------------------------------------------

    @seam.uses("SchedulerOutput.kv_connector_metadata")
    @seam.overrides("GPUModelRunner.execute_model")
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if self.snapkv_config.pressure:
            from vllm_snapkv.integration.connector import find_metadata

            meta = find_metadata(getattr(scheduler_output, "kv_connector_metadata", None))
            self._snapkv_orders = meta.orders if meta is not None else {}
        self._snapkv_in_step = True
        try:
            return super().execute_model(  # type: ignore[misc]
                scheduler_output, intermediate_tensors)
        finally:
            self._snapkv_in_step = False
            self.snapkv_state.current_rows = None

    @seam.overrides("GPUModelRunner._build_attention_metadata")
    def _build_attention_metadata(self, *args, **kwargs):
        # Runs after _update_states/_prepare_inputs (rows in their final order, num_computed
        # still the pre-step value) and right before every group's builder. Dummy/profile runs
        # (outside execute_model) publish nothing, so their builders act as vanilla.
        self.snapkv_state.current_rows = (self.snapkv_rows() if self._snapkv_in_step and
                                          self.snapkv_config.enabled else None)
        return super()._build_attention_metadata(*args, **kwargs)  # type: ignore[misc]


class SnapKVWorkerMixin:
    """The SnapKV worker RPCs (``LLM.collective_rpc``), shared by the CPU and GPU workers."""

    @seam.uses("CPUWorker.model_runner")
    def _snapkv_state(self) -> RunnerState:
        return self.model_runner.snapkv_state  # type: ignore[attr-defined]

    @seam.uses("CPUWorker.model_runner")
    def snapkv_report(self) -> dict:
        """Compactions done in this worker, the debug recorder's errors (if enabled), the cache
        layouts used."""
        out = self._snapkv_state().report()
        out["model_runner"] = type(self.model_runner).__name__  # type: ignore[attr-defined]
        return out

    def snapkv_set_debug(self, enabled: bool = True) -> bool:
        state = self._snapkv_state()
        state.set_debug(bool(enabled))
        return state.debug is not None

    def snapkv_kept(self, req_id_prefix: str, phase: str | None = None) -> dict:
        """Debug mode: layer -> kept original positions per KV head of the request(s) whose
        worker-side id starts with ``req_id_prefix`` (the offline API appends a suffix), at its
        last compaction of ``phase`` (default: the prompt compaction, else the last one). With
        ``phase="all"``: layer -> [(at, phase, positions)] for every compaction; with
        ``phase="before_recompute"``: the same for its last run before a preemption's recompute
        started over."""
        dbg = self._snapkv_state().debug
        if dbg is None:
            return {}
        out: dict = {}
        source = dbg.kept_before_recompute if phase == "before_recompute" else dbg.kept_history
        for (rid, layer), hist in source.items():
            if not (rid == req_id_prefix or rid.startswith(req_id_prefix + "-")):
                continue
            if phase in ("all", "before_recompute"):
                out[layer] = [(at, ph, kept.tolist()) for at, ph, kept in hist]
                continue
            wanted = [h for h in hist if h[1] == (phase or "prompt")] or \
                ([] if phase else hist)
            if wanted:
                out[layer] = wanted[-1][2].tolist()
        return out

    @seam.uses("CPUWorker.model_runner")
    @seam.uses("GPUModelRunner.attn_groups")
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
    _cpu_worker_mod = seam.module("cpu_worker.CPUModelRunner")
    CPUModelRunner = seam.get("CPUModelRunner")
    CPUWorker = seam.get("CPUWorker")

    class SnapKVCPUModelRunner(SnapKVModelRunnerMixin, CPUModelRunner):
        """``CPUModelRunner`` that publishes each step's per-row compression facts."""

    class SnapKVCPUWorker(SnapKVWorkerMixin, CPUWorker):
        """``CPUWorker`` with the SnapKV attention backend and model runner."""

        @seam.overrides("CPUWorker.__init__")
        def __init__(self, vllm_config, local_rank: int, rank: int,
                     distributed_init_method: str, is_driver_worker: bool = False) -> None:
            super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                             is_driver_worker=is_driver_worker)
            self.snapkv_config = _worker_setup(vllm_config)
            install_cpu_backend()

        @seam.uses("Worker.use_v2_model_runner")
        @seam.overrides("CPUWorker.init_device builds CPUModelRunner")
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
    GPUModelRunner = seam.get("GPUModelRunner")
    Worker = seam.get("Worker")

    class SnapKVGPUModelRunner(SnapKVModelRunnerMixin, GPUModelRunner):
        """The V1 ``GPUModelRunner`` that publishes each step's per-row compression facts."""

    class SnapKVGPUWorker(SnapKVWorkerMixin, Worker):
        """vLLM's GPU ``Worker`` with the SnapKV FlashAttention backend (``CUSTOM``) and the V1
        model runner (:class:`SnapKVGPUModelRunner`)."""

        def __init__(self, vllm_config, local_rank: int, rank: int,
                     distributed_init_method: str, is_driver_worker: bool = False) -> None:
            super().__init__(vllm_config, local_rank, rank, distributed_init_method,
                             is_driver_worker=is_driver_worker)
            self.snapkv_config = _worker_setup(vllm_config)
            if self.snapkv_config.enabled:
                _require_custom_backend(vllm_config)
            install_cuda_backend()

        def init_device(self):
            if self.use_v2_model_runner:
                raise RuntimeError(_V2_RUNNER_ERROR)
            install_cuda_backend()
            return super().init_device()

        @seam.overrides("Worker._make_model_runner")
        @seam.uses("Worker.use_v2_model_runner")
        def _make_model_runner(self):
            # Worker.init_device -> _init_workspace_and_model_runner -> here.
            if self.use_v2_model_runner:
                raise RuntimeError(_V2_RUNNER_ERROR)
            return SnapKVGPUModelRunner(self.vllm_config, self.device)

    return {"SnapKVGPUModelRunner": _named(SnapKVGPUModelRunner, "SnapKVGPUModelRunner"),
            "SnapKVGPUWorker": _named(SnapKVGPUWorker, "SnapKVGPUWorker")}


@seam.uses("AttentionBackendEnum.CUSTOM", "AttentionBackendEnum.FLASH_ATTN")
def _require_custom_backend(vllm_config) -> None:
    """The GPU worker's attention must be the SnapKV backend: the scheduler frees evicted
    blocks, which a vanilla backend would still read. The plugin sets ``CUSTOM``; a config that
    bypassed it (``--worker-cls`` by hand) is pointed at ``CUSTOM`` here, or refused."""
    AttentionBackendEnum = seam.get("AttentionBackendEnum")
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
