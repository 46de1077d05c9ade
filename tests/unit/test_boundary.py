"""The boundary between the pure core and the vLLM layer (``vllm_snapkv/integration/``).

The core (settings, methods, selection, schedule, capacity, the step plan and compaction, the
cache layout, the metrics summary, the model and test tools) must import without vLLM, so that it
is usable, testable and reviewable on its own; everything that imports, subclasses, replaces or
reads a vLLM name lives in ``integration/``, and there only ``seam.py`` imports vLLM
(``test_seam.py``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from vllm_snapkv.testing import REPO

PACKAGE = REPO / "vllm_snapkv"
INTEGRATION = PACKAGE / "integration"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports (lazy imports inside functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if INTEGRATION not in p.parents)


def test_the_core_imports_neither_vllm_nor_the_integration_layer() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in _core_modules() for line, name in _imports(path)
        if name == "vllm" or name.startswith("vllm.")
        or name.startswith("vllm_snapkv.integration")
    ]
    assert offenders == []


def test_the_core_runs_without_vllm() -> None:
    """Import every core module with ``vllm`` made unimportable: none needs it."""
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for p in _core_modules()]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        "import vllm_snapkv.methods, torch\n"
        "from vllm_snapkv import select_tokens\n"
        "q, k = torch.randn(4, 8, 16), torch.randn(2, 100, 16)\n"
        "assert select_tokens(q, k, budget=40, window=8).shape[-1] == 40\n"
        "print('CORE OK', len(sys.argv))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "CORE OK" in out.stdout, out.stderr[-3000:]
    assert len(modules) >= 15  # the walk found the core, not an empty directory

