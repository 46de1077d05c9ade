"""The compression methods, one module each, found automatically.

Every module in this package is imported when the package is, so a module that defines a
:class:`~vllm_snapkv.methods.base.Method` dataclass decorated with
:func:`~vllm_snapkv.methods.base.register_method` is all a new method needs (another package
declares its module in the entry-point group ``vllm_snapkv.methods`` instead):

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
    ENTRY_POINT_GROUP,
    Method,
    check_choice,
    check_int,
    get_method,
    method_names,
    method_parameters,
    register_method,
    registered_methods,
)

__all__ = ["ENTRY_POINT_GROUP", "Method", "check_choice", "check_int", "get_method",
           "method_names", "method_parameters", "register_method", "registered_methods"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
