#!/usr/bin/env bash
# Installs fusedaccum (scripts/install.sh) and runs the benchmark, standard .grad accumulation
# vs fusedaccum, on the default device (CUDA when there is a GPU). Arguments go to
# fusedaccum-bench, e.g. --quick, --device cpu, --backend all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/fusedaccum-bench "$@"
