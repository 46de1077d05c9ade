"""``benchmarks/step_cost.py`` at toy sizes (``--smoke``): both engines run (vanilla and decode
compaction) and every batch size gets its row, so the benchmark behind docs/benchmarks.md's step-cost
figures cannot rot. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks import REPO

pytestmark = pytest.mark.engine


def test_step_cost_smoke(tmp_path):
    out = tmp_path / "step-cost.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--smoke", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["output"] == 16 and set(res["results"]) == {"vanilla", "decode-128"}
    for rows in res["results"].values():
        assert set(rows) == {"1", "2"}
        for row in rows.values():
            assert all(math.isfinite(row[k]) for k in ("wall_s", "prefill_s", "step_ms",
                                                         "per_token_us", "tokens_per_s"))
    assert "| decode-128 | 2 |" in proc.stdout
