#!/usr/bin/env bash
# Serve the bundled SmolLM2-135M-Instruct with SnapKV compression on, on 127.0.0.1:8000.
# Extra arguments go to `vllm serve` (e.g. `scripts/serve.sh --port 8080`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
MODEL="$("$ROOT/.venv/bin/python" -m vllm_snapkv.models path smollm2)"
exec "$ROOT/.venv/bin/vllm" serve "$MODEL" --config "$ROOT/configs/smollm2-cpu-snapkv.yaml" "$@"
