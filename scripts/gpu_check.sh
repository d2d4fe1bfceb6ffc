#!/usr/bin/env bash
# The GPU check, for a machine that already has torch (maybe triton, nvcc, pytest) and maybe
# no package index:
#   bash scripts/gpu_check.sh OUT_DIR                 # build, tests, bench, profile
#   bash scripts/gpu_check.sh OUT_DIR build|tests|bench|profile ...   # some steps (one command each on a
#                                                     # machine that ends commands at 10 minutes)
# build  the extension against this torch (pip --no-build-isolation, no index). Without a usable
#        nvcc (none, or a CUDA major version other than torch's), or when the CUDA build fails, it
#        builds without the CUDA kernels (FUSEDACCUM_NO_CUDA=1), says why in
#        OUT_DIR/CUDA_KERNELS_NOT_BUILT, and the tests and bench still run Triton and torch on the GPU.
# tests  one pytest run per test file, each with its own time limit: OUT_DIR/tests/<file>.xml
#        (junit) and <file>.log (-v, written as the tests pass).
# bench  fusedaccum-bench --quick --backend all (every case and backend; on CUDA --quick keeps the
#        full sizes and shortens the timings), one run per case section: OUT_DIR/bench/<section>.jsonl
#        (a line per finished job), <section>.txt (the tables), and the run's JSON and CSV.
# profile scripts/gpu_profile.py: a boundary's and an accumulate's time kernel by kernel, against
#        the event and host times: OUT_DIR/profile/profile.txt and profile.json.
# tests and bench build first when this tree is not the one installed (a fresh machine).
# Each step keeps within GPU_CHECK_BUDGET seconds (default 540) and appends a line per finished
# unit (build, test file, bench section) to OUT_DIR/summary.txt, so that a kill loses nothing
# already measured; OUT_DIR/FAILED lists what failed; the exit status is 1 if anything did.
# Nothing waits on the network: what is importable is never installed; what is missing gets one
# `pip install` try (no retries, 5 s timeout), then the check runs without it (the bench prints
# plain text without rich, no PNG without matplotlib; pytest comes from scripts/vendor/).
#
# Knobs (environment): PYTHON (python3); GPU_CHECK_BUDGET; GPU_CHECK_TESTS="test_ops.py test_cuda.py"
# (the files to run; default all); GPU_CHECK_TEST_TIMEOUT (per file, default 300 s);
# GPU_CHECK_TESTS_TOGETHER=1 (one pytest run over the files, reported as "all");
# GPU_CHECK_PYTEST_ARGS (added to each pytest run: "-n 12 --timeout 120" with xdist and pytest-timeout);
# GPU_CHECK_BENCH_CASES ("host accumulate boundary window fused-modules sweep end-to-end"); GPU_CHECK_BENCH_ARGS
# (--quick); GPU_CHECK_TAR=FILE (outside OUT_DIR): a .tgz of OUT_DIR, rewritten after each unit,
# for tools that bring back only a few files: GPU_CHECK_TAR=$OUT/tests.tgz bash scripts/gpu_check.sh /tmp/gc tests
# scripts/gpu_check_sim.sh runs this here as a bare GPU image would meet it (no nvcc, pytest, index).
set -uo pipefail
usage="usage: bash scripts/gpu_check.sh OUT_DIR [build|tests|bench|profile|all ...]"
OUT=${1:?$usage}
shift
steps=()
for s in "${@:-all}"; do
  case $s in
    all) steps+=(build tests bench profile) ;;
    build|tests|bench|profile) steps+=("$s") ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
HELPER="$ROOT/scripts/gpu_check_helper.py"
BUDGET=${GPU_CHECK_BUDGET:-540}
[ -z "${GPU_CHECK_TAR:-}" ] || GPU_CHECK_TAR=$(cd "$(dirname "$GPU_CHECK_TAR")" && pwd)/$(basename "$GPU_CHECK_TAR")
STAMP="$ROOT/build/gpu_check.stamp"  # what the last build here installed (build/ is git-ignored)
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
failed=0

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

pack() {  # GPU_CHECK_TAR: OUT_DIR as one file, replaced atomically
  [ -n "${GPU_CHECK_TAR:-}" ] || return 0
  tar czf "$GPU_CHECK_TAR.tmp" -C "$OUT" --exclude="./$(basename "$GPU_CHECK_TAR")*" . 2>/dev/null \
    && mv -f "$GPU_CHECK_TAR.tmp" "$GPU_CHECK_TAR"
}

