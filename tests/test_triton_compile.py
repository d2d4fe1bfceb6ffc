"""Every Triton kernel variant compiles for the GPUs, on this machine without one.

scripts/triton_compile_check.py calls the Triton launchers with CPU tensors of every dtype and
flag combination the ops use and lets Triton's JIT specialize and compile each launch down to
a cubin for sm_90 (H100/H200) and sm_80 (A100), without launching. CI runs it under the newest
triton and again under the oldest supported (3.6, the GPU machines'), so a kernel the GPU's
triton cannot compile fails here, not at the first GPU contact.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
# On a GPU machine the kernels compile and run in the other tests: no need to spend its time here.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real tests compile the kernels")

CHECK = Path(__file__).resolve().parent.parent / "scripts" / "triton_compile_check.py"


@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_kernel_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU branches of the kernels
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled here, not taken from an earlier run's cache
    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, str(CHECK), "--arch", str(arch), "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stdout + run.stderr
    results = json.loads(out.read_text())["results"]
    errors = [r for r in results if "error" in r]
    assert not errors, errors
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_accumulate_kernel", "_adam_kernel", "_sgd_kernel", "_lion_kernel",
                       "_linear_weight_grad_kernel", "_embedding_weight_grad_kernel", "_write_words"}, kernels
    # The fp32 fold reads and writes 16 bytes per access where the blocks are aligned.
    fp32_folds = [r for r in results if r["variant"].startswith("accumulate arena=torch.float32 grad=torch.float32")]
    assert fp32_folds and all(r["vector_16B"] for r in fp32_folds), fp32_folds
    if arch == 90:
        # The machines this runs on: no spills, no stack frame. (triton 3.6 gives the fp32
        # linear_weight_grad an 8-byte stack frame on sm_80; 3.8 does not.)
        spilled = [r for r in results if r["local_bytes"] > 0]
        assert not spilled, spilled
