#!/usr/bin/env bash
# Build vLLM 0.33.0 for CPU (VLLM_TARGET_DEVICE=cpu) from the PyPI sdist and
# install it into a venv outside the repository ($HOME/.cache/vllm-snapkv; `make vllm-0.33-cpu`,
# used by `make test-vllm-0.33`). About 55 minutes of compiling on 2 cores the first time.  Idempotent: every step is
# skipped when its output already exists; the wheel build is skipped when a
# cached wheel exists in $WHEEL_CACHE.
#
# Offline-ish constraints this script was written for (PyPI + Debian only):
#  * torch: vLLM 0.33.0 pins torch==2.14.0+cpu, which only exists on
#    download.pytorch.org.  PyPI's torch 2.14.0 is the CUDA-13 build (its
#    Caffe2Config.cmake FATAL_ERRORs without a CUDA toolkit, and importing it
#    needs ~GBs of nvidia-* wheels).  We build and run against the local
#    torch 2.13.0+cpu wheel instead ($TORCH_SPEC).
#  * triton-cpu: requirements/cpu.txt names a github.com wheel -> line dropped.
#  * oneDNN v3.13: cmake/cpu_extension.cmake git-clones it from github; we use
#    a local source tree via FETCHCONTENT_SOURCE_DIR_ONEDNN ($ONEDNN_SRC, or the
#    cached tarball $SRC_CACHE/onednn-v3.13.tar.gz, or a git clone if github is
#    reachable).
#  * Rust frontend (vllm/vllm-rs, Binding.Exec; no PyO3 _rust_*.so modules in
#    0.33.0): crates.io is unreachable, so the prebuilt binary is taken from the
#    vllm-0.33.0 manylinux wheel on PyPI and dropped into the source tree
#    (exactly what docker/Dockerfile.cpu does); setup.py then skips cargo.
#
# Env knobs: MAX_JOBS (default 2), NICE (default 19), CMAKE_BUILD_TYPE
# (default Release), WORK, WHEEL_CACHE, VENV, PY, ONEDNN_SRC, TORCH_SPEC.
# VLLM_CPU_ONLY_C=1: on x86_64 build only the vllm._C extension (AVX512 +
# AVX512-BF16/VNNI + AMX code; the one vllm/platforms/cpu.py imports on CPUs
# with avx512_bf16) and skip the _C_AVX512 / _C_AVX2 fallbacks (~35 of the
# ~80 heavy translation units).  The resulting wheel only works on CPUs with
# avx512_bf16; it is cached separately in $WHEEL_CACHE/c-only/.
set -euo pipefail

VLLM_VERSION=0.33.0
SDIST_URL=https://files.pythonhosted.org/packages/f7/25/aa5684e9c59d6fc75f78926b7f15e8d9adc7de2d9e6e7575b80776ad8169/vllm-0.33.0.tar.gz
SDIST_SHA256=f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112
ONEDNN_TAG=v3.13   # pinned in cmake/cpu_extension.cmake (GIT_TAG v3.13)

CACHE_ROOT=${CACHE_ROOT:-$HOME/.cache/vllm-snapkv}
WORK=${WORK:-$CACHE_ROOT/build-$VLLM_VERSION}
WHEEL_CACHE=${WHEEL_CACHE:-$CACHE_ROOT/wheels}
SRC_CACHE=${SRC_CACHE:-$CACHE_ROOT/src}
VENV=${VENV:-$CACHE_ROOT/venv-vllm-0.33}
PY=${PY:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}   # found via pip find-links /opt/wheels
MAX_JOBS=${MAX_JOBS:-2}
NICE=${NICE:-19}
export CMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release}

SRC=$WORK/src/vllm-$VLLM_VERSION
BUILD_VENV=$WORK/build-venv
mkdir -p "$WORK" "$WHEEL_CACHE" "$SRC_CACHE"

log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ "${VLLM_CPU_ONLY_C:-0}" = 1 ]; then WHEEL_CACHE=$WHEEL_CACHE/c-only; mkdir -p "$WHEEL_CACHE"; fi
cached_wheel() { ls "$WHEEL_CACHE"/vllm-$VLLM_VERSION+cpu-*.whl 2>/dev/null | head -1; }

