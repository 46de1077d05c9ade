"""The structure of a benchmark run's ``results.json`` (pydantic models), and :func:`validate`.

One definition for everything that writes or reads the file: the suite (``benchmarks.suite``)
validates before every write, the report (``benchmarks.report``) before drawing, the smoke test
(``tests/benchmarks/test_bench_smoke.py``) after the smoke run, and ``tests/benchmarks/
test_schema.py`` checks the committed runs under ``docs/benchmarks/`` against it. From the
command line::

    python -m benchmarks.schema results/bench-.../results.json [...]    # problems, exit 1 if any
    python -m benchmarks.schema --describe                              # the schema, as a tree
    python -m benchmarks.schema --json-schema                           # its JSON Schema

``results.json`` is one JSON object (:class:`Results`):

* the **meta block** (:class:`Meta`): ``profile`` (the run's sizes, ``suite.Profile``),
  ``smoke``, ``machine``, ``sections`` (the ``--only`` sections requested), ``started`` and, once
  the run is over, ``wall_s``;
* one **data block** per :data:`BLOCKS` key that the run's sections wrote: ``selection``,
  ``pressure`` (``capacity``, ``throughput``), ``overhead``, ``blocks``, ``needle``,
  ``accuracy``, ``server_selection``, ``kvpress``, ``decode`` and ``prefill``.

A **section** (:data:`SECTIONS`, the names ``--only`` takes) lists the key paths a finished run of
it leaves in the file (``capacity`` -> ``pressure.capacity``; ``needle`` -> ``needle``,
``kvpress`` and ``server_selection``). With ``complete=True`` (the default) :func:`validate`
requires them, and ``wall_s``, for every section named in ``sections``; the suite's saves after
each section use ``complete=False``.

Objects are closed (``extra="forbid"``): a field the schema does not name is a problem, so the
suite, the report and this file cannot drift apart silently. Types are strict, as JSON has them:
an ``int`` is not a ``bool`` nor ``"1"``; a ``float`` field takes an int too (a JSON number); a
list may be a tuple (``dataclasses.asdict`` of the profile). Fields defaulting to
:func:`optional` may be absent but, unless typed ``... | None``, not ``null``: they are the ones
older committed runs lack (their summaries must still redraw), or that the suite writes only in
some cases.

Each object is a pydantic model made by :func:`obj` (``pydantic.create_model`` on
:class:`Closed`): ``obj("Name", "what it is", field=type, other=optional(type), ...)``, with
``int``, ``float``, ``str``, ``bool``, ``X | None``, ``List[X]``, ``dict[IntKey, X]`` (and the
other key patterns below), :data:`Open` or another model as types.

Adding a section (say ``phase``):

1. describe its block, ``Phase = obj("Phase", "...", rows=List[obj("PhaseRow", None, ...)])``,
   and add ``"phase": Phase`` to :data:`BLOCKS` (or add optional fields to an existing block);
2. register it in :data:`SECTIONS`: ``Section("phase", "...", writes=(("phase",),))``; the suite's
   ``--only`` choices are :data:`SECTIONS`' names;
3. add the profile fields it uses to :class:`Profile` (``suite.Profile`` and :class:`Profile` must
   name the same fields; ``tests/benchmarks/test_schema.py`` checks that).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints,
                      ValidationError, create_model)

__all__ = ["BLOCKS", "FINAL_META", "META", "SECTIONS", "Meta", "Profile", "Results",
           "SchemaError", "Section", "check", "describe", "obj", "optional", "validate"]


class SchemaError(ValueError):
    """``results.json`` content that does not match the schema (``.problems`` lists why)."""

    def __init__(self, problems: list[str], what: str = "results") -> None:
        self.problems = list(problems)
        super().__init__(f"{what}: not as benchmarks/schema.py describes:\n  " +
                         "\n  ".join(self.problems))


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """A benchmark section (a name ``--only`` takes) and the key paths a finished run of it
    leaves in ``results.json``."""

    name: str
    doc: str
    writes: tuple[tuple[str, ...], ...]


#: The suite's sections, in the order ``--only`` lists them.
SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("overhead", "TTFT and decode s/token, vanilla vs SnapKV, SmolLM2",
            (("overhead",), ("server_selection",))),
    Section("blocks", "KV blocks held per request vs the block arithmetic, SmolLM2",
            (("blocks",), ("server_selection",))),
    Section("needle", "needle accuracy: full, SnapKV, recency, kvpress; kept-set agreement",
            (("needle",), ("kvpress",), ("server_selection",))),
    Section("accuracy", "RULER-style tasks, both regimes, every method at 2x/4x/8x, kvpress",
            (("accuracy",),)),
    Section("selection", "selection cost vs one layer's prefill (bench_selection.py)",
            (("selection",),)),
    Section("capacity", "concurrent requests without preemption on a fixed pool, tiny model",
            (("pressure", "capacity"),)),
    # (and pressure.throughput_split, which runs before the prefill floor lack)
    Section("throughput", "output tokens/s on a fixed pool, and its prefill floor, tiny model",
            (("pressure", "throughput"),)),
    Section("trigger", "the pressure trigger vs vanilla and always: Poisson arrivals, SmolLM2",
            (("trigger",),)),
    Section("decode", "compaction during decode: capacity, throughput, copy task, cost",
            (("decode",),)),
    Section("prefill", "compaction while a prompt is read: needle at 2x/4x the pool, "
            "capacity, TTFT", (("prefill",),)),
)}
SectionName = Literal[tuple(SECTIONS)]  # type: ignore[valid-type]


# ----------------------------------------------------------------------------- building blocks


class Closed(BaseModel):
    """A JSON object with exactly its fields, of exactly their JSON types."""

    model_config = ConfigDict(extra="forbid", strict=True)


def obj(name: str, doc: str | None = None, /, **fields: Any) -> Any:
    """A :class:`Closed` model (or one extending ``__base__=``): ``field=type`` is required,
    ``field=optional(type)`` may be absent, ``field=described(type, "...")`` is documented."""
    return create_model(name, __doc__=doc, **{"__base__": Closed, **fields})


def optional(tp: Any, doc: str | None = None) -> Any:
    """A field that may be absent: its default, ``None``, is never validated, so a ``null`` that
    is present is refused unless ``tp`` admits it (``float | None``)."""
    return tp, Field(default=None, description=doc)


def described(tp: Any, doc: str) -> Any:
    return tp, Field(description=doc)


T = TypeVar("T")
#: A JSON list; a tuple too (the suite's results before they are written, where
#: ``dataclasses.asdict`` leaves the profile's tuples).
List = Annotated[list[T], BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)]


def _keys(pattern: str) -> Any:
    return Annotated[str, StringConstraints(pattern=f"^(?:{pattern})$")]


#: Object keys: any non-empty string; integers written as strings (prompt lengths, budgets, ...);
#: a compression factor (``2x``); an accuracy column (``full`` or ``<method>@<budget>``); a
#: kvpress accuracy column (``full`` or a budget).
FACTOR, COLUMN = r"\d+x", r"full|[a-z][a-z0-9_]*@\d+"
Key, IntKey, FactorKey = _keys(r".+"), _keys(r"\d+"), _keys(FACTOR)
ColumnKey, KvpressColumnKey = _keys(COLUMN), _keys(r"full|\d+")
#: An object passed through unchecked (what another tool wrote); its keys are strings.
Open = dict[str, Any]


def _others(pattern: str) -> ConfigDict:
    """The config of a model whose other keys match ``pattern`` (their values' type: the model's
    ``__pydantic_extra__: dict[<key type>, <value type>]``), its JSON Schema saying so too."""
    def schema(js: dict) -> None:
        js["patternProperties"] = {f"^(?:{pattern})$": js.pop("additionalProperties")}
        js["additionalProperties"] = False
    return ConfigDict(extra="allow", json_schema_extra=schema)


class ByConfig(Closed, Generic[T]):
    """Pressure configurations: ``vanilla`` and compression factors (``2x``, ``4x``, ``8x``)."""

    model_config = _others(FACTOR)
    __pydantic_extra__: dict[FactorKey, T]
    vanilla: T


class NeedleRow(Closed):
    """One needle prompt; its other keys are columns (``<method>@<budget>``): completion."""

    model_config = _others(COLUMN)
    __pydantic_extra__: dict[ColumnKey, str]
    id: str
    length: int
    depth: float
    answer: str
    full: str


# ----------------------------------------------------------------------------- meta block

Profile = obj(
    "Profile", "the run's sizes (suite.Profile, dataclasses.asdict: tuples are lists in JSON)",
    lengths=List[int], per_cell=int, budgets=List[int], filler=str, accuracy_concurrency=int,
    kvpress_per_cell=int, agreement_per_cell=int, agreement_budgets=List[int], ttft_reps=int,
    decode_len=int, decode_batches=List[int], decode_tokens=int, smol_blocks=int,
    max_model_len=int, smol_block_size=int, selection_lengths=List[int], pressure_len=int,
    pressure_tokens=int, pressure_requests=int, tiny_blocks=int, compressions=List[int],
    # the decode/prefill/accuracy sections' sizes (runs before them lack these)
    **{k: optional(int) for k in (
        "decode_prompt", "decode_output", "decode_requests", "decode_interval", "copy_per_cell",
        "copy_interval", "cost_prompt", "cost_output", "cost_budget", "prefill_per_cell",
        "prefill_pool_blocks", "prefill_budget", "prefill_interval", "prefill_final_budget",
        "prefill_budget_large", "prefill_interval_tiny")},
    **{k: optional(List[int]) for k in ("copy_lengths", "prefill_lengths",
                                         "prefill_compressions", "prefill_ttft_lengths")},
    prefill_methods=optional(List[str]),
    ruler=optional(Open, "benchmarks.accuracy.RulerProfile"),
    trigger=optional(Open, "benchmarks.trigger.TriggerProfile"))

Machine = obj("Machine", None, platform=str, python=str, cpu_count=int | None, torch=str,
              vllm=described(dict[Key, str], "installed vLLM distributions: version"),
              processor=str)

Meta = obj("Meta", "what every results.json has from its first write (wall_s: once finished)",
           profile=Profile, smoke=bool, machine=Machine, sections=List[SectionName],
           started=str, wall_s=optional(float, "at the end (required when complete=True)"))


# ----------------------------------------------------------------------------- data blocks

SelectionRow = obj(
    "SelectionRow", None, n=int, select_s=float, select_median_s=float, repeats=int,
    select_peak_extra_bytes=int | None, untiled_scores_bytes=int, path=str, prefill_s=float,
    prefill_attention_s=float, prefill_other_s=float, prefill_measured=bool,
    select_over_prefill=float,
    prefill_estimated_from_n=optional(int, "rows whose prefill was estimated, not measured"))
Selection = obj("Selection", "selection cost vs one layer's prefill", layer_bench=obj(
    "LayerBench", "bench_selection.py's report",
    config=obj("LayerBenchConfig", None, hq=int, hkv=int, head_dim=int, hidden=int,
               intermediate=int, window=int, budget=int,
               settings=described(Open, "CompressionSettings.to_dict(): the plugin's fields"),
               tile_size=int | None, dtype=str, quick=bool),
    env=obj("LayerBenchEnv", None, device=str, torch=str, threads=int, python=str, machine=str,
            processor=str),
    rows=List[SelectionRow], seconds=float))

ServerSelection = obj("ServerSelection",
                      "the SmolLM2 SnapKV server's vllm:snapkv_selection_seconds",
                      mean_s=float | None, requests=float)

# pressure: capacity and throughput on a fixed KV pool.
Trial = obj("Trial", "one load sent at once", requests=int, peak_running=int, preemptions=int,
            wall_s=float, output_tokens=int, output_tokens_per_s=float,
            prefix_cache_hit_tokens=optional(int, "absent in runs before 2026-11-22 08:00"))
ThroughputTrial = obj("ThroughputTrial", "one load sent at once", __base__=Trial,
                      prefill_only=optional(Trial, "the same load with 1 output token; absent "
                                                   "in runs before the prefill floor"))
Capacity = obj("Capacity", None, capacity=int, trials=described(dict[IntKey, Trial], "K: trial"))
SplitRow = obj("SplitRow", None, prefill_floor_s=float, decode_phase_s=float, floor_share=float,
               decode_phase_speedup=float | None)
Pressure = obj(
    "Pressure", "capacity and throughput under a fixed KV pool (tiny model)",
    prompt=int, output_tokens=int, pool_blocks=int, block_size=int,
    capacity=optional(ByConfig[Capacity]), throughput=optional(ByConfig[ThroughputTrial]),
    throughput_split=optional(obj("ThroughputSplit", None, __base__=ByConfig[SplitRow],
                                  bound_if_decode_were_free=float)))

Overhead = obj(
    "Overhead", "TTFT and decode time, vanilla vs SnapKV, no memory pressure",
    ttft=described(dict[IntKey, obj(
        "Ttft", None, vanilla_s=List[float], snapkv_s=List[float],
        median_vanilla_s=float | None, median_snapkv_s=float | None, ratio=float | None,
    )], "prompt length: TTFT"),
    decode=described(dict[IntKey, obj(
        "DecodeCost", None, vanilla_s_per_token=float | None, snapkv_s_per_token=float | None,
        ratio=float | None,
    )], "requests in flight: decode s/token"),
    decode_context=int, snapkv_budget=int)

BlocksRow = obj(
    "BlocksRow", None, prompt=int, budget=int, block_size=int, evicted=int, vanilla_blocks=int,
    snapkv_blocks=int, expected_blocks=int, matches_arithmetic=bool, reduction=float | None,
    # every /metrics reading (reading: count); absent in runs before scrapes were picked by the
    # server's own gauges
    vanilla_readings=optional(dict[IntKey, int]), snapkv_readings=optional(dict[IntKey, int]))
Blocks = obj("Blocks", "KV blocks a request holds after its prompt compaction",
             rows=List[BlocksRow], decode_blocks_included=int)

Needle = obj("Needle", "needle accuracy on the SmolLM2 SnapKV server", rows=List[NeedleRow],
             table=described(dict[IntKey, dict[ColumnKey, obj("AccuracyCell", None,
                                                              accuracy=float, n=int)]],
                             "length: column: accuracy % over n prompts"))

# kvpress: kvpress_runner.py's report (its bulky "kept" dropped) and agreement.py's.
KvpressRun = obj(
    "KvpressRun", "kvpress_runner.py's report",
    meta=obj("KvpressMeta", None, model=str, dtype=str, attn_implementation=str,
             kvpress_version=str, transformers_version=str, torch_version=str,
             torch_threads=int, press=Open, budgets=List[int], max_new_tokens=int,
             one_prefill_per_case=str,
             equivalence_checks=List[obj("EquivalenceCheck", None, case=str, length=int,
                                         budgets=List[int], identical=bool)],
             prompt=str, kept_encoding=str, seconds=float, notes=List[str]),
    cases=List[obj("KvpressCase", None, id=str, length=int, depth=float, answer=str,
                   full=str | None, kvpress=dict[IntKey, str],
                   correct=dict[KvpressColumnKey, bool], prefill_s=dict[Key, float],
                   decode_s=dict[KvpressColumnKey, float])],
    accuracy=described(dict[IntKey, dict[KvpressColumnKey, obj(
        "KvpressCell", None, correct=int, total=int, accuracy=float)]],
        "length: column: accuracy as a fraction"),
    prefill_s=dict[IntKey, dict[Key, float]])
AgreementStats = obj("AgreementStats", None, sets=int, identical=int,
                     fraction_identical=float | None, mean_jaccard=float | None,
                     mean_overlap=float | None)
Agreement = obj(
    "Agreement", "agreement.py's report: our kvpress preset in vLLM vs kvpress's kept sets",
    meta=obj("AgreementMeta", None, model=str, budgets=List[int], kvpress=Open,
             vllm_engine=Open, vllm_engine_start_s=float, note=str),
    vllm_seconds=described(dict[Key, dict[IntKey, float]], "case: budget: seconds"),
    comparison=obj(
        "Comparison", None, __base__=AgreementStats, by_budget=dict[IntKey, AgreementStats],
        by_length=dict[IntKey, AgreementStats], by_layer=dict[IntKey, AgreementStats],
        first_differing_layer_histogram=dict[Key, int],
        differences=obj(
            "Differences", None, sets=int, window_differs=int,
            positions_swapped_mean=float | None, positions_swapped_max=int | None,
            # when some differing set has kvpress scores
            max_rel_score_gap_histogram=optional(dict[Key, int]),
            max_rank_distance_histogram=optional(dict[Key, int]),
            max_rel_score_gap=optional(float), median_max_rel_score_gap=optional(float)),
        kvpress_boundary_margin_histogram=dict[Key, dict[Key, int]],
        runs=List[obj("AgreementRun", None, __base__=AgreementStats, case=str, length=int,
                      budget=int, first_differing_layer=int | None)],
        missing=List[obj("Missing", None, case=str, budget=str, only_in=str)]))
Kvpress = obj("Kvpress", "kvpress on the same needle prompts, and kept-set agreement",
              kvpress=KvpressRun, agreement=Agreement)

#: The RULER-style accuracy section (benchmarks.accuracy): its rows, tables and kvpress's rows.
Ruler = obj(
    "Ruler", "RULER-style accuracy, both regimes, every method and ratio, kvpress agreement",
    rows=List[obj("RulerRow", None, id=str, task=str, length=int, regime=str, column=str,
                  correct=bool, text=str, kept=int | None)],
    included=described(dict[IntKey, List[str]], "length: tasks in the macro average"),
    tasks=str, kvpress=Open, engine_s=float, wall_s=float, per_task=Open, macro=Open,
    macro_by_length=Open, agreement=Open)

#: Top-level data blocks: key in ``results.json`` -> its model.
BLOCKS: dict[str, Any] = {
    "selection": Selection,
    "pressure": Pressure,
    "overhead": Overhead,
    "blocks": Blocks,
    "needle": Needle,
    "accuracy": Ruler,
    "server_selection": ServerSelection,
    "kvpress": Kvpress,
    # benchmarks.phases writes these (their tables are rendered from what it wrote).
    "decode": obj("Decode", "compaction during decode (benchmarks.phases)",
                  pressure=Open, accuracy=Open, cost=Open),
    "trigger": obj("Trigger", "the pressure trigger under Poisson arrivals (benchmarks.trigger)",
                   runs=List[Open], rates=described(Open, "rate: config: summary"),
                   checks=dict[Key, bool], light_rate=str, overload_rate=str, wall_s=float),
    "prefill": obj("Prefill", "compaction while a prompt is read (benchmarks.phases)",
                   accuracy=Open, ttft=Open, capacity=Open),
}
Results = obj("Results", "a run's results.json: the meta block, then the data blocks its "
              "sections wrote", __base__=Meta, **{k: optional(m) for k, m in BLOCKS.items()})
#: The meta fields every write has, and the one written at the end (required when complete).
META = tuple(name for name, f in Meta.model_fields.items() if f.is_required())
FINAL_META = tuple(name for name in Meta.model_fields if name not in META)


# ----------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def _path(loc: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".") \
        or "results"


_SCALARS = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}
_EXPECTED = {**_SCALARS, "list_type": "a list", "dict_type": "an object", "model_type": "an object"}


def _problem(error: dict) -> str:
    """One pydantic error as ``path: what is wrong``."""
    kind, loc, value = error["type"], error["loc"], error.get("input")
    key = loc[-1:] == ("[key]",)  # a dict's key, itself invalid
    if key:
        loc, value = loc[:-1], loc[-2]
    if kind == "invalid_key" or key and kind == "string_type":  # (invalid_key: a model's)
        return f"{_path(loc[:-1])}: key {value!r} is not a string"
    if kind == "missing":
        return f"{_path(loc[:-1])}: missing field {loc[-1]!r}"
    if kind == "extra_forbidden":
        return f"{_path(loc[:-1])}: unexpected field {loc[-1]!r}"
    if kind == "string_pattern_mismatch":  # only keys have patterns
        return (f"{_path(loc[:-1])}: unexpected field {loc[-1]!r} "
                f"(keys here match {error['ctx']['pattern'][4:-2]!r})")
    if kind == "literal_error":
        return f"{_path(loc)}: unknown value {value!r} (known: {error['ctx']['expected']})"
    if kind in _EXPECTED:
        return (f"{_path(loc)}: expected {_EXPECTED[kind]}, got {_type_name(value)}"
                + (f" {value!r:.60}" if kind in _SCALARS and value is not None else ""))
    return f"{_path(loc)}: {error['msg']}"


def _has(results: dict, path: tuple[str, ...]) -> bool:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def validate(results: Any, *, complete: bool = True) -> list[str]:
    """Problems of ``results`` (a parsed ``results.json``) against the schema; ``[]`` if none.

    ``complete``: the run is over, so ``wall_s`` and every requested section's data must be
    there (``False``: a save between sections, where only what is present is checked).
    """
    try:
        Results.model_validate(results)
        problems = []
    except ValidationError as e:
        problems = [_problem(error) for error in e.errors()]
    if complete and isinstance(results, dict):
        problems += [f"results: missing field {name!r}" for name in FINAL_META
                     if name not in results]
        sections = results.get("sections")
        for name in sections if isinstance(sections, (list, tuple)) else ():
            section = SECTIONS.get(name) if isinstance(name, str) else None
            for path in section.writes if section else ():
                if not _has(results, path):
                    problems.append(f"{'.'.join(path)}: missing, but section {name!r} ran")
    return problems


def check(results: Any, *, complete: bool = True, what: str = "results") -> None:
    """:func:`validate`, raising :class:`SchemaError` on any problem."""
    problems = validate(results, complete=complete)
    if problems:
        raise SchemaError(problems, what)


def describe() -> str:
    """The schema as an indented tree, read off :class:`Results`' JSON Schema (``python -m
    benchmarks.schema --describe``), then the sections and what they write."""
    root = Results.model_json_schema()

    def tree(node: dict, indent: int) -> list[str]:
        node = {**root["$defs"].get(node.get("$ref", "").rpartition("/")[2], {}), **node}
        if "anyOf" in node:  # X | null
            first, *rest = tree(node["anyOf"][0], indent)
            return [f"{first} | null", *rest]
        doc = f": {node['description']}" if "description" in node else ""
        if "enum" in node:
            return [f"one of {', '.join(map(str, node['enum']))}{doc}"]
        if node.get("type") == "array":
            first, *rest = tree(node["items"], indent)
            return [f"list of {first}", *rest]
        if node.get("type") != "object":
            return [{"integer": "int", "number": "float", "string": "str",
                     "boolean": "bool"}[node["type"]] + doc]
        pad, others = "  " * (indent + 1), node.get("additionalProperties", False)
        children = [(f"{name}{'' if name in node.get('required', ()) else ' (optional)'}", spec)
                    for name, spec in node.get("properties", {}).items()]
        children += [(f"<key matching {pattern[4:-2]}>", spec)
                     for pattern, spec in node.get("patternProperties", {}).items()]
        lines = ["object" + (" (open)" if others is True else "") + doc]
        for label, spec in children:
            first, *rest = tree(spec, indent + 1)
            lines += [f"{pad}{label}: {first}", *rest]
        return lines

    first, *rest = tree(root, 1)
    lines = [f"results.json: {first}", *rest, "  sections (--only): data they write"]
    lines += [f"    {s.name}: {', '.join('.'.join(p) for p in s.writes)} -- {s.doc}"
              for s in SECTIONS.values()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.schema",
        description="Check results.json files against the benchmark results schema.")
    parser.add_argument("paths", nargs="*", type=Path, help="results.json files")
    parser.add_argument("--partial", action="store_true",
                        help="a run still in progress (wall_s and unfinished sections may lack)")
    parser.add_argument("--describe", action="store_true", help="print the schema and exit")
    parser.add_argument("--json-schema", action="store_true",
                        help="print the schema as JSON Schema and exit")
    args = parser.parse_args(argv)
    if args.describe or args.json_schema:
        sys.stdout.write(describe() if args.describe else
                         json.dumps(Results.model_json_schema(), indent=1) + "\n")
        return 0
    if not args.paths:
        parser.error("give results.json paths, --describe or --json-schema")
    bad = 0
    for path in args.paths:
        problems = validate(json.loads(path.read_text()), complete=not args.partial)
        bad += bool(problems)
        print(f"{path}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for p in problems:
            print(f"  {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
