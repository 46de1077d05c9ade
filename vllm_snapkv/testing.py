"""Start and stop a real ``vllm serve`` (this plugin loaded through its entry point) on a free
localhost port: the launcher the integration tests and the benchmarks share, and the line scan
of its ``/metrics`` they both read.

Nothing here mocks vLLM; it is a subprocess wrapper with a readiness poll and a process-group stop
(so the API server's engine and worker children go down with it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
VLLM_BIN = Path(sys.executable).parent / "vllm"
STARTUP_TIMEOUT_S = float(os.environ.get("VLLM_SNAPKV_TEST_STARTUP_TIMEOUT", "600"))

#: Default flags of a server started here on a CPU machine: fp32 (fast and exact here), a small
#: fixed KV cache in host memory, loopback only.
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

    def __init__(self, model: Path, args: list[str], log_path: Path, name: str,
                 base_flags: list[str] | None = None) -> None:
        self.model = model
        self.args = args
        self.base_flags = CPU_FLAGS if base_flags is None else base_flags
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
               *self.base_flags, *self.args, "--port", str(self.port)]
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


def sample_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """``names``' values in a Prometheus text exposition, summed over labels.

    A line scan, not a full parse: the benchmarks' ``Watcher`` polls every few milliseconds from
    the benchmark's own process, and a full parse of vLLM's ~100 KB exposition holds the GIL long
    enough to starve the thread that reads the streamed tokens. The tests read it too.
    """
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out