if [ -z "$(cached_wheel)" ]; then
  # ---- system deps -------------------------------------------------------
  if [ ! -e /usr/include/numa.h ]; then
    log "installing libnuma-dev"; apt-get install -y -q libnuma-dev
  fi

  # ---- sdist -------------------------------------------------------------
  SDIST=$WORK/vllm-$VLLM_VERSION.tar.gz
  if [ ! -f "$SDIST" ]; then
    log "downloading sdist"; curl -fsSL -o "$SDIST.part" "$SDIST_URL" && mv "$SDIST.part" "$SDIST"
  fi
  echo "$SDIST_SHA256  $SDIST" | sha256sum -c -

  if [ ! -f "$SRC/.prepared" ]; then
    log "extracting sdist to $SRC"
    rm -rf "$SRC"; mkdir -p "$WORK/src"; tar -xzf "$SDIST" -C "$WORK/src"
    cd "$SRC"
    # Drop torch/torchvision/torchaudio/torchcodec '==' pins (official helper,
    # also used by docker/Dockerfile.cpu for torch nightlies).
    "$PY" tools/use_existing_torch.py --prefix
    # Drop the github-hosted triton-cpu wheel.
    sed -i -E '/^triton @ https:\/\/github.com/d' requirements/cpu.txt
    # Debian 12 ships g++ 12.2.0; cpu_extension.cmake hard-requires >= 12.3
    # for the x86 backend.  Relax the floor to the host compiler's version
    # (only when the host gcc is older than 12.3).
    GXX_VER=$(g++ -dumpfullversion)
    if [ "$(printf '%s\n' 12.3 "$GXX_VER" | sort -V | head -1)" != 12.3 ]; then
      sed -i "s/CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.3))/CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL $GXX_VER))/" cmake/cpu_extension.cmake
      grep -q "VERSION_GREATER_EQUAL $GXX_VER))" cmake/cpu_extension.cmake
      # g++ 12.2 ICEs ("internal compiler error: in lookup_template_class_1,
      # at cp/pt.cc:10126") on flash_mla.cpp:349, a local constexpr captured
      # by the parallel_for lambda and used in an array bound; making it
      # `static constexpr` (no capture needed) avoids the ICE.
      sed -i '331s/^  constexpr int64_t kBLOCK_H_MAX = 16;/  static constexpr int64_t kBLOCK_H_MAX = 16;  \/\/ static: works around a g++ 12.2 ICE (lambda capture in array bound)/' csrc/cpu/sgl-kernels/flash_mla.cpp
      grep -q "static constexpr int64_t kBLOCK_H_MAX" csrc/cpu/sgl-kernels/flash_mla.cpp
    fi
    cp setup.py setup.py.orig
    touch .prepared
  fi
  cp "$SRC/setup.py.orig" "$SRC/setup.py"
  if [ "${VLLM_CPU_ONLY_C:-0}" = 1 ]; then
    sed -i -E '/ext_modules.append\(CMakeExtension\(name="vllm._C_AVX(512|2)"\)\)/d' "$SRC/setup.py"
    ! grep -q '_C_AVX512"))' "$SRC/setup.py"
  fi

  # ---- oneDNN source -----------------------------------------------------
  ONEDNN_TGZ=$SRC_CACHE/onednn-$ONEDNN_TAG.tar.gz
  ONEDNN_DIR=$WORK/onednn-$ONEDNN_TAG
  if [ -n "${ONEDNN_SRC:-}" ]; then
    ONEDNN_DIR=$ONEDNN_SRC
  elif [ ! -f "$ONEDNN_DIR/CMakeLists.txt" ]; then
    rm -rf "$ONEDNN_DIR"; mkdir -p "$ONEDNN_DIR"
    if [ -f "$ONEDNN_TGZ" ]; then
      tar -xzf "$ONEDNN_TGZ" -C "$ONEDNN_DIR"
    else
      git clone --depth 1 -b "$ONEDNN_TAG" https://github.com/uxlfoundation/oneDNN.git "$ONEDNN_DIR"
    fi
  fi
  if [ ! -f "$ONEDNN_TGZ" ]; then tar -czf "$ONEDNN_TGZ" -C "$ONEDNN_DIR" .; fi
  grep -q 'set(PROJECT_VERSION "3.13' "$ONEDNN_DIR/CMakeLists.txt" || { echo "oneDNN source is not 3.13"; exit 1; }

  # ---- precompiled Rust frontend ----------------------------------------
  RS_CACHE=$SRC_CACHE/vllm-rs-$VLLM_VERSION
  if [ ! -x "$RS_CACHE" ]; then
    log "fetching vllm-rs from the vllm-$VLLM_VERSION manylinux wheel on PyPI"
    D=$WORK/cudawheel; mkdir -p "$D"
    ls "$D"/vllm-$VLLM_VERSION-*.whl >/dev/null 2>&1 || \
      "$PY" -m pip download "vllm==$VLLM_VERSION" --no-deps --only-binary :all: -d "$D"
    unzip -o -j "$(ls "$D"/vllm-$VLLM_VERSION-*.whl | head -1)" vllm/vllm-rs -d "$WORK/rust-prebuilt"
    install -m 755 "$WORK/rust-prebuilt/vllm-rs" "$RS_CACHE"
  fi
  install -m 755 "$RS_CACHE" "$SRC/vllm/vllm-rs"

  # ---- build venv ----------------------------------------------------------
  if [ ! -x "$BUILD_VENV/bin/python" ]; then
    "$PY" -m venv "$BUILD_VENV"
  fi
  "$BUILD_VENV/bin/pip" install -q "$TORCH_SPEC" "cmake>=3.26.1" ninja "packaging>=24.2" \
      "setuptools==78.1.1" "setuptools-scm>=8" "setuptools-rust>=1.9.0" wheel "jinja2>=3.1.6" regex

  # ---- build wheel ---------------------------------------------------------
  log "building wheel (MAX_JOBS=$MAX_JOBS nice=$NICE CMAKE_BUILD_TYPE=$CMAKE_BUILD_TYPE)"
  cd "$SRC"
  export PATH="$BUILD_VENV/bin:$PATH"   # cmake/ninja from the build venv (system cmake is 3.25)
  T0=$(date +%s)
  env VLLM_TARGET_DEVICE=cpu MAX_JOBS="$MAX_JOBS" \
      FETCHCONTENT_SOURCE_DIR_ONEDNN="$ONEDNN_DIR" \
      nice -n "$NICE" "$BUILD_VENV/bin/python" setup.py bdist_wheel \
      --dist-dir=dist --py-limited-api=cp38
  log "wheel build took $(( $(date +%s) - T0 ))s"
  W=$(ls -t "$SRC"/dist/vllm-$VLLM_VERSION+cpu-*.whl | head -1)
  cp "$W" "$WHEEL_CACHE/"
