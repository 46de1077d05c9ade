"""The README's "Adding a method" example (``examples/value_norm``) is a working method: its
scores match a float64 restatement of the rule, its parameter is a validated setting and a
``vllm serve`` flag, and an installed package's entry point is all the engine needs to find it."""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from test_methods import _keep

from vllm_snapkv import select_tokens
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.integration.cli import add_cli_args
from vllm_snapkv.methods import base, method_names, registered_methods
from vllm_snapkv.settings import SettingsError, CompressionSettings
from vllm_snapkv.testing import REPO

EXAMPLE = REPO / "examples" / "value_norm"


@pytest.fixture
def vnorm():
    """The example module, imported (which registers it) and unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("value_norm", EXAMPLE / "value_norm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["value_norm"] = module  # as an import would (dataclasses look it up)
    spec.loader.exec_module(module)
    yield module
    del sys.modules["value_norm"], base._REGISTRY["vnorm"]
    base._method.cache_clear()


def value_norm_reference(values: torch.Tensor, order: int) -> list[list[float]]:
    """|v_i|_p per KV head, in float64, written out."""
    return [[(sum(abs(float(x)) ** order for x in v)) ** (1 / order) for v in head]
            for head in values.double()]


@pytest.mark.parametrize("seed", range(8))
def test_the_example_ranks_by_value_norm(vnorm, seed: int) -> None:
    rng = random.Random(seed)
    hkv, n, d, window = rng.choice([1, 2]), rng.randint(60, 400), 16, rng.choice([4, 8, 32])
    budget, order = rng.randint(window + 1, n), rng.choice([1, 2])
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen) * (1 + 3 * torch.rand(hkv, n, 1, generator=gen))
    got = select_tokens(None, keys, method="vnorm", budget=budget, window=window, values=values,
                        vnorm_order=order, score_dtype=torch.float64)
    ref = value_norm_reference(values, order)
    for h in range(hkv):
        assert got[h].tolist() == _keep(ref[h], n, min(budget, n), window, 0)


def test_its_parameter_is_a_validated_setting_and_a_flag(vnorm) -> None:
    assert "vnorm" in method_names() and registered_methods()["vnorm"] is vnorm.ValueNorm
    s = CompressionSettings(budget=100, method="vnorm", vnorm_order=1)
    assert s.vnorm_order == 1 and s.scorer().vnorm_order == 1
    assert CompressionSettings(budget=100).vnorm_order == 2  # the default
    for bad in (3, 2.0, True, "2"):
        with pytest.raises(SettingsError) as err:
            CompressionSettings(budget=100, vnorm_order=bad)
        assert err.value.setting == "vnorm_order" and "1, 2" in err.value.allowed
    cfg = CompressionConfig.from_additional_config(
        {"kv_compression": "vnorm", "snapkv": {"budget": 64, "vnorm_order": 1}})
    assert cfg.settings.scorer().vnorm_order == 1
    parser = add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--kv-compression", "vnorm", "--snapkv-vnorm-order", "1"])
    assert args.kv_compression == "vnorm" and args.snapkv_vnorm_order == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--snapkv-vnorm-order", "3"])
    assert "Value norm" in " ".join(parser.format_help().split())


def test_an_installed_package_is_found_through_its_entry_point(tmp_path: Path) -> None:
    """What ``pip install ./examples/value_norm`` leaves: the module on the path and a
    dist-info whose entry point names it. A fresh interpreter finds the method without
    importing the module itself."""
    site = tmp_path / "site"
    dist = site / "vllm_snapkv_value_norm-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-snapkv-value-norm\n"
                                   "Version: 0.1.0\n")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    group = project["entry-points"]["vllm_snapkv.methods"]
    (dist / "entry_points.txt").write_text(
        "[vllm_snapkv.methods]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))
    (site / "value_norm.py").write_text((EXAMPLE / "value_norm.py").read_text())
    code = ("import sys\n"
            "from vllm_snapkv.methods import method_names\n"
            "assert 'value_norm' not in sys.modules\n"
            "print(sorted(method_names()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'vnorm'" in out.stdout and "'snapkv'" in out.stdout
