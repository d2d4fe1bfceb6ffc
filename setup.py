"""Builds fusedaccum._C against the torch that is installed (pip install --no-build-isolation .).

The C++ CPU kernels always build. The CUDA kernels build too when this torch has CUDA and
nvcc is found; no GPU is needed (TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0). Set
FUSEDACCUM_NO_CUDA=1 to skip them. MAX_JOBS is honoured by torch's ninja build.
"""
import glob
import importlib.util
import os

import torch
from setuptools import setup

# torch finds the toolkit through `which nvcc`, which can be a wrapper script outside the
# toolkit (/usr/local/bin/nvcc here); the conventional install location is a better guess.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_wanted() -> bool:
    if os.environ.get("FUSEDACCUM_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def wheel_cuda_headers() -> list[str]:
    # A bare CUDA toolkit can lack headers that torch's own headers include (cusparse.h via
    # ATen/cuda/CUDAContext.h); the CUDA wheels that torch depends on ship them. They go after
    # the toolkit's own include folder so they only fill gaps.
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    folders = [os.path.join(p, "cu13", "include") for p in spec.submodule_search_locations]
    return [f"-idirafter{f}" for f in folders if os.path.isdir(f)]


sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: at::parallel_for is a header template that is parallel only where _OPENMP is
# defined (without it the CPU kernels ran on one thread); the GOMP symbols resolve to the
# libgomp that torch loads. It also turns on the `omp simd` loops.
# -fno-math-errno: sqrtf may not set errno, so loops with a square root vectorize.
# -ffp-contract=off: no fused multiply-adds, the roundings of elementwise.h as written.
# -g0: Python's own flags ask for debug info, which was 30 % of each file's compile time.
cxx_flags = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
if cuda_wanted():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extra = wheel_cuda_headers()
    extension = CUDAExtension(
        "fusedaccum._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={
            "cxx": cxx_flags + extra,
            # No FMA contraction and IEEE division/sqrt: the same roundings as the CPU kernels
            # and the reference (one shared elementwise.h). The kernels are memory-bound, so
            # exact arithmetic costs nothing measurable.
            "nvcc": ["-O3", "-lineinfo", "--fmad=false"] + [f"-Xcompiler={e}" for e in extra],
        },
    )
else:
    extension = CppExtension("fusedaccum._C", sources, extra_compile_args={"cxx": cxx_flags})

setup(
    packages=["fusedaccum", "fusedaccum.ops", "fusedaccum.bench", "fusedaccum.triton_kernels"],
    package_dir={"fusedaccum.triton_kernels": "triton_kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
