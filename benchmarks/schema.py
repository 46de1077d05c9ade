"""The structure of a benchmark run's ``results.json``, and :func:`validate`, which checks one.

One definition for everything that writes or reads the file: the suite (``benchmarks.suite``)
validates before every write, the report (``benchmarks.report``) before drawing, the smoke test
(``tests/benchmarks/test_bench_smoke.py``) after the smoke run, and ``tests/benchmarks/
test_schema.py`` checks the committed runs under ``docs/benchmarks/`` against it. Standard library
only. From the command line::

    python -m benchmarks.schema results/bench-.../results.json [...]    # problems, exit 1 if any
    python -m benchmarks.schema --describe                              # the schema, as a tree

``results.json`` is one JSON object:

* the **meta block** (:data:`META`): ``profile`` (the run's sizes, ``suite.Profile``), ``smoke``,
  ``machine``, ``sections`` (the ``--only`` sections requested), ``started`` and, once the run is
  over, ``wall_s``;
* one **data block** per top-level key of :data:`BLOCKS` that the run's sections wrote:
  ``selection``, ``pressure`` (``capacity``, ``throughput``), ``overhead``, ``blocks``,
  ``accuracy``, ``server_selection`` and ``kvpress``.

A **section** (:data:`SECTIONS`, the names ``--only`` takes) lists the key paths a finished run of
it leaves in the file (``capacity`` -> ``pressure.capacity``; ``accuracy`` -> ``accuracy``,
``kvpress`` and ``server_selection``). With ``complete=True`` (the default) :func:`validate`
requires them, and ``wall_s``, for every section named in ``sections``; the suite's saves after
each section use ``complete=False``.

Objects are closed: a field the schema does not name is a problem, so the suite, the report and
this file cannot drift apart silently. Fields marked optional are the ones older committed runs
lack (their summaries must still redraw), or that the suite writes only in some cases.

Adding a section (say ``decode``):

1. describe its block: ``DECODE = Obj({"rows": ListOf(Obj({...}))})`` and add ``"decode": DECODE``
   to :data:`BLOCKS` (or add optional fields to an existing block);
2. register it in :data:`SECTIONS`: ``Section("decode", "...", writes=(("decode",),))``; the
   suite's ``--only`` choices are :data:`SECTIONS`' names;
3. add the profile fields it uses to :data:`PROFILE` (``suite.Profile`` and :data:`PROFILE` must
   name the same fields; ``tests/benchmarks/test_schema.py`` checks that).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ANY", "BLOCKS", "BOOL", "FINAL_META", "FLOAT", "INT", "META", "PROFILE", "SECTIONS",
           "STR", "ListOf", "Map", "Obj", "Scalar", "SchemaError", "Section", "check", "describe",
           "nullable", "validate"]


class SchemaError(ValueError):
    """``results.json`` content that does not match the schema (``.problems`` lists why)."""

    def __init__(self, problems: list[str], what: str = "results") -> None:
        self.problems = list(problems)
        super().__init__(f"{what}: not as benchmarks/schema.py describes:\n  " +
                         "\n  ".join(self.problems))


# ----------------------------------------------------------------------------- building blocks


class Spec:
    """A JSON value's expected shape."""

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        raise NotImplementedError

    def describe(self, indent: int = 0) -> list[str]:
        """Lines of a tree rendering (the type on the first line)."""
        return [str(self)]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Scalar(Spec):
    """``int`` (not bool), ``float`` (an int is a number too), ``str``, ``bool``, or ``any``;
    ``nullable`` admits ``null``."""

    kind: str
    nullable: bool = False

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if value is None:
            if not self.nullable and self.kind != "any":
                problems.append(f"{path}: expected {self}, got null")
            return
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "any": True,
        }[self.kind]
        if not ok:
            problems.append(f"{path}: expected {self}, got {_type_name(value)} {value!r:.60}")

    def __str__(self) -> str:
        return self.kind + (" | null" if self.nullable else "")


