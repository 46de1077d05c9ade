"""The method registry and the query-agnostic methods, against independent float64 formulas.

References restate each paper's rule plainly (one KV head at a time, Python sorting with an
explicit (score descending, position ascending) key) and share no code with
``vllm_snapkv.methods``.
"""

from __future__ import annotations

import argparse
import math
import random

import pytest
import torch

from vllm_snapkv import select_tokens
from vllm_snapkv.integration.cli import add_cli_args
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.methods import (
    Method,
    base,
    get_method,
    method_names,
    register_method,
    registered_methods,
)
from vllm_snapkv.settings import SettingsError, CompressionSettings


def _keep(scores: list[float], n: int, budget: int, window: int, sink: int) -> list[int]:
    """sinks + top (budget - window - sink) of [sink, n - window) + window, ascending."""
    ranked = sorted(range(sink, n - window), key=lambda i: (-scores[i], i))
    return sorted(list(range(sink)) + ranked[: budget - window - sink]) + \
        list(range(n - window, n))


def keydiff_reference(keys: torch.Tensor) -> list[list[float]]:
    """KeyDiff (arXiv:2504.15364): -cos(k_i, mean_j k_j/|k_j|), per KV head, in float64."""
    out = []
    for head in keys.double():
        unit = [k / k.norm() for k in head]
        anchor = sum(unit) / len(unit)
        out.append([-float(k @ anchor / (k.norm() * anchor.norm())) for k in head])
    return out


def knorm_reference(keys: torch.Tensor) -> list[list[float]]:
    """Key norm (arXiv:2406.11430): -|k_i|_2, per KV head, in float64."""
    return [[-math.sqrt(sum(float(x) ** 2 for x in k)) for k in head] for head in keys.double()]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("method,reference", [("keydiff", keydiff_reference),
                                              ("knorm", knorm_reference)])
def test_query_agnostic_methods_match_their_papers(method, reference, seed) -> None:
    rng = random.Random(seed)
    hkv, n, d = rng.choice([1, 2, 3]), rng.randint(40, 700), rng.choice([8, 64])
    window, sink = rng.choice([1, 8, 32]), rng.choice([0, 2])
    budget = rng.randint(window + sink + 1, n)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=gen) * (1 + torch.rand(hkv, n, 1, generator=gen))
    got = select_tokens(None, keys, method=method, budget=budget, window=window, sink=sink,
                        score_dtype=torch.float64)
    ref = reference(keys)
    for h in range(hkv):
        assert got[h].tolist() == _keep(ref[h], n, min(budget, n), window, sink)


def test_query_agnostic_methods_ignore_queries_and_snapkv_needs_them() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 16, 32, generator=gen), torch.randn(2, 400, 32, generator=gen)
    for name in ("keydiff", "knorm", "recency"):
        assert not get_method(name).uses_queries
        assert torch.equal(select_tokens(None, k, method=name, budget=100, window=16),
                           select_tokens(q, k, method=name, budget=100, window=16))
    assert get_method("snapkv").uses_queries
    with pytest.raises(ValueError, match="needs the window's queries"):
        select_tokens(None, k, method="snapkv", budget=100, window=16)


def test_every_method_states_its_idea_and_paper() -> None:
    methods = registered_methods()
    assert {"snapkv", "recency", "keydiff", "knorm"} <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name and cls.summary and cls.paper.startswith("arXiv:")
        assert len((cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__)
                   or "") > 200  # the module docstring explains the idea


@pytest.fixture
def toy_method():
    """A method registered for the test and removed afterwards: what adding one takes."""

    @register_method
    class EveryOther(Method):
        name = "everyother"
        summary = "keeps even positions (a test method)"
        paper = "arXiv:0000.00000"
        uses_queries = False

        def score(self, keys, values, queries, *, window, **_):
            n = keys.shape[1] - window
            return (torch.arange(n) % 2 == 0).float().expand(keys.shape[0], n)

    yield EveryOther
    del base._REGISTRY["everyother"]
    base._method.cache_clear()


def test_a_registered_method_is_selectable_everywhere(toy_method) -> None:
    assert "everyother" in method_names()
    kept = select_tokens(None, torch.randn(1, 100, 8), method="everyother", budget=40, window=4)
    assert kept[0, :36].tolist() == list(range(0, 72, 2))
    # The engine config, per-request settings and the CLI take it by name.
    cfg = CompressionConfig.from_additional_config({"kv_compression": "everyother"})
    assert cfg.schedule(5000, 128, None).method == "everyother"
    snap = CompressionConfig.from_additional_config({"kv_compression": "snapkv"})
    assert snap.request_settings({"kv_compression": "everyother"}).method == "everyother"
    parser = add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--kv-compression", "everyother"]).kv_compression == "everyother"
    text = " ".join(parser.format_help().split())
    assert "everyother" in text and "keeps even positions" in text


def test_registry_refuses_bad_or_conflicting_names() -> None:
    for name in ("", "None", "none", "with space"):
        bad = type("Bad", (Method,), {"name": name, "summary": "x"})
        with pytest.raises(ValueError):
            register_method(bad)
    clash = type("Clash", (Method,), {"name": "snapkv", "summary": "x"})
    with pytest.raises(ValueError, match="already registered"):
        register_method(clash)
    with pytest.raises(SettingsError) as err:
        CompressionSettings(budget=100, method="h2o")
    assert err.value.setting == "method" and "'snapkv'" in str(err.value)


def test_cli_help_lists_the_registry() -> None:
    text = " ".join(add_cli_args(argparse.ArgumentParser()).format_help().split())
    for name, cls in registered_methods().items():
        assert name in text and cls.paper in text
