"""Pure parts of vllm_snapkv.metrics: per-request summary, stats payload aggregation, the
scheduler-side recorder, the --kv-transfer-config composition, the Prometheus series (on a private
registry), the selection timer's hook in backends/compaction.py, and the dashboard/scrape files in
deploy/."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import prometheus_client
import pytest
import torch
from dense_kv import DenseAccessor
from prometheus_client import CollectorRegistry

from vllm_snapkv import metrics
from vllm_snapkv.integration import kv_transfer, prometheus
from vllm_snapkv.schedule import Schedule

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _probe_connector_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe connector the integration tests compose with ours (a connector of "your own").
    monkeypatch.syspath_prepend(str(REPO / "tests" / "integration"))


def _schedule(n=2500, target=1024, bs=128, **kw) -> Schedule:
    return Schedule(prompt_len=n, block_size=bs, method="snapkv", prompt_target=target, **kw)


def test_request_summary_compressed_and_whole() -> None:
    p = _schedule()  # E = 1408, kept 1092, 11 blocks freed
    s = metrics.request_summary(2500, p, progress=2500, processed=2510)
    assert s == {"compressed": True, "method": "snapkv", "prompt_tokens": 2500,
                 "kept_tokens": 1092, "evicted_tokens": 1408, "freed_blocks": 11,
                 "compactions": 1, "final_kept_tokens": 1102, "ratio": 1092 / 2500,
                 "reasons": {"schedule": 1, "pressure": 0}}
    whole = metrics.request_summary(2500, p, progress=0, processed=100)  # aborted in prefill
    assert whole["kept_tokens"] == 2500 and whole["freed_blocks"] == 0 and whole["ratio"] == 1.0
    assert not whole["compressed"] and whole["compactions"] == 0
    assert metrics.request_summary(5, None, 0, 7)["compressed"] is False


def test_request_summary_with_the_compaction_before_the_question() -> None:
    # compact_at 2400 of 2500: E = floor((2400 - 1024) / 128) * 128 = 1280; the question's 100
    # tokens come on top: the prompt keeps 2500 - 1280 = 1220 per KV head.
    p = _schedule(prompt_at=2400)
    s = metrics.request_summary(2500, p, progress=2400, processed=2508)
    assert s["kept_tokens"] == 1220 and s["evicted_tokens"] == 1280 and s["compactions"] == 1
    assert s["final_kept_tokens"] == 2508 - 1280
    # aborted before the compaction point: the prompt was held whole
    assert metrics.request_summary(2500, p, progress=0, processed=2300)["kept_tokens"] == 2500


def test_request_summary_counts_decode_compactions() -> None:
    # prompt compaction at 2500 (E 1408), then decode budget 512 + interval 256.
    p = _schedule(decode_budget=512, decode_interval=256)
    done = list(p.compactions(3400))
    assert [c.phase for c in done] == ["prompt", "decode", "decode", "decode", "decode"]
    s = metrics.request_summary(2500, p, progress=done[-1].at, processed=3400)
    assert s["compactions"] == 5 and s["kept_tokens"] == 1092  # the prompt phase's
    assert s["evicted_tokens"] == done[-1].evicted and s["freed_blocks"] == done[-1].evicted // 128
    assert s["final_kept_tokens"] == 3400 - done[-1].evicted


def test_merge_keeps_a_real_connectors_params() -> None:
    out = metrics.merge_kv_transfer_params({"do_remote_decode": True}, {"ratio": 0.5})
    assert out == {"do_remote_decode": True, "snapkv": {"ratio": 0.5}}
    assert metrics.merge_kv_transfer_params(None, {"ratio": 1.0}) == {"snapkv": {"ratio": 1.0}}


def test_aggregate_sums_counts_concats_and_takes_max_time() -> None:
    a = {"compressed": [[2000, 1000, "snapkv", 1]], "skipped": {"fits_budget": 2},
         "evicted": {"prompt": 1000}, "freed": {"prompt": 7},
         "selection_s": {"r1": {"0": 0.5}}, "blocks_saved": 7}
    b = {"compressed": [[3000, 1100, "snapkv", 3]], "skipped": {"fits_budget": 1, "opted_out": 1},
         "evicted": {"prompt": 1792, "decode": 256}, "freed": {"prompt": 14, "decode": 2},
         "selection_s": {"r1": {"0": 0.7}, "r2": {"0": 0.1}}, "blocks_saved": None}
    out = metrics.aggregate_data(a, b)
    assert out["compressed"] == [[2000, 1000, "snapkv", 1], [3000, 1100, "snapkv", 3]]
    assert out["skipped"] == {"fits_budget": 3, "opted_out": 1}
    assert out["evicted"] == {"prompt": 2792, "decode": 256}
    assert out["freed"] == {"prompt": 21, "decode": 2}
    assert out["selection_s"] == {"r1": {"0": 0.7}, "r2": {"0": 0.1}}
    assert out["blocks_saved"] == 7
    stats = prometheus.SnapKVStats(data=a).aggregate(prometheus.SnapKVStats(data=b))
    red = stats.reduce()
    assert red["SnapKV compressed"] == 2 and red["skipped"] == 4 and red["freed blocks"] == 23
    assert red["kept ratio"] == pytest.approx(2100 / 5000, abs=1e-4)
    assert prometheus.SnapKVStats().is_empty() and not stats.is_empty()


def test_recorder_counts_each_compaction_and_request_once_and_tracks_the_gauge() -> None:
    rec = metrics.StatsRecorder()
    assert rec.take() is not None  # first take publishes the gauge (0)
    assert rec.take() is None  # nothing new
    p = _schedule(decode_budget=512, decode_interval=256)
    first = list(p.compactions(2500))
    rec.compacted("a", first, 128)
    rec.compacted("a", first, 128)  # the same compaction again: not counted twice
    data = rec.take()
    assert data["evicted"] == {"prompt": 1408} and data["freed"] == {"prompt": 11}
    assert data["blocks_saved"] == 11 and data["compressed"] == []
    rec.released("a")  # preempted
    assert rec.take()["blocks_saved"] == 0
    rec.compacted("a", first, 128)  # recomputed: compacted again, counted once
    assert rec.take() == {**metrics.empty_data(), "blocks_saved": 11}
    more = list(p.compactions(3000))[1:]
    rec.compacted("a", more, 128)
    data = rec.take()
    assert data["evicted"] == {"decode": sum(c.evicted - c.prior for c in more)}
    assert rec.progress("a") == more[-1].at
    summary = metrics.request_summary(2500, p, rec.progress("a"), 3000)
    rec.finished("a", summary, None)
    rec.finished("b", metrics.request_summary(10, None, 0, 20), metrics.SKIP_OPTED_OUT)
    data = rec.take()
    assert data["compressed"] == [[2500, 1092, "snapkv", 1 + len(more)]]
    assert data["blocks_saved"] == 0 and data["skipped"] == {"opted_out": 1}
    assert rec.progress("a") == 0


PROBE = {"kv_connector": "ProbeConnector", "kv_connector_module_path": "probe_connector",
         "kv_role": "kv_both"}


def test_composition_of_kv_transfer_config() -> None:
    alone = kv_transfer.composed_kv_transfer_config(None)
    assert alone["kv_connector"] == "SnapKVConnector" and alone["kv_role"] == "kv_both"
    user = {**PROBE, "kv_connector_extra_config": {"log_dir": "/tmp/x"}}
    multi = kv_transfer.composed_kv_transfer_config(user)
    assert multi["kv_connector"] == "MultiConnector"
    children = multi["kv_connector_extra_config"]["connectors"]
    assert children[0] == user and children[1]["kv_connector"] == "SnapKVConnector"
    # Idempotent, and an existing MultiConnector gets SnapKV appended once.
    assert kv_transfer.composed_kv_transfer_config(multi) == multi
    with pytest.raises(ValueError, match="no kv_connector"):
        kv_transfer.composed_kv_transfer_config({"kv_role": "kv_both"})


def test_wire_composes_your_own_connector(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv(kv_transfer.CPU_RESERVED_ENV, "1")
    args = EngineArgs(model="x")
    kv_transfer.wire(args)
    assert isinstance(args.kv_transfer_config, KVTransferConfig)
    assert args.kv_transfer_config.has_connector("SnapKVConnector")
    args = EngineArgs(model="x", kv_transfer_config=KVTransferConfig(**PROBE))
    kv_transfer.wire(args)
    assert args.kv_transfer_config.kv_connector == "MultiConnector"
    assert args.kv_transfer_config.has_connector("ProbeConnector")
    assert args.kv_transfer_config.has_connector("SnapKVConnector")


def test_our_connector_keeps_vanillas_cpu_core_reservation(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """vLLM's CPU backend reserves an extra core whenever a KV connector is configured; ours moves
    no KV, so wiring it pins the reservation to vanilla's (one core per local rank on x86), unless
    the user chose one, or brought a connector of their own."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(kv_transfer.CPU_RESERVED_ENV, raising=False)
    kv_transfer.wire(EngineArgs(model="x", tensor_parallel_size=2))
    assert os.environ[kv_transfer.CPU_RESERVED_ENV] == "2"
    monkeypatch.setenv(kv_transfer.CPU_RESERVED_ENV, "3")
    kv_transfer.wire(EngineArgs(model="x"))
    assert os.environ[kv_transfer.CPU_RESERVED_ENV] == "3"
    monkeypatch.delenv(kv_transfer.CPU_RESERVED_ENV)
    kv_transfer.wire(EngineArgs(model="x", kv_transfer_config=KVTransferConfig(**PROBE)))
    assert kv_transfer.CPU_RESERVED_ENV not in os.environ


