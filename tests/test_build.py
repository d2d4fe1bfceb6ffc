import os

from fusedaccum import dispatch


def test_build_is_complete():
    """The build that scripts/test.sh made has the C++ kernels, and the CUDA ones if nvcc was there."""
    if os.environ.get("FUSEDACCUM_REQUIRE_EXTENSION") == "1":
        assert dispatch.extension_loaded(), "fusedaccum._C did not load"
    if os.environ.get("FUSEDACCUM_REQUIRE_CUDA_BUILD") == "1":
        assert dispatch.extension_has_cuda(), "the CUDA kernels were not compiled into fusedaccum._C"


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the one triton ships; None when neither is here."""
    import shutil
    from pathlib import Path

    found = shutil.which("cuobjdump") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump")
    if found and Path(found).exists():
        return str(found)
    try:
        import triton
    except ImportError:
        return None
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else None


def test_cuda_kernels_use_no_local_memory():
    """Every CUDA kernel compiled into fusedaccum._C keeps its values in registers: no spills and
    no stack frame (local memory is DRAM traffic the byte floors do not count)."""
    import re
    import subprocess

    import pytest

    import fusedaccum._C as ext

    if not dispatch.extension_has_cuda():
        pytest.skip("fusedaccum._C was built without its CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the kernels' resource usage")
    out = subprocess.run([tool, "--dump-resource-usage", ext.__file__], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert kernels, out[:2000]
    using_local = [(name, int(stack), int(local)) for name, _, stack, local in kernels if int(stack) or int(local)]
    assert not using_local, using_local
