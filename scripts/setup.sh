#!/usr/bin/env bash
# Set up everything from nothing: a virtual environment in .venv, the package with its test extras, and the
# embedded default data (Fashion-MNIST from Debian's dataset-fashion-mnist where apt is available; elsewhere it is
# downloaded from the official source on first use). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: a CPU build satisfies the package's torch requirement, so pip does not pull a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
if ! .venv/bin/python -c "import sys; from otbr_plugin.data import find_dataset; sys.exit(find_dataset('fashion_mnist') is None)"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found locally: it will be downloaded into ./data on first use"
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, otbr_plugin; print("otbr-plugin", otbr_plugin.__version__, "torch", torch.__version__)')"
