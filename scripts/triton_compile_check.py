"""Compiles every Triton kernel variant fusedaccum launches for a GPU, on a machine without one.

    python scripts/triton_compile_check.py [--arch 90] [--json OUT]

The launchers in fusedaccum.triton_kernels are called with CPU tensors of every dtype and flag
combination the ops use; Triton's own JIT specializes each launch (argument types, 16-byte
alignment) as it would on the GPU, and compiles it for sm_<arch> down to a cubin with the ptxas
that triton ships, without launching: a stand-in driver answers the three questions the JIT
asks (device, stream, target). (tests/test_build.py uses kernel_resources() too.) Prints one line per variant (registers, spills, whether the PTX
has 16-byte vector accesses) and exits non-zero when a variant does not compile or spills.
Run without TRITON_INTERPRET (tests/test_triton_compile.py runs it in a subprocess), so that
the kernels take their GPU branches (block sizes, bf16 on the tensor cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import shutil
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class TargetOnlyDriver:
    """What JITFunction.run asks of the active driver before it compiles; nothing launches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, or the one triton ships; None when neither is here."""
    for found in (shutil.which("cuobjdump"), Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",
                  Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"):
        if found and Path(found).exists():
            return str(found)
    return None


def kernel_resources(path: str) -> list[dict]:
    """Each kernel of a cubin, or of a library with CUDA code in it: its name, registers and
    local memory (spilled registers and stack frames), as `cuobjdump --dump-resource-usage` reads them."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return [{"name": name, "registers": int(reg), "local_bytes": int(stack) + int(local)}
            for name, reg, stack, local in re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)]


def variants():
    """(name, launcher, args): every dtype and flag combination the ops launch with."""
    from fusedaccum.triton_kernels import accumulate as acc_k
    from fusedaccum.triton_kernels import adam_step as adam_k
    from fusedaccum.triton_kernels import embedding_weight_grad as emb_k
    from fusedaccum.triton_kernels import linear_weight_grad as lin_k
    from fusedaccum.triton_kernels import lion_step as lion_k
    from fusedaccum.triton_kernels import sgd_step as sgd_k

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    n = 4096
    one = lambda: torch.ones((), dtype=f32)  # noqa: E731  step / factor / found_inf / sumsq

    for arena_dtype, grad_dtypes in ((f32, (f32, bf16, f16)), (bf16, (bf16,)), (f16, (f16,))):
        for g in grad_dtypes:
            for first in (True, False):
                for stats in (False, True):
                    arena = torch.zeros(n, dtype=arena_dtype)
                    yield (f"accumulate arena={arena_dtype} grad={g} first={first} stats={stats}", acc_k.accumulate,
                           (arena, [torch.ones(n, dtype=g)], [0], 0.25, first,
                            one() if stats else None, one() if stats else None))
    odd = torch.zeros(n + 1)[1:]  # an arena view at an odd address: the no-vector variant
    yield "accumulate arena at an odd address", acc_k.accumulate, (odd, [torch.ones(n)], [0], 1.0, False, one(), one())
    # Under CUDA-graph capture the pointer table is written by a kernel that carries its words.
    yield "pointer table written under capture", acc_k.table_on_device, (list(range(20)), torch.device("cpu"), True)

    # Steps: fp32 parameters; fp32 master with a bf16 copy; bf16 parameters with an int16 remainder.
    weights = {"fp32": (f32, None), "master+bf16 copy": (f32, bf16), "bf16+remainder": (bf16, torch.int16)}
    for label, (p_dtype, copy_dtype) in weights.items():
        def w():
            return torch.zeros(n, dtype=p_dtype), (None if copy_dtype is None else torch.zeros(n, dtype=copy_dtype))
        for amsgrad, decoupled, wd, maximize, inf in ((False, True, 0.01, False, True), (True, False, 0.0, True, False)):
            p, c = w()
            yield (f"adam_step {label} amsgrad={amsgrad} decoupled={decoupled} wd={wd} maximize={maximize}",
                   adam_k.adam_step,
                   (p, torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n) if amsgrad else None, c, one(),
                    one(), one() if inf else None, 1e-3, 0.9, 0.999, 1e-8, wd, decoupled, maximize))
        for momentum, nesterov, wd in ((0.0, False, 0.0), (0.9, True, 0.01)):
            p, c = w()
            yield (f"sgd_step {label} momentum={momentum} nesterov={nesterov} wd={wd}", sgd_k.sgd_step,
                   (p, torch.ones(n), torch.zeros(n), c, one(), one(), one(), 0.1, momentum, 0.0, wd, nesterov, False))
        p, c = w()
        yield (f"lion_step {label}", lion_k.lion_step,
               (p, torch.ones(n), torch.zeros(n), c, one(), one(), 1e-4, 0.9, 0.99, 0.1, False))

    rows, out_f, in_f = 64, 96, 80
    for dtype in (f32, bf16, f16):
        for first in (True, False):
            yield (f"linear_weight_grad {dtype} first={first}", lin_k.linear_weight_grad,
                   (torch.zeros(out_f * in_f), 0, torch.ones(rows, out_f, dtype=dtype), torch.ones(rows, in_f, dtype=dtype),
                    0.25, first))
    idx = torch.tensor([3, 1, 3, 7, 0, 1])
    for dtype in (f32, bf16):
        for freq in (False, True):
            yield (f"embedding_weight_grad {dtype} scale_grad_by_freq={freq}", emb_k.embedding_weight_grad,
                   (torch.zeros(10 * 64), 0, idx, torch.ones(6, 64, dtype=dtype), 10, -1, freq, 1.0, False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")

    triton.runtime.driver.set_active(TargetOnlyDriver(a.arch))
    compiled = []
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    JITFunction.run = compile_only
    results, errors, spilled = [], 0, 0
    for name, launcher, args in variants():
        compiled.clear()
        try:
            launcher(*args)
        except Exception as e:  # a kernel that does not compile for the target
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            print(f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            errors += 1
            continue
        if not compiled:
            results.append({"variant": name, "error": "no kernel was launched"})
            print(f"FAIL  {name}: no kernel was launched")
            errors += 1
            continue
        for k in compiled:
            ptx = k.asm["ptx"]
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                (use,) = kernel_resources(f.name)
                del use["name"]
            r = {"variant": name, "kernel": k.name, **use,
                 "vector_16B": any(op in ptx for op in ("ld.global.v4", "st.global.v4", "ld.global.nc.v4"))}
            results.append(r)
            bad = use["local_bytes"] > 0  # spilled registers (or a stack frame) live in local memory
            spilled += bad
            print(f"{'FAIL' if bad else 'ok  '}  {name}: {k.name} {use['registers']} registers, "
                  f"{use['local_bytes']} bytes of local memory{', 16-byte vectors' if r['vector_16B'] else ''}")
    print(f"triton {triton.__version__}, sm_{a.arch}: {len(results) - errors} kernels compiled ({spilled} of them "
          f"with local memory), {errors} variants failed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": a.arch, "results": results}, f, indent=1)
    return 1 if errors or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
