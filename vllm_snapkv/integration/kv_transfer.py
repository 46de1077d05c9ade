"""The KV-transfer configuration: how the plugin's stats connector joins a user's
``--kv-transfer-config`` (:func:`composed_kv_transfer_config`), which user connectors cannot run
with compression (:func:`check_kv_transfer`), and :func:`wire`, called by the plugin when
compression is on."""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Mapping
from typing import Any

from vllm_snapkv.integration import seam
from vllm_snapkv.integration.connector import CONNECTOR_MODULE, CONNECTOR_NAME, NoTransferConnector


def snapkv_connector_dict() -> dict[str, Any]:
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both"}


def _is_snapkv(entry: Mapping[str, Any]) -> bool:
    return entry.get("kv_connector") == CONNECTOR_NAME


def _ktc_to_dict(ktc: Any) -> dict[str, Any]:
    """A user's ``KVTransferConfig`` as the dict ``MultiConnector`` rebuilds children from."""
    if isinstance(ktc, Mapping):
        return {k: copy.deepcopy(v) for k, v in ktc.items() if v is not None}
    out: dict[str, Any] = {}
    for name in ("kv_connector", "kv_role", "kv_connector_extra_config",
                 "kv_connector_module_path", "kv_buffer_device", "kv_port", "engine_id",
                 "enable_permute_local_kv", "kv_load_failure_policy"):
        if hasattr(ktc, name):
            value = getattr(ktc, name)
            if value is not None:
                out[name] = copy.deepcopy(value)
    return out


