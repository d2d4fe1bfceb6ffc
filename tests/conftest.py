"""Test setup: every test that takes `backend` and `device` runs on every backend that can run
on that device here. Without a GPU, Triton runs on CPU tensors through its interpreter, which
must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

