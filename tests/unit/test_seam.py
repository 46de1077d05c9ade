"""The one seam to vLLM's internals: complete, checked against real vLLM sources, and loud.

* every hook holds in the installed vLLM (0.32) and in vLLM 0.33.0's wheel sources (downloaded
  from PyPI with ``pip download --no-deps``, unpacked, never installed), and the
  version-dependent features read from the sources differ where the releases differ;
* a moved or changed internal is reported by name, and stops engine start-up with a message
  naming the hook and the vLLM version;
* no module but the seam imports vLLM, and every vLLM method the plugin overrides is a hook.
"""

from __future__ import annotations

import ast
import re
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_snapkv.integration import seam

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vllm_snapkv"


def test_installed_vllm_holds_every_hook() -> None:
    assert seam.check() == {}
    version = seam.tree_version(seam.installed_root())
    minor = seam.parse_release(version)[:2]
    assert minor in ((0, 32), (0, 33)), version
    # 0.33 streams kv_transfer_params itself and caps prefix hits natively; 0.32 does neither.
    assert seam.feature("streams_kv_transfer_params") == (minor == (0, 33))
    assert seam.feature("prefix_hit_cap") == (minor == (0, 33))


@pytest.fixture(scope="module")
def vllm_033() -> Path:
    return seam.release_sources("0.33.0", REPO / ".cache")


def test_vllm_033_sources_hold_every_hook(vllm_033: Path) -> None:
    assert seam.tree_version(vllm_033) == "0.33.0"
    assert seam.check_tree(vllm_033) == {}
    # What changed in 0.33 and the plugin adapts to: vLLM streams kv_transfer_params itself,
    # and caps prefix-cache hits natively.
    assert seam.feature("streams_kv_transfer_params", vllm_033)
    assert seam.feature("prefix_hit_cap", vllm_033)
    # make_arg_parser moved: found through its alternative place.
    hook = next(h for h in seam.TEST_HOOKS if h.name == "make_arg_parser")
    assert seam._check_place(vllm_033, hook, hook.module, hook.target) is None
    assert seam._check_place(vllm_033, hook, *hook.alternatives[0]) is not None


def _copy_module(root: Path, module: str, tmp: Path) -> Path:
    src = root.joinpath(*module.split(".")).with_suffix(".py")
    dst = tmp.joinpath(*module.split(".")).with_suffix(".py")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def test_a_changed_internal_is_reported_by_name(tmp_path: Path) -> None:
    root = seam.installed_root()
    sched = _copy_module(root, "vllm.v1.core.sched.scheduler", tmp_path)
    hooks = [h for h in seam.HOOKS if h.module == "vllm.v1.core.sched.scheduler"]
    assert seam.check_tree(tmp_path, hooks) == {}
    text = sched.read_text()
    # A vLLM that renamed the chunk hook, and one whose prefix-hit method grew a required
    # parameter (an override taking the old arguments would raise on the first request).
    text = text.replace("_reserve_prefill_lookahead", "_reserve_lookahead")
    # (0.32: ``(self, request)``; 0.33: ``(self, request, max_cache_hit_length=None)``)
    text, n = re.subn(r"def _get_local_prefix_cache_hit\(\s*self,\s*request: Request",
                      "def _get_local_prefix_cache_hit(self, request: Request, cap: int",
                      text)
    assert n == 1
    sched.write_text(text)
    problems = seam.check_tree(tmp_path, hooks)
    assert set(problems) == {"Scheduler._reserve_prefill_lookahead",
                             "Scheduler._get_local_prefix_cache_hit",
                             "Scheduler.schedule cuts chunks"}
    assert "takes (self, request, cap" in problems["Scheduler._get_local_prefix_cache_hit"]
    assert "no longer calls _reserve_prefill_lookahead" in \
        problems["Scheduler.schedule cuts chunks"]


def test_a_missing_module_or_attribute_is_reported(tmp_path: Path) -> None:
    root = seam.installed_root()
    mgr = _copy_module(root, "vllm.v1.core.single_type_kv_cache_manager", tmp_path)
    mgr.write_text(mgr.read_text().replace("self._null_block =", "self.null_blk ="))
    hooks = [h for h in seam.HOOKS if h.module in ("vllm.v1.core.single_type_kv_cache_manager",
                                                    "vllm.v1.worker.cpu_worker")]
    problems = seam.check_tree(tmp_path, hooks)
    assert "has no attribute _null_block" in problems["SingleTypeKVCacheManager._null_block"]
    assert problems["CPUWorker"] == "module vllm.v1.worker.cpu_worker not found"


