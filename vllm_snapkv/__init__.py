"""vllm-snapkv: SnapKV KV-cache eviction inside vLLM's paged KV cache.

Public API:

* :func:`select_tokens` — the SnapKV selection core (pure torch, no vLLM needed).
* :class:`CompressionSettings` (also `SnapKVSettings`) — validated settings; CLI flags, config files and per-request
  overrides all go through it.

The vLLM plugin itself is registered through the ``vllm.general_plugins`` entry point
(:func:`vllm_snapkv.integration.plugin.register`); importing this package does not import vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "KVPRESS_PRESET",
    "SettingsError",
    "CompressionSettings",
    "SnapKVSettings",
    "__version__",
    "select_tokens",
]

_LAZY = {
    "select_tokens": "vllm_snapkv.selection",
    "KVPRESS_PRESET": "vllm_snapkv.settings",
    "SettingsError": "vllm_snapkv.settings",
    "CompressionSettings": "vllm_snapkv.settings",
    "SnapKVSettings": "vllm_snapkv.settings",
}


def __getattr__(name: str) -> Any:
    # Lazy so that vLLM's plugin loader, which imports this package in every engine process,
    # pays only for what it uses.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm_snapkv' has no attribute {name!r}")
