"""The public ops, one file each: schema, argument checks, fake kernel and backend table.

Every op `fusedaccum::<name>` has four kernels with one signature:

    torch   fusedaccum/reference.py          <name>()
    cpp     csrc/cpu/<name>.cpp              (fusedaccum_C::<name>, CPU dispatch key)
    cuda    csrc/cuda/<name>.cu              (fusedaccum_C::<name>, CUDA dispatch key)
    triton  triton_kernels/<name>.py         <name>()

The op's CPU and CUDA implementations check the arguments once, then call the kernel of the
backend chosen by fusedaccum.dispatch.backend_for(device).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from fusedaccum import dispatch, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _extension_kernel(name: str) -> Callable:
    op = None

    def run(*args):
        nonlocal op
        if op is None:
            dispatch.extension_loaded()
            op = getattr(torch.ops.fusedaccum_C, name).default  # the overload itself: no resolution per call
        return op(*args)

    return run


def _triton_kernel(name: str) -> Callable:
    def run(*args):
        module = importlib.import_module(f"fusedaccum.triton_kernels.{name}")
        return getattr(module, name)(*args)

    return run


def define(schema: str, check: Callable) -> dict[str, Callable]:
    """Registers fusedaccum::<schema> and returns its backend table.

    The compiled kernels check every argument `check` does, so when the extension is loaded
    it registers the op's CPU (and CUDA) kernel itself (csrc/public_ops.cpp): the compiled
    kernel straight from the dispatcher when cpp/cuda is the backend (no Python on the way:
    a list of thousands of gradients costs more to walk in Python than to launch), else
    fusedaccum::_<name>_python below; `check` runs only to explain a refusal, as
    fusedaccum::_<name>_check. Without the extension every key runs `_run` below.
    """
    name = schema.split("(", 1)[0]
    qualname = f"fusedaccum::{name}"
    table = {
        "torch": getattr(reference, name),
        "cpp": _extension_kernel(name),
        "cuda": _extension_kernel(name),
        "triton": _triton_kernel(name),
    }
    torch.library.define(qualname, schema[len(name):])

    @torch.library.register_fake(qualname)
    def _fake(*args):
        check(*args)

    def _run(*args):
        check(*args)
        table[dispatch.backend_for(args[0].device)](*args)

    keys = ["CPU", "CUDA", "SparseCPU", "SparseCUDA"]  # the sparse keys only reach the checks
    if dispatch.extension_loaded():
        for suffix, kernel in (("python", _run), ("check", check)):
            torch.library.define(f"fusedaccum::_{name}_{suffix}", schema[len(name):])
            torch.library.impl(f"fusedaccum::_{name}_{suffix}", ["CPU", "CUDA"], kernel)
        keys = [k for k in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k)]
    torch.library.impl(qualname, keys, _run)
    return table


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_float_dtype(t: torch.Tensor, what: str) -> None:
    expect(t.dtype in DTYPES, f"{what} has dtype {t.dtype}; fusedaccum supports float32, bfloat16 and float16")


def check_flat(t: torch.Tensor, what: str, like: torch.Tensor | None = None, float_dtype: bool = True) -> None:
    expect(t.layout == torch.strided, f"{what} is {t.layout}; fusedaccum needs dense tensors")
    expect(t.dim() == 1 and t.is_contiguous(), f"{what} must be a flat contiguous 1-D tensor (an arena)")
    if float_dtype:
        check_float_dtype(t, what)
    if like is not None:
        expect(t.device == like.device, f"{what} is on {t.device} but the arena it goes with is on {like.device}")
        expect(t.numel() == like.numel(),
               f"{what} has {t.numel()} elements but must have {like.numel()}, as the arena it goes with")


def check_scalar(t: torch.Tensor | None, what: str, like: torch.Tensor) -> None:
    if t is None:
        return
    expect(t.numel() == 1 and t.dtype == torch.float32, f"{what} must be a one-element float32 tensor")
    expect(t.device == like.device, f"{what} is on {t.device} but the arena is on {like.device}")


from fusedaccum.ops import (  # noqa: E402,F401  (registers the ops)
    accumulate,
    adam_step,
    embedding_weight_grad,
    lion_step,
    linear_weight_grad,
    sgd_step,
)
