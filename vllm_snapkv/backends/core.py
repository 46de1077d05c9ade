"""Backend-agnostic paged SnapKV: what every attention-backend adapter shares.

The worker keeps ``num_computed_tokens`` at its true value; only what attention *reads* shrinks.
Per engine step the model runner publishes one :class:`BatchCompressionInfo` (one
:class:`RowState` per batch row: request id, prompt length N, tokens computed before this step,
the request's :class:`~vllm_snapkv.placement.Placement` and settings). From it, an adapter's
metadata builder derives a :class:`StepPlan` (:func:`plan_step`):

* rows **compacted in an earlier step** (``num_computed >= N`` and a placement): attention reads
  ``seq_len - E`` tokens through a block table whose first ``E / block_size`` entries are dropped
  (:func:`shift_rows`);
* rows **completing prefill in this step** (``num_computed < N <= num_computed + query_len``):
  after this step's normal attention (which must see the whole prompt), the adapter's impl runs
  :func:`compact_row` per layer: the last ``w`` post-RoPE prompt queries (this step's rows, plus
  the :class:`WindowStash` when the final chunk is shorter than ``w``) vote over the N prompt keys
  (read through the adapter's :class:`CacheAccessor`), and the kept ``N - E`` tokens per KV head
  move into logical slots ``[E, N)``;
* rows **still in prefill** that will be compressed stash their last ``w`` queries per layer
  (:meth:`WindowStash.update`).

Nothing here knows a cache layout: reads and writes of single tokens go through a
:class:`CacheAccessor` that each adapter (``backends/cpu.py``, ``backends/cuda.py``)
implements over its own kernel's layout. The adapters' builders and impls share
:func:`shift_common_metadata`, :func:`extend_metadata` and :func:`after_attention`.

A debug recorder (off by default; ``VLLM_SNAPKV_DEBUG=1`` or :func:`set_debug`) keeps, at
compaction time, the original K/V of exactly the kept tokens, and in later steps compares each
layer's attention output for the compacted request with dense attention over those kept tokens
plus the generated ones (:func:`debug_check_row`).

Selection time is reported to observers registered with :func:`add_selection_observer` (the
metrics connector's worker side does, see :class:`vllm_snapkv.metrics.SelectionTimer`):
:func:`compact_row` calls each with ``(request id, seconds)`` once per layer, so timing needs no
wrapping of this module's functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_snapkv.placement import Placement
from vllm_snapkv.selection import select_tokens_with_settings
from vllm_snapkv.settings import SnapKVSettings

logger = logging.getLogger("vllm_snapkv")

__all__ = [
    "BatchCompressionInfo",
    "CacheAccessor",
    "CompletionTask",
    "DebugRecorder",
    "RowState",
    "StashTask",
    "StepPlan",
    "WindowStash",
    "add_selection_observer",
    "after_attention",
    "compact_by_read_write",
    "compact_row",
    "current_batch",
    "debug_check_row",
    "dense_attention",
    "extend_metadata",
    "forget_requests",
    "plan_step",
    "publish_batch",
    "set_debug",
    "shift_common_metadata",
    "shift_rows",
    "stash_row",
    "state",
    "window_queries",
]

DEBUG_ENV = "VLLM_SNAPKV_DEBUG"
#: Compaction reports kept for this many most recent requests.
MAX_REPORTED_REQUESTS = 4096


# ---------------------------------------------------------------------------------------------
# What the model runner publishes each step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowState:
    """One batch row as the model runner sees it before this step's forward."""

    req_id: str
    prompt_len: int
    num_computed: int  # tokens computed before this step (true value, never shrunk)
    placement: Placement | None  # None: this request is not compressed
    settings: SnapKVSettings | None


@dataclass(frozen=True)
class BatchCompressionInfo:
    """Per-row compression facts for one step, in batch-row order (row i = ``rows[i]``)."""

    rows: tuple[RowState, ...]
    step: int = 0

    @property
    def any_compressed(self) -> bool:
        return any(r.placement is not None for r in self.rows)


# ---------------------------------------------------------------------------------------------
# Per-step plan, derived by the metadata builder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionTask:
    """A row whose prompt completes in this step: compact it after this step's attention."""

    row: int
    req_id: str
    q_start: int  # this row's first query row in the step's flattened query tensor
    q_end: int
    num_computed: int
    placement: Placement
    settings: SnapKVSettings

    @property
    def prompt_len(self) -> int:
        return self.placement.prompt_len