INT, FLOAT, STR, BOOL, ANY = (Scalar(k) for k in ("int", "float", "str", "bool", "any"))


def nullable(spec: Scalar) -> Scalar:
    """``spec`` or ``null``."""
    return Scalar(spec.kind, nullable=True)


@dataclass(frozen=True)
class ListOf(Spec):
    """A list whose every item matches ``item`` (a tuple too: the suite's results before they
    are written, where ``dataclasses.asdict`` leaves the profile's tuples)."""

    item: Spec

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_type_name(value)}")
            return
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]", problems)

    def describe(self, indent: int = 0) -> list[str]:
        inner = self.item.describe(indent)
        return [f"list of {inner[0]}", *inner[1:]]


@dataclass(frozen=True)
class Obj(Spec):
    """A JSON object.

    ``fields`` are required, ``optional`` may be absent; any other key must match the regular
    expression ``keys`` and its value ``others`` (``others=None``: no other keys). ``must_have``
    lists keys of the latter kind that must be present (``"vanilla"`` among the configurations).
    ``open=True`` accepts anything else unchecked (what another tool wrote, passed through).
    """

    fields: dict[str, Spec] = field(default_factory=dict)
    optional: dict[str, Spec] = field(default_factory=dict)
    others: Spec | None = None
    keys: str = r".+"
    must_have: tuple[str, ...] = ()
    open: bool = False
    doc: str = ""

    def check(self, value: Any, path: str, problems: list[str]) -> None:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {_type_name(value)}")
            return
        for name, spec in self.fields.items():
            if name not in value:
                problems.append(f"{path}: missing field {name!r}")
            else:
                spec.check(value[name], f"{path}.{name}", problems)
        for name in self.must_have:
            if name not in value:
                problems.append(f"{path}: missing key {name!r}")
        for name, v in value.items():
            if not isinstance(name, str):
                problems.append(f"{path}: key {name!r} is not a string")
                continue
            if name in self.fields:
                continue
            if name in self.optional:
                self.optional[name].check(v, f"{path}.{name}", problems)
            elif self.others is not None and re.fullmatch(self.keys, name):
                self.others.check(v, f"{path}.{name}", problems)
            elif not self.open:
                problems.append(f"{path}: unexpected field {name!r}" + (
                    f" (keys here match {self.keys!r})" if self.others is not None else ""))

    def describe(self, indent: int = 0) -> list[str]:
        pad = "  " * (indent + 1)
        head = "object" + (" (open)" if self.open else "") + (f": {self.doc}" if self.doc else "")
        lines = [head]
        for label, specs in (("", self.fields), (" (optional)", self.optional)):
            for name, spec in specs.items():
                inner = spec.describe(indent + 1)
                lines += [f"{pad}{name}{label}: {inner[0]}", *inner[1:]]
        if self.others is not None:
            inner = self.others.describe(indent + 1)
            must = f", must have {', '.join(self.must_have)}" if self.must_have else ""
            lines += [f"{pad}<key matching {self.keys}{must}>: {inner[0]}", *inner[1:]]
        return lines


def Map(value: Spec, keys: str = r".+", must_have: tuple[str, ...] = (), doc: str = "") -> Obj:
    """An object of arbitrary keys (matching ``keys``), every value matching ``value``."""
    return Obj(others=value, keys=keys, must_have=must_have, doc=doc)


#: Keys that are integers written as strings (JSON object keys): prompt lengths, budgets, ...
INT_KEY = r"\d+"
#: A pressure configuration: ``vanilla`` or a compression factor (``2x``, ``4x``, ``8x``).
CONFIG_KEY = r"vanilla|\d+x"
#: An accuracy column: ``full`` or ``<method>@<budget>``.
COLUMN_KEY = r"full|[a-z][a-z0-9_]*@\d+"
#: A kvpress accuracy column: ``full`` or a budget.
KVPRESS_COLUMN_KEY = r"full|\d+"
DICT = Obj(open=True)


