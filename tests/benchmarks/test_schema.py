"""The benchmark results schema (``benchmarks.schema``), without servers: the committed runs
validate, broken results are reported, the suite and the schema name the same sections and
profile fields, and the report redraws the committed summaries byte for byte."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import REPO, schema

COMMITTED = {
    "main": REPO / "docs" / "benchmarks",
    "throughput-floor": REPO / "docs" / "benchmarks" / "throughput-floor",
    "phases": REPO / "docs" / "benchmarks" / "phases",
    "accuracy": REPO / "docs" / "benchmarks" / "accuracy",
    "trigger": REPO / "docs" / "benchmarks" / "trigger",
}


def _load(name: str) -> dict:
    return json.loads((COMMITTED[name] / "results.json").read_text())


@pytest.fixture(scope="module")
def main_run() -> dict:
    return _load("main")


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_validate(name: str) -> None:
    assert schema.validate(_load(name)) == []


def test_missing_field_is_reported(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    del results["blocks"]["rows"][3]["evicted"]
    del results["kvpress"]["agreement"]["comparison"]["fraction_identical"]
    problems = schema.validate(results)
    assert "blocks.rows[3]: missing field 'evicted'" in problems
    assert "kvpress.agreement.comparison: missing field 'fraction_identical'" in problems
    assert len(problems) == 2, problems


def test_wrong_type_is_reported(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    results["pressure"]["capacity"]["vanilla"]["capacity"] = "12"
    results["overhead"]["ttft"]["1024"]["ratio"] = None  # nullable: fine
    results["overhead"]["decode_context"] = None  # not nullable
    results["needle"]["rows"][0]["full"] = 60494
    results["blocks"]["rows"][0]["matches_arithmetic"] = 1  # an int is not a bool
    results["smoke"] = "false"
    problems = schema.validate(results)
    assert len(problems) == 5, problems
    for path in ("pressure.capacity.vanilla.capacity", "overhead.decode_context",
                 "needle.rows[0].full", "blocks.rows[0].matches_arithmetic", "smoke"):
        assert any(p.startswith(path + ": expected") for p in problems), (path, problems)


def test_bool_is_not_a_number_and_int_is_a_float(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    results["wall_s"] = 6393  # an int where a float is expected: a JSON number all the same
    assert schema.validate(results) == []
    results["wall_s"] = True
    assert schema.validate(results) == ["wall_s: expected float, got bool True"]


def test_unknown_fields_keys_and_sections_are_reported(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    results["bogus_block"] = {"rows": []}  # a block the schema does not know
    results["blocks"]["rows"][0]["freed"] = 30
    results["pressure"]["throughput"]["16"] = results["pressure"]["throughput"]["8x"]
    results["sections"].append("bogus")
    problems = schema.validate(results)
    assert len(problems) == 4, problems
    assert any(p.startswith("results: unexpected field 'bogus_block'") for p in problems)
    assert "blocks.rows[0]: unexpected field 'freed'" in problems
    assert any(p.startswith("pressure.throughput: unexpected field '16'") for p in problems)
    assert any(p.startswith("sections[6]: unknown value 'bogus'") for p in problems)


def test_required_keys_among_configurations(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    del results["pressure"]["capacity"]["vanilla"]
    assert schema.validate(results) == ["pressure.capacity: missing field 'vanilla'"]


def test_optional_fields_may_be_absent_but_not_null(main_run: dict) -> None:
    results = copy.deepcopy(main_run)  # an older run: it lacks the optional fields below
    assert "prefill_only" not in results["pressure"]["throughput"]["4x"]
    assert "decode_prompt" not in results["profile"]
    results["pressure"]["throughput"]["4x"]["prefill_only"] = None
    results["profile"]["decode_prompt"] = None
    assert sorted(schema.validate(results)) == [
        "pressure.throughput.4x.prefill_only: expected an object, got null",
        "profile.decode_prompt: expected int, got null",
    ]
    assert schema.validate({**main_run, "wall_s": None}, complete=False) == [
        "wall_s: expected float, got null"]


def test_no_coercion(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    results["blocks"]["rows"][0]["prompt"] = 1024.0  # a float is not an int
    results["blocks"]["rows"][1]["reduction"] = "0.5"  # nor a string a float
    results["profile"]["lengths"] = {1024}  # a list (or a tuple), not a set
    results["kvpress"]["kvpress"]["cases"][0]["correct"]["full"] = 1  # nor an int a bool
    results["needle"]["rows"][0]["snapkv@64"] = 7  # a column's completion is a string
    assert sorted(schema.validate(results)) == [
        "blocks.rows[0].prompt: expected int, got float 1024.0",
        "blocks.rows[1].reduction: expected float, got str '0.5'",
        "kvpress.kvpress.cases[0].correct.full: expected bool, got int 1",
        "needle.rows[0].snapkv@64: expected str, got int 7",
        "profile.lengths: expected a list, got set",
    ]


def test_complete_runs_have_wall_time_and_every_section(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    del results["wall_s"], results["blocks"], results["pressure"]["capacity"]
    assert sorted(schema.validate(results)) == [
        "blocks: missing, but section 'blocks' ran",
        "pressure.capacity: missing, but section 'capacity' ran",
        "results: missing field 'wall_s'",
    ]
    # a save between sections: only what is there is checked
    assert schema.validate(results, complete=False) == []
    with pytest.raises(schema.SchemaError, match="wall_s"):
        schema.check(results)


def test_a_run_in_progress_validates_after_its_first_section(main_run: dict) -> None:
    meta = {k: copy.deepcopy(main_run[k]) for k in schema.META}
    assert schema.validate(meta, complete=False) == []
    assert schema.validate({**meta, "selection": main_run["selection"]}, complete=False) == []
    assert schema.validate(meta) != []


def test_not_an_object() -> None:
    assert schema.validate([]) == ["results: expected an object, got list"]


def test_keys_must_be_strings(main_run: dict) -> None:
    results = copy.deepcopy(main_run)
    results["overhead"]["ttft"][8192] = results["overhead"]["ttft"]["1024"]
    assert schema.validate(results) == ["overhead.ttft: key 8192 is not a string"]


def test_suite_and_schema_name_the_same_sections_and_profile_fields() -> None:
    from benchmarks import suite  # imports neither vLLM nor torch

    assert suite.SECTIONS == tuple(schema.SECTIONS)
    assert sorted(f.name for f in dataclasses.fields(suite.Profile)) == \
        sorted(schema.Profile.model_fields)
    for profile in (suite.FULL, suite.SMOKE):
        in_memory = dataclasses.asdict(profile)  # tuples, as the suite hands them to the report
        for value in (in_memory, json.loads(json.dumps(in_memory))):
            schema.Profile.model_validate(value)  # raises if it does not match
    for section in schema.SECTIONS.values():  # what a section writes is a data block
        assert all(path[0] in schema.BLOCKS for path in section.writes)


def test_describe_lists_every_block_and_section() -> None:
    text = schema.describe()
    for name in [*schema.META, *schema.FINAL_META, *schema.BLOCKS, *schema.SECTIONS]:
        assert f"\n    {name}" in text


@pytest.mark.parametrize("name", COMMITTED)
def test_json_schema_agrees_on_the_committed_runs(name: str) -> None:
    """The exported JSON Schema (``--json-schema``) says what :func:`schema.validate` does: a
    standard validator accepts the committed runs and refuses an unknown field or column key."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema.Results.model_json_schema())
    results = _load(name)
    assert [e.message for e in validator.iter_errors(results)] == []
    for block in ("blocks", "needle"):
        if block in results:
            results[block]["rows"][0]["bogus@x"] = "y"
            assert not validator.is_valid(results)


