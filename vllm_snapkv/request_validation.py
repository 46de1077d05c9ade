"""Per-request SnapKV settings are checked in the API server, so bad ones become HTTP 400s.

vLLM validates each request's ``SamplingParams`` before it reaches the engine, and part of that is
calling ``validate_params`` on every custom logits processor named in ``--logits-processors``
(``v1/sample/logits_processor/__init__.py``: ``validate_logits_processors_parameters``); a
``VLLMValidationError`` raised there is answered with HTTP 400 naming the parameter. The plugin
registers :class:`SnapKVRequestValidator` as such a processor: it never changes logits, it only
validates ``vllm_xargs`` (``SamplingParams.extra_args``) against the engine's
:class:`~vllm_snapkv.config.CompressionConfig`. A bad request is refused before it is scheduled,
so it can neither crash the engine nor touch another request's KV.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_snapkv import vllm_seam as seam
from vllm_snapkv.config import CompressionConfig
from vllm_snapkv.settings import SettingsError

VLLMValidationError = seam.get("VLLMValidationError")
BatchUpdate = seam.get("BatchUpdate")
LogitsProcessor = seam.get("LogitsProcessor")


#: Qualified name to put in ``--logits-processors``.
QUALNAME = "vllm_snapkv.request_validation:SnapKVRequestValidator"

_engine_config: CompressionConfig | None = None


def set_engine_config(config: CompressionConfig) -> None:
    """Record this process's engine config (called where the engine config is created)."""
    global _engine_config
    _engine_config = config


def engine_config() -> CompressionConfig:
    """The engine config recorded in this process, else the one of the current VllmConfig."""
    if _engine_config is not None:
        return _engine_config
    current = seam.get("get_current_vllm_config_or_none")()
    return CompressionConfig.from_vllm_config(current) if current is not None \
        else CompressionConfig.from_additional_config({"kv_compression": "snapkv"})


def validate_extra_args(config: CompressionConfig, extra_args: dict[str, Any] | None) -> None:
    """Raise ``VLLMValidationError`` (HTTP 400) naming ``vllm_xargs.<key>`` for bad settings."""
    try:
        config.request_settings(extra_args)
    except SettingsError as err:
        raise VLLMValidationError(
            f"vllm_xargs.{err.setting}={err.value!r} is invalid: {err.allowed}",
            parameter=f"vllm_xargs.{err.setting}",
            value=err.value,
        ) from None


class SnapKVRequestValidator(LogitsProcessor):
    """A logits processor that changes nothing; it exists for :meth:`validate_params`."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_extra_args(engine_config(), sampling_params.extra_args)

    def __init__(self, vllm_config: Any, device: torch.device,
                 is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None
