#!/usr/bin/env bash
# Installs fusedaccum (scripts/install.sh) and runs the whole test suite on every backend this
# machine has: C++ CPU and torch always, Triton (interpreted on CPU when there is no GPU),
# CUDA when there is a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The extension must have loaded, and its CUDA kernels must be in it when nvcc was there:
# a broken build fails here instead of silently testing fewer backends.
export FUSEDACCUM_REQUIRE_EXTENSION=1
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export FUSEDACCUM_REQUIRE_CUDA_BUILD=1
fi
# Run from tests/ so that the installed package, not the source folder, is imported.
cd tests && ../.venv/bin/python -m pytest -q -rs "$@"
