#!/usr/bin/env bash
# Runs scripts/gpu_check.sh here the way a bare GPU image would meet it: a copy of the working
# tree, a Python with torch, numpy and triton but without pytest, rich, matplotlib or expecttest
# (a venv that links the rest of ./.venv's packages), no nvcc (CUDA_HOME points nowhere, PATH has
# no /usr/local/bin) and no package index (pip's only index is a closed local port). Without a GPU
# the tests and the bench run on the CPU, so name a few test files:
#   GPU_CHECK_TESTS="test_build.py test_optim.py" bash scripts/gpu_check_sim.sh OUT_DIR [steps...]
# SIM_CUDA_HOME=/usr/local/cuda tries the CUDA build instead; GPU_CHECK_* pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:?usage: bash scripts/gpu_check_sim.sh OUT_DIR [steps...]}" && cd "$1" && pwd)
shift
SIM=${SIM_DIR:-/tmp/fusedaccum-gpu-sim}
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$SIM/venv/bin/python" ]; then
  .venv/bin/python -m venv "$SIM/venv"  # its own pip; the setuptools of ./.venv
  simsite=$("$SIM/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$simsite"/setuptools* "$simsite"/_distutils_hack "$simsite"/pkg_resources "$simsite"/distutils-precedence.pth
  for entry in "$site"/*; do
    case ${entry##*/} in
      pip|pip-*|pytest*|_pytest|py.py|pluggy*|iniconfig*|rich|rich-*|matplotlib*|mpl_toolkits|pylab.py|expecttest*|fusedaccum*|__pycache__) ;;
      *) ln -s "$entry" "$simsite/" ;;
    esac
  done
fi
# A fresh copy of the tree each time, keeping the last build's objects.
rm -rf "$SIM/tree.new" && mkdir -p "$SIM/tree.new"
tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude='./*.egg-info' -cf - . | tar -C "$SIM/tree.new" -xf -
[ -d "$SIM/tree/build" ] && mv "$SIM/tree/build" "$SIM/tree.new/build"
rm -rf "$SIM/tree" && mv "$SIM/tree.new" "$SIM/tree"
cd "$SIM/tree"
exec env -i HOME="$HOME" LANG=C.UTF-8 PATH="$SIM/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  CUDA_HOME="${SIM_CUDA_HOME:-/nonexistent/cuda}" PIP_CONFIG_FILE=/dev/null PIP_INDEX_URL=http://127.0.0.1:9/simple \
  PYTHONNOUSERSITE=1 PYTHON="$SIM/venv/bin/python" MAX_JOBS="${MAX_JOBS:-2}" \
  GPU_CHECK_TESTS="${GPU_CHECK_TESTS:-}" GPU_CHECK_TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-}" \
  GPU_CHECK_BENCH_CASES="${GPU_CHECK_BENCH_CASES:-}" GPU_CHECK_BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}" \
  GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-}" GPU_CHECK_TAR="${GPU_CHECK_TAR:-}" \
  bash scripts/gpu_check.sh "$OUT" "$@"
