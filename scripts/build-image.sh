#!/usr/bin/env bash
# Build docker/Dockerfile.cpu with podman (Debian's package), idempotently (layers are cached).
#
#   scripts/build-image.sh                    # FROM python:3.11-slim (needs Docker Hub)
#   BASE=debootstrap scripts/build-image.sh   # FROM Debian bookworm made here with debootstrap
#                                             # (needs only Debian's mirror; apt install
#                                             # podman runc debootstrap)
#
# IMAGE names the result (default localhost/vllm-snapkv:cpu). The host's pip settings travel into
# the build where set: PIP_FIND_LINKS (a folder of local wheels, e.g. torch 2.13.0+cpu) is mounted
# read-only, PIP_CERT (a CA bundle, e.g. behind a TLS-inspecting proxy) replaces the image's.
# PODMAN is the command (default podman; e.g. "podman --runtime runc" where crun cannot run, as
# on this project's VMs). PODMAN_BUILD_FLAGS adds flags (e.g. "--ulimit nofile=1024:1024 --ulimit nproc=1000:1000" on a
# VM whose hard limits are below podman's defaults). With Docker, use the plain `docker build`
# in the Dockerfile's header.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE="${IMAGE:-localhost/vllm-snapkv:cpu}"
BASE="${BASE:-python:3.11-slim}"
read -r -a PODMAN <<< "${PODMAN:-podman}"
extra=()
if [ "$BASE" = debootstrap ]; then
  BASE=localhost/debian-bookworm-python:min
  if ! "${PODMAN[@]}" image exists "$BASE"; then
    rootfs="$(mktemp -d)"
    echo "[image] debootstrap bookworm -> $BASE"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
    rm -rf "$rootfs"
  fi
  extra+=(--build-arg EXTRA_PACKAGES=python3-dev)
fi
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "${PIP_FIND_LINKS}" ]; then
  extra+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "TORCH_FIND_LINKS=$PIP_FIND_LINKS")
fi
if [ -n "${PIP_CERT:-}" ] && [ -f "${PIP_CERT}" ]; then
  extra+=(-v "$PIP_CERT:/etc/ssl/certs/ca-certificates.crt:ro")
fi
# shellcheck disable=SC2086
"${PODMAN[@]}" build --network host ${PODMAN_BUILD_FLAGS:-} "${extra[@]}" --build-arg "BASE=$BASE" \
  --ignorefile docker/Dockerfile.cpu.dockerignore -f docker/Dockerfile.cpu -t "$IMAGE" .
echo "[image] built $IMAGE"
