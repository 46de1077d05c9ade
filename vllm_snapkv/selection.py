"""Which positions each KV head keeps: the part every method shares (pure torch, no vLLM).

A method (:mod:`vllm_snapkv.methods`) only ranks positions. This module does the rest, once:

* how many positions are kept (:func:`kept_count`: a ``budget``, or kvpress's count for a
  ``ratio``) — pure Python, because the scheduler and the workers must derive the same number
  from the same inputs without talking;
* the first ``sinks`` positions and the last ``window`` positions are always kept;
* of the positions between them, the top ``kept - window - sinks`` by the method's score, ties
  broken towards the *lower* position (a stable descending sort), so results are deterministic
  on every device;
* the result is ascending per KV head; a sequence no longer than the kept count comes back whole.

The positions are those of whatever is being compacted: a prompt at the end of prefill, the part
of a prompt read so far, or a request's attended cache during decode (:mod:`vllm_snapkv.schedule`).
SnapKV's vote and its exact semantics are in :mod:`vllm_snapkv.methods.snapkv`;
``docs/selection.md`` has the full table.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_snapkv.settings import (
    DEFAULT_GQA_AGGREGATION,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_REDUCTION,
    DEFAULT_WINDOW,
    CompressionSettings,
)

__all__ = [
    "effective_budget",
    "kept_count",
    "select_from_scores",
    "select_tokens",
    "select_tokens_with_settings",
]


def effective_budget(num_tokens: int, settings: CompressionSettings) -> int:
    """Tokens a prompt of ``num_tokens`` may keep per KV head before the "keep whole" rule.

    With ``budget`` set this is the budget. With ``ratio`` it is kvpress's count,
    ``max(1, int(N * (1.0 - compression_ratio)))`` with ``compression_ratio = 1.0 - ratio`` — the
    very float expression kvpress evaluates, so a run of kvpress at ``compression_ratio = 1 - r``
    keeps exactly as many tokens as we do at ``ratio = r`` (``1.0 - (1.0 - r)`` is not always
    ``r`` in binary floating point, and ``int`` truncates) — then raised to at least
    ``window + sinks + 1``, the smallest budget that is valid when set explicitly (always keep the
    window, the sinks and at least one scored token). The raise keeps the kept count monotone in N.
    """
    if settings.budget is not None:
        return settings.budget
    compression_ratio = 1.0 - settings.ratio
    n_kvpress = max(1, int(num_tokens * (1.0 - compression_ratio)))
    return max(n_kvpress, settings.window + settings.sinks + 1)


def kept_count(num_tokens: int, settings: CompressionSettings) -> int:
    """Number of prompt positions each KV head keeps for a prompt of ``num_tokens`` tokens.

    ``min(N, effective_budget(N, settings))``: prompts not longer than the budget are kept whole.
    Pure Python on purpose — the scheduler and the workers (through the compaction schedule,
    :mod:`vllm_snapkv.schedule`) must derive the same count from (N, settings) without talking.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return min(num_tokens, effective_budget(num_tokens, settings))


def select_from_scores(scores: torch.Tensor, num_tokens: int, settings: CompressionSettings,
                       keep: int | None = None) -> torch.Tensor:
    """Kept positions from a method's scores.

    Args:
        scores: ``[Hkv, N - w]`` scores of the positions before the window (higher = keep).
        num_tokens: N, the positions being compacted.
        settings: window and sinks are read from it (and budget/ratio when ``keep`` is None).
        keep: how many to keep per KV head; ``None`` = :func:`kept_count`. Must exceed
            ``window + sinks`` when below N.

    Returns:
        int64 ``[Hkv, keep]`` ascending positions: ``0..sinks-1``, then the top
        ``keep - w - sinks`` of ``[sinks, N - w)`` by score (ties → lower position, via a stable
        descending sort), then ``N - w .. N - 1``.
    """
    n = num_tokens
    kept = kept_count(n, settings) if keep is None else min(int(keep), n)
    hkv = scores.shape[0]
    device = scores.device
    if kept >= n:
        return torch.arange(n, device=device, dtype=torch.long).expand(hkv, n).contiguous()
    window, sink = settings.window, settings.sinks
    prefix = n - window
    if scores.dim() != 2 or scores.shape[1] != prefix:
        raise ValueError(f"scores must be [num_kv_heads, {prefix}], got {tuple(scores.shape)}")
    n_top = kept - window - sink
    if n_top < 1:
        raise ValueError(f"keep={kept} must exceed window + sinks ({window} + {sink})")
    order = torch.sort(scores[:, sink:], dim=-1, descending=True, stable=True).indices
    top = torch.sort(order[:, :n_top] + sink, dim=-1).values
    sinks = torch.arange(sink, device=device, dtype=torch.long).expand(hkv, sink)
    win = torch.arange(prefix, n, device=device, dtype=torch.long).expand(hkv, window)
    return torch.cat([sinks, top, win], dim=-1)


