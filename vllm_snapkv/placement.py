"""Placement arithmetic: where a compressed prompt's kept KV goes, and which blocks are freed.

The paged cache keeps ``num_computed_tokens`` at its true value N; only what attention reads
shrinks. Let the selection want to keep ``target`` of the N prompt tokens and let the cache have
blocks of ``block_size`` tokens. Then

    E = floor((N - target) / block_size) * block_size     (0 when N <= target)

The kept tokens are written, per layer and KV head, into the logical slots [E, N) — the tail of the
request's own blocks, with the observation window (the last prompt tokens) already in place — and
the whole head blocks [0, E) are never read again, so they go back to the block pool. Because the
tail [E, N) holds N − E >= target slots, the selection keeps exactly N − E tokens per KV head: the
rounding up to a block boundary keeps a few more tokens for free instead of leaving slots empty.

E is a pure function of (N, target, block_size). The scheduler (which frees blocks) and every
worker (which compacts the cache and shifts the attention metadata) compute it independently from
the same inputs, so no channel between them is needed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where one prompt's kept KV lives after compression.

    Attributes:
        prompt_len: N, tokens in the prompt (``num_computed_tokens`` stays N).
        evicted: E, a multiple of ``block_size``: logical slots [0, E) are dropped.
        block_size: tokens per KV-cache block.
    """

    prompt_len: int
    evicted: int
    block_size: int

    @property
    def kept(self) -> int:
        """Tokens kept per KV head: N − E (the selection budget actually used)."""
        return self.prompt_len - self.evicted

    @property
    def compressed(self) -> bool:
        """True when at least one block is freed."""
        return self.evicted > 0

    @property
    def freed_blocks(self) -> int:
        """Head blocks [0, E / block_size) that return to the pool."""
        return self.evicted // self.block_size

    @property
    def held_blocks(self) -> int:
        """Blocks the request still holds for its prompt: ceil((N − E) / block_size)."""
        return -(-self.kept // self.block_size)

    @property
    def prompt_blocks(self) -> int:
        """Blocks the prompt occupies without compression: ceil(N / block_size)."""
        return -(-self.prompt_len // self.block_size)

    def attended_len(self, seq_len: int) -> int:
        """Tokens attention reads for a request whose true length is ``seq_len`` (>= N)."""
        return seq_len - self.evicted


def plan(prompt_len: int, target: int, block_size: int) -> Placement:
    """Place a prompt of ``prompt_len`` tokens of which the selection wants to keep ``target``.

    ``target`` >= ``prompt_len`` means "keep everything" (E = 0). Raises ``ValueError`` on
    non-positive sizes.
    """
    if prompt_len < 0:
        raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    surplus = prompt_len - target
    evicted = (surplus // block_size) * block_size if surplus > 0 else 0
    return Placement(prompt_len=prompt_len, evicted=evicted, block_size=block_size)
