"""A compaction whose window queries are missing still runs, ranked by the query-agnostic
fallback method, and the engine goes on (no exception): one request's problem never stops it.

The kept set is checked against KeyDiff's float64 formula (``test_methods.keydiff_reference``),
and the moved K/V against the original keys at the kept positions.
"""

from __future__ import annotations

import torch
from dense_kv import DenseAccessor
from test_methods import _keep, keydiff_reference

from vllm_snapkv.backends import compaction
from vllm_snapkv.backends.plan import RowPlan
from vllm_snapkv.backends.state import RunnerState
from vllm_snapkv.schedule import Schedule
from vllm_snapkv.settings import CompressionSettings


def test_missing_window_queries_fall_back_to_keydiff() -> None:
    n, hq, hkv, d, window, budget, step = 300, 4, 2, 16, 8, 128, 4
    assert compaction.FALLBACK_METHOD == "keydiff"
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(hkv, n, d, generator=gen) * (1 + torch.rand(hkv, n, 1, generator=gen))
    values = torch.randn(hkv, n, d, generator=gen)
    orig_k, orig_v = keys.clone(), values.clone()

    settings = CompressionSettings(budget=budget, window=window)
    schedule = Schedule(prompt_len=n, block_size=64, method="snapkv", prompt_target=budget)
    (c,) = schedule.compactions(n)
    # The last step computed only the final `step` tokens: the window's first 4 queries would
    # have to come from the stash, which is empty.
    row = RowPlan(0, "orphan", 0, step, n - step, settings, schedule, 0, (c,), None)
    state = RunnerState(object())
    kept = compaction.compact(row, c, torch.randn(step, hq, d, generator=gen), torch.empty(0),
                              torch.empty(0), DenseAccessor(keys, values), state, "layer0")
    assert state.fallbacks == 1
    ref = keydiff_reference(orig_k[:, c.prior:c.at])
    for h in range(hkv):
        want = _keep(ref[h], c.at - c.prior, c.kept, window, 0)
        assert sorted(kept[h].tolist()) == want
        # ... and those tokens' K/V now sit in the tail slots [evicted, at), in order.
        assert torch.equal(keys[h, c.evicted:c.at], orig_k[h, c.prior + torch.tensor(want)])
        assert torch.equal(values[h, c.evicted:c.at], orig_v[h, c.prior + torch.tensor(want)])