@pytest.mark.parametrize("user", [
    {"kv_connector": "ExampleConnector", "kv_role": "kv_both"},
    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"},
    {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"},
    {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
     "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1"},
    {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
        "connectors": [PROBE, {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}]}},
], ids=["example", "offloading", "nixl-consumer", "lmcache-own-module", "multi"])
def test_connectors_that_move_kv_are_refused(user: dict) -> None:
    """Judged by what the connector class does (its KV-moving hooks), not by its name; a class
    that cannot even be loaded (LMCache is not installed here) cannot be vouched for."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model="x", kv_transfer_config=KVTransferConfig(**user))
    with pytest.raises(ValueError, match=r"^--kv-transfer-config with \w+ \((implements|its "
                                         r"class could not be loaded).* cannot be combined "
                                         r"with --kv-compression: "):
        kv_transfer.wire(args)


def test_a_connector_judged_by_its_hooks_not_its_name(tmp_path, monkeypatch) -> None:
    """A connector of your own named like nothing vLLM ships is refused when it implements a
    KV-moving hook, and accepted when it inherits them from NoTransferConnector."""
    (tmp_path / "my_conns.py").write_text(
        "from vllm_snapkv.integration.connector import NoTransferConnector\n"
        "class Saver(NoTransferConnector):\n"
        "    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kw):\n"
        "        pass\n"
        "class Watcher(NoTransferConnector):\n"
        "    def request_finished(self, request, block_ids):\n"
        "        return False, None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saver = {"kv_connector": "Saver", "kv_connector_module_path": "my_conns"}
    watcher = {"kv_connector": "Watcher", "kv_connector_module_path": "my_conns"}
    assert kv_transfer.moves_kv(saver) == "Saver (implements save_kv_layer)"
    assert kv_transfer.moves_kv(watcher) is None
    assert kv_transfer.moves_kv({"kv_connector": "SnapKVConnector"}) is None


def test_kv_offloading_is_refused() -> None:
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="^--kv-offloading-size cannot be combined"):
        kv_transfer.wire(EngineArgs(model="x", kv_offloading_size=4.0))


def test_selection_timer_observes_every_compaction() -> None:
    """The worker-side timer gets one (request, seconds) per layer and compaction."""
    from vllm_snapkv.backends import compaction
    from vllm_snapkv.backends.plan import RowPlan
    from vllm_snapkv.backends.state import RunnerState
    from vllm_snapkv.settings import CompressionSettings

    timer = metrics.SelectionTimer.install()
    assert metrics.SelectionTimer.install() is timer
    timer.take()
    n, hq, hkv, d = 300, 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)

    settings = CompressionSettings(budget=128, window=8)
    schedule = _schedule(n=n, target=128, bs=64)
    (c,) = schedule.compactions(n)
    row = RowPlan(0, "timed", 0, n, 0, settings, schedule, 0, (c,), None)
    state = RunnerState(object())
    for layer in ("layer0", "layer1"):
        compaction.compact(row, c, torch.randn(n, hq, d, generator=gen), torch.empty(0),
                           torch.empty(0), DenseAccessor(keys, values), state, layer)
    times = timer.take(stage=1)["selection_s"]
    assert list(times) == ["timed"] and list(times["timed"]) == ["1"]
    assert 0 < times["timed"]["1"] < 10
    assert timer.take() is None


def test_selection_time_is_max_within_a_stage_and_sum_over_stages() -> None:
    """A step's payloads from a TP=2 x PP=2 engine (four workers, vLLM aggregates them in any
    order): the request's time is max(stage 0's ranks) + max(stage 1's ranks)."""
    import itertools

    workers = [("0", 0.30), ("0", 0.25), ("1", 0.10), ("1", 0.40)]
    want = max(0.30, 0.25) + max(0.10, 0.40)
    for order in itertools.permutations(workers):
        acc = metrics.empty_data()
        for stage, t in order:
            acc = metrics.aggregate_data(acc, {"selection_s": {"r": {stage: t}}})
        assert metrics.selection_seconds(acc) == {"r": pytest.approx(want)}
        red = prometheus.SnapKVStats(data=acc).reduce()
        assert red["avg selection ms"] == pytest.approx(1000 * want, abs=0.01)


def test_prom_metrics_observe() -> None:
    reg = CollectorRegistry()
    kinds = {cls: functools.partial(cls, registry=reg) for cls in
             (prometheus_client.Gauge, prometheus_client.Counter, prometheus_client.Histogram)}
    prom = prometheus.SnapKVPromMetrics(_Cfg(), kinds, ["model_name", "engine"],
                                     {0: ["m", "0"]})
    prom.observe({"compressed": [[2000, 1000, "snapkv", 1], [4000, 1000, "keydiff", 4]],
                  "evicted": {"prompt": 4000, "decode": 512}, "freed": {"prompt": 30,
                                                                        "decode": 4},
                  "skipped": {"fits_budget": 3}, "selection_s": {"r": {"0": 0.02,
                                                                            "1": 0.03}},
                  "blocks_saved": 30})
    lbl = {"model_name": "m", "engine": "0"}
    snap, kd = {**lbl, "method": "snapkv"}, {**lbl, "method": "keydiff"}
    v = reg.get_sample_value
    assert v("vllm:snapkv_compression_ratio_count", snap) == 1
    assert v("vllm:snapkv_compression_ratio_sum", kd) == pytest.approx(0.25)
    assert v("vllm:snapkv_compression_factor_sum", snap) == pytest.approx(2.0)
    assert v("vllm:snapkv_compressed_requests_total", kd) == 1
    assert v("vllm:snapkv_compactions_sum", kd) == 4
    assert v("vllm:snapkv_evicted_tokens_total", {**lbl, "phase": "prompt"}) == 4000
    assert v("vllm:snapkv_evicted_tokens_total", {**lbl, "phase": "decode"}) == 512
    assert v("vllm:snapkv_freed_blocks_total", {**lbl, "phase": "decode"}) == 4
    assert v("vllm:snapkv_skipped_requests_total", {**lbl, "reason": "fits_budget"}) == 3
    assert v("vllm:snapkv_selection_seconds_count", lbl) == 1
    assert v("vllm:snapkv_selection_seconds_sum", lbl) == pytest.approx(0.05)
    assert v("vllm:snapkv_blocks_saved", lbl) == 30


class _Cfg:
    kv_transfer_config = None


def dashboard_exprs() -> list[str]:
    dash = json.loads((REPO / "deploy/grafana/dashboards/vllm-snapkv.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    dash = json.loads((REPO / "deploy/grafana/dashboards/vllm-snapkv.json").read_text())
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    exprs = " ".join(dashboard_exprs())
    for needed in ("vllm:snapkv_compression_ratio_bucket", "vllm:snapkv_blocks_saved",
                   "vllm:kv_cache_usage_perc", "vllm:snapkv_compressed_requests_total",
                   "vllm:snapkv_skipped_requests_total", "vllm:snapkv_selection_seconds_bucket",
                   "vllm:num_preemptions_total", "vllm:generation_tokens_total"):
        assert needed in exprs, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
