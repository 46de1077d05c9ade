"""One request's K/V as plain ``[H, N, D]`` tensors behind the compaction's cache-accessor
protocol (``read_kv`` / ``write_kv``), for unit tests of the backend-agnostic compaction."""

from __future__ import annotations

import torch


class DenseAccessor:
    """Reads and writes positions of ``keys``/``values`` in place; ignores cache and blocks."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def read_kv(self, kv_cache, block_ids, positions):
        hkv = self.keys.shape[0]
        idx = positions if positions.dim() == 2 else positions.expand(hkv, -1)
        return (torch.stack([self.keys[h, idx[h]] for h in range(hkv)]),
                torch.stack([self.values[h, idx[h]] for h in range(hkv)]))

    def write_kv(self, kv_cache, block_ids, positions, k, v):
        self.keys[:, positions], self.values[:, positions] = k, v
