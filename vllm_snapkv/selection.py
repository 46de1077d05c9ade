"""SnapKV token selection: which prompt positions each KV head keeps (pure torch, no vLLM).

SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469) observes that the attention the *last* few prompt tokens pay to the rest of the
prompt predicts which tokens generation will attend to. So at the end of prefill it takes the
queries of the last ``w`` prompt tokens (the observation window), attends them to the keys of the
whole prompt, sums the resulting probabilities over the window queries, smooths those votes along
the sequence with a 1-D pooling (so that a kept token brings its neighbours along — the paper calls
this clustering, and it is what keeps multi-token answers intact), and keeps, per KV head, the
top-scoring ``budget - w`` prefix positions plus the whole window.

Exact semantics implemented here (``docs/selection.md`` has the full table):

* Scores are ``softmax(Q_win Kᵀ / sqrt(d))`` over *all* N keys, computed in ``score_dtype``
  (fp32 by default, whatever the input dtype). Window query ``i`` sits at prompt position
  ``N - w + i`` and sees keys ``<= N - w + i`` (causal mask inside the window), so window keys are
  in every softmax denominator, as in the reference implementation and kvpress.
* Only the prefix ``[0, N - w)`` is scored; the window is kept unconditionally.
* Per query head: reduce over the window queries (``sum`` or ``mean``), then pool along the prefix
  (``avg`` with zero padding counted — ``F.avg_pool1d`` semantics — or ``max``; odd kernel,
  stride 1, same length). Then aggregate each KV head's query group (``mean`` or ``max``); query
  head ``h`` belongs to KV head ``h // (Hq // Hkv)`` (HF/vLLM layout). Pool-then-aggregate is the
  order of kvpress ``SnapKVPress`` and of the reference, whose per-head scores are pooled per head.
* Keep the first ``sink`` positions, the top ``kept - w - sink`` of the remaining prefix positions
  by smoothed score, and the ``w`` window positions. Ties are broken towards the *lower* position
  (a stable descending sort), so the result is deterministic on every device.
* A prompt with ``N <= kept_count`` is returned whole.
* ``scorer="recency"`` replaces the vote by the position itself (:func:`recency_scores`), so the
  same selection keeps the sinks and the most recent ``kept - sink`` tokens — the baseline.

Memory: the textbook computation materialises ``[Hq, w, N]`` probabilities (151 MB for SmolLM2
shapes at 128K tokens). Above ``tile_size`` keys, :func:`window_scores` instead makes two passes
over key tiles — first the per-query log-sum-exp (softmax denominator), then the normalised
probabilities, reduced over the window as each tile is produced — so the extra memory is
``O(Hq·w·tile + Hq·N)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_snapkv.settings import (
    DEFAULT_GQA_AGGREGATION,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_REDUCTION,
    DEFAULT_WINDOW,
    SnapKVSettings,
)

__all__ = [
    "DEFAULT_TILE_ELEMENTS",
    "MIN_TILE_SIZE",
    "effective_budget",
    "kept_count",
    "recency_scores",
    "resolve_tile_size",
    "select_from_scores",
    "select_tokens",
    "select_tokens_with_settings",
    "window_scores",
]

#: Default working-set bound for one score tile: ``Hq * w * tile`` elements (16 MiB in fp32).
#: For SmolLM2 shapes (Hq=9, w=32) that is a tile of ~14.5K keys, so prompts up to that length take
#: the single-pass path.
DEFAULT_TILE_ELEMENTS = 1 << 22
#: Lower bound for the automatic tile size, so that models with very many heads still get tiles
#: large enough for efficient matmuls.
MIN_TILE_SIZE = 512


# ---------------------------------------------------------------------------------------------
# How many tokens are kept: a pure function of (N, settings), shared with scheduler-side code.
# ---------------------------------------------------------------------------------------------


def effective_budget(num_tokens: int, settings: SnapKVSettings) -> int:
    """Tokens a prompt of ``num_tokens`` may keep per KV head before the "keep whole" rule.

    With ``budget`` set this is the budget. With ``ratio`` it is kvpress's count,
    ``max(1, int(N * (1.0 - compression_ratio)))`` with ``compression_ratio = 1.0 - ratio`` — the
    very float expression kvpress evaluates, so a run of kvpress at ``compression_ratio = 1 - r``
    keeps exactly as many tokens as we do at ``ratio = r`` (``1.0 - (1.0 - r)`` is not always
    ``r`` in binary floating point, and ``int`` truncates) — then raised to at least
    ``window + sink + 1``, the smallest budget that is valid when set explicitly (always keep the
    window, the sinks and at least one scored token). The raise keeps the kept count monotone in N.
    """
    if settings.budget is not None:
        return settings.budget
    compression_ratio = 1.0 - settings.ratio
    n_kvpress = max(1, int(num_tokens * (1.0 - compression_ratio)))
    return max(n_kvpress, settings.window + settings.sink + 1)


def kept_count(num_tokens: int, settings: SnapKVSettings) -> int:
    """Number of prompt positions each KV head keeps for a prompt of ``num_tokens`` tokens.

    ``min(N, effective_budget(N, settings))``: prompts not longer than the budget are kept whole.
    Pure Python on purpose — the scheduler, the workers and the placement code must all derive the
    same count from (N, settings) without talking to each other.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return min(num_tokens, effective_budget(num_tokens, settings))


