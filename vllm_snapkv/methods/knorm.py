"""Key norm: keep the tokens whose keys have the smallest L2 norm (query-agnostic).

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv:2406.11430: in trained decoders a low key norm goes with high attention, so the norm alone
ranks tokens without any query (kvpress: ``KnormPress``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_snapkv.methods.base import Method, register_method


@register_method
@dataclass(frozen=True)
class KeyNorm(Method):
    name = "knorm"
    summary = "Key norm: keys with the smallest L2 norm (query-agnostic)"
    paper = "arXiv:2406.11430"
    uses_queries = False

    def score(self, keys, values, queries, *, window, score_dtype=torch.float32, **_):
        norms = keys[:, : keys.shape[1] - window].to(score_dtype).norm(dim=-1)
        return -norms
