"""SnapKV: keep what the last prompt tokens attend to (the method this plugin is named after).

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469:
the attention the *last* ``w`` prompt tokens (the observation window) pay to the rest of the
prompt predicts what generation will attend to. Score every earlier position by
``softmax(Q_win Kᵀ / sqrt(d))`` (fp32, all keys in the denominator, causal inside the window),
reduce over the window queries (``sum``/``mean``), smooth along the sequence with a 1-D pooling
(``avg`` counting zero padding as ``F.avg_pool1d``, or ``max``; odd kernel, same length) so that
a kept token brings its neighbours along (multi-token answers stay whole), then aggregate each KV
head's query group (``mean``/``max``; query head ``h`` belongs to KV head ``h // (Hq/Hkv)``).
Pool-then-aggregate is kvpress ``SnapKVPress``'s order.

Memory: the textbook computation materialises ``[Hq, w, N]`` probabilities (151 MB for SmolLM2
shapes at 128K tokens). Above ``tile_size`` keys, :func:`window_scores` makes two passes over
key tiles — the per-query log-sum-exp first, then the normalised probabilities, reduced over the
window as each tile is produced — so the extra memory is ``O(Hq·w·tile + Hq·N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vllm_snapkv.methods.base import Method, check_choice, check_int, register_method

__all__ = ["DEFAULT_GQA_AGGREGATION", "DEFAULT_KERNEL", "DEFAULT_POOLING", "DEFAULT_REDUCTION",
           "DEFAULT_TILE_ELEMENTS", "GQA_AGGREGATIONS", "MIN_TILE_SIZE", "POOLINGS", "REDUCTIONS",
           "SnapKV", "resolve_tile_size", "window_scores"]

#: Defaults (``docs/selection.md``, "Why these defaults"): kernel 15 is wider than the paper's 5/7
#: on purpose: on SmolLM2, which spells numbers digit by digit, a 7-wide pooling lost multi-digit
#: needles (0/8 at budget 512) where 15 kept them (8/8). The window queries' probabilities are
#: summed as the reference does (ranking-equivalent to the mean); a KV head's query group is
#: averaged as kvpress does.
DEFAULT_KERNEL = 15
DEFAULT_POOLING = "avg"
DEFAULT_REDUCTION = "sum"
DEFAULT_GQA_AGGREGATION = "mean"
POOLINGS: tuple[str, ...] = ("avg", "max")
REDUCTIONS: tuple[str, ...] = ("sum", "mean")
GQA_AGGREGATIONS: tuple[str, ...] = ("mean", "max")

#: Default working-set bound for one score tile: ``Hq * w * tile`` elements (16 MiB in fp32).
#: For SmolLM2 shapes (Hq=9, w=32) that is a tile of ~14.5K keys, so prompts up to that length
#: take the single-pass path.
DEFAULT_TILE_ELEMENTS = 1 << 22
#: Lower bound for the automatic tile size, so that models with very many heads still get tiles
#: large enough for efficient matmuls.
MIN_TILE_SIZE = 512


@register_method
@dataclass(frozen=True)
class SnapKV(Method):
    name = "snapkv"
    summary = ("SnapKV: the observation window's pooled attention picks what each KV head "
               "keeps (--snapkv-window/-kernel/-pooling/...)")
    paper = "arXiv:2404.14469"
    uses_queries = True

    kernel: int = field(default=DEFAULT_KERNEL, metadata={
        "help": f"SnapKV: odd width of the 1-D pooling that smooths scores along the prompt. "
                f"Default {DEFAULT_KERNEL}."})
    pooling: str = field(default=DEFAULT_POOLING, metadata={
        "choices": POOLINGS, "help": f"SnapKV: pooling kind. Default {DEFAULT_POOLING}."})
    reduction: str = field(default=DEFAULT_REDUCTION, metadata={
        "choices": REDUCTIONS,
        "help": f"SnapKV: how window queries' attention combines. Default {DEFAULT_REDUCTION}."})
    gqa_aggregation: str = field(default=DEFAULT_GQA_AGGREGATION, metadata={
        "choices": GQA_AGGREGATIONS,
        "help": "SnapKV: how a KV head's query group combines (selection is per KV head). "
                f"Default {DEFAULT_GQA_AGGREGATION}."})

    def __post_init__(self) -> None:
        check_int("kernel", self.kernel, minimum=1, odd=True)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("gqa_aggregation", self.gqa_aggregation, GQA_AGGREGATIONS)
        object.__setattr__(self, "kernel", int(self.kernel))

    def score(self, keys, values, queries, *, window, tile_size=None, score_dtype=torch.float32):
        return _window_scores(queries, keys, window, self, tile_size=tile_size,
                              score_dtype=score_dtype)


def resolve_tile_size(num_query_heads: int, window: int, tile_size: int | None) -> int:
    """The tile size (keys per tile) actually used: ``tile_size`` or the automatic default."""
    if tile_size is None:
        return max(MIN_TILE_SIZE, DEFAULT_TILE_ELEMENTS // max(1, num_query_heads * window))
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be an integer >= 1 or None, got {tile_size!r}")
    return tile_size


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
    settings: Any,
    *,
    tile_size: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Smoothed SnapKV scores of the prefix positions, one row per KV head.

    Args:
        queries: [Hq, w, d] post-RoPE queries of the last ``w = settings.window`` prompt positions.
        keys: [Hkv, N, d] post-RoPE keys of the whole prompt (N > w).
        settings: anything with ``window``, ``kernel``, ``pooling``, ``reduction`` and
            ``gqa_aggregation`` (a :class:`~vllm_snapkv.settings.CompressionSettings`).
        tile_size: keys per tile. ``N <= tile_size`` takes the single-pass path (one
            ``[Hq, w, N]`` score tensor); longer prompts take the two-pass tiled path whose extra
            memory is ``O(Hq·w·tile_size + Hq·N)``. ``None``: ``DEFAULT_TILE_ELEMENTS // (Hq·w)``
            (at least ``MIN_TILE_SIZE``).
        score_dtype: dtype of logits, softmax and accumulation (fp32 as in the paper; float64 is
            for exact comparisons in tests).

    Returns:
        [Hkv, N - w] tensor of ``score_dtype``; higher means more important.
    """
    return _window_scores(queries, keys, settings.window, settings, tile_size=tile_size,
                          score_dtype=score_dtype)


def _window_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, p: Any, *,
                   tile_size: int | None, score_dtype: torch.dtype) -> torch.Tensor:
    group, n = _check_inputs(queries, keys, window)
    hq, _, d = queries.shape
    hkv = keys.shape[0]
    prefix = n - window
    tile = resolve_tile_size(hq, window, tile_size)
    common = dict(
        hkv=hkv,
        group=group,
        window=window,
        kernel=p.kernel,
        pooling=p.pooling,
        reduction=p.reduction,
        gqa_aggregation=p.gqa_aggregation,
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
