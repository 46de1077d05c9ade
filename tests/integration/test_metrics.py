"""SnapKV metrics end to end: a real Prometheus scrapes a real `vllm serve --kv-compression snapkv`
started with `--api-server-count 2` (Prometheus multiprocess mode), requests go through both API
processes, and the `vllm:snapkv_*` series Prometheus holds must equal what the responses'
`kv_transfer_params.snapkv` fields report — nothing lost, nothing counted twice. Every PromQL
expression of the Grafana dashboard must return data from that Prometheus, and `promtool` must
accept deploy/prometheus.yml.

Needs Debian's `prometheus` package (`scripts/install-prometheus.sh`).
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import PRESET, REPO, VllmServer, post_ok, stream_summary
from prometheus import Prometheus, tool

pytestmark = pytest.mark.engine

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vllm-snapkv.json"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(start_module_server, smollm2_path) -> VllmServer:
    """The preset (compression on, budget 1024, blocks of 128) with two API-server processes."""
    return start_module_server(smollm2_path,
                               ["--config", str(PRESET), "--api-server-count", "2"], name=MODEL)


@pytest.fixture(scope="module")
def prom(server: VllmServer, tmp_path_factory: pytest.TempPathFactory):
    p = Prometheus(server.port, tmp_path_factory.mktemp("prometheus"))
    yield p
    p.stop()


def _post(server: VllmServer, path: str, body: dict) -> dict:
    # A fresh connection per request, so the kernel spreads them over both API processes.
    with requests.Session() as s:
        r = s.post(f"{server.url}{path}", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def _completion(prompt: str, **kw) -> tuple[str, dict]:
    return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4,
                               "temperature": 0, **kw}


def _chat(content: str, **kw) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "temperature": 0,
                                    "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture(scope="module")
def traffic(server: VllmServer, prom: Prometheus) -> dict:
    """Send a known mix of requests (both endpoints, both API processes); return their fields."""
    compressed = [_completion(FILLER * 70 + "Summarise."),
                  _completion(FILLER * 110 + "Summarise."),
                  _chat(FILLER * 90 + "What colour is the sky?"),
                  _completion(FILLER * 100 + "Again?", vllm_xargs={"snapkv_ratio": 0.25}),
                  _chat(FILLER * 60 + "And the grass?")]
    fits = [_completion("The capital of France is"), _chat("Hi there"),
            _completion(FILLER * 20)]  # ~400 tokens: under the 1024 budget
    opted_out = [_completion(FILLER * 70 + "Summarise.", vllm_xargs={"kv_compression": "none"})]
    calls = compressed + fits + opted_out
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(lambda c: _post(server, *c), calls))
    fields = [a.get("kv_transfer_params", {}).get("snapkv") for a in answers]
    usage = [a["usage"]["prompt_tokens"] for a in answers]
    n_comp = len(compressed)
    return {"fields": fields, "usage": usage, "compressed": fields[:n_comp],
            "fits": fields[n_comp:n_comp + len(fits)], "opted_out": fields[n_comp + len(fits):]}


def test_every_response_carries_its_snapkv_summary(traffic: dict) -> None:
    for f, prompt_tokens in zip(traffic["fields"], traffic["usage"]):
        assert f is not None, "response without kv_transfer_params.snapkv"
        assert f["prompt_tokens"] == prompt_tokens
        assert f["kept_tokens"] + f["evicted_tokens"] == f["prompt_tokens"]
        assert f["ratio"] == pytest.approx(f["kept_tokens"] / f["prompt_tokens"])
    for f in traffic["compressed"]:
        assert f["compressed"] and f["freed_blocks"] >= 1
        assert f["evicted_tokens"] == 128 * f["freed_blocks"]
    # budget 1024 -> kept in [1024, 1152); the snapkv_ratio=0.25 request keeps ~a quarter
    assert all(1024 <= f["kept_tokens"] < 1152 for i, f in enumerate(traffic["compressed"])
               if i != 3)
    assert traffic["compressed"][3]["ratio"] < 0.35
    for f in traffic["fits"] + traffic["opted_out"]:
        assert not f["compressed"] and f["freed_blocks"] == 0 and f["ratio"] == 1.0


def test_prometheus_series_match_the_responses(traffic: dict, prom: Prometheus) -> None:
    comp = traffic["compressed"]
    m = f'{{model_name="{MODEL}"}}'
    # The responses are back before Prometheus' next scrape: wait until the last requests'
    # stats are scraped (every request ends in exactly one of these counters).
    total = len(traffic["fields"])
    assert prom.wait_value(f"sum(vllm:snapkv_compressed_requests_total{m}) + "
                           f"sum(vllm:snapkv_skipped_requests_total{m})", total) == total
    assert prom.value(f"sum(vllm:snapkv_compressed_requests_total{m})") == len(comp)
    assert prom.value(f"sum(vllm:snapkv_compression_ratio_count{m})") == len(comp)
    assert prom.value(f"sum(vllm:snapkv_compression_factor_count{m})") == len(comp)
    assert prom.value(f"sum(vllm:snapkv_compression_ratio_sum{m})") == pytest.approx(
        sum(f["ratio"] for f in comp), rel=1e-9)
    assert prom.value(f"sum(vllm:snapkv_evicted_tokens_total{m})") == sum(
        f["evicted_tokens"] for f in comp)
    assert prom.value(f"sum(vllm:snapkv_freed_blocks_total{m})") == sum(
        f["freed_blocks"] for f in comp)
    assert prom.value(f"sum(vllm:snapkv_prompt_tokens_total{m})") == sum(
        f["prompt_tokens"] for f in comp)
    runs = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query(
        f"sum by (reason) (vllm:snapkv_compaction_runs_total{m})")}
    assert runs == {"schedule": sum(f["reasons"]["schedule"] for f in comp), "pressure": 0}
    assert runs["schedule"] == sum(f["compactions"] for f in comp) >= len(comp)
    assert prom.value(f"sum(vllm:snapkv_kept_tokens_total{m})") == sum(
        f["kept_tokens"] for f in comp)
    assert prom.value(f"sum(vllm:snapkv_selection_seconds_count{m})") == len(comp)
    sel = prom.value(f"sum(vllm:snapkv_selection_seconds_sum{m})")
    assert sel is not None and 0 < sel < 60
    skipped = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query(
        f"sum by (reason) (vllm:snapkv_skipped_requests_total{m})")}
    assert skipped == {"fits_budget": len(traffic["fits"]),
                       "opted_out": len(traffic["opted_out"]), "not_compacted": 0}
    # Nothing is running any more: no block is being saved.
    assert prom.wait_value(f"sum(vllm:snapkv_blocks_saved{m})", 0) == 0
    # The series carry vLLM's own labels, one engine.
    labels = prom.query(f"vllm:snapkv_compressed_requests_total{m}")
    assert {r["metric"]["engine"] for r in labels} == {"0"}


def _multiproc_dir(server: VllmServer) -> Path:
    """PROMETHEUS_MULTIPROC_DIR of the server's processes (vLLM sets it for N > 1 API servers)."""
    assert server.proc is not None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pgid = int(stat.read_text().rsplit(")", 1)[1].split()[2])
            if pgid != server.proc.pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(item.split(b"=", 1)[1].decode())
    pytest.fail("no server process has PROMETHEUS_MULTIPROC_DIR: not in multiprocess mode?")


