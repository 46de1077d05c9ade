"""The exactness oracle: off the hot path, on when ``VLLM_SNAPKV_DEBUG=1`` or turned on by RPC.

At every compaction it records, per (request, layer), the original positions of the kept slots
and their K/V as they were before the move. In every later step in which the request attends, it
compares each layer's attention output for that request with dense fp64 attention over exactly
those kept tokens plus the tokens computed since (their K/V read back from the cache), and checks
that the compacted slots hold exactly the recorded K/V. Tests read the results through the
``snapkv_report``/``snapkv_kept`` worker RPCs.

With several compactions (while a prompt is read, during decode) the records compose: slot
``i`` of a compaction's ranked range is either a kept slot of the previous compaction (whose
original position was recorded) or a token computed since (its own position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_snapkv.backends.compaction import CacheAccessor
    from vllm_snapkv.backends.plan import RowPlan
    from vllm_snapkv.schedule import Compaction

__all__ = ["DebugRecorder", "dense_attention"]

#: Kept-position histories kept for tests after their request finished (bounded).
MAX_KEPT_HISTORY = 64 * 1024


@dataclass
class _Record:
    at: int  # slots [evicted, at) hold the kept tokens
    evicted: int
    positions: torch.Tensor  # [Hkv, at - evicted] original positions
    keys: torch.Tensor  # [Hkv, at - evicted, D] their K before the move
    values: torch.Tensor


@dataclass
class DebugRecorder:
    """Records at compaction, compares in later steps. ``summary()`` is what the report shows."""

    records: dict[tuple[str, str], _Record] = field(default_factory=dict)
    max_err: dict[str, float] = field(default_factory=dict)  # req -> max abs error
    max_ref: dict[str, float] = field(default_factory=dict)  # req -> max |reference|
    slot_err: dict[str, float] = field(default_factory=dict)  # req -> max |slot - recorded|
    checks: dict[str, int] = field(default_factory=dict)  # req -> (layer, step) comparisons
    layer_err: dict[str, float] = field(default_factory=dict)  # layer -> max abs error
    #: (req, layer) -> [(at, phase, kept original positions [Hkv, k])], outlives the request.
    kept_history: dict[tuple[str, str], list[tuple[int, str, torch.Tensor]]] = \
        field(default_factory=dict)
    #: (req, layer) -> the history of its last run before a recompute started over.
    kept_before_recompute: dict[tuple[str, str], list[tuple[int, str, torch.Tensor]]] = \
        field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "max_err": dict(self.max_err),
            "max_ref": dict(self.max_ref),
            "slot_err": dict(self.slot_err),
            "checks": dict(self.checks),
            "layer_err": dict(self.layer_err),
        }

    def drop(self, req_id: str) -> None:
        for key in [k for k in self.records if k[0] == req_id]:
            del self.records[key]

    # -------------------------------------------------------------------------- recording

    def on_compaction(self, req_id: str, layer: str, c: Compaction, kept_rel: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor) -> None:
        """``kept_rel`` [Hkv, k]: kept slots relative to ``c.prior``; ``keys``/``values``:
        the ranked range ``[c.prior, c.at)`` as read before the move."""
        hkv = keys.shape[0]
        positions = torch.arange(c.prior, c.at, device=keys.device).expand(hkv, -1)
        prev = self.records.get((req_id, layer))
        if prev is not None and prev.evicted == c.prior and prev.at <= c.at:
            fresh = torch.arange(prev.at, c.at, device=keys.device).expand(hkv, -1)
            positions = torch.cat([prev.positions, fresh], dim=1)
        kept_pos = torch.gather(positions, 1, kept_rel)
        idx = kept_rel[:, :, None].expand(-1, -1, keys.shape[-1])
        self.records[(req_id, layer)] = _Record(
            c.at, c.evicted, kept_pos.clone(), torch.gather(keys, 1, idx).clone(),
            torch.gather(values, 1, idx).clone())
        hist = self.kept_history.setdefault((req_id, layer), [])
        if hist and hist[-1][0] >= c.at:  # a recompute after preemption starts over
            self.kept_before_recompute[(req_id, layer)] = list(hist)
            hist.clear()
        hist.append((c.at, c.phase, kept_pos.clone()))
        for history in (self.kept_history, self.kept_before_recompute):
            while len(history) > MAX_KEPT_HISTORY:
                history.pop(next(iter(history)))

    # -------------------------------------------------------------------------- checking

    def check_row(self, row: RowPlan, query: torch.Tensor, output: torch.Tensor,
                  kv_cache: torch.Tensor, block_ids: torch.Tensor, accessor: CacheAccessor,
                  layer: str, scale: float) -> float | None:
        """Compare one row's attention output in this step with dense attention over the kept
        tokens plus those computed since. ``block_ids``: the row's *unshifted* block table.
        Returns the max abs error (``None`` when nothing is recorded for it)."""
        rec = self.records.get((row.req_id, layer))
        if rec is None or rec.evicted != row.evicted:
            return None
        seq_len = row.step_end
        dev = kv_cache.device
        k_slots, v_slots = accessor.read_kv(kv_cache, block_ids,
                                            torch.arange(rec.evicted, rec.at, device=dev))
        slot_err = max(float((k_slots.float() - rec.keys.float()).abs().max()),
                       float((v_slots.float() - rec.values.float()).abs().max()))
        hkv = rec.keys.shape[0]
        k_all, v_all, pos_all = rec.keys, rec.values, rec.positions
        if seq_len > rec.at:
            gen_pos = torch.arange(rec.at, seq_len, device=dev)
            k_gen, v_gen = accessor.read_kv(kv_cache, block_ids, gen_pos)
            k_all = torch.cat([k_all, k_gen.to(k_all.dtype)], dim=1)
            v_all = torch.cat([v_all, v_gen.to(v_all.dtype)], dim=1)
            pos_all = torch.cat([pos_all, gen_pos[None, :].expand(hkv, -1)], dim=1)
        q = query[row.q_start:row.q_end]
        q_pos = torch.arange(row.num_computed, seq_len, device=dev)
        ref = dense_attention(q, k_all, v_all, q_pos, pos_all, scale)
        got = output[row.q_start:row.q_end].reshape(ref.shape).to(torch.float64)
        err = float((got - ref).abs().max())
        rid = row.req_id
        self.max_err[rid] = max(self.max_err.get(rid, 0.0), err)
        self.max_ref[rid] = max(self.max_ref.get(rid, 0.0), float(ref.abs().max()))
        self.slot_err[rid] = max(self.slot_err.get(rid, 0.0), slot_err)
        self.checks[rid] = self.checks.get(rid, 0) + 1
        self.layer_err[layer] = max(self.layer_err.get(layer, 0.0), err)
        return err


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
