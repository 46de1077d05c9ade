"""``SnapKVConnector``: a vLLM KV connector that transfers nothing and carries SnapKV's stats.

vLLM builds it from ``--kv-transfer-config`` (the plugin sets that, see
:func:`vllm_snapkv.integration.kv_transfer.wire`) in every process that needs it:

* engine core (role SCHEDULER): :meth:`get_kv_connector_stats` returns what the SnapKV scheduler
  recorded since the last step (the scheduler attaches its :class:`~vllm_snapkv.metrics.
  StatsRecorder` to this object at start-up);
* workers (role WORKER): installs :class:`~vllm_snapkv.metrics.SelectionTimer` and returns the
  step's per-request selection times;
* API servers: :meth:`build_prom_metrics` creates the ``vllm:snapkv_*`` series and
  :meth:`build_kv_connector_stats` rebuilds payloads for vLLM's periodic log line.

It never reports external tokens, never loads or saves KV, never delays a free and returns no
``kv_transfer_params`` (the scheduler adds the per-request summary itself), so it composes with a
real connector inside ``MultiConnector`` without changing what that connector does.
"""

from __future__ import annotations

from typing import Any

from vllm_snapkv import metrics
from vllm_snapkv.integration import seam
from vllm_snapkv.integration.prometheus import SnapKVPromMetrics, SnapKVStats, stats

#: Connector class name (MultiConnector keys stats and metrics by it) and module.
CONNECTOR_NAME = "SnapKVConnector"
CONNECTOR_MODULE = __name__

KVConnectorFactory = seam.get("KVConnectorFactory")
KVConnectorBase_V1 = seam.get("KVConnectorBase_V1")
KVConnectorMetadata = seam.get("KVConnectorMetadata")
KVConnectorRole = seam.get("KVConnectorRole")
SupportsHMA = seam.get("SupportsHMA")


class SnapKVConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers each step: under ``--snapkv-trigger pressure``, the
    compaction points it ordered for each request scheduled in the step (all of them, so a
    worker needs no memory of earlier steps, and a recomputed request replays them). Empty
    otherwise: the workers evaluate every scheduled compaction themselves."""

    def __init__(self, orders: dict[str, tuple[int, ...]] | None = None) -> None:
        self.orders: dict[str, tuple[int, ...]] = orders or {}


@seam.uses("MultiKVConnectorMetadata.metadata")
def find_metadata(meta: Any) -> SnapKVConnectorMetadata | None:
    """The SnapKV part of a step's connector metadata (alone, or inside ``MultiConnector``'s)."""
    if isinstance(meta, SnapKVConnectorMetadata):
        return meta
    for child in getattr(meta, "metadata", None) or ():
        if isinstance(child, SnapKVConnectorMetadata):
            return child
    return None


class NoTransferConnector(KVConnectorBase_V1):
    """A KV connector that moves no KV: every transfer hook is a no-op, no external tokens, no
    delayed frees. The base of SnapKV's stats carrier, and of connectors that only observe
    requests (the kind SnapKV composes with, e.g. the tests' probe)."""

    # -- worker side: no transfers ------------------------------------------------------------

    @seam.overrides("KVConnectorBase_V1.start_load_kv")
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return

    @seam.overrides("KVConnectorBase_V1.wait_for_layer_load")
    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    @seam.overrides("KVConnectorBase_V1.save_kv_layer")
    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    @seam.overrides("KVConnectorBase_V1.wait_for_save")
    def wait_for_save(self) -> None:
        return

    # -- scheduler side: no external tokens ---------------------------------------------------

    @seam.overrides("KVConnectorBase_V1.get_num_new_matched_tokens")
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        return 0, False

    @seam.overrides("KVConnectorBase_V1.update_state_after_alloc")
    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        return

    @seam.overrides("KVConnectorBase_V1.build_connector_meta")
    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return SnapKVConnectorMetadata()

    @seam.overrides("KVConnectorBase_V1.request_finished")
    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return False, None


class SnapKVConnector(NoTransferConnector, SupportsHMA):
    """See the module docstring. ``SupportsHMA`` so that configuring it does not make vLLM turn
    off the hybrid KV-cache manager."""

    @seam.uses("GroupCoordinator.rank_in_group")
    @seam.overrides("KVConnectorBase_V1.__init__")
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None
                 ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        #: set by the SnapKV scheduler (scheduler role only)
        self.recorder: metrics.StatsRecorder | None = None
        #: the scheduler's request schedules (scheduler role only), whose orders the metadata
        #: carries
        self.schedules: dict[str, Any] | None = None
        self._timer = metrics.SelectionTimer.install() if role == KVConnectorRole.WORKER \
            else None
        # A worker's pipeline stage: vLLM aggregates every worker's stats of a step, and the
        # stages of a pipeline select one after another (their times add up) while the
        # tensor-parallel workers of a stage select at the same time (the slowest counts).
        self._stage = (int(seam.get("get_pp_group")().rank_in_group)
                       if self._timer is not None else 0)

    @seam.uses("SchedulerOutput.num_scheduled_tokens")
    @seam.overrides("KVConnectorBase_V1.build_connector_meta")
    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if not self.schedules:
            return SnapKVConnectorMetadata()
        orders = {}
        for rid in scheduler_output.num_scheduled_tokens:
            schedule = self.schedules.get(rid)
            if schedule is not None and schedule.orders:
                orders[rid] = schedule.orders
        return SnapKVConnectorMetadata(orders)

    @seam.overrides("SupportsHMA.request_finished_all_groups")
    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    # -- stats --------------------------------------------------------------------------------

    @seam.overrides("KVConnectorBase_V1.get_kv_connector_stats")
    def get_kv_connector_stats(self) -> SnapKVStats | None:
        if self._timer is not None:
            return stats(self._timer.take(self._stage))
        if self.recorder is not None:
            return stats(self.recorder.take())
        return None

    @seam.overrides("KVConnectorBase_V1.build_kv_connector_stats")
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> SnapKVStats | None:
        if data is None:
            return SnapKVStats()
        return SnapKVStats(data=metrics.aggregate_data(metrics.empty_data(), data))

    @seam.overrides("KVConnectorBase_V1.build_prom_metrics")
    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> SnapKVPromMetrics:
        return SnapKVPromMetrics(vllm_config, metric_types, labelnames,
                                         per_engine_labelvalues)


# MultiConnector rebuilds children's stats by class name in the API server; the module is
# imported there (through kv_connector_module_path) before any stats arrive.
try:
    KVConnectorFactory.get_connector_class_by_name(CONNECTOR_NAME)
except ValueError:  # not registered yet in this process
    seam.get("KVConnectorFactory.register_connector")(CONNECTOR_NAME, __name__, CONNECTOR_NAME)
