"""The accuracy section's arithmetic (``benchmarks.accuracy``), without servers: Wilson intervals
against closed forms and published values, the macro average over included tasks only, and the
agreement table on handmade rows."""

from __future__ import annotations

import math

import pytest

from benchmarks import accuracy
from benchmarks.accuracy import RulerProfile


def test_wilson_matches_closed_forms_and_published_values() -> None:
    z2 = 1.959963984540054 ** 2
    # all wrong / all right: the bounds are z²/(n+z²) and n/(n+z²)
    assert accuracy.wilson(0, 6) == pytest.approx((0.0, z2 / (6 + z2)))
    assert accuracy.wilson(6, 6) == pytest.approx((6 / (6 + z2), 1.0))
    # 50/100: [0.4038, 0.5962] (Wilson 1927; Newcombe 1998, table I style)
    lo, hi = accuracy.wilson(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    # 81/263 (Newcombe 1998, example: 0.2553 to 0.3662)
    lo, hi = accuracy.wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert accuracy.wilson(0, 0) == (0.0, 1.0)


def _rows() -> list[dict]:
    rows = []
    # task a: full 4/4, snapkv@4x 2/4 (question) and 1/4 (context); task b: full 1/4 (excluded)
    for task, full, q, c in (("a", 4, 2, 1), ("b", 1, 0, 0)):
        for i in range(4):
            for regime, comp in (("question", q), ("context", c)):
                rows.append(dict(id=f"{task}-{i}", task=task, length=1024, regime=regime,
                                 column="full", correct=i < full, text="", kept=None))
                rows.append(dict(id=f"{task}-{i}", task=task, length=1024, regime=regime,
                                 column="snapkv@4x", correct=i < comp, text="", kept=1))
    return rows


def test_macro_pools_only_the_included_tasks() -> None:
    p = RulerProfile(tasks=("a", "b"), lengths=(1024,), ratios=(4,), methods=("snapkv",))
    t = accuracy.tables(p, _rows(), {"1024": ["a"]}, {"rows": []})
    q, c = t["macro"]["question"], t["macro"]["context"]
    assert (q["full"]["correct"], q["full"]["total"]) == (4, 4)
    assert (q["snapkv@4x"]["correct"], c["snapkv@4x"]["correct"]) == (2, 1)
    assert q["snapkv@4x"]["accuracy"] == 50.0
    assert (q["snapkv@4x"]["lo"], q["snapkv@4x"]["hi"]) == pytest.approx(
        tuple(100 * x for x in accuracy.wilson(2, 4)))
    # the excluded task is still shown per task
    assert t["per_task"]["b@1024"]["question"]["full"]["correct"] == 1


def test_agreement_compares_the_same_prompts() -> None:
    p = RulerProfile(tasks=("a",), lengths=(1024,), ratios=(4,), methods=("snapkv",),
                     kvpress_ratio=4)
    kv = [dict(id=f"a-{i}", task="a", length=1024, regime=g, column=col, correct=ok, text="")
          for i in range(2) for g in ("question", "context")
          for col, ok in (("full", True), ("snapkv@4x", i == 0))]
    t = accuracy.tables(p, _rows(), {"1024": ["a"]}, {"rows": kv})
    a = t["agreement"]["question"]["snapkv"]
    # engine on a-0, a-1: both right (2 of the first 2 in question); kvpress: 1 of 2
    assert (a["engine"]["correct"], a["engine"]["total"]) == (2, 2)
    assert (a["kvpress"]["correct"], a["kvpress"]["total"]) == (1, 2)
    assert a["same_answer_correctness"] == 1
    lo, hi = accuracy.wilson(1, 2)
    assert a["within"] == (100 * lo <= 100.0 <= 100 * hi)
    assert set(t["agreement"]["question"]) == {"full", "snapkv"}  # only the methods run
    assert not math.isnan(a["engine"]["lo"])