def resolve_tile_size(num_query_heads: int, window: int, tile_size: int | None) -> int:
    """The tile size (keys per tile) actually used: ``tile_size`` or the automatic default."""
    if tile_size is None:
        return max(MIN_TILE_SIZE, DEFAULT_TILE_ELEMENTS // max(1, num_query_heads * window))
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be an integer >= 1 or None, got {tile_size!r}")
    return tile_size


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _check_inputs(queries: torch.Tensor, keys: torch.Tensor, window: int) -> tuple[int, int]:
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            "expected queries [num_query_heads, window, head_dim] and keys "
            f"[num_kv_heads, N, head_dim], got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    hq, wq, d = queries.shape
    hkv, n, dk = keys.shape
    if d != dk:
        raise ValueError(f"head_dim mismatch: queries {d}, keys {dk}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"num_query_heads ({hq}) must be a positive multiple of num_kv_heads ({hkv})"
        )
    if wq != window:
        raise ValueError(
            f"queries hold {wq} positions but window={window}: pass the post-RoPE queries of the "
            "last `window` prompt positions"
        )
    if n <= window:
        raise ValueError(f"need more prompt tokens ({n}) than the window ({window}) to score")
    return hq // hkv, n


def _pool(x: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last dim, stride 1, same length. ``x``: [rows, P]."""
    if kernel == 1:
        return x
    x = x.unsqueeze(1)
    if pooling == "avg":
        # Zero padding, divided by the full kernel (count_include_pad=True): the reference's and
        # kvpress's F.avg_pool1d call. Border positions are thereby slightly penalised.
        out = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        out = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    return out.squeeze(1)


def _finish(
    reduced: torch.Tensor,
    hkv: int,
    group: int,
    window: int,
    kernel: int,
    pooling: str,
    reduction: str,
    gqa_aggregation: str,
) -> torch.Tensor:
    """[Hq, P] window-summed probabilities -> [Hkv, P] smoothed per-KV-head scores."""
    if reduction == "mean":
        reduced = reduced / window
    pooled = _pool(reduced, kernel, pooling)
    pooled = pooled.view(hkv, group, -1)
    if gqa_aggregation == "mean":
        return pooled.mean(dim=1)
    return pooled.amax(dim=1)


def _causal_window_mask(window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[w, w] additive mask: window query i sees window key j iff j <= i."""
    return torch.full((window, window), float("-inf"), dtype=dtype, device=device).triu(1)


def window_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    settings: SnapKVSettings,
    *,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Smoothed SnapKV scores of the prefix positions, one row per KV head.

    Args:
        queries: [Hq, w, d] post-RoPE queries of the last ``w = settings.window`` prompt positions.
        keys: [Hkv, N, d] post-RoPE keys of the whole prompt (N > w).
        settings: window, kernel, pooling, reduction and GQA aggregation are read from it.
        tile_size: keys per tile. ``N <= tile_size`` takes the single-pass path (one
            ``[Hq, w, N]`` score tensor); longer prompts take the two-pass tiled path whose extra
            memory is ``O(Hq·w·tile_size + Hq·N)``. ``None``: ``DEFAULT_TILE_ELEMENTS // (Hq·w)``
            (at least ``MIN_TILE_SIZE``).
        score_dtype: dtype of logits, softmax and accumulation (fp32 as in the paper; float64 is
            for exact comparisons in tests).

    Returns:
        [Hkv, N - w] tensor of ``score_dtype``; higher means more important.
    """
    window = settings.window
    group, n = _check_inputs(queries, keys, window)
    hq, _, d = queries.shape
    hkv = keys.shape[0]
    prefix = n - window
    tile = resolve_tile_size(hq, window, tile_size)
    common = dict(
        hkv=hkv,
        group=group,
        window=window,
        kernel=settings.kernel,
        pooling=settings.pooling,
        reduction=settings.reduction,
        gqa_aggregation=settings.gqa_aggregation,
    )
    # Grouped queries: [Hkv, G*w, d] so that each KV head's keys are used by its whole query group
    # in one matmul, without repeat_kv's [Hq, N, d] copy of the keys.
    q = queries.to(score_dtype).reshape(hkv, group * window, d)
    scale = math.sqrt(d)
    mask = _causal_window_mask(window, score_dtype, queries.device)

    if n <= tile:
        # Single pass, in kvpress's order of operations: logits / sqrt(d), mask, softmax, slice.
        # (In place: same values as kvpress's out-of-place division, one big buffer fewer.)
        logits = torch.matmul(q, keys.to(score_dtype).transpose(1, 2)).div_(scale)  # [Hkv,G*w,N]
        logits = logits.view(hkv, group, window, n)
        logits[..., prefix:] += mask
        probs = torch.softmax(logits, dim=-1)[..., :prefix]
        reduced = probs.sum(dim=2).reshape(hq, prefix)
        return _finish(reduced, **common)

    # Two passes over key tiles. Pass 1: the softmax denominator of every window query, as a
    # running maximum m and a running sum s of exp(logit - m) (rescaled when m grows), so that
    # rounding error grows like a plain fp32 sum, not once per tile. The window block (causally
    # masked) seeds it; the 1/sqrt(d) scale is applied inside the GEMM (baddbmm alpha).
    inv_scale = 1.0 / scale
    win_keys = keys[:, prefix:].to(score_dtype)
    win_logits = (torch.matmul(q, win_keys.transpose(1, 2)) / scale).view(
        hkv, group * window, window
    )
    win_logits.view(hkv, group, window, window).add_(mask)
    run_max = win_logits.amax(dim=-1, keepdim=True)  # [Hkv, G*w, 1]; finite: key i is visible
    run_sum = (win_logits - run_max).exp_().sum(dim=-1, keepdim=True)
    del win_logits, win_keys
    for start in range(0, prefix, tile):
        k_tile = keys[:, start : min(start + tile, prefix)].to(score_dtype)
        logits = torch.baddbmm(run_max, q, k_tile.transpose(1, 2), beta=0.0, alpha=inv_scale)
        new_max = torch.maximum(run_max, logits.amax(dim=-1, keepdim=True))
        run_sum = run_sum * (run_max - new_max).exp_() + logits.sub_(new_max).exp_().sum(
            dim=-1, keepdim=True
        )
        run_max = new_max
        del logits, k_tile
    lse = run_max + run_sum.log()
    # Pass 2: normalised probabilities exp(logit - lse) of each prefix tile (the subtraction is
    # fused into the GEMM), summed over the window queries right away into [Hkv, G, P].
    reduced = torch.empty(hkv, group, prefix, dtype=score_dtype, device=queries.device)
    neg_lse = -lse
    for start in range(0, prefix, tile):
        stop = min(start + tile, prefix)
        k_tile = keys[:, start:stop].to(score_dtype)
        probs = torch.baddbmm(neg_lse, q, k_tile.transpose(1, 2), alpha=inv_scale).exp_()
        reduced[:, :, start:stop] = probs.view(hkv, group, window, stop - start).sum(dim=2)
        del probs, k_tile
    return _finish(reduced.view(hq, prefix), **common)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def select_from_scores(
    scores: torch.Tensor, num_tokens: int, settings: SnapKVSettings
) -> torch.Tensor:
    """Kept positions from :func:`window_scores` output.

    Args:
        scores: [Hkv, N - w] smoothed prefix scores.
        num_tokens: prompt length N.
        settings: budget/ratio, window and sink are read from it.

    Returns:
        int64 [Hkv, kept_count(N)] ascending positions: ``0..sink-1``, then the top
        ``kept - w - sink`` of ``[sink, N - w)`` by score (ties → lower position, via a stable
        descending sort), then ``N - w .. N - 1``.
    """
    n = num_tokens
    kept = kept_count(n, settings)
    hkv = scores.shape[0]
    device = scores.device
    if kept >= n:
        return torch.arange(n, device=device, dtype=torch.long).expand(hkv, n).contiguous()
    window, sink = settings.window, settings.sink
    prefix = n - window
    if scores.dim() != 2 or scores.shape[1] != prefix:
        raise ValueError(f"scores must be [num_kv_heads, {prefix}], got {tuple(scores.shape)}")
    n_top = kept - window - sink  # >= 1 by construction (effective budget > window + sink)
    order = torch.sort(scores[:, sink:], dim=-1, descending=True, stable=True).indices
    top = torch.sort(order[:, :n_top] + sink, dim=-1).values
    sinks = torch.arange(sink, device=device, dtype=torch.long).expand(hkv, sink)
    win = torch.arange(prefix, n, device=device, dtype=torch.long).expand(hkv, window)
    return torch.cat([sinks, top, win], dim=-1)


def select_tokens_with_settings(
    queries: torch.Tensor,
    keys: torch.Tensor,
    settings: SnapKVSettings,
    *,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`select_tokens` with a ready :class:`SnapKVSettings` (the per-layer integration path)."""
    if keys.dim() != 3:
        raise ValueError(f"expected keys [num_kv_heads, N, head_dim], got {tuple(keys.shape)}")
    hkv, n, _ = keys.shape
    if kept_count(n, settings) >= n:
        # Short prompt: nothing to evict, and no need for (possibly fewer than w) window queries.
        return torch.arange(n, device=keys.device, dtype=torch.long).expand(hkv, n).contiguous()
    if settings.scorer == "recency":
        scores = recency_scores(hkv, n, settings, device=keys.device)
    else:
        scores = window_scores(queries, keys, settings, tile_size=tile_size,
                               score_dtype=score_dtype)
    return select_from_scores(scores, n, settings)


def recency_scores(num_kv_heads: int, num_tokens: int, settings: SnapKVSettings, *,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Prefix scores of the recency baseline: each position's own index, for every KV head.

    Fed to :func:`select_from_scores`, they keep the ``sink`` first positions and the most recent
    ``kept - sink`` (window included) — StreamingLLM's rule at SnapKV's budget and placement, which
    isolates what the observation window's vote is worth.
    """
    prefix = num_tokens - settings.window
    return torch.arange(prefix, device=device, dtype=torch.float32).expand(num_kv_heads, prefix)


def select_tokens(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    budget: int | None = None,
    ratio: float | None = None,
    window: int = DEFAULT_WINDOW,
    kernel: int = DEFAULT_KERNEL,
    pooling: str = DEFAULT_POOLING,
    reduction: str = DEFAULT_REDUCTION,
    gqa_aggregation: str = DEFAULT_GQA_AGGREGATION,
    sink: int = 0,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Prompt positions each KV head keeps under SnapKV (arXiv:2404.14469).

    Args:
        queries: [num_query_heads, window, head_dim] post-RoPE queries of the last ``window``
            prompt positions (any float dtype; scored in ``score_dtype``).
        keys: [num_kv_heads, N, head_dim] post-RoPE keys of the whole prompt.
        budget / ratio: exactly one — tokens kept (window and sinks included) or fraction kept.
        window, kernel, pooling, reduction, gqa_aggregation, sink: see
            :class:`vllm_snapkv.settings.SnapKVSettings`; invalid values raise
            :class:`vllm_snapkv.settings.SettingsError`.
        tile_size: keys per scoring tile (memory bound); ``None`` = automatic.
        score_dtype: dtype of the score computation (default fp32).

    Returns:
        int64 tensor [num_kv_heads, kept] of ascending prompt positions, on ``keys.device``;
        ``kept = kept_count(N, settings)``, and the whole prompt when ``N <= kept``.
    """
    settings = SnapKVSettings(
        budget=budget,
        ratio=ratio,
        window=window,
        kernel=kernel,
        pooling=pooling,
        reduction=reduction,
        gqa_aggregation=gqa_aggregation,
        sink=sink,
    )
    return select_tokens_with_settings(
        queries, keys, settings, tile_size=tile_size, score_dtype=score_dtype
    )
