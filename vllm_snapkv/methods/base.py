"""What a KV-compression method is: a way to rank cached positions, and nothing else.

Modelled on NVIDIA kvpress' ``presses/``: a method is one small class that overrides
:meth:`Method.score`. Everything the methods share — the budget, the always-kept sinks and
observation window, the top-k, the tie rule, the placement in the paged cache, when a request
compacts — lives once, elsewhere (:mod:`vllm_snapkv.selection`, :mod:`vllm_snapkv.schedule`).

A method is registered under the name users type (``vllm serve --kv-compression NAME``,
``vllm_xargs: {"kv_compression": NAME}``) with :func:`register_method`; the CLI choices and help,
per-request validation and the metrics' ``method`` label all come from the registry
(:mod:`vllm_snapkv.methods`). Adding a method is one new module in ``vllm_snapkv/methods/``
(discovered automatically) plus its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vllm_snapkv.settings import SnapKVSettings

__all__ = ["Method", "get_method", "method_names", "register_method", "registered_methods"]


class Method:
    """Base class of a compression method.

    Class attributes a method sets:

    * ``name`` — what users type (``--kv-compression NAME``); lower case.
    * ``summary`` — one line for ``vllm serve --help=snapkv``.
    * ``paper`` — where the idea comes from (arXiv id or URL).
    * ``uses_queries`` — whether :meth:`score` reads the observation window's queries. The
      engine stashes the last ``window`` post-RoPE queries of a request only for methods that
      do; query-agnostic methods can compact at any moment, e.g. while a prompt is still being
      read, before the question at its end has been seen.
    * ``default_sink`` — how many first positions are always kept when the user does not say
      (``--snapkv-sink``); an explicit value, 0 included, always wins.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_queries: ClassVar[bool] = True
    default_sink: ClassVar[int] = 0

    def score(self, keys: torch.Tensor, queries: torch.Tensor | None,
              settings: SnapKVSettings, *, tile_size: int | None = None,
              score_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Importance of every position before the observation window, per KV head.

        Args:
            keys: ``[Hkv, L, D]`` post-RoPE keys of the positions being compacted, in cache order
                (a prompt, or a request's attended cache).
            queries: ``[Hq, w, D]`` post-RoPE queries of the last ``w = settings.window``
                positions, or ``None`` when the method does not use queries.
            settings: the request's selection settings (window, kernel, ... as the method
                needs).
            tile_size, score_dtype: memory bound and precision hints (used by SnapKV).

        Returns:
            ``[Hkv, L - w]`` scores; higher means keep. Ties go to the lower position.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Method]] = {}
_INSTANCES: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``--kv-compression cls.name``."""
    name = cls.name
    if not name or name != name.lower() or name == "none" or not name.replace("_", "").isalnum():
        raise ValueError(f"invalid method name {name!r}: lower-case letters, digits, '_'; "
                         "not 'none'")
    if not cls.summary:
        raise ValueError(f"method {name!r} needs a one-line summary")
    registered = _REGISTRY.get(name)
    if registered is not None and registered is not cls:
        raise ValueError(f"method {name!r} is already registered by {registered.__module__}")
    _REGISTRY[name] = cls
    return cls


def _ensure_loaded() -> None:
    # Importing the package imports every method module in it (pkgutil discovery).
    import vllm_snapkv.methods  # noqa: F401


def registered_methods() -> dict[str, type[Method]]:
    """Name -> class of every registered method, in name order."""
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def method_names() -> tuple[str, ...]:
    """The names ``--kv-compression`` accepts besides ``none``."""
    return tuple(registered_methods())


def get_method(name: str) -> Method:
    """The (stateless, shared) instance of method ``name``; ``KeyError`` if unknown."""
    _ensure_loaded()
    inst = _INSTANCES.get(name)
    if inst is None:
        inst = _INSTANCES[name] = _REGISTRY[name]()
    return inst
