"""What the benchmarks need from a running ``vllm serve``: completions (timed, streamed or not)
and readings of its Prometheus ``/metrics``. Plain HTTP, as any OpenAI client would do it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from vllm_snapkv.testing import VllmServer, sample_values

TIMEOUT_S = 1800


@dataclass
class Completion:
    """One finished request: its text, token count and client-side timings (seconds)."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    start: float
    first_token: float | None
    end: float
    token_times: list[float] = field(default_factory=list)
    snapkv: dict | None = None
    token_ids: list[int] | None = None

    @property
    def ttft(self) -> float:
        return (self.first_token or self.end) - self.start

    @property
    def decode_per_token(self) -> float | None:
        """Seconds per output token after the first (``None`` with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def complete(server: VllmServer, prompt_ids: list[int], max_tokens: int, *,
             xargs: dict | None = None, stream: bool = False,
             ignore_eos: bool = False, token_ids: bool = False) -> Completion:
    """POST /v1/completions (greedy) with token ids as the prompt (``token_ids``: also return
    the output's token ids, non-streaming)."""
    body: dict[str, Any] = {"model": server.name, "prompt": prompt_ids, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": ignore_eos, "stream": stream}
    if token_ids:
        body["return_token_ids"] = True
    if xargs:
        body["vllm_xargs"] = xargs
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    r = requests.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S, stream=stream)
    if r.status_code != 200:
        raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.text[:500]}")
    if not stream:
        out = r.json()
        end = time.perf_counter()
        return Completion(out["choices"][0]["text"], out["usage"]["completion_tokens"],
                          out["usage"]["prompt_tokens"], start, None, end,
                          snapkv=(out.get("kv_transfer_params") or {}).get("snapkv"),
                          token_ids=out["choices"][0].get("token_ids"))
    text, times, usage, snapkv = [], [], {}, None
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        for choice in chunk.get("choices") or []:
            if choice.get("text"):
                text.append(choice["text"])
                times.append(now)
        usage = chunk.get("usage") or usage
        snapkv = (chunk.get("kv_transfer_params") or {}).get("snapkv") or snapkv
    end = time.perf_counter()
    return Completion("".join(text), usage.get("completion_tokens", len(times)),
                      usage.get("prompt_tokens", len(prompt_ids)), start,
                      times[0] if times else None, end, times, snapkv)


def metrics_text(server: VllmServer) -> str:
    """The server's ``/metrics`` exposition (Prometheus text format)."""
    return requests.get(f"{server.url}/metrics", timeout=30).text


def metric_families(server: VllmServer) -> list:
    """The server's ``/metrics``, parsed."""
    return list(text_string_to_metric_families(metrics_text(server)))


def metrics(server: VllmServer) -> dict[str, float]:
    """The server's Prometheus samples, summed over labels: ``{sample name: value}``."""
    return summed(metric_families(server))


def summed(families: list) -> dict[str, float]:
    """Parsed ``families``' samples, summed over labels: ``{sample name: value}``."""
    out: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def num_kv_blocks(server: VllmServer) -> int:
    """Blocks in the server's KV pool (from vLLM's ``cache_config_info`` labels)."""
    for family in metric_families(server):
        if family.name == "vllm:cache_config_info":
            return int(family.samples[0].labels["num_gpu_blocks"])
    raise RuntimeError(f"{server.name}: no vllm:cache_config_info in /metrics")


class Watcher:
    """Polls ``/metrics`` in a thread while a workload runs; keeps each series' peak and every
    sample (``{name: value}`` per scrape, in order)."""

    def __init__(self, server: VllmServer, names: tuple[str, ...], period_s: float = 0.1) -> None:
        self.server, self.names, self.period_s = server, names, period_s
        self.peak = {n: 0.0 for n in names}
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = sample_values(metrics_text(self.server), self.names)
            self.samples.append(m)
            for n in self.names:
                self.peak[n] = max(self.peak[n], m[n])
            self._stop.wait(self.period_s)

    def wait_for_sample(self, timeout_s: float = 60.0) -> None:
        """Block until the first poll has returned, so a workload started next is watched from
        its beginning."""
        deadline = time.perf_counter() + timeout_s
        while not self.samples:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.server.name}: no /metrics answer in {timeout_s:.0f}s")
            time.sleep(0.005)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_all(fn: Callable[..., Completion], jobs: list[tuple], concurrency: int
            ) -> list[Completion]:
    """``fn(*job)`` for every job with ``concurrency`` requests in flight; results in job order."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))