record() {  # record STEP UNIT STATUS SECONDS DETAIL: one summary line per finished unit
  printf '%-5s %-30s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" "${5:-}" | tee -a "$OUT/summary.txt"
  case $3 in ok|NOT-BUILT) ;; *) failed=1; echo "$1 $2: $3 ${5:-}" >> "$OUT/FAILED" ;; esac
  pack
}

left() { echo $(( BUDGET - (SECONDS - step_start) )); }  # seconds left to the current step

pip_tried=" "
need() {  # need MODULE...: one pip try for those that do not import; never fatal
  local want=() m
  for m in $("$PY" "$HELPER" missing "$@"); do
    case $pip_tried in *" $m "*) ;; *) want+=("$m") ;; esac
  done
  [ ${#want[@]} -gt 0 ] || return 0
  pip_tried+="${want[*]} "
  say "missing ${want[*]}: one pip try (no retries, 5 s timeout), else going on without"
  if timeout -k 5 60 "$PY" -m pip install -q --retries 0 --timeout 5 "${want[@]}" >> "$OUT/pip.log" 2>&1; then
    say "pip installed ${want[*]}"
  else
    say "pip could not install ${want[*]} (see pip.log)"
  fi
}

versions() {
  {
    date -u
    git rev-parse HEAD 2>/dev/null || echo "no git"
    git status --short 2>/dev/null | head -20
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (no CUDA GPU)')"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton missing"
    "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" || echo "setuptools missing"
    echo "not importable: $("$PY" "$HELPER" missing pytest numpy ninja rich matplotlib | tr '\n' ' ')"
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "no nvcc on PATH"; fi
    echo "CUDA_HOME=${CUDA_HOME:-} CUDA_PATH=${CUDA_PATH:-}"
    # The C++ compiler the build will use (torch takes $CXX, else c++ on PATH) and the one torch
    # was built with: an H200 image's /opt/gcc g++ built an extension whose C++ error path
    # segfaulted (2026-12-04), hence error_path_check below.
    echo "CXX=${CXX:-} c++=$(command -v c++ || echo none) g++=$(command -v g++ || echo none)"
    "${CXX:-c++}" --version 2>&1 | head -1
    [ -x /usr/bin/g++ ] && echo "/usr/bin/g++: $(/usr/bin/g++ --version 2>&1 | head -1)"
    "$PY" -c "import torch, re; print('torch built with:', re.search(r'(GCC|clang)[^\n]*', torch.__config__.show()).group(0))" 2>&1
  } > "$OUT/versions.txt" 2>&1
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
}

build_step() {
  local t0=$SECONDS src=. cuda_built=0 reason="" plan home arch note T rc
  rm -f "$OUT/CUDA_KERNELS_NOT_BUILT" "$STAMP"
  need ninja  # without it torch compiles one file at a time
  "$PY" "$HELPER" cuda-plan > "$OUT/build-plan.txt" 2>&1 \
    || echo "plan=skip; note='the nvcc check failed (see build-plan.txt)'" >> "$OUT/build-plan.txt"
  eval "$(grep -E '^(plan|home|arch|note)=' "$OUT/build-plan.txt")"
  # pyproject.toml's SPDX license string needs setuptools >= 77: an older one builds from a copy
  # of the tree with the old form, rather than not at all.
  if ! "$PY" "$HELPER" setuptools-spdx >> "$OUT/build-plan.txt" 2>&1; then
    src=$(mktemp -d)/fusedaccum
    mkdir -p "$src"
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build -cf - . | tar -C "$src" -xf -
    sed -i 's/^license = "BSD-3-Clause".*/license = { text = "BSD-3-Clause" }/' "$src/pyproject.toml"
    echo "setuptools older than 77: building from a copy of the tree with license = { text = \"BSD-3-Clause\" }" \
      | tee -a "$OUT/build-plan.txt"
  fi
  local pip_build=("$PY" -m pip install -v --no-build-isolation --no-deps --no-index --force-reinstall "$src")
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ "$plan" = build ]; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}
    local reserve=$(( $(left) / 3 )); [ $reserve -gt 150 ] && reserve=150
    T=$(( $(left) - reserve ))  # leaves time for a build without CUDA if this one fails
    [ "$T" -ge 60 ] || T=60
    say "build: with the CUDA kernels, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, limit ${T}s; $note"
    CUDA_HOME=$home timeout -k 10 "$T" "${pip_build[@]}" > "$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      cuda_built=1
      record build cuda-kernels ok $((SECONDS - t0)) "$note"
    else
      mv "$OUT/build.log" "$OUT/build-cuda.log"
      reason="the build with the CUDA kernels failed (rc $rc$([ $rc -eq 124 ] && echo ", time limit ${T}s"); see build-cuda.log); $note"
      record build cuda-kernels FAILED $((SECONDS - t0)) "rc $rc, see build-cuda.log"
    fi
  else
    reason=$note
    record build cuda-kernels NOT-BUILT 0 "$note"
  fi
  if [ $cuda_built -eq 0 ]; then
    {
      echo "The CUDA kernels of fusedaccum._C were NOT built: the cuda backend is not tested or benchmarked."
      echo "Why: $reason"
      echo "The build without them (FUSEDACCUM_NO_CUDA=1) still runs Triton and torch on the GPU."
    } > "$OUT/CUDA_KERNELS_NOT_BUILT"
    say "CUDA KERNELS NOT BUILT: $reason"
    T=$(( $(left) - 20 ))
    [ "$T" -ge 60 ] || T=60
    say "build: without the CUDA kernels (FUSEDACCUM_NO_CUDA=1), limit ${T}s"
    FUSEDACCUM_NO_CUDA=1 timeout -k 10 "$T" "${pip_build[@]}" > "$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
      record build extension FAILED $((SECONDS - t0)) "rc $rc, see build.log"
      return 1
    fi
  fi
  # From tests/ (as the tests and the bench run): the installed package, not the source folder.
  if ! (cd tests && "$PY" -c "
import sys, fusedaccum as fa
from fusedaccum import dispatch
print('installed', fa.__file__); print('backends', fa.backends())
print('extension', dispatch.extension_loaded(), 'cuda kernels', dispatch.extension_has_cuda())
assert dispatch.extension_loaded(), 'fusedaccum._C does not load'
assert dispatch.extension_has_cuda() == bool($cuda_built), 'the CUDA kernels are not what the build said'
") >> "$OUT/build.log" 2>&1; then
    record build extension FAILED $((SECONDS - t0)) "installed but does not import as built; see the end of build.log"
    return 1
  fi
  if ! error_path_check; then
    # Seen on an H200 image (CXX=/opt/gcc/bin/g++, 2026-12-04): a TORCH_CHECK whose message is
    # formatted (an index, an offset) crashed the process instead of raising. Once, with the
    # system compiler, if there is another one.
    if [ -x /usr/bin/g++ ] && [ "$(command -v "${CXX:-c++}")" != /usr/bin/g++ ] && [ -z "${GPU_CHECK_CXX_RETRIED:-}" ]; then
      say "the extension's C++ error path crashes: rebuilding once with /usr/bin/g++"
      record build error-path FAILED $((SECONDS - t0)) "built with ${CXX:-c++}: a failed TORCH_CHECK with a formatted message segfaults; rebuilding with /usr/bin/g++"
      GPU_CHECK_CXX_RETRIED=1 CXX=/usr/bin/g++ CC=/usr/bin/gcc build_step
      return $?
    fi
    record build error-path FAILED $((SECONDS - t0)) "a failed TORCH_CHECK with a formatted message segfaults (compiler ${CXX:-c++}); see error-path.log"
  fi
  mkdir -p "$ROOT/build"
  printf '%s\n' "$("$PY" "$HELPER" source-hash)" "$("$PY" -c 'import sys; print(sys.executable)')" \
    "$cuda_built" "$reason" > "$STAMP"
  record build extension ok $((SECONDS - t0)) "$(tail -1 "$OUT/build.log"); $(tail -2 "$OUT/build.log" | head -1)"
}

