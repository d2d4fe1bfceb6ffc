"""fusedaccum::adam_step in Triton: one Adam/AdamW update over a flat arena, in one pass.

The per-element math follows csrc/elementwise.h (adam_element) operation by operation, in
fp32, with IEEE division and square root (tl.div_rn, tl.sqrt_rn: Triton's `/` and tl.sqrt are
the approximate PTX forms) and no fma contraction, so results agree with the reference to
fp32 rounding (see _adam_update for the one known difference, the lerp).

step, factor and found_inf stay on the device and are read inside the kernel: no host sync.
The bias corrections are computed from the loaded step in fp64, as adam_constants does:
beta**step as exp(step * log(beta)) with log(beta) taken on the host (libdevice pow does not
run under the interpreter; this form runs on both). It is within ~1e-13 relative of pow for
steps up to 1e6, far below fp32 rounding: the fp32 step_size and sqrt(1 - beta2**step) came
out identical to pow's for all ~72k (beta, step) pairs tried. lr and log(beta) reach the
kernel as fp64 bits (Triton passes Python floats as fp32). When found_inf != 0 every load and store is masked off: nothing is
read or written. With an int16 param_copy (master_weights="remainder") the value updated is the
fp32 master that the bf16 param and its remainder are together (_common.load_weight / store_weight).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedaccum.triton_kernels._common import (
    LAUNCH_OPTIONS,
    block_and_keep,
    device_guard,
    f64_bits,
    from_bits,
    load_weight,
    round_to,
    store_weight,
)

BLOCK = 1024  # elements per program: 4 per thread at 8 warps (see NUM_WARPS)
# 4 elements per thread is one 128-bit access for fp32 and keeps every tensor in one register
# layout: with more, a bf16 tensor (grad, param_copy) gets 8 per thread and fp32 ones 4, and
# Triton converts between the two through shared memory.
NUM_WARPS = 8


@triton.jit
def _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, copy_ptr,
                 offs, mask, factor, step_size, bias_correction2_sqrt,
                 beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor,
                 AMSGRAD: tl.constexpr, HAS_COPY: tl.constexpr, REMAINDER: tl.constexpr,
                 WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    # csrc/elementwise.h adam_element, operation by operation.
    p = load_weight(param_ptr, copy_ptr, offs, mask, REMAINDER)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * factor
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay_factor
        else:
            g = g + weight_decay * p
    # torch: exp_avg.lerp_(grad, 1 - beta1). torch's lerp is an fma, elementwise.h's is not; we
    # follow elementwise.h (bit-identical to the C++ kernels, within one rounding of torch).
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + one_minus_beta2 * g * g
    denom_v = v
    if AMSGRAD:
        # NaN-propagating max, as torch.maximum.
        vmax = tl.load(max_exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom_v = vmax
    denom = tl.div_rn(tl.sqrt_rn(denom_v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(exp_avg_ptr + offs, round_to(m, exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offs, round_to(v, exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(max_exp_avg_sq_ptr + offs, round_to(vmax, max_exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    store_weight(param_ptr, copy_ptr, offs, p, mask, HAS_COPY, REMAINDER)


# The fp64 bits are arbitrary integers: no divisibility specialization (it would only
# multiply compiled variants as lr changes).
@triton.jit(do_not_specialize=["lr_bits", "log_beta1_bits", "log_beta2_bits"])
def _adam_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, copy_ptr,
                 step_ptr, factor_ptr, found_inf_ptr, n,
                 beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor,
                 lr_bits, log_beta1_bits, log_beta2_bits,
                 AMSGRAD: tl.constexpr, HAS_COPY: tl.constexpr, REMAINDER: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid, offs, keep = block_and_keep(found_inf_ptr, HAS_FOUND_INF, BLOCK)

    # Step-wide constants, fp64 like torch.optim's Python floats, rounded once to fp32.
    # (fp64 `/` and tl.sqrt are IEEE, div.rn.f64 / sqrt.rn.f64; the _rn forms are fp32 only.)
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * from_bits(log_beta1_bits))
    step_size = (from_bits(lr_bits) / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * from_bits(log_beta2_bits))).to(tl.float32)
    factor = tl.load(factor_ptr)

    # Whole blocks go without the bounds mask: `offs < n` is only known uniform per vector when
    # n is a multiple of 16, so with it any other n would cost every block its vector accesses.
    if pid * BLOCK + BLOCK <= n:
        _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, copy_ptr,
                     offs, keep, factor, step_size, bias_correction2_sqrt,
                     beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor,
                     AMSGRAD, HAS_COPY, REMAINDER, WEIGHT_DECAY, DECOUPLED, MAXIMIZE)
    else:
        _adam_update(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, copy_ptr,
                     offs, keep & (offs < n), factor, step_size, bias_correction2_sqrt,
                     beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor,
                     AMSGRAD, HAS_COPY, REMAINDER, WEIGHT_DECAY, DECOUPLED, MAXIMIZE)


def _log(beta: float) -> float:
    # log(0) = -inf gives beta**step = exp(-inf) = 0, as pow does for step > 0.
    return math.log(beta) if beta > 0 else (float("-inf") if beta == 0 else float("nan"))


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, step, factor, found_inf,
              lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize) -> None:
    n = param.numel()
    if n == 0:
        return
    # Absent optional tensors are never touched (constexpr flags); any pointer fills the slot.
    with device_guard(param):
        _adam_kernel[(triton.cdiv(n, BLOCK),)](
            param, grad, exp_avg, exp_avg_sq,
            max_exp_avg_sq if max_exp_avg_sq is not None else param,
            param_copy if param_copy is not None else param,
            step, factor, found_inf if found_inf is not None else step, n,
            # fp32 constants rounded from double on the host, as adam_constants does
            float(beta2), 1.0 - beta1, 1.0 - beta2, float(eps), float(weight_decay), 1.0 - lr * weight_decay,
            f64_bits(lr), f64_bits(_log(beta1)), f64_bits(_log(beta2)),
            AMSGRAD=max_exp_avg_sq is not None, HAS_COPY=param_copy is not None,
            REMAINDER=param_copy is not None and param_copy.dtype == torch.int16,
            HAS_FOUND_INF=found_inf is not None, WEIGHT_DECAY=weight_decay != 0,
            DECOUPLED=bool(decoupled_weight_decay), MAXIMIZE=bool(maximize),
            BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
        )
