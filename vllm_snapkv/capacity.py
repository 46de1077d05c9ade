"""How much KV a request needs at its peak, when prompts are compacted while they are read.

vLLM sizes its KV pool so that one request of ``max_model_len`` tokens fits, admits a request
only when its whole prompt fits in the free blocks, and assumes a running request can always
grow. With ``--snapkv-prefill-budget`` a prompt never holds more than about the prefill budget
plus one interval while it is read, so prompts far larger than the pool can run — provided
every one of those three rules uses the request's real peak instead of its length:

* start-up: the spec's memory need is :func:`engine_min_blocks` (the largest prompt the model
  takes, read with compactions, plus its first generated token), not ``max_model_len``
  (:meth:`vllm_snapkv.integration.kv_cache.SnapKVAttentionSpec.max_memory_usage_bytes`);
* admission: a new request must find :func:`peak_blocks` free blocks for its prompt, not
  ``ceil(N / bs)`` (:meth:`vllm_snapkv.integration.kv_cache.SnapKVFullAttentionManager.get_num_blocks_to_allocate`);
* and a request whose peak over its whole prompt *and* output (``max_tokens``) exceeds the pool
  can never run, so the API server refuses it up front with an HTTP 400 naming ``max_tokens``
  (:mod:`vllm_snapkv.integration.request_validation`) instead of leaving it waiting forever.

Without a prefill budget nothing here changes vLLM's behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.schedule import Schedule

__all__ = ["SLACK_BLOCKS", "engine_min_blocks", "peak_blocks", "relaxed"]

#: One block beyond the schedule's peak: under async scheduling a request's blocks are freed one
#: step after its compaction ran, while the next step's block is already allocated.
SLACK_BLOCKS = 1


def relaxed(config: CompressionConfig) -> bool:
    """Whether prompts are compacted while read (engine-level prefill budget)."""
    return config.enabled and config.settings is not None and \
        config.settings.prefill_budget is not None


def peak_blocks(schedule: Schedule | None, total_tokens: int, block_size: int) -> int:
    """Most blocks a request holds while processing ``total_tokens`` tokens (prompt and
    output), compactions included, plus :data:`SLACK_BLOCKS`."""
    if schedule is None:
        return -(-total_tokens // block_size) + SLACK_BLOCKS
    return schedule.max_held_blocks(total_tokens) + SLACK_BLOCKS


def request_peak_blocks(config: CompressionConfig, prompt_len: int, max_tokens: int,
                        block_size: int, extra_args: Mapping[str, Any] | None) -> int:
    """:func:`peak_blocks` of one request with its own settings (``extra_args``)."""
    schedule = config.schedule(prompt_len, block_size, extra_args)
    return peak_blocks(schedule, prompt_len + max(1, max_tokens), block_size)


def engine_min_blocks(config: CompressionConfig, max_model_len: int, block_size: int) -> int:
    """What the pool must hold for the engine to be useful at all with compaction while
    reading: the worst prompt length up to ``max_model_len`` read with the engine's settings,
    plus its first generated token. (Longer outputs are checked per request.)"""
    settings = config.settings
    assert settings is not None and settings.prefill_budget is not None
    sample = config.schedule(max_model_len, block_size, None)
    interval = sample.prefill_interval if sample is not None else block_size
    # A prompt holds the most just before a prefill compaction (P + C tokens attended) or at its
    # end; these prompt lengths reach both.
    lengths = {max_model_len - 1, settings.prefill_budget + interval,
               settings.prefill_budget + interval - 1}
    return max(peak_blocks(config.schedule(n, block_size, None), n + 1, block_size)
               for n in lengths if 0 < n < max_model_len)
