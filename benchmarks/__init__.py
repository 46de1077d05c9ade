"""The benchmark suite of vllm-snapkv and its pieces, run as modules from the repository root::

    python -m benchmarks.suite [--smoke] [--out DIR] [--only SECTIONS]
    python -m benchmarks.report results/bench-.../results.json
    python -m benchmarks.schema results/bench-.../results.json
    python -m benchmarks.bench_selection [--quick]
    python -m benchmarks.bench_compaction [--quick]
    python -m benchmarks.agreement --kvpress-json ... --out ...
    python -m benchmarks.kvpress_runner --spec ... --out ...      (re-executes in .venv-kvpress)
    python -m benchmarks.kvpress_crosscheck                         (re-executes in .venv-kvpress)

Modules import each other as ``from benchmarks.x import y`` and the plugin as ``vllm_snapkv``;
running from the repository root puts both on ``sys.path``. ``results.json`` is described, and
checked, by :mod:`benchmarks.schema`.

This file imports nothing but the standard library: ``kvpress_runner`` and ``kvpress_crosscheck``
import the package inside kvpress's own virtual environment, which has neither vLLM nor the
main venv's other packages.
"""

from pathlib import Path

#: The repository root (the working directory every benchmark runs from).
REPO = Path(__file__).resolve().parents[1]