def _counter_per_process(server: VllmServer, sample: str) -> dict[str, float]:
    """Counter ``sample`` as each API process recorded it (multiprocess files)."""
    from prometheus_client.mmap_dict import MmapedDict

    per_pid: dict[str, float] = {}
    for f in _multiproc_dir(server).glob("counter_*.db"):
        pid = f.stem.split("_", 1)[1]
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(f)):
            if json.loads(key)[1] == sample:
                per_pid[pid] = per_pid.get(pid, 0.0) + value
    return per_pid


def _wait_total(server: VllmServer, expected: int, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        per_pid = _counter_per_process(server, "vllm:snapkv_compressed_requests_total")
        if sum(per_pid.values()) >= expected or time.monotonic() > deadline:
            return per_pid
        time.sleep(0.5)


def test_observations_are_spread_over_both_api_processes(server: VllmServer, traffic: dict,
                                                         prom: Prometheus) -> None:
    """Each step's stats reach one API process; the per-process values must add up to what was
    sent (none lost, none doubled) — and the check is only meaningful if both processes got some.
    Which API process takes a connection is the kernel's choice, so a few more compressed
    requests are sent (at most 12) until both have recorded some."""
    per_pid = _wait_total(server, len(traffic["compressed"]))
    assert sum(per_pid.values()) == len(traffic["compressed"]), per_pid
    for _ in range(12):
        if sum(1 for v in per_pid.values() if v > 0) == 2:
            break
        answer = _post(server, *_completion(FILLER * 70 + "Once more."))
        traffic["compressed"].append(answer["kv_transfer_params"]["snapkv"])
        per_pid = _wait_total(server, len(traffic["compressed"]))
        assert sum(per_pid.values()) == len(traffic["compressed"]), per_pid
    assert sum(1 for v in per_pid.values() if v > 0) == 2, per_pid


def test_blocks_saved_gauge_while_a_compressed_request_decodes(server: VllmServer,
                                                               prom: Prometheus,
                                                               traffic: dict) -> None:
    path, body = _completion(FILLER * 80 + "Tell me a long story.", max_tokens=200,
                             min_tokens=200)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(out=_post(server, path, body)))
    t.start()
    seen = 0.0
    while t.is_alive():
        v = prom.value(f'sum(vllm:snapkv_blocks_saved{{model_name="{MODEL}"}})')
        seen = max(seen, v or 0.0)
        time.sleep(0.5)
    t.join()
    freed = result["out"]["kv_transfer_params"]["snapkv"]["freed_blocks"]
    assert freed >= 1 and seen == freed
    assert prom.wait_value(f'sum(vllm:snapkv_blocks_saved{{model_name="{MODEL}"}})', 0) == 0


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(q)
    return exprs


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$model_name", MODEL)


