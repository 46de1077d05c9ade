"""``ProbeConnector``: a user's own KV connector of the kind SnapKV composes with — one that never
loads or saves prompt KV. vLLM loads it from ``kv_connector_module_path`` (this folder must be on
``PYTHONPATH``) beside the SnapKV metrics connector, inside vLLM's ``MultiConnector``.

Its job, visible from outside: for every finished request, the scheduler side writes
``<log_dir>/<request id>.json`` (the prompt length it saw) and returns
``kv_transfer_params={"probe": {"prompt_tokens": N}}``, which must reach the response beside
SnapKV's own ``snapkv`` key. The worker side does nothing (:class:`~vllm_snapkv.integration.connector.NoTransferConnector`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from vllm_snapkv.integration.connector import NoTransferConnector


class ProbeConnector(NoTransferConnector):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None
                 ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.log_dir = self._kv_transfer_config.get_from_extra_config("log_dir", None)
        os.makedirs(self.log_dir, exist_ok=True)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        with open(os.path.join(self.log_dir, f"{request.request_id}.json"), "w") as f:
            json.dump({"prompt_tokens": request.num_prompt_tokens}, f)
        return False, {"probe": {"prompt_tokens": request.num_prompt_tokens}}