# ----------------------------------------------------------------------------- meta block

#: ``suite.Profile`` (``dataclasses.asdict``; tuples are lists in JSON).
PROFILE = Obj({
    "lengths": ListOf(INT), "per_cell": INT, "budgets": ListOf(INT), "filler": STR,
    "accuracy_concurrency": INT, "kvpress_per_cell": INT, "agreement_per_cell": INT,
    "agreement_budgets": ListOf(INT), "ttft_reps": INT, "decode_len": INT,
    "decode_batches": ListOf(INT), "decode_tokens": INT, "smol_blocks": INT,
    "max_model_len": INT, "smol_block_size": INT, "selection_lengths": ListOf(INT),
    "pressure_len": INT, "pressure_tokens": INT, "pressure_requests": INT, "tiny_blocks": INT,
    "compressions": ListOf(INT),
}, optional={  # the decode/prefill sections' sizes (runs before them lack these)
    **{k: INT for k in ("decode_prompt", "decode_output", "decode_requests", "decode_interval",
                        "copy_per_cell", "copy_interval", "cost_prompt", "cost_output",
                        "cost_budget", "prefill_per_cell", "prefill_pool_blocks",
                        "prefill_budget", "prefill_interval", "prefill_final_budget",
                        "prefill_budget_large", "prefill_interval_tiny")},
    **{k: ListOf(INT) for k in ("copy_lengths", "prefill_lengths", "prefill_compressions",
                                "prefill_ttft_lengths")},
    "prefill_methods": ListOf(STR),
    "ruler": DICT,  # benchmarks.accuracy.RulerProfile
}, doc="the run's sizes (suite.Profile)")

MACHINE = Obj({
    "platform": STR, "python": STR, "cpu_count": nullable(INT), "torch": STR,
    "vllm": Map(STR, doc="installed vLLM distributions: version"), "processor": STR,
})

#: Top-level fields every ``results.json`` has from its first write (``wall_s``: once finished).
META: dict[str, Spec] = {
    "profile": PROFILE,
    "smoke": BOOL,
    "machine": MACHINE,
    "sections": ListOf(STR),
    "started": STR,
}
#: Written at the end of a run (required by ``validate(..., complete=True)``).
FINAL_META: dict[str, Spec] = {"wall_s": FLOAT}


# ----------------------------------------------------------------------------- data blocks

# selection: bench_selection.py's own report, one row per prompt length.
SELECTION_ROW = Obj({
    "n": INT, "select_s": FLOAT, "select_median_s": FLOAT, "repeats": INT,
    "select_peak_extra_bytes": nullable(INT), "untiled_scores_bytes": INT, "path": STR,
    "prefill_s": FLOAT, "prefill_attention_s": FLOAT, "prefill_other_s": FLOAT,
    "prefill_measured": BOOL, "select_over_prefill": FLOAT,
}, optional={
    "prefill_estimated_from_n": INT,  # rows whose prefill was estimated, not measured
})
SELECTION = Obj({
    "layer_bench": Obj({
        "config": Obj({
            "hq": INT, "hkv": INT, "head_dim": INT, "hidden": INT, "intermediate": INT,
            "window": INT, "budget": INT,
            "settings": DICT,  # SnapKVSettings.to_dict(): the plugin's, not the suite's, fields
            "tile_size": nullable(INT), "dtype": STR, "quick": BOOL,
        }),
        "env": Obj({"device": STR, "torch": STR, "threads": INT, "python": STR, "machine": STR,
                    "processor": STR}),
        "rows": ListOf(SELECTION_ROW),
        "seconds": FLOAT,
    }, doc="bench_selection.py's report"),
}, doc="selection cost vs one layer's prefill")

