"""Value norm: keep the tokens whose values are largest (query-agnostic). An example method.

Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache
Reduction: Value Also Matters", arXiv:2406.12335: a token's contribution to attention's output is
its attention weight times its value vector, and value norms vary enough across tokens to change
what is worth keeping. This example keeps only the value half of that idea — the L1 or L2 norm of
each token's value, per KV head — which needs no query, so it can also compact a prompt while it
is read.

It is the complete example of adding a method from another package: a frozen dataclass whose
fields are its parameters (validated in ``__post_init__``; each becomes the flag
``--snapkv-<name>``), ``score()`` over keys, values and queries, and the entry point in
``pyproject.toml`` that makes ``vllm serve --kv-compression vnorm`` find it once the package is
installed (``pip install ./examples/value_norm``). ``tests/unit/test_example_method.py`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_snapkv.methods import Method, check_choice, register_method


@register_method
@dataclass(frozen=True)
class ValueNorm(Method):
    name = "vnorm"
    summary = "Value norm: values with the largest norm (query-agnostic; an example method)"
    paper = "arXiv:2406.12335"
    uses_queries = False

    vnorm_order: int = field(default=2, metadata={
        "choices": (1, 2), "help": "Value norm: the norm of each value vector, 1 or 2. Default 2."})

    def __post_init__(self) -> None:
        check_choice("vnorm_order", self.vnorm_order, (1, 2))

    def score(self, keys, values, queries, *, window, score_dtype=torch.float32, **_):
        if values is None:
            raise ValueError("vnorm scores values: pass them (select_tokens(..., values=v))")
        v = values[:, : values.shape[1] - window].to(score_dtype)
        return torch.linalg.vector_norm(v, ord=self.vnorm_order, dim=-1)
