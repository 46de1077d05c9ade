"""The CPU image: ``docker/Dockerfile.cpu`` built with podman, and its ``vllm serve`` (the bundled
SmolLM2 with compression on) answering over HTTP.

Opt-in (``make test-image``, or ``VLLM_SNAPKV_IMAGE_TEST=1``): it builds a 5 GB image (about
10 minutes) with podman, which CI's machines do not have installed. ``scripts/build-image.sh``
takes its settings from the environment (``BASE=debootstrap`` where Docker Hub is unreachable,
``PODMAN``, ``PODMAN_BUILD_FLAGS``); ``PODMAN_RUN_FLAGS`` adds flags to ``podman run``.

Ran on this project's VM (Debian bookworm, podman 4.3 + runc from Debian) as::

    BASE=debootstrap PODMAN="podman --runtime runc" PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PODMAN_BUILD_FLAGS="--ulimit nofile=1024:1024 --ulimit nproc=1000:1000" \
    PODMAN_RUN_FLAGS="--ulimit nofile=1024:1024 --ulimit nproc=1000:1000" make test-image
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest
import requests

from vllm_snapkv.testing import REPO, free_port

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(os.environ.get("VLLM_SNAPKV_IMAGE_TEST") != "1",
                       reason="builds a container image with podman: run `make test-image`"),
]
IMAGE = os.environ.get("IMAGE", "localhost/vllm-snapkv:cpu")


def _podman(*args: str, **kw) -> subprocess.CompletedProcess:
    podman = shlex.split(os.environ.get("PODMAN", "podman"))
    return subprocess.run([*podman, *args], capture_output=True, text=True, **kw)


def test_image_builds_and_serves_compressed_requests():
    build = subprocess.run([str(REPO / "scripts" / "build-image.sh")], cwd=REPO,
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    port = free_port()
    name = f"vllm-snapkv-test-{port}"
    run = _podman("run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
                  *shlex.split(os.environ.get("PODMAN_RUN_FLAGS", "")), IMAGE,
                  "scripts/serve.sh", "--host", "127.0.0.1", "--port", str(port))
    assert run.returncode == 0, run.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if requests.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            state = _podman("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, \
                _podman("logs", "--tail", "60", name).stderr[-4000:]
            time.sleep(3)
        prompt = "The grass is green. The sky is blue. " * 150 + "What colour is the sky?"
        r = requests.post(f"{url}/v1/completions", timeout=300, json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        summary = r.json()["kv_transfer_params"]["snapkv"]
        assert summary["compressed"] and summary["kept_tokens"] < summary["prompt_tokens"]
        bad = requests.post(f"{url}/v1/completions", timeout=60, json={
            "model": "smollm2", "prompt": prompt, "max_tokens": 4,
            "vllm_xargs": {"snapkv_ratio": 3}})
        assert bad.status_code == 400 and "snapkv_ratio" in bad.text, bad.text
        metrics = requests.get(f"{url}/metrics", timeout=30).text
        assert "vllm:snapkv_compressed_requests_total" in metrics
    finally:
        _podman("rm", "-f", name, timeout=120)
