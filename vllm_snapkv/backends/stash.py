"""The observation window's queries, kept between steps until a compaction uses them.

A compaction at ``at`` that ranks with queries (SnapKV) needs the post-RoPE queries of positions
``[at - window, at)``. Those computed in the compaction's own step are in that step's query
tensor; earlier ones — the end of the previous prefill chunk when the last chunk is shorter than
the window, or the previous decode steps — are kept here, per (request, layer), as one contiguous
run of at most ``window`` positions. The step plan asks for exactly the positions the *next*
compaction's window covers (:func:`vllm_snapkv.backends.plan.plan_step`), so during decode a
request stashes one query per layer in ``window`` of every ``decode_interval`` steps.
"""

from __future__ import annotations

import torch

__all__ = ["QueryStash"]


class QueryStash:
    """Per (request, layer): queries ``[n, Hq, D]`` of positions ``[end - n, end)``, n <= window.

    A run that starts where the stored one ends extends it (keeping the last ``window``); a run
    that starts inside it (speculative drafts rejected: their positions are computed again)
    replaces the stored queries from there on; a run starting elsewhere (a recompute after
    preemption, a new window) replaces it.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def update(self, req_id: str, layer: str, start_pos: int, queries: torch.Tensor,
               window: int) -> None:
        """Record ``queries`` ``[q, Hq, D]`` at positions ``start_pos ..``."""
        key = (req_id, layer)
        q = queries.shape[0]
        if q == 0:
            return
        old = self._data.get(key)
        if old is not None and q < window:
            end, stored = old
            first = end - stored.shape[0]
            if first <= start_pos <= end:
                queries = torch.cat([stored[:start_pos - first], queries], dim=0)
        self._data[key] = (start_pos + q, queries[-window:].detach().clone())

    def get(self, req_id: str, layer: str, start: int, end: int) -> torch.Tensor | None:
        """Queries of positions ``[start, end)`` (``[end - start, Hq, D]``), or ``None`` when
        they were not stashed."""
        entry = self._data.get((req_id, layer))
        if entry is None or end <= start:
            return None
        stash_end, q = entry
        stash_start = stash_end - q.shape[0]
        if start < stash_start or end > stash_end:
            return None
        return q[start - stash_start:end - stash_start]

    def drop(self, req_id: str, layer: str | None = None) -> None:
        if layer is not None:
            self._data.pop((req_id, layer), None)
            return
        for key in [k for k in self._data if k[0] == req_id]:
            del self._data[key]
