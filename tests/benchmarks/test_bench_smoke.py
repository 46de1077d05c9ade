"""The benchmark suite at toy sizes (``suite.py --smoke``): every section runs end to end against
real servers and kvpress, and writes its results, summary and plots — so the benchmarks cannot
rot. Timings are not asserted (benchmarks, not tests); what must hold whatever the machine is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_snapkv.testing import REPO

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "suite.py"), "--smoke",
                    "--out", str(out)], check=True, cwd=REPO, timeout=3000)
    return json.loads((out / "results.json").read_text()), out


def test_writes_summary_and_plots(smoke) -> None:
    results, out = smoke
    assert results["smoke"] and set(results["sections"]) == {
        "overhead", "blocks", "accuracy", "selection", "capacity", "throughput"}
    summary = (out / "summary.md").read_text()
    for heading in ("KV blocks held", "Capacity", "Throughput", "Overhead", "Selection cost",
                    "Needle accuracy"):
        assert heading in summary
    for png in ("accuracy_vs_budget.png", "throughput_capacity.png", "ttft_vs_prompt.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_blocks_held_equal_the_placement_arithmetic(smoke) -> None:
    rows = smoke[0]["blocks"]["rows"]
    assert rows and all(r["snapkv_blocks"] == r["expected_blocks"] for r in rows), rows
    assert all(r["snapkv_blocks"] < r["vanilla_blocks"] for r in rows)
    # Read from scrapes that showed the request decoding; the figure is their most common value.
    for r in rows:
        readings = r["snapkv_readings"]
        assert readings[str(r["snapkv_blocks"])] * 2 > sum(readings.values()), r


def test_pressure_sections_measured_every_config(smoke) -> None:
    pressure = smoke[0]["pressure"]
    assert set(pressure["capacity"]) == set(pressure["throughput"]) == {"vanilla", "2x", "4x", "8x"}
    for t in pressure["throughput"].values():
        assert t["output_tokens"] == t["requests"] * pressure["output_tokens"]
        floor = t["prefill_only"]  # the same load, one output token each: the prefill floor
        assert floor["output_tokens"] == floor["requests"] == t["requests"]
        assert floor["prefix_cache_hit_tokens"] == t["prefix_cache_hit_tokens"] == 0
    split = pressure["throughput_split"]
    assert split["vanilla"]["decode_phase_speedup"] == 1.0
    assert split["bound_if_decode_were_free"] == (
        pressure["throughput"]["vanilla"]["wall_s"] / split["vanilla"]["prefill_floor_s"])
    cap = {k: v["capacity"] for k, v in pressure["capacity"].items()}
    # An eighth of the blocks per request lets more requests in. (Only the extremes are compared:
    # a capacity trial needs all K requests alive at once, which a loaded machine can miss.)
    assert cap["8x"] > cap["vanilla"], cap
    for c in pressure["capacity"].values():  # the walk ended on a boundary it measured
        trials = c["trials"]
        assert trials[str(c["capacity"])]["preemptions"] == 0
        assert str(c["capacity"] + 1) in trials or c["capacity"] == 1


def test_every_peer_answered_every_cell(smoke) -> None:
    results = smoke[0]
    budgets, lengths = results["profile"]["budgets"], results["profile"]["lengths"]
    table = results["accuracy"]["table"]
    for n in lengths:
        cols = set(table[str(n)])
        assert {"full"} | {f"{m}@{b}" for m in ("snapkv", "recency") for b in budgets} <= cols
    kv = results["kvpress"]["kvpress"]["accuracy"]
    assert all(str(b) in kv[str(n)] for n in lengths for b in budgets)
    # kvpress's one-prefill-for-every-budget was checked against one prefill per budget
    checks = results["kvpress"]["kvpress"]["meta"]["equivalence_checks"]
    assert {c["length"] for c in checks} == set(lengths) and all(c["identical"] for c in checks)
    agreement = results["kvpress"]["agreement"]["comparison"]
    assert agreement["sets"] > 0 and 0.0 <= agreement["fraction_identical"] <= 1.0
