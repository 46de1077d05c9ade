"""Attention-backend adapters for paged compression.

Backend-agnostic, no cache layout:

* :mod:`.plan` — each step's plan per batch row (evicted slots to skip, compactions to run,
  queries to stash) and the metadata shift every adapter's builder applies;
* :mod:`.compaction` — after attention: rank the attended slots, move the kept K/V through a
  :class:`~.compaction.CacheAccessor`;
* :mod:`.stash` — the observation window's queries between steps;
* :mod:`.state` — what one model runner remembers between steps;
* :mod:`.debug` — the exactness oracle (off the hot path).

Layout-specific adapters: :mod:`.cpu` (vLLM's ``CPU_ATTN``, layout probed from the kernel's own
write op) and :mod:`.cuda` (FlashAttention, registered as ``CUSTOM``).

Importing this package imports neither vLLM nor the adapters.
"""

#: Dotted path of the CPU backend class, as ``register_backend`` wants it.
CPU_BACKEND_PATH = "vllm_snapkv.backends.cpu.SnapKVCPUBackend"
#: Dotted path of the CUDA backend class, registered as ``AttentionBackendEnum.CUSTOM``.
CUDA_BACKEND_PATH = "vllm_snapkv.backends.cuda.SnapKVFlashAttentionBackend"