SERVER_SELECTION = Obj({"mean_s": nullable(FLOAT), "requests": FLOAT},
                       doc="the SmolLM2 SnapKV server's vllm:snapkv_selection_seconds")

# pressure: capacity and throughput on a fixed KV pool.
TRIAL = Obj({
    "requests": INT, "peak_running": INT, "preemptions": INT, "wall_s": FLOAT,
    "output_tokens": INT, "output_tokens_per_s": FLOAT,
}, optional={
    "prefix_cache_hit_tokens": INT,  # absent in runs before 2026-11-22 08:00
}, doc="one load sent at once")
THROUGHPUT_TRIAL = Obj(TRIAL.fields, optional={
    **TRIAL.optional,
    "prefill_only": TRIAL,  # the same load with 1 output token; absent in runs before the floor
}, doc=TRIAL.doc)
CAPACITY = Obj({"capacity": INT, "trials": Map(TRIAL, keys=INT_KEY, doc="K: trial")})
SPLIT_ROW = Obj({"prefill_floor_s": FLOAT, "decode_phase_s": FLOAT, "floor_share": FLOAT,
                 "decode_phase_speedup": nullable(FLOAT)})
PRESSURE = Obj({
    "prompt": INT, "output_tokens": INT, "pool_blocks": INT, "block_size": INT,
}, optional={
    "capacity": Map(CAPACITY, keys=CONFIG_KEY, must_have=("vanilla",)),
    "throughput": Map(THROUGHPUT_TRIAL, keys=CONFIG_KEY, must_have=("vanilla",)),
    "throughput_split": Obj({"bound_if_decode_were_free": FLOAT}, others=SPLIT_ROW,
                            keys=CONFIG_KEY, must_have=("vanilla",)),
}, doc="capacity and throughput under a fixed KV pool (tiny model)")

OVERHEAD = Obj({
    "ttft": Map(Obj({
        "vanilla_s": ListOf(FLOAT), "snapkv_s": ListOf(FLOAT),
        "median_vanilla_s": nullable(FLOAT), "median_snapkv_s": nullable(FLOAT),
        "ratio": nullable(FLOAT),
    }), keys=INT_KEY, doc="prompt length: TTFT"),
    "decode": Map(Obj({
        "vanilla_s_per_token": nullable(FLOAT), "snapkv_s_per_token": nullable(FLOAT),
        "ratio": nullable(FLOAT),
    }), keys=INT_KEY, doc="requests in flight: decode s/token"),
    "decode_context": INT,
    "snapkv_budget": INT,
}, doc="TTFT and decode time, vanilla vs SnapKV, no memory pressure")

BLOCKS_ROW = Obj({
    "prompt": INT, "budget": INT, "block_size": INT, "evicted": INT, "vanilla_blocks": INT,
    "snapkv_blocks": INT, "expected_blocks": INT, "matches_arithmetic": BOOL,
    "reduction": nullable(FLOAT),
}, optional={
    # every /metrics reading (reading: count); absent in runs before scrapes were picked by the
    # server's own gauges
    "vanilla_readings": Map(INT, keys=INT_KEY), "snapkv_readings": Map(INT, keys=INT_KEY),
})
BLOCKS_SECTION = Obj({"rows": ListOf(BLOCKS_ROW), "decode_blocks_included": INT},
                     doc="KV blocks a request holds after its prompt compaction")

ACCURACY = Obj({
    "rows": ListOf(Obj({"id": STR, "length": INT, "depth": FLOAT, "answer": STR, "full": STR},
                       others=STR, keys=COLUMN_KEY, doc="one needle prompt: column: completion")),
    "table": Map(Map(Obj({"accuracy": FLOAT, "n": INT}), keys=COLUMN_KEY),
                 keys=INT_KEY, doc="length: column: accuracy % over n prompts"),
}, doc="needle accuracy on the SmolLM2 SnapKV server")