@pytest.mark.parametrize("name", COMMITTED)
def test_report_redraws_committed_summary_byte_identically(name: str, tmp_path: Path) -> None:
    folder = COMMITTED[name]
    subprocess.run([sys.executable, "-m", "benchmarks.report", str(folder / "results.json"),
                    "--out", str(tmp_path)], check=True, cwd=REPO, timeout=300,
                   capture_output=True)
    assert (tmp_path / "summary.md").read_bytes() == (folder / "summary.md").read_bytes()
    for png in folder.glob("*.png"):  # the plots the committed run has are drawn again
        assert (tmp_path / png.name).read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_results_that_do_not_match(main_run: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from benchmarks import report

    results = copy.deepcopy(main_run)
    del results["machine"]["torch"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path)]) == 1
    assert "machine: missing field 'torch'" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()
    with pytest.raises(schema.SchemaError):
        report.write(results, tmp_path)
    assert not list(tmp_path.glob("*.png"))


def test_suite_saves_then_stops_on_a_mismatch(main_run: dict, tmp_path: Path) -> None:
    from benchmarks import suite

    meta = {k: copy.deepcopy(main_run[k]) for k in schema.META}
    suite.save(meta, tmp_path)  # between sections: no wall_s yet
    assert json.loads((tmp_path / "results.json").read_text()) == meta
    broken = {**meta, "blocks": {"rows": [{"prompt": "1024"}], "decode_blocks_included": 1}}
    with pytest.raises(schema.SchemaError, match=r"blocks\.rows\[0\]\.prompt: expected int"):
        suite.save(broken, tmp_path)
    # the measurements are on disk all the same
    assert json.loads((tmp_path / "results.json").read_text()) == broken
