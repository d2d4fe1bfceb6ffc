import os

from fusedaccum import dispatch


def test_build_is_complete():
    """The build that scripts/test.sh made has the C++ kernels, and the CUDA ones if nvcc was there."""
    if os.environ.get("FUSEDACCUM_REQUIRE_EXTENSION") == "1":
        assert dispatch.extension_loaded(), "fusedaccum._C did not load"
    if os.environ.get("FUSEDACCUM_REQUIRE_CUDA_BUILD") == "1":
        assert dispatch.extension_has_cuda(), "the CUDA kernels were not compiled into fusedaccum._C"


def test_cuda_kernels_use_no_local_memory():
    """Every CUDA kernel compiled into fusedaccum._C keeps its values in registers: no spills and
    no stack frame (local memory is DRAM traffic the byte floors do not count)."""
    import importlib.util
    from pathlib import Path

    import pytest

    import fusedaccum._C as ext

    if not dispatch.extension_has_cuda():
        pytest.skip("fusedaccum._C was built without its CUDA kernels")
    pytest.importorskip("triton")
    path = Path(__file__).resolve().parent.parent / "scripts" / "triton_compile_check.py"
    spec = importlib.util.spec_from_file_location("triton_compile_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    if check.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the kernels' resource usage")
    kernels = check.kernel_resources(ext.__file__)
    assert kernels, "cuobjdump found no kernel in fusedaccum._C"
    using_local = [k for k in kernels if k["local_bytes"]]
    assert not using_local, using_local
