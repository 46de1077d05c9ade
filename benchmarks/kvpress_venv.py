"""Run a benchmark script under NVIDIA kvpress 0.5.5's own virtual environment.

kvpress 0.5.5 pins ``transformers<5.3``, which the vLLM project venv does not satisfy, so every
script that imports kvpress (``kvpress_crosscheck.py``, ``kvpress_runner.py``) runs in a separate
venv built by ``benchmarks/kvpress_env.sh`` (default ``<repo>/.venv-kvpress``, or
``$KVPRESS_VENV``).
Such a script calls :func:`ensure_kvpress_python` first: when started with any other Python it
creates that venv if needed (the shell script is idempotent) and re-executes itself there, with this
repository on ``PYTHONPATH`` so that ``vllm_snapkv`` (the selection core is pure torch) and
``benchmarks.*`` import without being installed. :func:`kvpress_python` gives the interpreter path
to callers in the main venv that start such a script as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    """Environment for a script run by :func:`kvpress_python`: this repo on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.setdefault("VLLM_SNAPKV_SKIP_VERSION_CHECK", "1")
    return env


def ensure_kvpress_python(script: str | Path, argv: list[str]) -> None:
    """Return if kvpress 0.5.5 is importable here; else re-exec ``script argv`` in its venv."""
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
    os.execve(str(py), [str(py), str(Path(script).resolve()), *argv], env)