fi

WHEEL=$(cached_wheel)
log "using wheel $WHEEL"

# ---- runtime venv ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
CONSTRAINTS=$WORK/constraints-0.33.txt
printf '%s\n' "$TORCH_SPEC" > "$CONSTRAINTS"
if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('$VLLM_VERSION') else 1)" 2>/dev/null; then
  log "installing $WHEEL into $VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  # torchvision/torchaudio/torchcodec are only needed for multimodal models and
  # have no 2.13-compatible +cpu builds on PyPI; install without them.
  "$VENV/bin/pip" install -q "$WHEEL" -c "$CONSTRAINTS" --no-deps
  "$VENV/bin/python" - <<'EOF' > "$WORK/runtime-reqs-0.33.txt"
import importlib.metadata as md
skip = ("torchvision", "torchaudio", "torchcodec", "torch")
for r in md.requires("vllm") or []:
    if "extra ==" in r:
        continue
    name = r.split(";")[0].split("[")[0]
    for op in "<>=!~ ":
        name = name.split(op)[0]
    if name.strip().lower() in skip:
        continue
    print(r)
EOF
  "$VENV/bin/pip" install -q -r "$WORK/runtime-reqs-0.33.txt" -c "$CONSTRAINTS"
fi
"$VENV/bin/python" -c "import torch, vllm; from vllm.platforms import current_platform as p; print('vllm', vllm.__version__, 'torch', torch.__version__, 'platform', type(p).__name__, p.device_type)"
