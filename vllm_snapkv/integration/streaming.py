"""The per-request SnapKV summary in streaming ``/v1/completions`` and ``/v1/chat/completions``.

vLLM 0.32 copies a finished request's ``kv_transfer_params`` (where the SnapKV scheduler puts
``{"snapkv": {...}}``, see :func:`vllm_snapkv.metrics.request_summary`) into non-streaming
responses only; its stream generators (``OpenAIServingCompletion.completion_stream_generator``,
``OpenAIServingChat.chat_completion_stream_generator``) drop it although the final engine output
carries it. :func:`install` wraps those two generators in the API-server process:

* the engine outputs a generator consumes (its ``result_generator`` argument) are watched, so the
  wrapper knows which output each chunk was built from;
* a chunk built from an output that carries a SnapKV summary and whose choice has a
  ``finish_reason`` gets ``"kv_transfer_params": {"snapkv": {...}}`` added — the same object the
  non-streaming response carries. The usage-only chunk that ``stream_options.include_usage``
  appends has no choice and is left alone.

Every other chunk passes through untouched and unparsed; with compression off no output carries
a summary, so nothing changes at all. No vLLM file is patched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from vllm_snapkv.integration import seam
from vllm_snapkv.metrics import RESPONSE_KEY

logger = logging.getLogger("vllm_snapkv")

#: The argument through which vLLM hands a stream generator its engine outputs.
RESULTS_ARG = "result_generator"
#: (the stream generator's hook, engine output of one item of its ``result_generator``):
#: completions iterate ``(prompt index, RequestOutput)``, chat iterates ``RequestOutput``.
TARGETS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("OpenAIServingCompletion.completion_stream_generator", lambda item: item[1]),
    ("OpenAIServingChat.chat_completion_stream_generator", lambda item: item),
)
_DATA = "data: "

_installed = False


def add_summary(event: str, summary: dict[str, Any]) -> str:
    """``event`` (one server-sent ``data:`` event) with ``kv_transfer_params.snapkv`` set when
    one of its choices has a ``finish_reason``; any other event unchanged."""
    if not event.startswith(_DATA):
        return event
    try:
        body = json.loads(event[len(_DATA):])
    except ValueError:  # "data: [DONE]"
        return event
    if not isinstance(body, dict) or not any(
            isinstance(c, dict) and c.get("finish_reason") for c in body.get("choices") or []):
        return event
    body["kv_transfer_params"] = {**(body.get("kv_transfer_params") or {}),
                                  RESPONSE_KEY: summary}
    return f"{_DATA}{json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _summary(output: Any) -> dict[str, Any] | None:
    params = getattr(output, "kv_transfer_params", None)
    return params.get(RESPONSE_KEY) if isinstance(params, dict) else None


def _with_summaries(original: Callable[..., Any], output_of: Callable[[Any], Any]
                    ) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
        bound = signature.bind(*args, **kwargs)
        current: list[Any] = [None]  # the engine output the chunks being yielded come from

        async def watched(results: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for item in results:
                current[0] = output_of(item)
                yield item

        bound.arguments[RESULTS_ARG] = watched(bound.arguments[RESULTS_ARG])
        async with contextlib.aclosing(original(*bound.args, **bound.kwargs)) as events:
            async for event in events:
                summary = _summary(current[0])
                yield event if summary is None else add_summary(event, summary)

    return stream


@seam.uses("OpenAIServingCompletion.completion_stream_generator",
           "OpenAIServingChat.chat_completion_stream_generator")
def install() -> bool:
    """Wrap vLLM's two stream generators (once per process). Returns whether they are wrapped.

    A vLLM whose generators no longer take ``result_generator`` is left alone with a warning:
    streaming keeps working, only without the field.
    """
    global _installed
    if _installed:
        return True
    found = []
    for hook, output_of in TARGETS:
        class_name, method = hook.split(".")
        try:
            original = seam.get(hook)
        except seam.IncompatibleVLLM:
            original = None
        if original is None or not seam.accepts(hook, RESULTS_ARG):
            logger.warning("SnapKV: %s(%s=...) not found in this vLLM; streaming responses will "
                           "not carry kv_transfer_params.%s", hook, RESULTS_ARG, RESPONSE_KEY)
            return False
        found.append((getattr(seam.module(hook), class_name), method, original, output_of))
    for cls, method, original, output_of in found:
        setattr(cls, method, _with_summaries(original, output_of))
    _installed = True
    return True