error_path_check() {  # a refused argument raises, in a fresh process (from tests/: the installed package)
  (cd tests && timeout 120 "$PY" -c "
import torch, fusedaccum
try:
    torch.ops.fusedaccum_C.accumulate(torch.zeros(4), [torch.ones(3)], [2], 1.0, True, None, None)
except RuntimeError as e:
    print('raised as it should:', str(e).splitlines()[0])
else:
    raise SystemExit('no error for a gradient past the end of its arena')
") >> "$OUT/error-path.log" 2>&1
}

ensure_built() {  # the tests and the bench need this tree installed; build it if it is not
  if [ -f "$STAMP" ] && [ "$(sed -n 1p "$STAMP")" = "$("$PY" "$HELPER" source-hash)" ] \
      && [ "$(sed -n 2p "$STAMP")" = "$("$PY" -c 'import sys; print(sys.executable)')" ] \
      && (cd tests && "$PY" -c "import fusedaccum._C") 2>/dev/null; then
    if [ "$(sed -n 3p "$STAMP")" != 1 ] && [ ! -f "$OUT/CUDA_KERNELS_NOT_BUILT" ]; then
      printf '%s\n' "The CUDA kernels of fusedaccum._C were NOT built: the cuda backend is not tested or benchmarked." \
        "Why: $(sed -n 4p "$STAMP")" > "$OUT/CUDA_KERNELS_NOT_BUILT"
    fi
    return 0
  fi
  say "this tree is not the one installed: building first"
  build_step
}

tests_step() {
  ensure_built || { record tests all "not-run" 0 "no usable build"; return 1; }
  need pytest numpy
  local pythonpath=${PYTHONPATH:-} files f name T rc t0 status counts
  if [ -n "$("$PY" "$HELPER" missing pytest)" ]; then
    pythonpath=$(printf '%s:' "$ROOT"/scripts/vendor/*.whl)$pythonpath
    say "pytest from scripts/vendor/ ($(PYTHONPATH=$pythonpath "$PY" -c 'import pytest; print(pytest.__version__)' 2>&1))"
  fi
  local envs=(FUSEDACCUM_REQUIRE_EXTENSION=1 "PYTHONPATH=$pythonpath")
  [ "$(sed -n 3p "$STAMP")" = 1 ] && envs+=(FUSEDACCUM_REQUIRE_CUDA_BUILD=1)
  # The GPU's own files first, the slow framework ones last, then any file not named here.
  local first="test_build.py test_cuda.py test_ops.py test_errors.py test_accumulator.py test_optim.py
    test_fidelity.py test_torch_optim_suite.py test_ddp.py test_bench.py test_frameworks.py"
  files=${GPU_CHECK_TESTS:-$(cd tests && for f in $first; do [ -f "$f" ] && echo "$f"; done;
    for f in test_*.py; do case " $(echo $first) " in *" $f "*) ;; *) echo "$f" ;; esac; done)}
  mkdir -p "$OUT/tests"
  # GPU_CHECK_TESTS_TOGETHER=1: the files as one pytest run (with GPU_CHECK_PYTEST_ARGS="-n 12",
  # pytest-xdist spreads them over the machine's cores), for a lease too short for one run each.
  local targets
  [ -n "${GPU_CHECK_TESTS_TOGETHER:-}" ] && files=ALL
  for f in $files; do
    f=${f#tests/}
    name=${f%.py}
    targets=$f
    [ "$f" = ALL ] && { name=all; targets=${GPU_CHECK_TESTS:-.}; }
    T=$(( $(left) - 40 ))  # 30 s of it for a run that ignores SIGINT to be killed
    [ "$T" -gt "${GPU_CHECK_TEST_TIMEOUT:-300}" ] && T=${GPU_CHECK_TEST_TIMEOUT:-300}
    if [ "$T" -lt 20 ]; then
      record tests "$name" "not-run" 0 "the step's ${BUDGET}s are spent: run it alone (GPU_CHECK_TESTS=$f)"
      continue
    fi
    say "tests: $f (limit ${T}s)"
    t0=$SECONDS
    rm -f "$OUT/tests/$name.xml"
    # SIGINT at the limit: pytest stops, still writes the junit of what ran, and the log has the rest.
    (cd tests && env "${envs[@]}" timeout -s INT -k 30 "$T" "$PY" -m pytest -v -rs -p no:cacheprovider \
      --maxfail=25 ${GPU_CHECK_PYTEST_ARGS:-} --junitxml="$OUT/tests/$name.xml" $targets) > "$OUT/tests/$name.log" 2>&1
    rc=$?
    counts=$("$PY" "$HELPER" tests-result "$OUT/tests/$name.xml" "$OUT/tests/$name.log")
    read -r np nf ne ns rest <<< "$counts"
    case $rc in
      0|5) status=ok ;;  # 5: nothing collected (all skipped at import)
      124|137) status=TIMEOUT ;;
      *) status=FAILED ;;
    esac
    record tests "$name" "$status" $((SECONDS - t0)) "passed $np, failed $nf, errors $ne, skipped $ns ${rest:+$rest }(rc $rc, limit ${T}s)"
  done
}

bench_step() {
  ensure_built || { record bench all "not-run" 0 "no usable build"; return 1; }
  need rich matplotlib  # optional: plain-text tables and no PNG without them
  local device=cpu cases c n T rc t0 status done_ planned errs
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then device=cuda; fi
  [ $device = cpu ] && say "bench: torch sees no CUDA GPU, so it runs on the CPU"
  cases=${GPU_CHECK_BENCH_CASES:-host accumulate boundary window fused-modules sweep end-to-end}
  n=$(echo $cases | wc -w)
  mkdir -p "$OUT/bench"
  for c in $cases; do
    # A fair share of what is left, up to 1.5 shares when the earlier sections were quick.
    T=$(( $(left) * 3 / (2 * n) ))
    [ "$T" -gt $(( $(left) - 40 - 20 * (n - 1) )) ] && T=$(( $(left) - 40 - 20 * (n - 1) ))
    n=$((n - 1))
    if [ "$T" -lt 20 ]; then
      record bench "$c" "not-run" 0 "the step's ${BUDGET}s are spent: run it alone (GPU_CHECK_BENCH_CASES=$c)"
      continue
    fi
    say "bench: $c on $device (limit ${T}s)"
    t0=$SECONDS
    # From tests/: the installed package. SIGINT at the limit: the bench writes what it measured.
    (cd tests && timeout -s INT -k 30 "$T" "$PY" -m fusedaccum.bench --device $device --backend all \
      ${GPU_CHECK_BENCH_ARGS:---quick} --cases "$c" --out "$OUT/bench" --jobs-log "$OUT/bench/$c.jsonl") \
      > "$OUT/bench/$c.txt" 2>&1
    rc=$?
    read -r done_ planned errs <<< "$("$PY" "$HELPER" bench-result "$OUT/bench/$c.jsonl")"
    case $rc in 0) status=ok ;; 124|137) status=TIMEOUT ;; *) status=FAILED ;; esac
    record bench "$c" "$status" $((SECONDS - t0)) "$done_ of $planned jobs measured, $errs failed (rc $rc, limit ${T}s, $device)"
  done
}

profile_step() {
  ensure_built || { record profile all "not-run" 0 "no usable build"; return 1; }
  local T=$(( $(left) - 20 )) t0=$SECONDS rc status scale=full
  [ "$T" -lt 30 ] && { record profile all "not-run" 0 "the step's ${BUDGET}s are spent"; return 1; }
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || scale=tiny  # CPU: only that it runs
  mkdir -p "$OUT/profile"
  say "profile (limit ${T}s, $scale)"
  (cd tests && timeout -k 10 "$T" "$PY" "$ROOT/scripts/gpu_profile.py" --scale $scale --out "$OUT/profile") \
    > "$OUT/profile/profile.txt" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=TIMEOUT ;; *) status=FAILED ;; esac
  record profile all "$status" $((SECONDS - t0)) "rc $rc, limit ${T}s: $OUT/profile/profile.txt"
}

say "steps: ${steps[*]}; results in $OUT"
versions
for s in "${steps[@]}"; do
  step_start=$SECONDS
  case $s in
    build) build_step || break ;;  # nothing to test without a build
    tests) tests_step ;;
    bench) bench_step ;;
    profile) profile_step ;;
  esac
done
pack
echo
echo "== $OUT/summary.txt"
cat "$OUT/summary.txt"
[ -f "$OUT/CUDA_KERNELS_NOT_BUILT" ] && { echo; cat "$OUT/CUDA_KERNELS_NOT_BUILT"; }
[ $failed -eq 0 ] || { echo; echo "FAILED:"; cat "$OUT/FAILED"; }
exit $failed
