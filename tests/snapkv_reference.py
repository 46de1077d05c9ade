"""SnapKV's selection written plainly, for tests: the reference every test compares against.

One query head at a time, an explicit causal mask, a full softmax in float64, explicit padding for
the pooling, Python's ``sorted`` with an explicit (score descending, position ascending) key. It
shares no code with ``vllm_snapkv`` (the unit tests of the selection and the engine tests'
kept-set checks against HF transformers both use it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_budget(n: int, *, budget, ratio, window, sink) -> int:
    """The documented rule, restated: budget, or kvpress's count for compression 1 - ratio."""
    if budget is not None:
        return budget
    compression_ratio = 1 - ratio
    return max(max(1, int(n * (1 - compression_ratio))), window + sink + 1)


def reference_scores(q, k, *, window, kernel, pooling, reduction, gqa_aggregation):
    """[Hkv, N - w] float64 smoothed scores, the textbook way."""
    q = q.double()
    k = k.double()
    hq, w, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    p = n - w
    per_query_head = []
    for h in range(hq):
        kv = h // g  # HF/vLLM: query heads [kv*g, (kv+1)*g) share KV head kv
        logits = (q[h] @ k[kv].T) / math.sqrt(d)  # [w, n]
        for i in range(w):
            # window query i is the token at position n - w + i; it sees keys 0 .. n - w + i
            logits[i, n - w + i + 1 :] = float("-inf")
        probs = torch.softmax(logits, dim=-1)[:, :p]
        r = probs.sum(dim=0) if reduction == "sum" else probs.mean(dim=0)
        half = kernel // 2
        if pooling == "avg":
            padded = F.pad(r, (half, half), value=0.0)
            pooled = padded.unfold(0, kernel, 1).sum(dim=-1) / kernel
        else:
            padded = F.pad(r, (half, half), value=float("-inf"))
            pooled = padded.unfold(0, kernel, 1).max(dim=-1).values
        per_query_head.append(pooled)
    rows = []
    for kv in range(hkv):
        grp = torch.stack(per_query_head[kv * g : (kv + 1) * g])
        rows.append(grp.mean(dim=0) if gqa_aggregation == "mean" else grp.max(dim=0).values)
    return torch.stack(rows)


def reference_keep(q, k, *, budget=None, ratio=None, window, kernel, pooling, reduction,
                   gqa_aggregation, sink):
    """(kept positions per KV head as lists, reference scores or None)."""
    hkv, n, _ = k.shape
    b = reference_budget(n, budget=budget, ratio=ratio, window=window, sink=sink)
    if n <= b:
        return [list(range(n)) for _ in range(hkv)], None
    scores = reference_scores(
        q, k, window=window, kernel=kernel, pooling=pooling, reduction=reduction,
        gqa_aggregation=gqa_aggregation,
    )
    p = n - window
    kept = []
    for kv in range(hkv):
        s = scores[kv].tolist()
        ranked = sorted(range(sink, p), key=lambda i: (-s[i], i))
        top = sorted(ranked[: b - window - sink])
        kept.append(list(range(sink)) + top + list(range(p, n)))
    return kept, scores
