"""SnapKV beside a user's own KV connector (`--kv-transfer-config`), on real `vllm serve`.

* Connectors that move KV (judged by their class: it implements a KV-moving hook) cannot share
  prompt KV with compression. Measured with vLLM's
  `ExampleConnector` on the tiny model: it stored a compressed prompt's compacted tail [E, N)
  under the whole prompt's hash (max |diff| 1.45 against the uncompressed prompt's file, 0 on
  [0, E)), and loading a stored prompt into a compressed request whose local tail was shorter
  than the window stopped the engine (`EngineDeadError`). So they are refused at start-up, in one
  line naming the flag.
* A connector of the user's own that moves no prompt KV (`probe_connector.py`, loaded through
  `kv_connector_module_path`) is composed with SnapKV's through vLLM's `MultiConnector`: answers
  and summaries are identical to the same preset served without it, the connector does its own
  job (a file per request, its `kv_transfer_params` beside `snapkv`), and the `vllm:snapkv_*`
  series equal the sums of the responses' fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import PRESET, VLLM_BIN, VllmServer, post_ok

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
MODEL = "smollm2"


def test_a_vllm_connector_is_refused_at_startup(tiny_path: Path, tmp_path: Path) -> None:
    ktc = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "kv")}}
    proc = subprocess.run([str(VLLM_BIN), "serve", str(tiny_path), "--kv-compression", "snapkv",
                           "--kv-transfer-config", json.dumps(ktc)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vllm serve: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    # Refused for what it does (its KV-moving hooks), named with them.
    assert "--kv-transfer-config with ExampleConnector (implements get_num_new_matched_tokens, " \
           "start_load_kv, save_kv_layer) cannot be combined with --kv-compression" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "kv").exists()


@pytest.fixture(scope="module")
def probe(start_module_server, smollm2_path: Path,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[VllmServer, Path]:
    """The `make serve` preset plus the probe connector, and the connector's log folder."""
    log_dir = tmp_path_factory.mktemp("probe-connector")
    ktc = {"kv_connector": "ProbeConnector", "kv_connector_module_path": "probe_connector",
           "kv_role": "kv_both", "kv_connector_extra_config": {"log_dir": str(log_dir)}}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), old) if p)
    try:
        server = start_module_server(smollm2_path, ["--config", str(PRESET),
                                                    "--kv-transfer-config", json.dumps(ktc)],
                                     name=MODEL)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    return server, log_dir


def _requests() -> list[tuple[str, dict]]:
    def completion(prompt: str, **kw) -> tuple[str, dict]:
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8,
                                   "temperature": 0, **kw}

    chat = ("/v1/chat/completions", {
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": FILLER * 80 + "What colour is the sky?"}]})
    return [completion(FILLER * 70 + "Summarise."),
            completion(FILLER * 100 + "Again?", vllm_xargs={"snapkv_ratio": 0.25}),
            chat,
            completion("The capital of France is"),
            completion(FILLER * 70 + "Summarise.", vllm_xargs={"kv_compression": "none"})]


def _text(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _snapkv_series(server: VllmServer) -> dict[str, float]:
    """``vllm:snapkv_*`` samples of the server's /metrics, summed per sample name (+ reason)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:snapkv_") and s.labels.get("model_name") == MODEL:
                key = s.name + (f"{{{s.labels['reason']}}}" if "reason" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_a_connector_of_your_own_is_composed(probe: tuple[VllmServer, Path],
                                             smollm2_server: VllmServer) -> None:
    server, log_dir = probe
    calls = _requests()
    mine = [post_ok(server, path, body) for path, body in calls]
    plain = [post_ok(smollm2_server, path, body) for path, body in calls]

    # Same answers and summaries as the preset without the connector (greedy).
    for a, b in zip(mine, plain):
        assert _text(a) == _text(b)
        assert a["kv_transfer_params"]["snapkv"] == b["kv_transfer_params"]["snapkv"]
    fields = [a["kv_transfer_params"]["snapkv"] for a in mine]
    assert [f["compressed"] for f in fields] == [True, True, True, False, False]

    # The connector did its job: its own params beside SnapKV's, one file per request.
    prompt_tokens = [a["usage"]["prompt_tokens"] for a in mine]
    assert [a["kv_transfer_params"]["probe"] for a in mine] == [
        {"prompt_tokens": n} for n in prompt_tokens]
    logged = [json.loads(p.read_text())["prompt_tokens"] for p in log_dir.glob("*.json")]
    assert sorted(logged) == sorted(prompt_tokens)

    # The SnapKV series equal the sums of the fields (stats arrive with the engine's steps).
    comp = [f for f in fields if f["compressed"]]
    deadline = time.monotonic() + 30
    while True:
        series = _snapkv_series(server)
        seen = (series.get("vllm:snapkv_compressed_requests_total", 0)
                + sum(v for k, v in series.items()
                      if k.startswith("vllm:snapkv_skipped_requests_total")))
        if seen >= len(fields) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert series["vllm:snapkv_compressed_requests_total"] == len(comp)
    assert series["vllm:snapkv_prompt_tokens_total"] == sum(f["prompt_tokens"] for f in comp)
    assert series["vllm:snapkv_kept_tokens_total"] == sum(f["kept_tokens"] for f in comp)
    assert series["vllm:snapkv_evicted_tokens_total"] == sum(f["evicted_tokens"] for f in comp)
    assert series["vllm:snapkv_freed_blocks_total"] == sum(f["freed_blocks"] for f in comp)
    assert series["vllm:snapkv_compression_ratio_sum"] == pytest.approx(
        sum(f["ratio"] for f in comp), rel=1e-9)
    assert series["vllm:snapkv_selection_seconds_count"] == len(comp)
    assert series["vllm:snapkv_skipped_requests_total{fits_budget}"] == 1
    assert series["vllm:snapkv_skipped_requests_total{opted_out}"] == 1
