"""Test setup: every test that takes `backend` and `device` runs on every backend that can run
on that device here. Without a GPU, Triton runs on CPU tensors through its interpreter, which
must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _version(module) -> tuple[int, int]:
    return tuple(int(x) for x in module.__version__.split(".")[:2])


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import numpy
        import triton
    except ImportError:
        pass
    else:
        # triton < 3.7's interpreter hands a kernel's integer argument to range() as int() of a
        # 1-element array, which numpy >= 2.3 refuses: every Triton kernel with a loop would fail
        # with "only 0-dimensional arrays can be converted to Python scalars".
        if _version(triton) < (3, 7) and _version(numpy) >= (2, 3):
            raise pytest.UsageError(
                f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, how the Triton kernels run on "
                f"CPU) does not work with numpy {numpy.__version__}: install numpy<2.3, or triton>=3.7"
            )

import fusedaccum as fa  # noqa: E402
from fusedaccum import dispatch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAIRS = [(d, b) for d in DEVICES for b in dispatch.BACKENDS if dispatch.runs_on(b, d)]


def pytest_report_header(config):
    return f"fusedaccum backends: {fa.backends()}; device/backend pairs under test: {PAIRS}"


@pytest.fixture(params=PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def device_backend(request):
    device, backend = request.param
    fa.set_backend(backend)
    yield torch.device(device), backend
    fa.set_backend(None)


@pytest.fixture(autouse=True)
def _default_backend():
    yield
    fa.set_backend(None)


@pytest.fixture(params=["compiled", "python"])
def probe(request, monkeypatch):
    """FusedOptimizer._reconcile's per-parameter checks through csrc/reconcile.cpp, or through
    their Python reference (what runs where the extension did not load)."""
    from fusedaccum import optim

    if request.param == "python":
        monkeypatch.setattr(optim, "_native_probe", None)
    elif optim._native_probe is None:
        pytest.skip("the compiled extension did not load")
    return request.param
