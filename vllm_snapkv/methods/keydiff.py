"""KeyDiff: keep the tokens whose keys differ most from the others (query-agnostic).

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv:2504.15364: keys that point away from the mean key
direction tend to be the ones attention singles out, so a token's score is minus the cosine
similarity between its key and the mean of the normalised keys (the "anchor"), per KV head. It
needs no query, so it can compact a prompt that is still being read, before its question has
arrived (kvpress ships it as ``KeyDiffPress``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_snapkv.methods.base import Method, register_method


@register_method
@dataclass(frozen=True)
class KeyDiff(Method):
    name = "keydiff"
    summary = "KeyDiff: keys least similar to the mean key direction (query-agnostic)"
    paper = "arXiv:2504.15364"
    uses_queries = False

    def score(self, keys, values, queries, *, window, score_dtype=torch.float32, **_):
        k = keys.to(score_dtype)
        anchor = F.normalize(k, dim=-1).mean(dim=1, keepdim=True)  # [Hkv, 1, D]
        scores = -F.cosine_similarity(k, anchor, dim=-1)  # [Hkv, L]
        return scores[:, : keys.shape[1] - window]
