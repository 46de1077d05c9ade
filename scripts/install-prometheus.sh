#!/usr/bin/env bash
# Install Prometheus and promtool (Debian's `prometheus` package) for the metrics tests.
# Idempotent: does nothing when both commands are already on PATH. Needs root (or sudo) for apt.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-prometheus.sh: need root (or sudo) to apt-get install prometheus" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: no node-exporter etc.; the tests start prometheus themselves.
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may start a system service on port 9090; the tests do not need it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
prometheus --version 2>&1 | head -1
