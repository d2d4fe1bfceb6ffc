"""fusedaccum::lion_step: one Lion update over a flat arena, in one pass.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") on the accumulated
gradient times `factor`: c = beta1 * m + (1 - beta1) * g; p = p * (1 - lr * wd) - lr * sign(c);
m = beta2 * m + (1 - beta2) * g, with sign(0) = 0. Writes the bf16/fp16 `param_copy` of an fp32
master in the same pass (an int16 `param_copy` is the remainder that makes a bf16 parameter the
fp32 master). If `found_inf` is nonzero nothing is written.

Kernels: reference.lion_step, csrc/cpu/lion_step.cpp, csrc/cuda/lion_step.cu,
triton_kernels/lion_step.py.
"""
from __future__ import annotations

from fusedaccum.ops import define
from fusedaccum.ops.adam_step import check_step_args

SCHEMA = (
    "lion_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!)? param_copy, Tensor factor, "
    "Tensor? found_inf, float lr, float beta1, float beta2, float weight_decay, bool maximize) -> ()"
)


def check(param, grad, exp_avg, param_copy, factor, found_inf, lr, beta1, beta2, weight_decay, maximize) -> None:
    check_step_args(param, grad, {"exp_avg": exp_avg}, param_copy, None, factor, found_inf)  # Lion counts no steps


KERNELS = define(SCHEMA, check)