def test_every_dashboard_query_returns_data(prom: Prometheus, traffic: dict,
                                            server: VllmServer) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    # Fresh traffic inside the rate window, then let Prometheus scrape it.
    post_ok(server, *_completion(FILLER * 75 + "Once more."))
    time.sleep(4)
    empty = []
    for q in queries:
        if q.startswith("label_values("):
            metric, label = q[len("label_values("):-1].split(",")
            r = requests.get(f"{prom.url}/api/v1/label/{label.strip()}/values",
                             params={"match[]": metric.strip()}, timeout=10).json()
            if MODEL not in r["data"]:
                empty.append(q)
            continue
        if not prom.query(_substitute(q)):
            empty.append(q)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_promtool_accepts_the_scrape_configs(prom: Prometheus) -> None:
    for cfg in (REPO / "deploy" / "prometheus.yml", prom.config):
        out = subprocess.run([tool("promtool"), "check", "config", str(cfg)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_both_api_processes_stream_the_summary(server: VllmServer) -> None:
    """Streamed responses carry the summary whichever API process serves them (each one wraps
    vLLM's stream generators itself). The process that served a request is the one whose
    ``vllm:request_success_total`` grew; at most 12 requests until both have served one."""
    served: set[str] = set()
    for i in range(12):
        before = _counter_per_process(server, "vllm:request_success_total")
        path, body = (_completion if i % 2 else _chat)(FILLER * 70 + "Stream it.")
        summary = stream_summary(server, path, body)
        assert summary is not None and summary["compressed"], summary
        deadline = time.monotonic() + 10
        while True:  # the serving process counts the request as it finishes it
            after = _counter_per_process(server, "vllm:request_success_total")
            if sum(after.values()) > sum(before.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        served |= {pid for pid, v in after.items() if v > before.get(pid, 0.0)}
        if len(served) == 2:
            break
    assert len(served) == 2, served
