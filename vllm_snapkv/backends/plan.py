"""Step planning: what each batch row needs from the attention backend in one engine step.

Each step the model runner publishes one :class:`RowState` per batch row (request id, tokens
computed before the step, the request's :class:`~vllm_snapkv.config.RequestPlan`). From it and
the step's query layout, :func:`plan_step` derives a :class:`StepPlan`, the same for every layer:

* attention reads slots ``[E, seq_len)`` with ``E = schedule.evicted_at(num_computed)``: the
  builder passes ``seq_len - E`` and drops the first ``E / block_size`` block-table entries
  (:func:`shift_common_metadata`);
* the compactions whose ``at`` falls in this step (``num_computed < at <= num_computed +
  query_len``) run after this step's attention, in order (:mod:`vllm_snapkv.backends.compaction`);
* the query rows the next compaction's observation window needs are stashed
  (:mod:`vllm_snapkv.backends.stash`).

:func:`vllm_snapkv.integration.metadata.build_metadata` is the one sequence every adapter's metadata builder runs: plan, shift
(into the builder's persistent buffers when it has them), the backend's own build, and the
adapter's metadata subclass carrying the plan, the unshifted block table and the runner state.
Pure arithmetic on CPU tensors and Python objects, no vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_snapkv.methods import get_method
from vllm_snapkv.schedule import Compaction, Schedule
from vllm_snapkv.settings import CompressionSettings

if TYPE_CHECKING:
    from vllm_snapkv.config import RequestPlan

__all__ = ["RowPlan", "RowState", "StepPlan", "plan_step", "shift_rows"]


@dataclass(frozen=True)
class RowState:
    """One batch row as the model runner sees it before this step's forward."""

    req_id: str
    num_computed: int  # tokens computed before this step (true value, never shrunk)
    plan: RequestPlan | None  # None: this request never compacts


@dataclass(frozen=True)
class RowPlan:
    """What one row needs in this step.

    Attributes:
        row, req_id: the batch row and its request.
        q_start, q_end: the row's query rows in the step's flattened query tensor; query row
            ``q_start + i`` is position ``num_computed + i``.
        num_computed: tokens computed before the step.
        evicted: slots attention skips in this step (compactions of earlier steps).
        compactions: compactions that run after this step's attention.
        stash_from: query positions ``>= stash_from`` of this step are stashed for the next
            compaction's window (``None``: nothing to stash).
    """

    row: int
    req_id: str
    q_start: int
    q_end: int
    num_computed: int
    settings: CompressionSettings
    schedule: Schedule
    evicted: int
    compactions: tuple[Compaction, ...]
    stash_from: int | None

    @property
    def step_end(self) -> int:
        """Tokens computed after the step."""
        return self.num_computed + self.q_end - self.q_start


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[RowPlan, ...]

    @property
    def shifted(self) -> tuple[RowPlan, ...]:
        """Rows whose attention skips evicted slots."""
        return tuple(r for r in self.rows if r.evicted)

    @property
    def compacting(self) -> tuple[RowPlan, ...]:
        return tuple(r for r in self.rows if r.compactions)


def _stash_from(schedule: Schedule, window: int, lo: int, hi: int) -> int | None:
    """First position of ``[lo, hi)`` the next compaction after ``hi`` needs the query of."""
    nxt = schedule.next_after(hi)
    if nxt is None or not get_method(nxt.method).uses_queries:
        return None
    start = max(lo, nxt.at - window)
    return start if start < hi else None


def plan_step(rows: tuple[RowState, ...] | None, query_start_loc_cpu: torch.Tensor,
              num_reqs: int) -> StepPlan | None:
    """This step's :class:`StepPlan`, or ``None`` when no row needs anything."""
    if not rows:
        return None
    if len(rows) < num_reqs:
        raise RuntimeError(f"snapkv: batch info has {len(rows)} rows, metadata {num_reqs}")
    qsl = query_start_loc_cpu.tolist()
    out = []
    for i in range(num_reqs):
        r = rows[i]
        if r.plan is None or r.plan.schedule.idle:
            continue
        qs, qe = int(qsl[i]), int(qsl[i + 1])
        nc, sched = r.num_computed, r.plan.schedule
        hi = nc + (qe - qs)
        evicted = sched.evicted_at(nc)
        compactions = tuple(sched.between(nc, hi)) if qe > qs else ()
        stash_from = _stash_from(sched, r.plan.settings.window, nc, hi) if qe > qs else None
        if evicted or compactions or stash_from is not None:
            out.append(RowPlan(i, r.req_id, qs, qe, nc, r.plan.settings, sched, evicted,
                               compactions, stash_from))
    return StepPlan(tuple(out)) if out else None


def shift_rows(seq_lens: torch.Tensor, block_table: torch.Tensor, shifted, block_size: int, *,
               out_seq_lens: torch.Tensor | None = None,
               out_block_table: torch.Tensor | None = None,
               fill_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted copies of ``seq_lens`` [R] and ``block_table`` [R, M] for rows with evictions.

    Row r evicting E reads ``seq_len - E`` tokens through ``block_table[r, E/bs:]`` (moved to the
    front; the freed tail entries get ``fill_value``). The inputs are never modified; ``out_*``
    (persistent buffers, e.g. for CUDA graphs) receive the result when given.
    """
    if out_seq_lens is None:
        out_seq_lens = seq_lens.clone()
    else:
        out_seq_lens.copy_(seq_lens)
    if out_block_table is None:
        out_block_table = block_table.clone()
    else:
        out_block_table.copy_(block_table)
    m = block_table.shape[1]
    for s in shifted:
        e = s.evicted
        if e % block_size:
            raise RuntimeError(f"snapkv: evicted {e} is not a multiple of block size {block_size}")
        nb = e // block_size
        out_seq_lens[s.row] -= e
        if nb:
            out_block_table[s.row, : m - nb] = block_table[s.row, nb:]
            out_block_table[s.row, m - nb:] = fill_value
    return out_seq_lens, out_block_table
