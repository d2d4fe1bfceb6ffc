"""Which kernel runs an op: the backend table behind every fusedaccum op.

Backends, fastest first: "cuda" (the compiled extension, CUDA tensors), "triton" (CUDA
tensors; CPU tensors only under TRITON_INTERPRET=1, which is how CI runs it), "cpp" (the
compiled extension, CPU tensors) and "torch" (the pure PyTorch reference, anywhere).

The default per device is the fastest available one. `set_backend(name)` or the
FUSEDACCUM_BACKEND environment variable forces one for every device; forcing a backend
where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")
_forced: str | None = None


@functools.cache
def extension_loaded() -> bool:
    try:
        from fusedaccum import _C  # (loading it registers the fusedaccum_C ops)
    except ImportError:
        return False
    _C._set_forced_backend(_forced or "")
    return True


@functools.cache
def extension_has_cuda() -> bool:
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fusedaccum_C::accumulate", "CUDA"
    )


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_available() -> bool:
    # torch.cuda.is_available() asks the driver each time (4 us here): once per process is
    # enough, and set_backend (which the benchmark calls around timed calls) asks it 8 times.
    return torch.cuda.is_available()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(backend: str, device_type: str) -> bool:
    """True when `backend` can run ops on tensors of `device_type` on this machine."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu" and extension_loaded()
    if backend == "cuda":
        return device_type == "cuda" and extension_has_cuda() and cuda_available()
    if backend == "triton":
        if not triton_installed():
            return False
        if device_type == "cuda":
            return cuda_available() and not triton_interpreted()
        return device_type == "cpu" and triton_interpreted()
    return False


def _device_types() -> list[str]:
    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def available() -> list[str]:
    return [b for b in BACKENDS if any(runs_on(b, d) for d in _device_types())]


def default_for(device_type: str) -> str:
    # Triton on CPU is an interpreter: correct, but far slower than the C++ kernels.
    order = ("cpp", "torch") if device_type == "cpu" else ("cuda", "triton", "torch")
    return next(b for b in order if runs_on(b, device_type))


def backends() -> dict:
    """{"available": [...], "default": {"cpu": ..., "cuda": ...}, "forced": name or None}."""
    return {
        "available": available(),
        "default": {d: default_for(d) for d in _device_types()},
        "forced": forced(),
    }


def _check_name(name: str, source: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown fusedaccum backend {name!r} (from {source}); choose one of {list(BACKENDS)}")
    if name not in available():
        hint = {
            "cpp": "the compiled extension fusedaccum._C did not load; reinstall with "
            "`pip install --no-build-isolation .` after torch",
            "cuda": "it needs a CUDA GPU and an extension built with CUDA (torch with CUDA and nvcc at build time)",
            "triton": "it needs triton and a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is imported) for CPU tensors",
        }[name]
        raise RuntimeError(f"fusedaccum backend {name!r} (from {source}) cannot run on this machine: {hint}")


def set_backend(name: str | None) -> None:
    """Force one backend for every op (None restores the per-device defaults)."""
    global _forced
    if name is not None:
        _check_name(name, "set_backend")
    _forced = name
    if extension_loaded():
        from fusedaccum import _C

        _C._set_forced_backend(name or "")  # the public ops' compiled entry follows it


def forced() -> str | None:
    if _forced is not None:
        return _forced
    env = os.environ.get("FUSEDACCUM_BACKEND") or None
    if env is not None:
        _check_name(env, "FUSEDACCUM_BACKEND")
    return env


def backend_for(device: torch.device) -> str:
    name = forced()
    if name is None:
        return default_for(device.type)
    if not runs_on(name, device.type):
        raise RuntimeError(
            f"fusedaccum backend {name!r} is forced but cannot run on {device.type} tensors; "
            f"call fusedaccum.set_backend(None) (and unset FUSEDACCUM_BACKEND) to use the default, "
            f"or move the parameters to a device it supports"
        )
    return name
