"""Placement arithmetic: E, kept tokens and block counts, against a brute-force count."""

from __future__ import annotations

import itertools

import pytest

from vllm_snapkv.placement import plan


def _brute_force(n: int, target: int, bs: int) -> int:
    """Largest multiple of bs that still leaves at least `target` of the n tokens."""
    best = 0
    for e in range(0, n + 1, bs):
        if n - e >= target:
            best = e
    return best


@pytest.mark.parametrize("n,target,bs", list(itertools.product(
    [0, 1, 31, 32, 33, 100, 128, 129, 1000, 2048, 4097],
    [1, 16, 32, 64, 100, 512, 1024],
    [1, 16, 32, 128],
)))
def test_evicted_is_the_largest_block_multiple_that_keeps_the_target(n, target, bs) -> None:
    p = plan(n, target, bs)
    assert p.evicted == _brute_force(n, target, bs)
    assert p.evicted % bs == 0
    assert p.kept == n - p.evicted
    assert p.kept >= min(n, target)
    # Never more than one block's worth of extra tokens is kept beyond the target.
    if n > target:
        assert p.kept - target < bs
    assert p.freed_blocks == p.evicted // bs
    assert p.held_blocks + p.freed_blocks == p.prompt_blocks
    assert p.compressed == (p.freed_blocks > 0)


def test_short_prompt_is_untouched() -> None:
    p = plan(100, 512, 32)
    assert (p.evicted, p.kept, p.freed_blocks, p.compressed) == (0, 100, 0, False)


def test_example_from_the_docs() -> None:
    # 4096 tokens, keep 1024, 128-token blocks: 24 blocks freed, 8 held, 4x fewer blocks.
    p = plan(4096, 1024, 128)
    assert (p.evicted, p.kept, p.freed_blocks, p.held_blocks) == (3072, 1024, 24, 8)
    assert p.attended_len(4100) == 1028


@pytest.mark.parametrize("args", [(-1, 10, 16), (10, 0, 16), (10, 5, 0)])
def test_bad_sizes_are_refused(args) -> None:
    with pytest.raises(ValueError):
        plan(*args)
