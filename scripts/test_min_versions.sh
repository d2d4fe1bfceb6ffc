#!/usr/bin/env bash
# The whole test suite again against the oldest versions fusedaccum supports (torch 2.11,
# triton 3.6: what the GPU machines have), in .venv-min, built from a copy of the tracked
# files so that ./build (the main .venv's objects) is left alone. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-min/bin/python ]; then
  "$PYTHON" -m venv .venv-min
fi
.venv-min/bin/python -m pip install -q --upgrade pip
# numpy < 2.3: triton 3.6's interpreter (how the Triton kernels run on CPU) needs it (tests/conftest.py).
# setuptools < 82: torch 2.11's requirement; >= 77 for pyproject's SPDX license.
.venv-min/bin/python -m pip install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.3" "setuptools>=77,<82" \
  -r scripts/requirements-test.txt
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$src"
(cd "$src" && MAX_JOBS=${MAX_JOBS:-2} "$OLDPWD/.venv-min/bin/python" -m pip install -q --no-build-isolation .)
(cd tests && ../.venv-min/bin/python -c "import torch, triton, fusedaccum as fa; print('min versions: torch', torch.__version__, 'triton', triton.__version__, 'fusedaccum', fa.backends())")
export FUSEDACCUM_REQUIRE_EXTENSION=1
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  export FUSEDACCUM_REQUIRE_CUDA_BUILD=1
fi
cd tests && ../.venv-min/bin/python -m pytest -q -rs "$@"
