"""fusedaccum::lion_step in Triton: one Lion update over a flat arena, in one pass.

The per-element math follows csrc/elementwise.h (lion_element) operation by operation, in fp32
and without fma contraction. factor and found_inf stay on the device and are read inside the
kernel: no host sync. When found_inf != 0 every load and store is masked off. With an int16
param_copy the bf16 param and its remainder are the fp32 master updated (see adam_step.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedaccum.triton_kernels._common import (
    LAUNCH_OPTIONS,
    block_and_keep,
    device_guard,
    load_weight,
    round_to,
    store_weight,
)

BLOCK = 1024  # elements per program: 4 per thread at 8 warps (see adam_step.py for why 4)
NUM_WARPS = 8


@triton.jit
def _lion_update(param_ptr, grad_ptr, exp_avg_ptr, copy_ptr, offs, mask, factor,
                 lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay_factor,
                 HAS_COPY: tl.constexpr, REMAINDER: tl.constexpr, MAXIMIZE: tl.constexpr):
    # csrc/elementwise.h lion_element, operation by operation.
    p = load_weight(param_ptr, copy_ptr, offs, mask, REMAINDER)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * factor
    if MAXIMIZE:
        g = -g
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    interp = beta1 * m + one_minus_beta1 * g
    sign = (interp > 0.0).to(tl.float32) - (interp < 0.0).to(tl.float32)
    sign = tl.where(interp != interp, interp, sign)  # NaN stays NaN, as torch.sign
    p = p * decay_factor
    p = p + (-lr) * sign
    m = beta2 * m + one_minus_beta2 * g
    store_weight(param_ptr, copy_ptr, offs, p, mask, HAS_COPY, REMAINDER)
    tl.store(exp_avg_ptr + offs, round_to(m, exp_avg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lion_kernel(param_ptr, grad_ptr, exp_avg_ptr, copy_ptr, factor_ptr, found_inf_ptr, n,
                 lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay_factor,
                 HAS_COPY: tl.constexpr, REMAINDER: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid, offs, keep = block_and_keep(found_inf_ptr, HAS_FOUND_INF, BLOCK)
    factor = tl.load(factor_ptr)
    # Whole blocks go without the bounds mask, so that they keep vector accesses for any n.
    if pid * BLOCK + BLOCK <= n:
        _lion_update(param_ptr, grad_ptr, exp_avg_ptr, copy_ptr, offs, keep, factor,
                     lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay_factor,
                     HAS_COPY, REMAINDER, MAXIMIZE)
    else:
        _lion_update(param_ptr, grad_ptr, exp_avg_ptr, copy_ptr, offs, keep & (offs < n), factor,
                     lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay_factor,
                     HAS_COPY, REMAINDER, MAXIMIZE)


def lion_step(param, grad, exp_avg, param_copy, factor, found_inf, lr, beta1, beta2, weight_decay, maximize) -> None:
    n = param.numel()
    if n == 0:
        return
    # Absent optional tensors are never touched (constexpr flags); any pointer fills the slot.
    with device_guard(param):
        _lion_kernel[(triton.cdiv(n, BLOCK),)](
            param, grad, exp_avg, param_copy if param_copy is not None else param,
            factor, found_inf if found_inf is not None else factor, n,
            # fp32 constants rounded from double on the host, as lion_constants does
            float(lr), float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay,
            HAS_COPY=param_copy is not None, REMAINDER=param_copy is not None and param_copy.dtype == torch.int16,
            HAS_FOUND_INF=found_inf is not None, MAXIMIZE=bool(maximize),
            BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
