#!/usr/bin/env bash
# Create (idempotently) the separate virtual environment in which NVIDIA kvpress 0.5.5 runs.
#
# Why a separate venv: kvpress 0.5.5 pins transformers<5.3, which the vLLM project venv does not
# satisfy. Our selection module is pure torch, so the cross-check imports it from this repo through
# PYTHONPATH instead of installing the project here.
#
# Usage: benchmarks/kvpress_env.sh [VENV_DIR]    (default: <repo>/.venv-kvpress, gitignored)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${KVPRESS_VENV:-$REPO/.venv-kvpress}}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"            # the CPU wheel the machine provides locally
KVPRESS_VERSION="0.5.5"
TRANSFORMERS_VERSION="5.2.0"      # newest release kvpress 0.5.5 accepts (it requires <5.3)
STAMP="$VENV/.kvpress-env-ok-$TORCH_VERSION-$KVPRESS_VERSION-$TRANSFORMERS_VERSION"

if [[ -f "$STAMP" ]]; then
    echo "kvpress venv ready: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
# (grep drops the machine's noisy "Location ... is ignored" index warnings, nothing else)
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" "kvpress==$KVPRESS_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" 2> >(grep -v "^WARNING: Location" >&2)
# kvpress's dependency tree may pull CUDA builds of torchvision/torchaudio/torchcodec; they do not
# match the CPU torch and break `import transformers` (libc10_cuda.so missing). They are optional.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show --quiet "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall --quiet --yes "$pkg"
    fi
done
"$VENV/bin/python" - <<'PYEOF'
import kvpress, torch, transformers
from importlib.metadata import version
print("torch", torch.__version__, "transformers", transformers.__version__, "kvpress", version("kvpress"))
assert version("kvpress") == "0.5.5", version("kvpress")
PYEOF
touch "$STAMP"
echo "kvpress venv ready: $VENV"
