"""fusedaccum::adam_step: one Adam/AdamW update over a flat arena, in one pass.

Reads the accumulated gradient times `factor` (1/N or 1/items, times the inverse loss scale,
times the clip coefficient, all computed on the device), updates the parameter and its
state as torch.optim.Adam/AdamW do (amsgrad when `max_exp_avg_sq` is given, decoupled decay
for AdamW) and, when the parameter is an fp32 master, writes its bf16/fp16 `param_copy` in the
same pass; with an int16 `param_copy` (the remainder of a bf16 parameter) it reads and writes
the fp32 master the two are together. `step` already counts this step. If `found_inf` is nonzero nothing is written.

Kernels: reference.adam_step, csrc/cpu/adam_step.cpp, csrc/cuda/adam_step.cu,
triton_kernels/adam_step.py.
"""
from __future__ import annotations

import torch

from fusedaccum.ops import check_flat, check_scalar, define, expect

SCHEMA = (
    "adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
    "Tensor(d!)? max_exp_avg_sq, Tensor(e!)? param_copy, Tensor step, Tensor factor, "
    "Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool maximize) -> ()"
)


def check_step_args(param, grad, state: dict, param_copy, step, factor, found_inf) -> None:
    """Checks shared by every optimizer step op.

    param_copy is the other half of master weights: the bf16/fp16 copy of an fp32 master
    `param`, or, as int16, the remainder of a bf16 `param` (master_weights="remainder": the two
    together are the fp32 master, and the optimizer state is fp32)."""
    check_flat(param, "the parameter arena")
    check_flat(grad, "the gradient arena", like=param)
    remainder = param_copy is not None and param_copy.dtype == torch.int16
    state_dtype = torch.float32 if remainder else param.dtype
    for what, t in state.items():
        if t is not None:
            check_flat(t, what, like=param)
            expect(t.dtype == state_dtype, f"{what} is {t.dtype}; optimizer state must be {state_dtype} here "
                                           f"(the parameter's dtype, or float32 with a remainder)")
    if remainder:
        check_flat(param_copy, "param_copy", like=param, float_dtype=False)
        expect(param.dtype == torch.bfloat16, "an int16 param_copy is the remainder of a bfloat16 parameter "
                                              "(master_weights='remainder')")
    elif param_copy is not None:
        check_flat(param_copy, "param_copy", like=param)
        expect(param.dtype == torch.float32 and param_copy.dtype != torch.float32,
               "param_copy is the bf16/fp16 copy of an fp32 master parameter")
    check_scalar(step, "step", param)
    check_scalar(factor, "factor", param)
    check_scalar(found_inf, "found_inf", param)


def check(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, step, factor, found_inf,
          lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize) -> None:
    state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}
    check_step_args(param, grad, state, param_copy, step, factor, found_inf)


KERNELS = define(SCHEMA, check)
