"""The metadata builders' common step, on vLLM's ``CommonAttentionMetadata``: plan the step
(:func:`vllm_snapkv.backends.plan.plan_step`), shift the rows with evicted slots
(:func:`~vllm_snapkv.backends.plan.shift_rows`), let the backend build, wrap the result.
Both attention adapters (CPU, FlashAttention) call :func:`build_metadata`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from vllm_snapkv.backends.plan import StepPlan, plan_step, shift_rows
from vllm_snapkv.backends.state import RunnerState
from vllm_snapkv.integration import seam

@seam.uses("CommonAttentionMetadata.seq_lens", "CommonAttentionMetadata.block_table_tensor",
           "CommonAttentionMetadata.seq_lens_cpu_upper_bound",
           "CommonAttentionMetadata.max_seq_len", "CommonAttentionMetadata.num_reqs")
def shift_common_metadata(cm: Any, plan: StepPlan, block_size: int, *,
                          out_seq_lens: torch.Tensor | None = None,
                          out_block_table: torch.Tensor | None = None):
    """``cm`` (vLLM's ``CommonAttentionMetadata``) with the shifted rows shifted, as every
    adapter's builder hands it to its base builder: ``seq_lens``/``block_table_tensor`` from
    :func:`shift_rows` (into ``out_*`` when given), ``seq_lens_cpu_upper_bound`` lowered by each
    row's eviction, and ``max_seq_len`` recomputed. With ``seq_lens`` on the CPU the max is
    exact; on a device it comes from the (shifted) CPU upper bound, capped by the old
    ``max_seq_len`` (both are upper bounds), so no device-to-host sync happens; without an upper
    bound the old ``max_seq_len`` stays (an upper bound, which the attention backends accept).
    """
    shifted = plan.shifted
    seq_lens, block_table = shift_rows(cm.seq_lens, cm.block_table_tensor, shifted,
                                       block_size, out_seq_lens=out_seq_lens,
                                       out_block_table=out_block_table)
    changes: dict[str, Any] = dict(seq_lens=seq_lens, block_table_tensor=block_table)
    ub = None
    if cm.seq_lens_cpu_upper_bound is not None:
        ub = cm.seq_lens_cpu_upper_bound.clone()
        for s in shifted:
            ub[s.row] -= s.evicted
        changes["seq_lens_cpu_upper_bound"] = ub
    if seq_lens.device.type == "cpu":
        changes["max_seq_len"] = int(seq_lens[: cm.num_reqs].max())
    elif ub is not None:
        changes["max_seq_len"] = min(int(cm.max_seq_len), int(ub[: cm.num_reqs].max()))
    return dataclasses.replace(cm, **changes)


@seam.uses("CommonAttentionMetadata", "CommonAttentionMetadata.query_start_loc_cpu",
           "CommonAttentionMetadata.num_reqs", "CommonAttentionMetadata.seq_lens",
           "CommonAttentionMetadata.block_table_tensor")
def build_metadata(builder: Any, parent_build: Callable[..., Any], common_prefix_len: int,
                   cm: Any, fast_build: bool, *, state: RunnerState | None,
                   base_cls: type, cls: type,
                   buffers: Callable[[torch.Tensor, torch.Tensor],
                                     tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """Every adapter's ``build``: plan the step, shift rows with evictions (into ``buffers(seq_lens,
    block_table)`` when the builder keeps persistent ones), let the backend build its metadata
    from that, and wrap it in the adapter's subclass ``cls`` of ``base_cls`` carrying
    ``snapkv_plan``, ``snapkv_state`` and ``unshifted_block_table``."""
    plan = None
    if state is not None:
        plan = plan_step(state.current_rows, cm.query_start_loc_cpu, cm.num_reqs)
    if plan is None:
        return parent_build(common_prefix_len, cm, fast_build)
    unshifted = cm.block_table_tensor
    if plan.shifted:
        out_s = out_b = None
        if buffers is not None:
            out_s, out_b = buffers(cm.seq_lens, cm.block_table_tensor)
        cm = shift_common_metadata(cm, plan, builder.block_size, out_seq_lens=out_s,
                                   out_block_table=out_b)
    md = parent_build(common_prefix_len, cm, fast_build)
    fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(base_cls)}
    return cls(**fields, snapkv_plan=plan, snapkv_state=state, unshifted_block_table=unshifted)
