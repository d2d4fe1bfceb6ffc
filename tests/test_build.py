import os

from fusedaccum import dispatch


def test_build_is_complete():
    """The build that scripts/test.sh made has the C++ kernels, and the CUDA ones if nvcc was there."""
    if os.environ.get("FUSEDACCUM_REQUIRE_EXTENSION") == "1":
        assert dispatch.extension_loaded(), "fusedaccum._C did not load"
    if os.environ.get("FUSEDACCUM_REQUIRE_CUDA_BUILD") == "1":
        assert dispatch.extension_has_cuda(), "the CUDA kernels were not compiled into fusedaccum._C"
