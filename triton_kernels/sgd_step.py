"""fusedaccum::sgd_step in Triton: one SGD update over a flat arena, in one pass.

The per-element math follows csrc/elementwise.h (sgd_element) operation by operation, in fp32
and without fma contraction. step, factor and found_inf stay on the device and are read inside
the kernel: no host sync. The first step (step <= 1, the count includes this step) starts the
momentum buffer as a copy of the gradient. When found_inf != 0 every load and store is masked
off: nothing is read or written. With an int16 param_copy the bf16 param and its remainder are
the fp32 master updated (see adam_step.py).
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
    splat,
    store_weight,
)

BLOCK = 1024  # elements per program: 4 per thread at 8 warps (see adam_step.py for why 4)
NUM_WARPS = 8


@triton.jit
def _sgd_update(param_ptr, grad_ptr, buf_ptr, copy_ptr, offs, mask, first_step, factor,
                lr, momentum, one_minus_dampening, weight_decay,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_COPY: tl.constexpr,
                REMAINDER: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr):
    # csrc/elementwise.h sgd_element, operation by operation.
    p = load_weight(param_ptr, copy_ptr, offs, mask, REMAINDER)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * factor
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.where(first_step, g, buf * momentum + one_minus_dampening * g)
        tl.store(buf_ptr + offs, round_to(buf, buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g

    store_weight(param_ptr, copy_ptr, offs, p, mask, HAS_COPY, REMAINDER)


@triton.jit
def _sgd_kernel(param_ptr, grad_ptr, buf_ptr, copy_ptr, step_ptr, factor_ptr, found_inf_ptr, n,
                lr, momentum, one_minus_dampening, weight_decay,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_COPY: tl.constexpr,
                REMAINDER: tl.constexpr, HAS_FOUND_INF: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
                BLOCK: tl.constexpr):
    pid, offs, keep = block_and_keep(found_inf_ptr, HAS_FOUND_INF, BLOCK)
    first_step = splat(step_ptr, BLOCK) <= 1.0  # the count includes this step
    factor = tl.load(factor_ptr)

    # Whole blocks go without the bounds mask, so that they keep vector accesses for any n.
    if pid * BLOCK + BLOCK <= n:
        _sgd_update(param_ptr, grad_ptr, buf_ptr, copy_ptr, offs, keep, first_step, factor,
                    lr, momentum, one_minus_dampening, weight_decay,
                    MOMENTUM, NESTEROV, HAS_COPY, REMAINDER, WEIGHT_DECAY, MAXIMIZE)
    else:
        _sgd_update(param_ptr, grad_ptr, buf_ptr, copy_ptr, offs, keep & (offs < n), first_step, factor,
                    lr, momentum, one_minus_dampening, weight_decay,
                    MOMENTUM, NESTEROV, HAS_COPY, REMAINDER, WEIGHT_DECAY, MAXIMIZE)


def sgd_step(param, grad, momentum_buffer, param_copy, step, factor, found_inf,
             lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
    n = param.numel()
    if n == 0:
        return
    use_momentum = momentum != 0
    # Absent optional tensors are never touched (constexpr flags); any pointer fills the slot.
    with device_guard(param):
        _sgd_kernel[(triton.cdiv(n, BLOCK),)](
            param, grad, momentum_buffer if use_momentum else param,
            param_copy if param_copy is not None else param,
            step, factor, found_inf if found_inf is not None else step, n,
            # fp32 constants rounded from double on the host, as sgd_constants does
            float(lr), float(momentum), 1.0 - dampening, float(weight_decay),
            MOMENTUM=use_momentum, NESTEROV=bool(nesterov), HAS_COPY=param_copy is not None,
            REMAINDER=param_copy is not None and param_copy.dtype == torch.int16,
            HAS_FOUND_INF=found_inf is not None, WEIGHT_DECAY=weight_decay != 0,
            MAXIMIZE=bool(maximize), BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
