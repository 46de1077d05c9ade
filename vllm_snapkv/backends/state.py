"""What one SnapKV model runner remembers between steps, and how its backends find it.

The model runner owns one :class:`RunnerState`: this step's rows (published before the metadata
builders run), the query stash, the compaction records its RPCs report, and the debug oracle.
The attention metadata builders reach it through the ``vllm_config`` they are built with
(:func:`state_for`), and hand it to the attention impls inside the metadata they build. The one
module-level piece is that lookup: a per-process registry from a ``vllm_config`` object to the
state of the runner built with it, holding the config weakly (an entry dies with its config, and
an id reused by a later object never finds a stale state).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

from vllm_snapkv.backends.debug import DebugRecorder
from vllm_snapkv.backends.stash import QueryStash

if TYPE_CHECKING:
    from vllm_snapkv.backends.plan import RowState
    from vllm_snapkv.schedule import Compaction

__all__ = ["DEBUG_ENV", "RunnerState", "state_for"]

DEBUG_ENV = "VLLM_SNAPKV_DEBUG"
#: Compaction reports kept for this many most recent requests.
MAX_REPORTED_REQUESTS = 4096

#: id(vllm_config) -> (a weak reference to that config, the state of the runner built with it).
#: ``VllmConfig`` is unhashable, hence the id; the weak reference confirms the identity.
_BY_CONFIG: dict[int, tuple[weakref.ref, RunnerState]] = {}


def state_for(vllm_config: Any) -> RunnerState | None:
    """The state of the SnapKV model runner built with ``vllm_config`` (``None``: none)."""
    entry = _BY_CONFIG.get(id(vllm_config))
    return entry[1] if entry is not None and entry[0]() is vllm_config else None


def _register(vllm_config: Any, state: RunnerState) -> None:
    key = id(vllm_config)
    try:
        ref = weakref.ref(vllm_config, lambda _: _BY_CONFIG.pop(key, None))
    except TypeError:  # not weak-referenceable (a test's plain object): keep it alive
        ref = (lambda obj: (lambda: obj))(vllm_config)
    _BY_CONFIG[key] = (ref, state)


class RunnerState:
    """Per model runner: see the module docstring."""

    def __init__(self, vllm_config: Any) -> None:
        self.current_rows: tuple[RowState, ...] | None = None
        self.stash = QueryStash()
        self.debug: DebugRecorder | None = (
            DebugRecorder() if os.environ.get(DEBUG_ENV, "0") not in ("", "0") else None)
        # req_id -> {"compactions", "layers", "moved", "times", "window_from_stash", ...}
        self.compactions: dict[str, dict] = {}
        self.num_compactions = 0  # (request, layer, compaction) triples since start
        self.fallbacks = 0  # compactions ranked without their window's queries (see compaction)
        # layer -> the cache layout the accessor uses (ISA, dtype, K/V packing), once known
        self.layouts: dict[str, str] = {}
        _register(vllm_config, self)

    # -------------------------------------------------------------------------- lifecycle

    def forget(self, req_ids) -> None:
        """Drop what is stashed for finished / preempted requests."""
        for rid in req_ids:
            self.stash.drop(rid)
            if self.debug is not None:
                self.debug.drop(rid)

    def set_debug(self, enabled: bool) -> None:
        """Turn the oracle on (fresh recorder) or off."""
        self.debug = DebugRecorder() if enabled else None

    # -------------------------------------------------------------------------- records

    def record(self, req_id: str, layer: str, c: Compaction, moved: int,
               window_from_stash: int) -> None:
        """Count one layer's compaction of a request (for the ``snapkv_report`` RPC)."""
        rec = self.compactions.get(req_id)
        key = (c.at, layer)
        if rec is None or key in rec["_seen"]:
            # First compaction of this request, or a recompute (after preemption) starting over.
            times = 1 if rec is None else rec["times"] + 1
            rec = self.compactions[req_id] = {
                "prompt_len": 0, "evicted": 0, "kept": 0, "compactions": 0, "layers": 0,
                "moved": 0, "window_from_stash": 0, "times": times, "phases": [],
                "_seen": set(), "_layers": set()}
        if not any(at == c.at for at, _ in rec["_seen"]):
            rec["compactions"] += 1
            rec["phases"].append(c.phase)
        rec["_seen"].add(key)
        rec["_layers"].add(layer)
        rec["layers"] = len(rec["_layers"])
        if c.phase == "prompt":
            rec["prompt_len"] = c.at
        rec["evicted"], rec["kept"] = c.evicted, c.kept
        rec["moved"] += moved
        rec["window_from_stash"] = max(rec["window_from_stash"], window_from_stash)
        self.num_compactions += 1
        while len(self.compactions) > MAX_REPORTED_REQUESTS:
            self.compactions.pop(next(iter(self.compactions)))

    def report(self) -> dict:
        return {
            "compactions": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                            for k, v in self.compactions.items()},
            "num_compactions": self.num_compactions,
            "fallbacks": self.fallbacks,
            "stash_entries": len(self.stash),
            "layouts": dict(self.layouts),
            "debug": self.debug.summary() if self.debug is not None else None,
        }
