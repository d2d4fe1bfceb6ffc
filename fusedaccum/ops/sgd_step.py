"""fusedaccum::sgd_step: one SGD update over a flat arena, in one pass.

torch.optim.SGD semantics (momentum, dampening, nesterov, weight decay, maximize) on the
accumulated gradient times `factor`; the momentum buffer starts as a copy of the first
gradient, decided on the device from `step` (which already counts this step). Writes the
bf16/fp16 `param_copy` of an fp32 master in the same pass (an int16 `param_copy` is the remainder
that makes a bf16 parameter the fp32 master: master_weights="remainder"). If `found_inf` is nonzero nothing
is written.

Kernels: reference.sgd_step, csrc/cpu/sgd_step.cpp, csrc/cuda/sgd_step.cu,
triton_kernels/sgd_step.py.
"""
from __future__ import annotations

from fusedaccum.ops import define, expect
from fusedaccum.ops.adam_step import check_step_args

SCHEMA = (
    "sgd_step(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor(c!)? param_copy, "
    "Tensor step, Tensor factor, Tensor? found_inf, float lr, float momentum, float dampening, "
    "float weight_decay, bool nesterov, bool maximize) -> ()"
)


def check(param, grad, momentum_buffer, param_copy, step, factor, found_inf,
          lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
    check_step_args(param, grad, {"momentum_buffer": momentum_buffer}, param_copy, step, factor, found_inf)
    expect(momentum == 0 or momentum_buffer is not None, "sgd_step with momentum needs a momentum_buffer")


KERNELS = define(SCHEMA, check)