@dataclass(frozen=True)
class StashTask:
    """A row in the middle of a to-be-compressed prefill: stash its last window queries."""

    row: int
    req_id: str
    q_start: int
    q_end: int
    num_computed: int  # position of query row q_start
    window: int


@dataclass(frozen=True)
class ShiftedRow:
    """A row compacted in an earlier step: attention reads ``seq_len - evicted`` tokens."""

    row: int
    req_id: str
    q_start: int
    q_end: int
    num_computed: int
    placement: Placement

    @property
    def evicted(self) -> int:
        return self.placement.evicted


@dataclass
class StepPlan:
    shifted: list[ShiftedRow] = field(default_factory=list)
    completing: list[CompletionTask] = field(default_factory=list)
    stashing: list[StashTask] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.shifted or self.completing or self.stashing)


def plan_step(info: BatchCompressionInfo | None, query_start_loc_cpu: torch.Tensor,
              num_reqs: int) -> StepPlan | None:
    """Classify this step's rows. ``None`` when nothing in the batch is compressed.

    A row with a placement is, by its ``num_computed`` (before the step) and ``query_len``:
    compacted earlier (``num_computed >= N``), completing prefill now
    (``num_computed < N <= num_computed + query_len``), or still in prefill (``... < N``).
    """
    if info is None or not info.any_compressed:
        return None
    if len(info.rows) < num_reqs:
        raise RuntimeError(f"snapkv: batch info has {len(info.rows)} rows, metadata {num_reqs}")
    qsl = query_start_loc_cpu.tolist()
    plan = StepPlan()
    for i in range(num_reqs):
        r = info.rows[i]
        p = r.placement
        if p is None:
            continue
        assert r.settings is not None
        qs, qe = int(qsl[i]), int(qsl[i + 1])
        n, nc, qlen = p.prompt_len, r.num_computed, qe - qs
        if nc >= n:
            plan.shifted.append(ShiftedRow(i, r.req_id, qs, qe, nc, p))
        elif n <= nc + qlen:
            plan.completing.append(CompletionTask(i, r.req_id, qs, qe, nc, p, r.settings))
        elif qlen > 0:
            plan.stashing.append(StashTask(i, r.req_id, qs, qe, nc, r.settings.window))
    return None if plan.empty else plan


def shift_rows(seq_lens: torch.Tensor, block_table: torch.Tensor, shifted: list[ShiftedRow],
               block_size: int, *, out_seq_lens: torch.Tensor | None = None,
               out_block_table: torch.Tensor | None = None,
               fill_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted copies of ``seq_lens`` [R] and ``block_table`` [R, M] for compacted rows.

    Row r with eviction E reads ``seq_len - E`` tokens through ``block_table[r, E/bs:]`` (moved
    to the front; the freed tail entries get ``fill_value``). The inputs are never modified;
    ``out_*`` (persistent buffers, e.g. for CUDA graphs) receive the result when given.
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


def shift_common_metadata(cm, plan: StepPlan, block_size: int, *,
                          out_seq_lens: torch.Tensor | None = None,
                          out_block_table: torch.Tensor | None = None):
    """``cm`` (vLLM's ``CommonAttentionMetadata``) with ``plan.shifted`` rows shifted, as every
    adapter's builder hands it to its base builder: ``seq_lens``/``block_table_tensor`` from
    :func:`shift_rows` (into ``out_*`` when given), ``seq_lens_cpu_upper_bound`` lowered by each
    row's eviction, and ``max_seq_len`` recomputed. With ``seq_lens`` on the CPU the max is
    exact; on a device it comes from the (shifted) CPU upper bound, capped by the old
    ``max_seq_len`` (both are upper bounds), so no device-to-host sync happens; without an upper
    bound the old ``max_seq_len`` stays (an upper bound, which the attention backends accept).
    """
    seq_lens, block_table = shift_rows(cm.seq_lens, cm.block_table_tensor, plan.shifted,
                                       block_size, out_seq_lens=out_seq_lens,
                                       out_block_table=out_block_table)
    changes = dict(seq_lens=seq_lens, block_table_tensor=block_table)
    ub = None
    if cm.seq_lens_cpu_upper_bound is not None:
        ub = cm.seq_lens_cpu_upper_bound.clone()
        for s in plan.shifted:
            ub[s.row] -= s.evicted
        changes["seq_lens_cpu_upper_bound"] = ub
    if seq_lens.device.type == "cpu":
        changes["max_seq_len"] = int(seq_lens[: cm.num_reqs].max())
    elif ub is not None:
        changes["max_seq_len"] = min(int(cm.max_seq_len), int(ub[: cm.num_reqs].max()))
    return dataclasses.replace(cm, **changes)


def extend_metadata(md, base_cls: type, cls: type, **extra):
    """``cls(**fields of md as a base_cls, **extra)``: wrap a backend's metadata in the adapter's
    subclass (which adds ``snapkv_plan`` and ``unshifted_block_table``)."""
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(base_cls)}
    return cls(**fields, **extra)