def composed_kv_transfer_config(user: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` dict that runs the SnapKV connector next to ``user``'s.

    * none -> the SnapKV connector alone;
    * ``MultiConnector`` -> SnapKV appended to its ``connectors`` (once);
    * any other connector -> a ``MultiConnector`` of [user's, SnapKV]. The user's comes first,
      so it keeps deciding loads; SnapKV never loads, saves or returns ``kv_transfer_params``.

    Which user connectors may run with compression at all is :func:`check_kv_transfer`'s call.
    """
    if user is None:
        return snapkv_connector_dict()
    cfg = _ktc_to_dict(user)
    if not cfg.get("kv_connector"):
        raise ValueError(
            "--kv-compression snapkv: --kv-transfer-config has no kv_connector; give one or "
            "leave --kv-transfer-config out")
    if cfg["kv_connector"] == CONNECTOR_NAME:
        return cfg
    if cfg["kv_connector"] == "MultiConnector":
        extra = dict(cfg.get("kv_connector_extra_config") or {})
        children = [dict(c) for c in extra.get("connectors") or []]
        if not any(_is_snapkv(c) for c in children):
            children.append(snapkv_connector_dict())
        extra["connectors"] = children
        cfg["kv_connector_extra_config"] = extra
        cfg.setdefault("kv_role", "kv_both")
        return cfg
    # The MultiConnector carries the ids and role; children inherit engine_id from it.
    top = {k: cfg[k] for k in ("kv_role", "engine_id", "kv_buffer_device") if k in cfg}
    top.setdefault("kv_role", "kv_both")
    child = {k: v for k, v in cfg.items() if k != "engine_id"}
    return {**top, "kv_connector": "MultiConnector",
            "kv_connector_extra_config": {"connectors": [child, snapkv_connector_dict()]}}


#: The connector hooks that move KV: loading external KV into a request, saving a layer's KV.
TRANSFER_HOOKS = ("get_num_new_matched_tokens", "start_load_kv", "save_kv_layer")


def _connector_entries(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The connectors a ``--kv-transfer-config`` dict configures (MultiConnector children
    included), as connector dicts."""
    if cfg.get("kv_connector") == "MultiConnector":
        extra = cfg.get("kv_connector_extra_config") or {}
        return [e for child in extra.get("connectors") or [] for e in _connector_entries(child)]
    return [dict(cfg)]


def moves_kv(entry: Mapping[str, Any]) -> str | None:
    """Why the connector ``entry`` (a connector dict) may move KV, or ``None`` when it cannot.

    Judged by what its class does, not by its name: a connector that inherits every KV-moving
    hook (:data:`TRANSFER_HOOKS`) from :class:`~vllm_snapkv.integration.connector.NoTransferConnector`
    moves none; any other implementation of them (vLLM's NIXL, LMCache, offloading, example,
    Mooncake, UMBP connectors, ...) may load prompt KV into a request or save it, which
    compression cannot share. A connector class that cannot be loaded is judged as moving KV.
    """
    name = entry.get("kv_connector")
    if name == CONNECTOR_NAME:
        return None
    try:
        cls = _connector_class(entry)
    except Exception as exc:  # noqa: BLE001 - any failure to load means we cannot vouch for it
        return f"{name} (its class could not be loaded: {exc})"
    overridden = [h for h in TRANSFER_HOOKS
                  if getattr(cls, h, None) is not getattr(NoTransferConnector, h)]
    if overridden:
        return f"{name} (implements {', '.join(overridden)})"
    return None


def _connector_class(entry: Mapping[str, Any]) -> type:
    name = entry["kv_connector"]
    module_path = entry.get("kv_connector_module_path")
    if module_path:
        return getattr(importlib.import_module(module_path), name)
    return seam.get("KVConnectorFactory.get_connector_class_by_name")(name)


@seam.uses("EngineArgs.kv_transfer_config", "EngineArgs.kv_offloading_size")
def check_kv_transfer(engine_args: Any) -> None:
    """Refuse (``ValueError``, one line naming the flag) KV-transfer settings that cannot work
    with compression on: ``--kv-offloading-size`` (vLLM's offloading connector) and any
    connector in ``--kv-transfer-config`` that may move KV (:func:`moves_kv`). Connectors that
    move none (derived from ``NoTransferConnector``) are composed with the SnapKV connector.
    """
    if getattr(engine_args, "kv_offloading_size", None) is not None:
        raise ValueError(
            "--kv-offloading-size cannot be combined with --kv-compression snapkv: vLLM's "
            "offloading connector saves prompt KV after SnapKV compacted it and loads it into "
            "requests whose prefill SnapKV then cannot see; use one or the other")
    user = engine_args.kv_transfer_config
    if user is None:
        return
    movers = [why for e in _connector_entries(_ktc_to_dict(user))
              if e.get("kv_connector") and (why := moves_kv(e)) is not None]
    if movers:
        raise ValueError(
            f"--kv-transfer-config with {'; '.join(movers)} cannot be combined with "
            "--kv-compression: a connector that moves KV would save prompt KV after a "
            "compaction rewrote it (other requests would load corrupted KV) or load prompt KV "
            "into requests whose prefill compression then cannot see; use one or the other (a "
            "connector that moves no KV may derive from "
            "vllm_snapkv.integration.connector.NoTransferConnector)")


def wire(engine_args: Any) -> None:
    """Add the SnapKV metrics connector to ``engine_args`` (compression on), after
    :func:`check_kv_transfer`. ``--disable-log-stats`` is left alone (then nothing is exported,
    as for vLLM's own metrics)."""
    KVTransferConfig = seam.get("KVTransferConfig")
    check_kv_transfer(engine_args)
    if engine_args.kv_transfer_config is None:
        keep_cpu_core_reservation(engine_args)
    engine_args.kv_transfer_config = KVTransferConfig(
        **composed_kv_transfer_config(engine_args.kv_transfer_config))


#: vLLM's CPU worker reserves cores for the engine's other processes from this variable.
CPU_RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


@seam.uses("EngineArgs.tensor_parallel_size", "EngineArgs.pipeline_parallel_size")
def keep_cpu_core_reservation(engine_args: Any) -> None:
    """On CPU, keep the compute cores vanilla vLLM would have, despite our connector.

    vLLM's CPU backend reserves one extra core per rank whenever any KV connector is configured
    ("for nixl_connector under p/d", ``utils/ompmultiprocessing.py``). The SnapKV connector moves
    no KV, so that reservation would only take a compute core away from the worker (and on a
    2-core machine the over-reservation is dropped altogether, giving it one core *more* than
    vanilla). So, unless the user set the variable, pin it to vanilla's reservation: one core per
    local rank on x86/ARM/RISC-V (vLLM's default), else one.
    """
    current_platform = seam.get("current_platform")
    if not current_platform.is_cpu() or CPU_RESERVED_ENV in os.environ:
        return
    CpuArchEnum = seam.get("CpuArchEnum")

    ranks = int(getattr(engine_args, "tensor_parallel_size", 1) or 1) * \
        int(getattr(engine_args, "pipeline_parallel_size", 1) or 1)
    per_rank = current_platform.get_cpu_architecture() in (
        CpuArchEnum.X86, CpuArchEnum.ARM, CpuArchEnum.RISCV)
    os.environ[CPU_RESERVED_ENV] = str(ranks if per_rank else 1)


@seam.uses("MultiConnector.sub_connectors")
def find_connector(connector: Any) -> Any:
    """The SnapKV connector inside the scheduler's connector (itself or a MultiConnector child)."""
    if connector is None:
        return None
    if type(connector).__name__ == CONNECTOR_NAME:
        return connector
    for child in getattr(connector, "sub_connectors", None) or []:
        found = find_connector(child)
        if found is not None:
            return found
    return None
