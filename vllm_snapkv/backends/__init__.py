"""Attention-backend adapters for paged compression.

Backend-agnostic, no cache layout:

* :mod:`.plan` — each step's plan per batch row (evicted slots to skip, compactions to run,
  queries to stash) and the metadata shift every adapter's builder applies;
* :mod:`.compaction` — after attention: rank the attended slots, move the kept K/V through a
  :class:`~.compaction.CacheAccessor`;
* :mod:`.stash` — the observation window's queries between steps;
* :mod:`.state` — what one model runner remembers between steps;
* :mod:`.debug` — the exactness oracle (off the hot path).

The layout-specific adapters that subclass vLLM's attention backends live in the integration
layer: :mod:`vllm_snapkv.integration.attention_cpu` (vLLM's ``CPU_ATTN``) and
:mod:`vllm_snapkv.integration.attention_cuda` (FlashAttention, registered as ``CUSTOM``).

Importing this package imports no vLLM (``tests/unit/test_boundary.py``).
"""