def after_attention(plan: StepPlan, layer: str, query: torch.Tensor, output: torch.Tensor,
                    kv_cache: torch.Tensor, block_table: torch.Tensor, get_accessor,
                    scale: float) -> None:
    """What an adapter's impl runs after its normal attention, for one layer: stash window
    queries of unfinished prefills, select + compact rows completing prefill, and (debug mode)
    check compacted rows' outputs. ``query`` is ``[num_tokens, Hq, D]``; ``block_table`` the
    step's *unshifted* block table; ``get_accessor()`` returns the layer's
    :class:`CacheAccessor` (called only when needed)."""
    for task in plan.stashing:
        stash_row(task, query, layer)
    if plan.completing:
        acc = get_accessor()
        for task in plan.completing:
            compact_row(task, query, kv_cache, block_table[task.row], acc, layer)
    if plan.shifted and _STATE.debug is not None:
        acc = get_accessor()
        o = output.view(output.shape[0], query.shape[1], -1)
        for row in plan.shifted:
            debug_check_row(row, query, o, kv_cache, block_table[row.row], acc, layer, scale)


# ---------------------------------------------------------------------------------------------
# Cache access (implemented per backend)
# ---------------------------------------------------------------------------------------------


class CacheAccessor(Protocol):
    """Per-token access to one layer's paged cache, through the backend's real layout."""

    def read_kv(self, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of logical ``positions`` ([n] or [H, n]) as ``[H, n, D]`` copies."""
        ...

    def compact(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, kept: torch.Tensor,
                dest_start: int) -> int:
        """Move ``kept`` [H, k] (sorted per head) to logical slots ``dest_start ..``."""
        ...


def compact_by_read_write(read_kv, write_kv, kept: torch.Tensor, dest_start: int) -> int:
    """Generic :meth:`CacheAccessor.compact` from an accessor's per-token ``read_kv(positions)``
    and ``write_kv(positions, keys, values)`` (both ``[H, n, D]``; positions ``[n]`` or
    ``[H, n]``): move, per KV head, ``kept[h]`` (sorted) to logical slots ``dest_start ..``.

    Columns where every head already sits at its destination are identity moves and skipped;
    everything that moves is read into fresh tensors before anything is written, so the
    overlapping source and destination of the tail placement are safe. Returns the number of
    columns moved. (The same algorithm as :func:`vllm_snapkv.paged_kv.compact`.)
    """
    kept = kept.to(torch.int64)
    if kept.dim() != 2:
        raise ValueError(f"kept must be [H, k], got {tuple(kept.shape)}")
    k = kept.shape[1]
    dest = torch.arange(dest_start, dest_start + k, dtype=torch.int64, device=kept.device)
    moving = (kept != dest[None, :]).any(dim=0).nonzero().flatten().tolist()
    if not moving:
        return 0
    lo, hi = moving[0], moving[-1] + 1
    keys, values = read_kv(kept[:, lo:hi])
    write_kv(dest[lo:hi], keys, values)
    return hi - lo


# ---------------------------------------------------------------------------------------------
# Window-query stash for chunked prefill
# ---------------------------------------------------------------------------------------------


class WindowStash:
    """Last ``w`` post-RoPE queries of each in-progress prefill, per (request, layer).

    Entries are a contiguous run of positions ``[end - n, end)``. A chunk starting where the
    stash ends extends it; a chunk starting elsewhere (a recompute after preemption) replaces it.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def update(self, req_id: str, layer: str, start_pos: int, queries: torch.Tensor,
               window: int) -> None:
        """Record ``queries`` [q, Hq, D] at positions ``start_pos ..``; keep the last ``window``."""
        key = (req_id, layer)
        q = queries.shape[0]
        old = self._data.get(key)
        if old is not None and old[0] == start_pos and q < window:
            queries = torch.cat([old[1], queries], dim=0)
        self._data[key] = (start_pos + q, queries[-window:].detach().clone())

    def get(self, req_id: str, layer: str, start: int, end: int) -> torch.Tensor:
        """Queries at positions ``[start, end)`` ([end - start, Hq, D]); raises if missing."""
        entry = self._data.get((req_id, layer))
        if end <= start:
            raise ValueError("empty range")
        if entry is None:
            raise RuntimeError(f"snapkv: no stashed window queries for request {req_id!r}, "
                               f"layer {layer!r} (positions [{start}, {end}) needed). A prefix "
                               "cache hit that skips the window is not supported: turn prefix "
                               "caching off.")
        stash_end, q = entry
        stash_start = stash_end - q.shape[0]
        if end != stash_end or start < stash_start:
            raise RuntimeError(f"snapkv: stashed queries of {req_id!r}/{layer!r} cover "
                               f"[{stash_start}, {stash_end}), need [{start}, {end})")
        return q[start - stash_start:]

    def drop(self, req_id: str, layer: str | None = None) -> None:
        if layer is not None:
            self._data.pop((req_id, layer), None)
            return
        for key in [k for k in self._data if k[0] == req_id]:
            del self._data[key]


# ---------------------------------------------------------------------------------------------
# Debug recorder
# ---------------------------------------------------------------------------------------------


@dataclass
class _KeptRecord:
    prompt_len: int
    evicted: int
    kept: torch.Tensor  # [Hkv, k] original positions
    keys: torch.Tensor  # [Hkv, k, D] original K of the kept tokens (before compaction)
    values: torch.Tensor


class DebugRecorder:
    """Off by default. Records, per (request, layer), the kept tokens' original K/V at compaction
    and, for later steps, the max error between the backend's attention output and dense
    attention over exactly those tokens (plus the generated ones)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], _KeptRecord] = {}
        self.max_err: dict[str, float] = {}  # req_id -> max abs error over layers/steps
        self.max_ref: dict[str, float] = {}  # req_id -> max |reference output| (scale)
        self.slot_err: dict[str, float] = {}  # req_id -> max |slots [E, N) - kept K/V|
        self.checks: dict[str, int] = {}  # req_id -> (layer, step) comparisons made
        self.layer_err: dict[str, float] = {}  # layer -> max abs error
        # (req_id, layer) -> kept positions [Hkv, k]; outlives the request (for tests), bounded.
        self.kept_positions: dict[tuple[str, str], torch.Tensor] = {}

    def summary(self) -> dict:
        return {
            "max_err": dict(self.max_err),
            "max_ref": dict(self.max_ref),
            "slot_err": dict(self.slot_err),
            "checks": dict(self.checks),
            "layer_err": dict(self.layer_err),
        }

    def drop(self, req_id: str) -> None:
        for key in [k for k in self.kept if k[0] == req_id]:
            del self.kept[key]


# ---------------------------------------------------------------------------------------------
# Process-wide worker state
# ---------------------------------------------------------------------------------------------


@dataclass
class CompactionEvent:
    req_id: str
    layer: str
    prompt_len: int
    evicted: int
    kept: int
    moved: int
    window_from_stash: int


class WorkerCompressionState:
    """What one worker process remembers between steps (one per process)."""

    def __init__(self) -> None:
        self.current: BatchCompressionInfo | None = None
        self.stash = WindowStash()
        self.debug: DebugRecorder | None = DebugRecorder() if os.environ.get(
            DEBUG_ENV, "0") not in ("", "0") else None
        # req_id -> {"prompt_len", "evicted", "kept", "layers", "moved"}
        self.compactions: dict[str, dict] = {}
        self.num_compactions = 0  # (request, layer) compactions since start
        # layer -> the cache layout the accessor uses (ISA, dtype, K/V packing), once known
        self.layouts: dict[str, str] = {}

    def report(self) -> dict:
        return {
            "compactions": {k: {kk: vv for kk, vv in v.items() if kk != "layer_names"}
                            for k, v in self.compactions.items()},
            "num_compactions": self.num_compactions,
            "stash_entries": len(self.stash),
            "layouts": dict(self.layouts),
            "debug": self.debug.summary() if self.debug is not None else None,
        }


_STATE = WorkerCompressionState()


def state() -> WorkerCompressionState:
    return _STATE


def publish_batch(info: BatchCompressionInfo | None) -> None:
    """Model runner: make this step's batch info visible to the metadata builders."""
    _STATE.current = info


def current_batch() -> BatchCompressionInfo | None:
    return _STATE.current


def forget_requests(req_ids) -> None:
    """Drop everything stashed for finished / preempted requests."""
    for rid in req_ids:
        _STATE.stash.drop(rid)
        if _STATE.debug is not None:
            _STATE.debug.drop(rid)


def set_debug(enabled: bool) -> None:
    """Turn the debug comparison on (fresh recorder) or off."""
    _STATE.debug = DebugRecorder() if enabled else None


#: ``observer(req_id, seconds)``: one layer's SnapKV selection (scoring + top-k) for a request.
SelectionObserver = Callable[[str, float], None]
_SELECTION_OBSERVERS: list[SelectionObserver] = []


def add_selection_observer(observer: SelectionObserver) -> None:
    """Have :func:`compact_row` report each layer's selection time to ``observer`` (this
    process, once per observer). Observers run on the forward path: keep them cheap."""
    if observer not in _SELECTION_OBSERVERS:
        _SELECTION_OBSERVERS.append(observer)


# ---------------------------------------------------------------------------------------------
# Per-layer work done by an adapter's impl after its normal attention
# ---------------------------------------------------------------------------------------------


def stash_row(task: StashTask, query: torch.Tensor, layer: str) -> None:
    """Keep the last ``w`` queries of a prefill chunk (query rows ``[q_start, q_end)``)."""
    _STATE.stash.update(task.req_id, layer, task.num_computed,
                        query[task.q_start:task.q_end], task.window)


def window_queries(task: CompletionTask, query: torch.Tensor,
                   layer: str) -> tuple[torch.Tensor, int]:
    """The ``w`` observation-window queries ``[Hq, w, D]`` of a completing row, and how many
    came from the stash. Query row ``q_start + i`` sits at position ``num_computed + i``."""
    n, w, nc = task.prompt_len, task.settings.window, task.num_computed
    lo = n - w
    parts = []
    from_stash = 0
    if lo < nc:
        parts.append(_STATE.stash.get(task.req_id, layer, lo, nc))
        from_stash = nc - lo
    first = task.q_start + max(lo, nc) - nc
    last = task.q_start + n - nc
    parts.append(query[first:last])
    q = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if q.shape[0] != w:
        raise RuntimeError(f"snapkv: gathered {q.shape[0]} window queries, expected {w}")
    return q.transpose(0, 1), from_stash


def compact_row(task: CompletionTask, query: torch.Tensor, kv_cache: torch.Tensor,
                block_ids: torch.Tensor, accessor: CacheAccessor, layer: str) -> torch.Tensor:
    """Select and compact one request's prompt in one layer. Returns ``kept`` [Hkv, N - E].

    ``query`` is this step's [num_tokens, Hq, D] post-RoPE queries; ``block_ids`` the request's
    unshifted block table (1-D); the prompt's K is already in the cache (the backends write K/V
    before ``forward``).
    """
    p = task.placement
    n = p.prompt_len
    q_win, from_stash = window_queries(task, query, layer)
    positions = torch.arange(n, dtype=torch.int64, device=kv_cache.device)
    keys, values = accessor.read_kv(kv_cache, block_ids, positions)
    settings = task.settings.replace(budget=p.kept)
    t0 = time.perf_counter()
    kept = select_tokens_with_settings(q_win, keys, settings)
    if _SELECTION_OBSERVERS:
        seconds = time.perf_counter() - t0
        for observer in _SELECTION_OBSERVERS:
            observer(task.req_id, seconds)
    if tuple(kept.shape) != (keys.shape[0], p.kept):
        raise RuntimeError(f"snapkv: selection returned {tuple(kept.shape)}, expected "
                           f"({keys.shape[0]}, {p.kept})")
    dbg = _STATE.debug
    if dbg is not None:
        idx = kept[:, :, None].expand(-1, -1, keys.shape[-1])
        dbg.kept_positions[(task.req_id, layer)] = kept.clone()
        while len(dbg.kept_positions) > 64 * 1024:
            dbg.kept_positions.pop(next(iter(dbg.kept_positions)))
        dbg.kept[(task.req_id, layer)] = _KeptRecord(
            n, p.evicted, kept.clone(), torch.gather(keys, 1, idx).clone(),
            torch.gather(values, 1, idx).clone())
    moved = accessor.compact(kv_cache, block_ids, kept, p.evicted)
    _STATE.stash.drop(task.req_id, layer)
    rec = _STATE.compactions.get(task.req_id)
    if rec is None or layer in rec["layer_names"]:
        # First compaction of this request, or a recompute (after preemption) starting over.
        times = 1 if rec is None else rec["times"] + 1
        rec = _STATE.compactions[task.req_id] = {
            "prompt_len": n, "evicted": p.evicted, "kept": p.kept, "layers": 0, "moved": 0,
            "window_from_stash": 0, "layer_names": set(), "times": times}
    while len(_STATE.compactions) > MAX_REPORTED_REQUESTS:
        _STATE.compactions.pop(next(iter(_STATE.compactions)))
    rec["layer_names"].add(layer)
    rec["layers"] = len(rec["layer_names"])
    rec["moved"] += moved
    rec["window_from_stash"] = max(rec["window_from_stash"], from_stash)
    _STATE.num_compactions += 1
    return kept


# ---------------------------------------------------------------------------------------------
# Debug comparison
# ---------------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference causal GQA attention in fp64: q [T, Hq, D], k/v [Hkv, n, D] (per-head key
    positions ``k_pos`` [Hkv, n]) -> [T, Hq, D]."""
    hq, hkv = q.shape[1], k.shape[0]
    g = hq // hkv
    kq = k.to(torch.float64).repeat_interleave(g, dim=0)  # [Hq, n, D]
    vq = v.to(torch.float64).repeat_interleave(g, dim=0)
    kp = k_pos.repeat_interleave(g, dim=0)  # [Hq, n]
    s = torch.einsum("thd,hnd->htn", q.to(torch.float64), kq) * scale
    mask = kp[:, None, :] > q_pos[None, :, None]  # [Hq, T, n]
    s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("htn,hnd->thd", p, vq)


def debug_check_row(row: ShiftedRow, query: torch.Tensor, output: torch.Tensor,
                    kv_cache: torch.Tensor, block_ids: torch.Tensor, accessor: CacheAccessor,
                    layer: str, scale: float) -> float | None:
    """Compare one compacted row's attention output with dense attention over exactly the kept
    tokens (their K/V as recorded before compaction) plus the tokens generated since.

    ``block_ids`` is the row's *unshifted* block table. Also checks that slots ``[E, N)`` hold
    exactly the kept K/V. Returns the max abs error (or None when nothing was recorded).
    """
    dbg = _STATE.debug
    if dbg is None:
        return None
    rec = dbg.kept.get((row.req_id, layer))
    if rec is None:
        return None
    n, e = rec.prompt_len, rec.evicted
    seq_len = row.num_computed + (row.q_end - row.q_start)
    # What sits in the compacted slots must be exactly the kept tokens' original K/V.
    dev = kv_cache.device
    k_slots, v_slots = accessor.read_kv(kv_cache, block_ids, torch.arange(e, n, device=dev))
    slot_err = max(float((k_slots.float() - rec.keys.float()).abs().max()),
                   float((v_slots.float() - rec.values.float()).abs().max()))
    hkv = rec.keys.shape[0]
    k_all, v_all, pos_all = rec.keys, rec.values, rec.kept
    if seq_len > n:
        gen_pos = torch.arange(n, seq_len, device=dev)
        k_gen, v_gen = accessor.read_kv(kv_cache, block_ids, gen_pos)
        k_all = torch.cat([k_all, k_gen.to(k_all.dtype)], dim=1)
        v_all = torch.cat([v_all, v_gen.to(v_all.dtype)], dim=1)
        pos_all = torch.cat([pos_all, gen_pos[None, :].expand(hkv, -1)], dim=1)
    q = query[row.q_start:row.q_end]
    q_pos = torch.arange(row.num_computed, seq_len, device=dev)
    ref = dense_attention(q, k_all, v_all, q_pos, pos_all, scale)
    got = output[row.q_start:row.q_end].reshape(ref.shape).to(torch.float64)
    err = float((got - ref).abs().max())
    dbg.max_err[row.req_id] = max(dbg.max_err.get(row.req_id, 0.0), err)
    dbg.max_ref[row.req_id] = max(dbg.max_ref.get(row.req_id, 0.0), float(ref.abs().max()))
    dbg.slot_err[row.req_id] = max(dbg.slot_err.get(row.req_id, 0.0), slot_err)
    dbg.checks[row.req_id] = dbg.checks.get(row.req_id, 0) + 1
    dbg.layer_err[layer] = max(dbg.layer_err.get(layer, 0.0), err)
    return err
