"""Attention-backend adapters for paged SnapKV.

* :mod:`vllm_snapkv.backends.core` — backend-agnostic logic (no cache layout, no vLLM imports
  beyond what callers pass in): prefill-completion detection, window queries and their stash for
  chunked prefill, selection + compaction through a
  :class:`~vllm_snapkv.backends.core.CacheAccessor`,
  the metadata shift arithmetic, and the debug comparison.
* :mod:`vllm_snapkv.backends.cpu` — the adapter for vLLM's ``CPU_ATTN`` backend.

Importing this package imports neither vLLM nor the adapters.
"""

#: Dotted path of the CPU backend class, as ``register_backend`` wants it.
CPU_BACKEND_PATH = "vllm_snapkv.backends.cpu.SnapKVCPUBackend"
