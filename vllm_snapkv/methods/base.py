"""What a KV-compression method is: a way to rank cached positions, with its own parameters.

Modelled on NVIDIA kvpress' ``presses/``: a method is one small frozen dataclass whose fields are
its parameters (validated in ``__post_init__``) and which overrides :meth:`Method.score`.
Everything the methods share — the budget, the always-kept sinks and observation window, the
top-k, the tie rule, the placement in the paged cache, when a request compacts — lives once,
elsewhere (:mod:`vllm_snapkv.selection`, :mod:`vllm_snapkv.schedule`).

A method is registered under the name users type (``vllm serve --kv-compression NAME``,
``vllm_xargs: {"kv_compression": NAME}``) with :func:`register_method`. Its parameters become
settings under their field names: flags ``--snapkv-<field>``, ``--config`` YAML keys of the same
name, keys of ``additional_config["snapkv"]`` (SnapKV's ``kernel`` is ``--snapkv-kernel``). The
CLI choices and help, per-request validation and the metrics' ``method`` label all come from the
registry. Methods are found in ``vllm_snapkv/methods/`` and in other installed packages through
the entry-point group :data:`ENTRY_POINT_GROUP` (``examples/value_norm`` is a complete one).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm_snapkv.errors import SettingsError

__all__ = ["ENTRY_POINT_GROUP", "Method", "check_choice", "check_int", "get_method",
           "method_names", "method_parameters", "register_method", "registered_methods"]

#: Entry-point group through which other packages add methods: ``name = "module"`` or
#: ``name = "module:Class"``; loading the module registers its classes.
ENTRY_POINT_GROUP = "vllm_snapkv.methods"


@dataclass(frozen=True)
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

    Dataclass fields are the method's parameters: each has a default, a ``metadata["help"]``
    line (the flag's help) and, where it is one of a few strings, ``metadata["choices"]``. The
    subclass's ``__post_init__`` validates them and raises :class:`SettingsError` naming the
    field (use :func:`check_int` / :func:`check_choice`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_queries: ClassVar[bool] = True
    default_sink: ClassVar[int] = 0

    def score(self, keys: torch.Tensor, values: torch.Tensor | None,
              queries: torch.Tensor | None, *, window: int, tile_size: int | None = None,
              score_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Importance of every position before the observation window, per KV head.

        Args:
            keys: ``[Hkv, L, D]`` post-RoPE keys of the positions being compacted, in cache order
                (a prompt, or a request's attended cache).
            values: ``[Hkv, L, D]`` their values (``None`` where the caller has none, e.g.
                :func:`vllm_snapkv.select_tokens` without ``values=``; the engine always passes
                them).
            queries: ``[Hq, window, D]`` post-RoPE queries of the last ``window`` positions, or
                ``None`` when the method does not use queries.
            window: the observation window: the last ``window`` positions are always kept and
                are not scored.
            tile_size, score_dtype: memory bound and precision hints (used by SnapKV).

        Returns:
            ``[Hkv, L - window]`` scores; higher means keep. Ties go to the lower position.
        """
        raise NotImplementedError

    @classmethod
    def parameters(cls) -> tuple[dataclasses.Field, ...]:
        """The method's parameters (its dataclass fields)."""
        return dataclasses.fields(cls)


def check_int(name: str, value: Any, *, minimum: int = 0, odd: bool = False) -> None:
    """Refuse (:class:`SettingsError` naming ``name``) a non-integer below ``minimum`` (or even,
    with ``odd``). ``bool`` is refused: ``kernel=True`` is a bug."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if ok and (not odd or value % 2 == 1):
        return
    kind = "an odd integer" if odd else "an integer"
    raise SettingsError(name, value, f"must be {kind} >= {minimum}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Refuse (:class:`SettingsError` naming ``name``) a value outside ``choices`` (compared with
    its type: ``2.0`` or ``True`` is not the choice ``2`` or ``1``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise SettingsError(name, value, "must be one of " + ", ".join(map(repr, choices)))


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``--kv-compression cls.name``.

    Refuses a bad name, a missing summary, a parameter without
    a default, and a parameter name another method already uses with another default (two
    methods may share a parameter, e.g. ``gqa_aggregation``, only when they mean the same
    setting). A class not decorated with ``@dataclass(frozen=True)`` is made one."""
    name = cls.name
    if not name or name != name.lower() or name == "none" or not name.replace("_", "").isalnum():
        raise ValueError(f"invalid method name {name!r}: lower-case letters, digits, '_'; "
                         "not 'none'")
    if not cls.summary:
        raise ValueError(f"method {name!r} needs a one-line summary")
    if "__dataclass_fields__" not in vars(cls):  # a method without parameters may skip it
        cls = dataclass(frozen=True)(cls)
    registered = _REGISTRY.get(name)
    if registered is not None and registered is not cls:
        raise ValueError(f"method {name!r} is already registered by {registered.__module__}")
    for f in cls.parameters():
        if f.default is dataclasses.MISSING:
            raise ValueError(f"method {name!r}: parameter {f.name!r} needs a default")
        for other in _REGISTRY.values():
            theirs = {g.name: g for g in other.parameters()}.get(f.name)
            if other is not cls and theirs is not None and theirs.default != f.default:
                raise ValueError(f"method {name!r}: parameter {f.name!r} is method "
                                 f"{other.name!r}'s, with default {theirs.default!r}")
    _REGISTRY[name] = cls
    _method.cache_clear()
    return cls


@functools.cache
def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # importing the module registers its classes
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register_method(obj)


def _ensure_loaded() -> None:
    # Importing the package imports every method module in it (pkgutil discovery); entry points
    # bring other packages' methods.
    import vllm_snapkv.methods  # noqa: F401

    _load_entry_points()


def registered_methods() -> dict[str, type[Method]]:
    """Name -> class of every registered method, in name order."""
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def method_names() -> tuple[str, ...]:
    """The names ``--kv-compression`` accepts besides ``none``."""
    return tuple(registered_methods())


def method_parameters() -> dict[str, dataclasses.Field]:
    """Parameter name -> its field, over every registered method (a shared name once)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in registered_methods().values():
        for f in cls.parameters():
            out.setdefault(f.name, f)
    return out


@functools.lru_cache(maxsize=256)
def _method(cls: type[Method], params: tuple[tuple[str, type, Any], ...]) -> Method:
    # The value's type is part of the key: 5.0 == 5 and True == 1, but neither is a kernel.
    return cls(**{name: value for name, _, value in params})


def get_method(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """The instance of method ``name`` with ``params`` (its own parameters; others ignored), shared
    and immutable; ``KeyError`` if unknown, :class:`SettingsError` for a bad parameter."""
    _ensure_loaded()
    cls = _REGISTRY[name]
    own = {f.name for f in cls.parameters()}
    mine = tuple(sorted(((k, type(v), v) for k, v in (params or {}).items() if k in own),
                        key=lambda item: item[0]))
    return _method(cls, mine)
