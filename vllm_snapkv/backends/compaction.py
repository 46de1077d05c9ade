"""Compaction: after a step's attention, rank a request's attended slots and move the kept K/V.

For every compaction of the step's plan (:mod:`vllm_snapkv.backends.plan`), per layer:

1. read the K/V of the ranked slots ``[c.prior, c.at)`` through the backend's
   :class:`CacheAccessor` (its kernel's real cache layout);
2. gather the observation window's queries — this step's query rows, and the
   :class:`~vllm_snapkv.backends.stash.QueryStash` for positions computed in earlier steps — when
   the method ranks with queries;
3. let the method rank and keep ``c.kept`` slots per KV head (:mod:`vllm_snapkv.selection`);
4. move them into slots ``[c.evicted, c.at)`` (:func:`move_kept`).

Then the step's queries that the next compaction's window needs are stashed. Nothing here knows a
cache layout, and the whole sequence is the same for every backend (:func:`after_attention`).

If a window's queries are missing (nothing in the engine should cause that, but a vLLM change or
an unforeseen path could), the compaction still runs — the scheduler frees blocks on the strength
of the schedule, so the move must happen — ranked by the query-agnostic
:data:`FALLBACK_METHOD` instead, with a warning and a count in the worker report: one request's
problem never stops the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from vllm_snapkv.methods import get_method
from vllm_snapkv.selection import select_tokens_with_settings

if TYPE_CHECKING:
    from vllm_snapkv.backends.plan import RowPlan, StepPlan
    from vllm_snapkv.backends.state import RunnerState
    from vllm_snapkv.schedule import Compaction

logger = logging.getLogger("vllm_snapkv")

__all__ = ["FALLBACK_METHOD", "CacheAccessor", "add_selection_observer", "after_attention",
           "compact", "move_kept", "window_queries"]

#: Ranks a compaction whose window queries are unexpectedly missing.
FALLBACK_METHOD = "keydiff"


class CacheAccessor(Protocol):
    """Per-token access to one layer's paged cache, through the backend's real layout."""

    def read_kv(self, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of logical ``positions`` (``[n]`` or ``[H, n]``) as fresh ``[H, n, D]`` copies."""
        ...

    def write_kv(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, positions: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[H, n, D]`` at logical ``positions`` (distinct per head)."""
        ...


def move_kept(accessor: CacheAccessor, kv_cache: torch.Tensor, block_ids: torch.Tensor,
              kept: torch.Tensor, dest_start: int, *,
              source: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> int:
    """Move, per KV head ``h``, the slots ``kept[h]`` (sorted, distinct) to slots
    ``dest_start ..`` of the same request, K and V, in place. Returns the columns moved.

    Columns where every head already sits at its destination (with the tail placement: the
    observation window and any kept suffix) are skipped; they are neither read nor written, so
    skipping cannot clobber a source. Everything that moves is read (or taken from ``source`` =
    ``(keys, values, first_slot)``, K/V already read for slots ``first_slot ..``) before
    anything is written, so overlapping source and destination ranges are safe.
    """
    kept = kept.to(torch.int64)
    if kept.dim() != 2:
        raise ValueError(f"kept must be [H, k], got {tuple(kept.shape)}")
    k = kept.shape[1]
    dest = torch.arange(dest_start, dest_start + k, dtype=torch.int64, device=kept.device)
    moving = (kept != dest[None, :]).any(dim=0).nonzero().flatten()
    if moving.numel() == 0:
        return 0
    lo, hi = int(moving[0]), int(moving[-1]) + 1
    cols = kept[:, lo:hi]
    if source is None:
        keys, values = accessor.read_kv(kv_cache, block_ids, cols)
    else:
        src_k, src_v, first = source
        idx = (cols - first).to(src_k.device)[:, :, None].expand(-1, -1, src_k.shape[-1])
        keys, values = torch.gather(src_k, 1, idx), torch.gather(src_v, 1, idx)
    accessor.write_kv(kv_cache, block_ids, dest[lo:hi], keys, values)
    return hi - lo


def window_queries(row: RowPlan, c: Compaction, query: torch.Tensor, state: RunnerState,
                   layer: str) -> tuple[torch.Tensor | None, int]:
    """The ``w`` window queries ``[Hq, w, D]`` of compaction ``c`` (positions
    ``[c.at - w, c.at)``), and how many came from the stash; ``None`` if any is missing."""
    w, nc = row.settings.window, row.num_computed
    lo, hi = c.at - w, c.at
    parts = []
    from_stash = 0
    if lo < nc:
        stashed = state.stash.get(row.req_id, layer, lo, min(nc, hi))
        if stashed is None:
            return None, 0
        parts.append(stashed)
        from_stash = stashed.shape[0]
    if hi > nc:
        first = row.q_start + max(lo, nc) - nc
        parts.append(query[first:row.q_start + hi - nc])
    q = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if q.shape[0] != w:
        return None, 0
    return q.transpose(0, 1), from_stash


#: ``observer(req_id, seconds)``: one layer's ranking + top-k for a request.
SelectionObserver = Callable[[str, float], None]
_SELECTION_OBSERVERS: list[SelectionObserver] = []


def add_selection_observer(observer: SelectionObserver) -> None:
    """Have every compaction report each layer's selection time to ``observer`` (this
    process, once per observer; the metrics connector's worker side does). Observers run on
    the forward path: keep them cheap."""
    if observer not in _SELECTION_OBSERVERS:
        _SELECTION_OBSERVERS.append(observer)


def compact(row: RowPlan, c: Compaction, query: torch.Tensor, kv_cache: torch.Tensor,
            block_ids: torch.Tensor, accessor: CacheAccessor, state: RunnerState,
            layer: str) -> torch.Tensor:
    """Run compaction ``c`` of ``row`` in one layer. Returns the kept slots relative to
    ``c.prior``, ``[Hkv, c.kept]``."""
    dev = kv_cache.device
    keys, values = accessor.read_kv(kv_cache, block_ids,
                                    torch.arange(c.prior, c.at, dtype=torch.int64, device=dev))
    method = c.method
    q_win, from_stash = None, 0
    if get_method(method).uses_queries:
        q_win, from_stash = window_queries(row, c, query, state, layer)
        if q_win is None:
            state.fallbacks += 1
            logger.warning("snapkv: window queries of request %s (layer %s, compaction at %d) "
                           "are missing; ranking with %s instead", row.req_id, layer, c.at,
                           FALLBACK_METHOD)
            method = FALLBACK_METHOD
    t0 = time.perf_counter()
    kept = select_tokens_with_settings(q_win, keys, row.settings, keep=c.kept, method=method,
                                       values=values)
    if _SELECTION_OBSERVERS:
        seconds = time.perf_counter() - t0
        for observer in _SELECTION_OBSERVERS:
            observer(row.req_id, seconds)
    if tuple(kept.shape) != (keys.shape[0], c.kept):
        raise RuntimeError(f"snapkv: selection returned {tuple(kept.shape)}, expected "
                           f"({keys.shape[0]}, {c.kept})")
    if state.debug is not None:
        state.debug.on_compaction(row.req_id, layer, c, kept, keys, values)
    moved = move_kept(accessor, kv_cache, block_ids, kept + c.prior, c.evicted,
                      source=(keys, values, c.prior))
    state.record(row.req_id, layer, c, moved, from_stash)
    return kept


def after_attention(plan: StepPlan, state: RunnerState, layer: str, query: torch.Tensor,
                    output: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                    get_accessor: Callable[[], CacheAccessor], scale: float) -> None:
    """What every adapter's impl runs after its normal attention, for one layer: the debug
    comparison of rows attending over compacted slots (when on), this step's compactions, then
    the stash. ``query`` is ``[num_tokens, Hq, D]``; ``block_table`` the step's *unshifted*
    block table; ``get_accessor()`` the layer's :class:`CacheAccessor` (called when needed)."""
    accessor = None
    if state.debug is not None and plan.shifted:
        accessor = get_accessor()
        out = output.view(output.shape[0], query.shape[1], -1)
        for row in plan.shifted:
            state.debug.check_row(row, query, out, kv_cache, block_table[row.row], accessor,
                                  layer, scale)
    for row in plan.rows:
        if row.compactions:
            accessor = accessor or get_accessor()
            for c in row.compactions:
                compact(row, c, query, kv_cache, block_table[row.row], accessor, state, layer)
            if row.stash_from is None:
                state.stash.drop(row.req_id, layer)
        if row.stash_from is not None:
            first = row.q_start + row.stash_from - row.num_computed
            state.stash.update(row.req_id, layer, row.stash_from, query[first:row.q_end],
                               row.settings.window)
