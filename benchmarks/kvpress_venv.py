"""Run a benchmark module under NVIDIA kvpress 0.5.5's own virtual environment.

kvpress 0.5.5 pins ``transformers<5.3``, which the vLLM project venv does not satisfy, so every
module that imports kvpress (``benchmarks.kvpress_crosscheck``, ``benchmarks.kvpress_runner``) runs
in a separate venv built by ``benchmarks/kvpress_env.sh`` (default ``<repo>/.venv-kvpress``, or
``$KVPRESS_VENV``), as ``<venv>/bin/python -m benchmarks.<module>`` from the repository root.
Such a module calls :func:`ensure_kvpress_python` first: when started with any other Python it
creates that venv if needed (the shell script is idempotent) and re-executes itself there with
``-m``, this repository on ``PYTHONPATH`` (:func:`kvpress_env`) so that ``vllm_snapkv`` (the
selection core is pure torch) and ``benchmarks.*`` import without being installed.
:func:`kvpress_python` gives the interpreter path to callers in the main venv that start such a
module as a subprocess (``cwd=REPO``, ``env=kvpress_env()``).

Standard library only: it is imported on both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import REPO

DEFAULT_VENV = REPO / ".venv-kvpress"
KVPRESS_VERSION = "0.5.5"
_REEXEC_ENV = "_SNAPKV_KVPRESS_REEXEC"


def kvpress_venv() -> Path:
    """The kvpress venv directory (``$KVPRESS_VENV`` or ``<repo>/.venv-kvpress``)."""
    return Path(os.environ.get("KVPRESS_VENV", DEFAULT_VENV))


def kvpress_python() -> Path:
    """Create the kvpress venv if needed (idempotent) and return its Python interpreter."""
    venv = kvpress_venv()
    subprocess.run([str(REPO / "benchmarks" / "kvpress_env.sh"), str(venv)], check=True)
    return venv / "bin" / "python"


def kvpress_env() -> dict[str, str]:
    """Environment for a module run by :func:`kvpress_python`: this repo on ``PYTHONPATH`` (so
    that ``-m benchmarks.<module>`` works from any working directory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return env


def ensure_kvpress_python(module: str, argv: list[str]) -> None:
    """Return if kvpress 0.5.5 is importable here; else re-exec ``python -m module argv`` in
    its venv (same working directory, so relative paths in ``argv`` keep their meaning)."""
    try:
        from importlib.metadata import version

        if version("kvpress") == KVPRESS_VERSION:
            return
    except Exception:
        pass
    if os.environ.get(_REEXEC_ENV) == "1":
        sys.exit(f"kvpress {KVPRESS_VERSION} is not importable even inside its venv; "
                 "see benchmarks/kvpress_env.sh")
    py = kvpress_python()
    env = kvpress_env()
    env[_REEXEC_ENV] = "1"
    os.execve(str(py), [str(py), "-m", module, *argv], env)