# kvpress: kvpress_runner.py's report (its bulky "kept" dropped) and agreement.py's.
KVPRESS_RUN = Obj({
    "meta": Obj({
        "model": STR, "dtype": STR, "attn_implementation": STR, "kvpress_version": STR,
        "transformers_version": STR, "torch_version": STR, "torch_threads": INT,
        "press": DICT, "budgets": ListOf(INT), "max_new_tokens": INT,
        "one_prefill_per_case": STR,
        "equivalence_checks": ListOf(Obj({"case": STR, "length": INT, "budgets": ListOf(INT),
                                          "identical": BOOL})),
        "prompt": STR, "kept_encoding": STR, "seconds": FLOAT, "notes": ListOf(STR),
    }),
    "cases": ListOf(Obj({
        "id": STR, "length": INT, "depth": FLOAT, "answer": STR, "full": nullable(STR),
        "kvpress": Map(STR, keys=INT_KEY), "correct": Map(BOOL, keys=KVPRESS_COLUMN_KEY),
        "prefill_s": Map(FLOAT), "decode_s": Map(FLOAT, keys=KVPRESS_COLUMN_KEY),
    })),
    "accuracy": Map(Map(Obj({"correct": INT, "total": INT, "accuracy": FLOAT}),
                        keys=KVPRESS_COLUMN_KEY), keys=INT_KEY,
                    doc="length: column: accuracy as a fraction"),
    "prefill_s": Map(Map(FLOAT), keys=INT_KEY),
}, doc="kvpress_runner.py's report")
AGREEMENT_STATS = Obj({"sets": INT, "identical": INT, "fraction_identical": nullable(FLOAT),
                       "mean_jaccard": nullable(FLOAT), "mean_overlap": nullable(FLOAT)})
AGREEMENT = Obj({
    "meta": Obj({
        "model": STR, "budgets": ListOf(INT), "kvpress": DICT, "vllm_engine": DICT,
        "vllm_engine_start_s": FLOAT, "note": STR,
    }),
    "vllm_seconds": Map(Map(FLOAT, keys=INT_KEY), doc="case: budget: seconds"),
    "comparison": Obj({
        **AGREEMENT_STATS.fields,
        "by_budget": Map(AGREEMENT_STATS, keys=INT_KEY),
        "by_length": Map(AGREEMENT_STATS, keys=INT_KEY),
        "by_layer": Map(AGREEMENT_STATS, keys=INT_KEY),
        "first_differing_layer_histogram": Map(INT),
        "differences": Obj({"sets": INT, "window_differs": INT,
                            "positions_swapped_mean": nullable(FLOAT),
                            "positions_swapped_max": nullable(INT)},
                           optional={  # when some differing set has kvpress scores
                               "max_rel_score_gap_histogram": Map(INT),
                               "max_rank_distance_histogram": Map(INT),
                               "max_rel_score_gap": FLOAT, "median_max_rel_score_gap": FLOAT}),
        "kvpress_boundary_margin_histogram": Map(Map(INT)),
        "runs": ListOf(Obj({
            "case": STR, "length": INT, "budget": INT, "first_differing_layer": nullable(INT),
            **AGREEMENT_STATS.fields})),
        "missing": ListOf(Obj({"case": STR, "budget": STR, "only_in": STR})),
    }),
}, doc="agreement.py's report: our kvpress preset in vLLM vs kvpress's kept sets")
KVPRESS = Obj({"kvpress": KVPRESS_RUN, "agreement": AGREEMENT},
              doc="kvpress on the same needle prompts, and kept-set agreement")

#: The RULER-style accuracy section (benchmarks.accuracy): its rows, tables and kvpress's rows.
RULER = Obj({
    "rows": ListOf(Obj({"id": STR, "task": STR, "length": INT, "regime": STR, "column": STR,
                        "correct": BOOL, "text": STR, "kept": nullable(INT)})),
    "included": Map(ListOf(STR), keys=INT_KEY, doc="length: tasks in the macro average"),
    "tasks": STR, "kvpress": DICT, "engine_s": FLOAT, "wall_s": FLOAT,
    "per_task": DICT, "macro": DICT, "macro_by_length": DICT, "agreement": DICT,
}, doc="RULER-style accuracy, both regimes, every method and ratio, kvpress agreement")

