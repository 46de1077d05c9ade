"""The compression methods, one module each, found automatically.

Every module in this package is imported when the package is, so a module that defines a
:class:`~vllm_snapkv.methods.base.Method` subclass decorated with
:func:`~vllm_snapkv.methods.base.register_method` is all a new method needs:

* :mod:`~vllm_snapkv.methods.snapkv` — SnapKV: the observation window's pooled attention.
* :mod:`~vllm_snapkv.methods.recency` — StreamingLLM's sinks + most recent tokens (baseline).
* :mod:`~vllm_snapkv.methods.keydiff` — KeyDiff: keys least similar to the mean key
  (query-agnostic).
* :mod:`~vllm_snapkv.methods.knorm` — keys with the smallest L2 norm (query-agnostic).
"""

from __future__ import annotations

import importlib
import pkgutil

from vllm_snapkv.methods.base import (
    Method,
    get_method,
    method_names,
    register_method,
    registered_methods,
)

__all__ = ["Method", "get_method", "method_names", "register_method", "registered_methods"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
