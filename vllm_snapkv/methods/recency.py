"""StreamingLLM's rule as a baseline: keep the first tokens (attention sinks) and the most
recent ones.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv:2309.17453: the
first few tokens soak up attention whatever they say, so keeping them plus a recent window keeps
a model fluent. At SnapKV's budget and placement it shows what a learned selection buys over
position alone. Four sinks unless ``--snapkv-sink`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_snapkv.methods.base import Method, register_method


@register_method
@dataclass(frozen=True)
class Recency(Method):
    name = "recency"
    summary = "StreamingLLM baseline: sinks (4 unless --snapkv-sink) + the most recent tokens"
    paper = "arXiv:2309.17453"
    uses_queries = False
    default_sink = 4

    def score(self, keys, values, queries, *, window, **_):
        # Each position's own index: the most recent win.
        hkv, length = keys.shape[0], keys.shape[1] - window
        return torch.arange(length, device=keys.device, dtype=torch.float32).expand(hkv, length)