def test_startup_stops_naming_the_hook_and_the_version(tiny_path) -> None:
    """A vLLM lacking a hook stops ``create_engine_config`` (every way of starting an engine)
    before anything else happens, with a message that names it and the installed version."""
    code = f"""
import vllm_snapkv.integration.seam as seam
seam.HOOKS = seam.HOOKS + (seam.Hook("Scheduler.gone", "vllm.v1.core.sched.scheduler",
                                     "Scheduler.gone", "method", why="a test"),)
seam._BY_NAME = {{h.name: h for h in seam.HOOKS}}
from vllm_snapkv.integration import plugin
plugin.register()
from vllm.engine.arg_utils import EngineArgs
args = EngineArgs(model={str(tiny_path)!r}, additional_config={{"kv_compression": "snapkv"}})
try:
    args.create_engine_config()
except seam.IncompatibleVLLM as exc:
    print("REFUSED", exc)
else:
    print("STARTED")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert "REFUSED" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    msg = out.stdout[out.stdout.index("REFUSED"):]
    assert f"vLLM {seam.tree_version(seam.installed_root())}" in msg and "Scheduler.gone" in msg and "Scheduler.gone not found" in msg


def test_only_the_seam_imports_vllm() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() == "integration/seam.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n == "vllm" or n.startswith("vllm.")]
    assert offenders == []


_REFERENCING = {"get", "module", "accepts", "overrides", "uses"}


def _referenced_hooks() -> dict[str, list[str]]:
    """Hook name -> where the integration layer names it (``seam.get/module/accepts`` calls,
    ``@seam.overrides`` / ``@seam.uses`` declarations), from the source."""
    found: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / "integration").rglob("*.py")):
        if path.name == "seam.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in _REFERENCING and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "seam":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.setdefault(arg.value, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_hook_is_named_where_it_is_used_and_nothing_else_gates_startup() -> None:
    """The seam is derived from the code: each hook is named by the code that uses or overrides
    it (else it is a dead declaration that would still stop start-up), and each name the code
    uses is a hook."""
    referenced = _referenced_hooks()
    declared = {h.name for h in seam.HOOKS}
    assert sorted(set(referenced) - declared) == []
    assert sorted(declared - set(referenced)) == []


def _plugin_classes() -> list[type]:
    """Every class the integration layer defines that has a vLLM class among its bases."""
    import importlib
    import pkgutil

    import vllm_snapkv.integration as integration
    from vllm_snapkv.integration import worker

    out = [getattr(worker, n) for n in ("SnapKVCPUModelRunner", "SnapKVCPUWorker")]
    for info in pkgutil.iter_modules(integration.__path__):
        mod = importlib.import_module(f"{integration.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and any(
                    k.__module__.startswith("vllm.") for k in obj.__mro__):
                out.append(obj)
    return out


def test_every_override_of_a_vllm_method_is_declared_as_a_hook() -> None:
    """A method a plugin class defines that its vLLM base also has (``__init__`` included, when
    vLLM defines one) carries ``@seam.overrides`` naming a hook of that method, whose
    signature the seam then checks against the vLLM sources."""
    targets = {h.name: h.target for h in seam.HOOKS}
    classes = _plugin_classes()
    assert len(classes) >= 12  # scheduler, manager, spec, runners, workers, backends, connector
    missing = []
    for cls in classes:
        vllm_bases = [k for k in cls.__mro__ if k.__module__.startswith("vllm.")]
        for klass in cls.__mro__:  # the class and its plugin mixins
            if not klass.__module__.startswith("vllm_snapkv"):
                continue
            for name, value in vars(klass).items():
                fn = getattr(value, "__func__", value)
                if not callable(fn) or name in ("__init_subclass__", "__class_getitem__") or \
                        (name.startswith("__") and name != "__init__"):
                    continue
                if getattr(getattr(fn, "__code__", None), "co_filename", "") == "<string>":
                    continue  # made by @dataclass, not written here
                if not any(name in vars(k) for k in vllm_bases):
                    continue  # the plugin's own method
                declared = getattr(fn, "__seam_overrides__", ())
                if not any(targets[d].rsplit(".", 1)[-1] == name for d in declared):
                    missing.append(f"{klass.__module__}.{klass.__qualname__}.{name}")
    assert missing == []


def _in_vllm_class(bases: list[type], attr: str) -> bool:
    """``attr`` is defined by one of the vLLM ``bases``: in its class body, or assigned on
    ``self`` in its source."""
    root = seam.installed_root()
    for k in bases:
        if attr in vars(k):
            return True
        path = seam._module_path(root, k.__module__)
        tree = seam._parse(path) if path is not None else None
        node = seam._find(tree.body, k.__qualname__.split(".")[0]) if tree is not None else None
        if node is not None and seam._assigns_attribute(node, attr):
            return True
    return False


def _self_attributes(fn, ctx: type) -> set[str]:
    """Names ``fn`` reads (``ctx=ast.Load``) or assigns (``ast.Store``) on ``self``."""
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError):  # no source (made at run time): nothing to read
        return set()
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self" and isinstance(n.ctx, ctx)}


def test_every_vllm_attribute_read_on_self_is_declared() -> None:
    """In a plugin class with a vLLM base, a method that reads ``self.x`` where ``x`` is vLLM's
    (not defined or assigned by the plugin's own classes) declares a hook of ``x`` with
    ``@seam.uses`` / ``@seam.overrides``: a vLLM name used without a hook fails here."""
    import inspect

    targets = {h.name: h.target for h in seam.HOOKS}
    undeclared = []
    for cls in _plugin_classes():
        bases = [k for k in cls.__mro__ if k.__module__.startswith("vllm.")]
        mine = [k for k in cls.__mro__ if k.__module__.startswith("vllm_snapkv")]
        own = set()
        for k in mine:
            own |= set(vars(k))
            for fn in vars(k).values():
                fn = getattr(fn, "__func__", fn)
                if inspect.isfunction(fn):
                    own |= _self_attributes(fn, ast.Store)
        for k in mine:
            for name, fn in vars(k).items():
                fn = getattr(fn, "__func__", fn)
                if not inspect.isfunction(fn) or fn.__code__.co_filename == "<string>":
                    continue
                declared = {targets[d].rsplit(".", 1)[-1] for d in
                            (*getattr(fn, "__seam_uses__", ()),
                             *getattr(fn, "__seam_overrides__", ()))}
                undeclared += [f"{k.__qualname__}.{name}: self.{a}"
                               for a in _self_attributes(fn, ast.Load) - own - declared
                               if _in_vllm_class(bases, a)]
    assert sorted(set(undeclared)) == []
