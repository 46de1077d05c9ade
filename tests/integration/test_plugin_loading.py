"""vLLM discovers and loads the plugin, and `vllm serve` knows its flags (no engine started)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from conftest import VLLM_BIN


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_entry_point_is_declared() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("snapkv") == "vllm_snapkv.integration.plugin:register"


def test_vllm_plugin_loader_registers_the_plugin() -> None:
    # A fresh interpreter, so nothing of ours is imported before vLLM's own loader runs.
    proc = _run_python(
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "assert 'vllm_snapkv.integration.plugin' not in sys.modules\n"
        "load_general_plugins()\n"
        "import vllm_snapkv.integration.plugin as p\n"
        "print('registered', p.is_registered())\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "registered True" in proc.stdout


def test_engine_args_carry_the_flag_into_additional_config() -> None:
    # The real `vllm serve` parser, built the way the CLI builds it.
    proc = _run_python(
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm_snapkv.integration.seam import get\n"
        "make_arg_parser = get('make_arg_parser')\n"
        "from vllm.engine.arg_utils import AsyncEngineArgs\n"
        "parser = make_arg_parser(FlexibleArgumentParser())\n"
        "args = parser.parse_args(['m', '--kv-compression', 'snapkv'])\n"
        "ea = AsyncEngineArgs.from_cli_args(args)\n"
        "print('cfg', ea.additional_config)\n"
        "args = parser.parse_args(['m'])\n"
        "print('default', AsyncEngineArgs.from_cli_args(args).additional_config)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "cfg {'kv_compression': 'snapkv'}" in proc.stdout
    assert "default {'kv_compression': 'none'}" in proc.stdout


def test_vllm_command_works() -> None:
    proc = subprocess.run([str(VLLM_BIN), "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version

    assert proc.stdout.strip().splitlines()[-1] == version("vllm")


def test_serve_help_has_snapkv_group() -> None:
    proc = subprocess.run([str(VLLM_BIN), "serve", "--help=snapkv"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from vllm_snapkv.methods import registered_methods

    text = " ".join(proc.stdout.split())
    # The methods come from the registry, each with its summary and paper.
    assert "--kv-compression {none," + ",".join(registered_methods()) + "}" in text
    for name, cls in registered_methods().items():
        assert cls.paper in text, name
    for flag in ("--snapkv-decode-budget", "--snapkv-prefill-budget", "--snapkv-prefill-method"):
        assert flag in text


def test_bad_flag_value_is_refused_at_startup() -> None:
    proc = subprocess.run([str(VLLM_BIN), "serve", "some-model", "--kv-compression", "h2o"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--kv-compression" in proc.stderr and "invalid choice: 'h2o'" in proc.stderr


def test_bad_setting_combination_is_refused_at_startup_naming_the_flag() -> None:
    proc = subprocess.run([str(VLLM_BIN), "serve", "some-model", "--kv-compression", "snapkv",
                           "--snapkv-budget", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--snapkv-budget=16 is invalid: must be an integer > window (32)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_interval_is_refused_at_startup_naming_the_flag() -> None:
    proc = subprocess.run([str(VLLM_BIN), "serve", "some-model", "--kv-compression", "snapkv",
                           "--snapkv-decode-budget", "512", "--snapkv-decode-interval", "100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("--snapkv-decode-interval=100 is invalid: must be a positive multiple of the KV "
            "block size (128)") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_settings_flags_reach_additional_config() -> None:
    proc = _run_python(
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm_snapkv.integration.seam import get\n"
        "make_arg_parser = get('make_arg_parser')\n"
        "from vllm.engine.arg_utils import AsyncEngineArgs\n"
        "parser = make_arg_parser(FlexibleArgumentParser())\n"
        "args = parser.parse_args(['m', '--kv-compression', 'snapkv', '--snapkv-ratio', '0.25',\n"
        "                          '--snapkv-window', '16', '--snapkv-min-prompt', '2048'])\n"
        "print('cfg', AsyncEngineArgs.from_cli_args(args).additional_config)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert ("cfg {'kv_compression': 'snapkv', 'snapkv': {'ratio': 0.25, 'window': 16, "
            "'min_prompt': 2048}}") in proc.stdout
