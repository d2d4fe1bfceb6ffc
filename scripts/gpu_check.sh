#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine that already has torch installed:
#   bash scripts/gpu_check.sh OUT_DIR
# builds the extension against that torch (no venv, --no-build-isolation), runs the test suite
# (CUDA tests included), runs the benchmarks on CUDA and writes everything into OUT_DIR:
# versions.txt, nvidia-smi.txt, build.log, tests.txt (+ junit.xml), bench/ (JSON, CSV, PNG).
# Budget: under 10 minutes on an H100.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "no git"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton missing"
  nvcc --version | tail -2 || echo "nvcc missing"
} > "$OUT/versions.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# Only Hopper here: building one arch halves the compile time.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_BREAK_SYSTEM_PACKAGES=1  # a system Python that marks itself externally managed
# The GPU machine may have no package index: whatever is missing is reported in pip.log.
"$PY" -m pip install -q ninja pytest numpy matplotlib rich > "$OUT/pip.log" 2>&1 || true
if ! "$PY" -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee "$OUT/FAILED"
  exit 1
fi

export FUSEDACCUM_REQUIRE_EXTENSION=1 FUSEDACCUM_REQUIRE_CUDA_BUILD=1
(cd tests && timeout 270 "$PY" -m pytest -q -rs --junitxml="$OUT/junit.xml" --maxfail=20) > "$OUT/tests.txt" 2>&1 || status=1
tail -5 "$OUT/tests.txt"

# From tests/ (as the tests): the installed package, not the source folder, must be imported.
(cd tests && timeout 240 "$PY" -m fusedaccum.bench --device cuda --backend all --out "$OUT/bench") > "$OUT/bench.txt" 2>&1 || status=1
tail -40 "$OUT/bench.txt"
exit $status
