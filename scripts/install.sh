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
.venv/bin/python -m pip install -q "torch>=2.11" setuptools numpy -r scripts/requirements-test.txt
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation "${@:-.}"
# From tests/, so that the installed package is imported, not the source folder.
(cd tests && ../.venv/bin/python -c "import fusedaccum as fa; print('fusedaccum', fa.__version__, fa.backends())")
