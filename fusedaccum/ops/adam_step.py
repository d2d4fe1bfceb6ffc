"""fusedaccum::adam_step: one Adam/AdamW update over a flat arena, in one pass.

Reads the accumulated gradient times `factor` (1/N or 1/items, times the inverse loss scale,
times the clip coefficient, all computed on the device), updates the parameter and its
state as torch.optim.Adam/AdamW do (amsgrad when `max_exp_avg_sq` is given, decoupled decay
for AdamW) and, when the parameter is an fp32 master, writes its bf16/fp16 `param_copy` in the
same pass. `step` already counts this step. If `found_inf` is nonzero nothing is written.

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
    """Checks shared by every optimizer step op."""
    check_flat(param, "the parameter arena")
    check_flat(grad, "the gradient arena", like=param)
    for what, t in state.items():
        if t is not None:
            check_flat(t, what, like=param)
            expect(t.dtype == param.dtype, f"{what} is {t.dtype}; optimizer state has the parameter's dtype {param.dtype}")
    if param_copy is not None:
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
