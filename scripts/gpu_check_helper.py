"""Small helpers for scripts/gpu_check.sh (standard library only; torch where said).

    python scripts/gpu_check_helper.py missing MODULE...       the modules that do not import (ninja: the program)
    python scripts/gpu_check_helper.py cuda-plan               plan=build|skip home= arch= note= (imports torch)
    python scripts/gpu_check_helper.py setuptools-spdx         exit 0 when setuptools takes an SPDX `license` string
    python scripts/gpu_check_helper.py source-hash             hash of everything the build reads
    python scripts/gpu_check_helper.py tests-result XML LOG    "passed failed errors skipped" of one pytest run
    python scripts/gpu_check_helper.py bench-result JSONL      "done planned errors" of one fusedaccum-bench run
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def missing(modules: list[str]) -> int:
    for name in modules:
        if name == "ninja":  # torch's build runs the `ninja` program
            found = shutil.which("ninja") is not None
        else:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            print(name)
    return 0


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def cuda_plan() -> int:
    """Whether the CUDA kernels can build here, as shell assignments (plan=build|skip, home, arch,
    note). nvcc is found the way setup.py and torch find it: CUDA_HOME / CUDA_PATH, else
    /usr/local/cuda, else the nvcc on PATH; its CUDA major version must be torch's."""
    import torch

    def say(plan: str, note: str, home: str = "", arch: str = "") -> int:
        for key, value in (("plan", plan), ("home", home), ("arch", arch), ("note", note)):
            print(f"{key}={shlex.quote(value)}")
        return 0

    wants = f"torch {torch.__version__} is built with CUDA {torch.version.cuda}"
    if torch.version.cuda is None:
        return say("skip", f"this torch ({torch.__version__}) has no CUDA")
    arch = ""
    if torch.cuda.is_available():  # build for this GPU only: one arch compiles in half the time
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        if os.path.isfile("/usr/local/cuda/bin/nvcc"):
            home = "/usr/local/cuda"
        elif shutil.which("nvcc"):
            home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
        else:
            return say("skip", f"no nvcc: no CUDA_HOME or CUDA_PATH, no /usr/local/cuda/bin/nvcc, none on PATH; {wants}")
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return say("skip", f"no nvcc: {nvcc} does not exist; {wants}")
    version = nvcc_version(nvcc)
    if version is None:
        return say("skip", f"{nvcc} --version did not say its release; {wants}")
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return say("skip", f"nvcc {version} ({nvcc}) does not match: {wants}, and torch builds no extension "
                           f"across CUDA major versions")
    return say("build", f"nvcc {version} ({nvcc}); {wants}", home, arch)


def setuptools_spdx() -> int:
    """pyproject.toml's `license = "BSD-3-Clause"` (PEP 639) needs setuptools >= 77."""
    try:
        import setuptools
    except ImportError:
        print("setuptools missing")
        return 1
    major = int(re.match(r"\d+", setuptools.__version__).group())
    print(f"setuptools {setuptools.__version__}")
    return 0 if major >= 77 else 1


def source_hash() -> int:
    h = hashlib.sha256()
    files = [ROOT / "setup.py", ROOT / "pyproject.toml"]
    for folder in ("csrc", "fusedaccum", "triton_kernels"):
        files += sorted(p for p in (ROOT / folder).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc"))
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    print(h.hexdigest()[:16])
    return 0


def tests_result(xml: str, log: str) -> int:
    """Counts from the junit file, or (when pytest was killed before writing it) from its -v log."""
    try:
        root = ET.parse(xml).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
        print(passed, total["failures"], total["errors"], total["skipped"])
        return 0
    except (OSError, ET.ParseError):
        pass
    counts = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"), 0)
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        m = re.match(r"\S+::\S.*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if m:
            counts[m.group(1)] += 1
    print(counts["PASSED"] + counts["XPASS"], counts["FAILED"], counts["ERROR"], counts["SKIPPED"] + counts["XFAIL"],
          "(from the log: no junit)")
    return 0


def bench_result(jsonl: str) -> int:
    """Jobs finished, planned and failed in one --jobs-log file."""
    done = planned = errors = 0
    try:
        lines = Path(jsonl).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "header" in rec:
            planned += len(rec["header"].get("jobs", []))
        elif "rows" in rec:
            done += 1
        elif "error" in rec:
            errors += 1
    print(done, planned, errors)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "missing":
        return missing(args)
    if cmd == "cuda-plan":
        return cuda_plan()
    if cmd == "setuptools-spdx":
        return setuptools_spdx()
    if cmd == "source-hash":
        return source_hash()
    if cmd == "tests-result":
        return tests_result(*args)
    if cmd == "bench-result":
        return bench_result(*args)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
