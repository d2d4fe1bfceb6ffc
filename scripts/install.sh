#!/usr/bin/env bash
# Installs fusedaccum into ./.venv (created if missing): torch from the package index, then
# the extension built against that torch. The CUDA kernels compile whenever nvcc is found,
# GPU or not (TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0; MAX_JOBS caps the parallel compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch>=2.11" ninja setuptools wheel pytest numpy matplotlib rich expecttest
# The frameworks tests/test_frameworks.py trains with; these versions work with torch >= 2.11 on Python 3.11 and 3.12.
.venv/bin/python -m pip install -q "transformers==5.24.0" "accelerate==1.15.0" "lightning==2.6.6" "pytorch-lightning==2.6.6" "safetensors==0.8.0"
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation "${@:-.}"
# From tests/, so that the installed package is imported, not the source folder.
(cd tests && ../.venv/bin/python -c "import fusedaccum as fa; print('fusedaccum', fa.__version__, fa.backends())")