def select_tokens_with_settings(
    queries: torch.Tensor | None,
    keys: torch.Tensor,
    settings: CompressionSettings,
    *,
    keep: int | None = None,
    method: str | None = None,
    values: torch.Tensor | None = None,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`select_tokens` with ready settings: the integration path.

    ``method`` (default ``settings.method``, configured with the settings' parameters) ranks
    the positions; ``keep`` (default :func:`kept_count`) is how many each KV head keeps.
    ``queries`` may be ``None`` for methods that do not use them; ``values`` (``[Hkv, N, D]``)
    are handed to the method (the engine always has them).
    """
    if keys.dim() != 3:
        raise ValueError(f"expected keys [num_kv_heads, N, head_dim], got {tuple(keys.shape)}")
    hkv, n, _ = keys.shape
    kept = kept_count(n, settings) if keep is None else min(int(keep), n)
    if kept >= n:
        # Nothing to evict, and no need for (possibly fewer than w) window queries.
        return torch.arange(n, device=keys.device, dtype=torch.long).expand(hkv, n).contiguous()
    impl = settings.scorer(method)
    if impl.uses_queries and queries is None:
        raise ValueError(f"method {impl.name!r} needs the window's queries")
    scores = impl.score(keys, values, queries if impl.uses_queries else None,
                        window=settings.window, tile_size=tile_size, score_dtype=score_dtype)
    return select_from_scores(scores, n, settings, kept)


def select_tokens(
    queries: torch.Tensor | None,
    keys: torch.Tensor,
    *,
    method: str = "snapkv",
    budget: int | None = None,
    ratio: float | None = None,
    window: int = DEFAULT_WINDOW,
    kernel: int = DEFAULT_KERNEL,
    pooling: str = DEFAULT_POOLING,
    reduction: str = DEFAULT_REDUCTION,
    gqa_aggregation: str = DEFAULT_GQA_AGGREGATION,
    sink: int | None = None,
    values: torch.Tensor | None = None,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
    **params: Any,
) -> torch.Tensor:
    """Positions each KV head keeps under ``method`` (default SnapKV, arXiv:2404.14469).

    Args:
        queries: ``[num_query_heads, window, head_dim]`` post-RoPE queries of the last
            ``window`` positions (any float dtype; scored in ``score_dtype``); may be ``None``
            for query-agnostic methods (``recency``, ``keydiff``, ``knorm``).
        keys: ``[num_kv_heads, N, head_dim]`` post-RoPE keys of the whole sequence.
        method: a registered method name (:func:`vllm_snapkv.methods.method_names`).
        budget / ratio: exactly one — tokens kept (window and sinks included) or fraction kept.
        window, kernel, pooling, reduction, gqa_aggregation, sink: see
            :class:`vllm_snapkv.settings.CompressionSettings` (``sink=None``: the method's default);
            invalid values raise :class:`vllm_snapkv.settings.SettingsError`.
        values: ``[num_kv_heads, N, head_dim]``, for methods that score values.
        tile_size: keys per scoring tile (memory bound); ``None`` = automatic.
        score_dtype: dtype of the score computation (default fp32).
        params: other methods' parameters by name (e.g. ``vnorm_order=1``).

    Returns:
        int64 tensor ``[num_kv_heads, kept]`` of ascending positions, on ``keys.device``;
        ``kept = kept_count(N, settings)``, and the whole sequence when ``N <= kept``.
    """
    settings = CompressionSettings(
        method=method,
        budget=budget,
        ratio=ratio,
        window=window,
        kernel=kernel,
        pooling=pooling,
        reduction=reduction,
        gqa_aggregation=gqa_aggregation,
        sink=sink,
        **params,
    )
    return select_tokens_with_settings(
        queries, keys, settings, values=values, tile_size=tile_size, score_dtype=score_dtype
    )