#: Top-level data blocks: key in ``results.json`` -> its structure.
BLOCKS: dict[str, Spec] = {
    "selection": SELECTION,
    "pressure": PRESSURE,
    "overhead": OVERHEAD,
    "blocks": BLOCKS_SECTION,
    "needle": ACCURACY,
    "accuracy": RULER,
    "server_selection": SERVER_SELECTION,
    "kvpress": KVPRESS,
    # benchmarks.phases writes these (their tables are rendered from what it wrote).
    "decode": Obj({"pressure": DICT, "accuracy": DICT, "cost": DICT},
                  doc="compaction during decode (benchmarks.phases)"),
    "prefill": Obj({"accuracy": DICT, "ttft": DICT, "capacity": DICT},
                   doc="compaction while a prompt is read (benchmarks.phases)"),
}


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
    Section("decode", "compaction during decode: capacity, throughput, copy task, cost",
            (("decode",),)),
    Section("prefill", "compaction while a prompt is read: needle at 2x/4x the pool, "
            "capacity, TTFT", (("prefill",),)),
)}


# ----------------------------------------------------------------------------- validation


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
    if not isinstance(results, dict):
        return [f"results: expected an object, got {_type_name(results)}"]
    problems: list[str] = []
    for name in results:
        if not isinstance(name, str):
            problems.append(f"results: key {name!r} is not a string")
    meta = {**META, **FINAL_META}
    for name in META if not complete else meta:
        if name not in results:
            problems.append(f"results: missing field {name!r}")
    for name, value in results.items():
        if not isinstance(name, str):
            continue
        spec = meta.get(name) or BLOCKS.get(name)
        if spec is None:
            problems.append(f"results: unexpected field {name!r} (neither meta nor a data "
                            f"block of benchmarks/schema.py: {', '.join(BLOCKS)})")
            continue
        spec.check(value, name, problems)
    sections = results.get("sections")
    if isinstance(sections, list):
        for i, name in enumerate(sections):
            if isinstance(name, str) and name not in SECTIONS:
                problems.append(f"sections[{i}]: unknown section {name!r} "
                                f"(known: {', '.join(SECTIONS)})")
            elif isinstance(name, str) and complete:
                for path in SECTIONS[name].writes:
                    if not _has(results, path):
                        problems.append(f"{'.'.join(path)}: missing, but section {name!r} "
                                        "ran")
    return problems


def check(results: Any, *, complete: bool = True, what: str = "results") -> None:
    """:func:`validate`, raising :class:`SchemaError` on any problem."""
    problems = validate(results, complete=complete)
    if problems:
        raise SchemaError(problems, what)


def describe() -> str:
    """The schema as an indented tree (``python -m benchmarks.schema --describe``)."""
    lines = ["results.json: object", "  meta:"]
    for name, spec in {**META, **FINAL_META}.items():
        inner = spec.describe(2)
        lines += [f"    {name}{' (at the end)' if name in FINAL_META else ''}: {inner[0]}",
                  *inner[1:]]
    lines.append("  data blocks:")
    for name, spec in BLOCKS.items():
        inner = spec.describe(2)
        lines += [f"    {name}: {inner[0]}", *inner[1:]]
    lines.append("  sections (--only): data they write")
    for s in SECTIONS.values():
        lines.append(f"    {s.name}: {', '.join('.'.join(p) for p in s.writes)} -- {s.doc}")
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
    args = parser.parse_args(argv)
    if args.describe:
        sys.stdout.write(describe())
        return 0
    if not args.paths:
        parser.error("give results.json paths, or --describe")
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
