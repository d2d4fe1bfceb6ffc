"""The pure PyTorch kernels: the "torch" backend, the oracle of the tests and the fallback.

Written op by op from torch.optim's single-tensor formulas, in fp32 (step constants in
float64 as torch.optim's Python floats), without host syncs: step, factor and found_inf stay
on the device and skipping is a torch.where, so this backend is also capturable. It is
meant to be obviously right, not fast.
"""
from __future__ import annotations

import torch


def add_sum_of_squares(x, sumsq, found_inf) -> None:
    """sumsq += sum(x^2) (in float64); found_inf = 1 if any x is not finite."""
    total = x.double().square().sum()
    if sumsq is not None:
        sumsq += total.float()
    if found_inf is not None:
        # A double sum of squares of finite floats cannot overflow: non-finite means a NaN/inf.
        found_inf.copy_(torch.where(total.isfinite(), found_inf, torch.ones_like(found_inf)))


def accumulate(arena, grads, offsets, scale, first, sumsq, found_inf) -> None:
    written = []
    for g, off in zip(grads, offsets):
        dst = arena[off : off + g.numel()]
        new = g.reshape(-1).float() * scale
        if not first:
            new = dst.float() + new
        dst.copy_(new)
        written.append(dst)
    if (sumsq is not None or found_inf is not None) and written:
        add_sum_of_squares(torch.cat(written), sumsq, found_inf)



def linear_weight_grad(arena, offset, grad_output, input, scale, first) -> None:
    """W = (first ? 0 : W) + scale * grad_output^T @ input, through an fp32 GEMM (addmm: beta = 0
    ignores what W held, NaNs included)."""
    out_features, in_features = grad_output.shape[1], input.shape[1]
    dst = arena[offset : offset + out_features * in_features].view(out_features, in_features)
    acc = dst if dst.dtype == torch.float32 else dst.float()
    torch.addmm(acc, grad_output.t().float(), input.float(), beta=0 if first else 1, alpha=scale, out=acc)
    if acc is not dst:
        dst.copy_(acc)


def embedding_weight_grad(arena, offset, indices, grad_output, num_weights, padding_idx, scale_grad_by_freq, scale, first) -> None:
    """Rows only: the touched rows' fp32 sums, added once each (zeroing the table first when first).
    torch.unique sizes its output from the data: a host sync on a GPU, unlike the other references."""
    dim = grad_output.shape[1]
    dst = arena[offset : offset + num_weights * dim].view(num_weights, dim)
    if first:
        dst.zero_()
    if indices.numel() == 0 or dim == 0:
        return
    rows, inverse, counts = torch.unique(indices.long(), return_inverse=True, return_counts=True)
    # index_add_ adds in row order on a CPU (deterministic); on a GPU it uses atomics.
    sums = torch.zeros(rows.numel(), dim, dtype=torch.float32, device=dst.device)
    sums.index_add_(0, inverse, grad_output.float())
    if scale_grad_by_freq:
        sums /= counts.unsqueeze(1).float()
    keep = rows != padding_idx
    rows, sums = rows[keep], sums[keep]
    dst[rows] = (dst[rows].float() + sums * scale).to(dst.dtype)

def merge_remainder(hi: torch.Tensor, rem: torch.Tensor) -> torch.Tensor:
    """The fp32 master that a bf16 tensor and its int16 remainder are (csrc/elementwise.h).

    bits = (hi << 16) + rem, the remainder sign-extended: a negative one takes the one back
    that rounding added to the high half."""
    bits = ((hi.view(torch.int16).to(torch.int64) & 0xFFFF) << 16) + rem.to(torch.int64)
    bits = bits & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def split_remainder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16, int16 remainder) of fp32 x: the high half rounded half up in magnitude, the low
    16 bits as they are; a NaN stays a NaN (csrc/elementwise.h split_remainder)."""
    u = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = u & 0xFFFF
    hi = torch.where(x.isnan(), (u >> 16) | 0x0040, (u >> 16) + ((u >> 15) & 1)) & 0xFFFF

    def to_int16(v):
        return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)

    return to_int16(hi).view(torch.bfloat16), to_int16(low)


def _master(param, param_copy):
    """The fp32 value the step updates: the parameter, or the master a bf16 parameter and its
    int16 remainder are together (master_weights="remainder")."""
    if param_copy is not None and param_copy.dtype == torch.int16:
        return merge_remainder(param, param_copy)
    return param.float()


def _weight_writes(param, param_copy, p) -> list:
    """Where the new fp32 value goes: the parameter (and its low-precision copy), or the bf16
    parameter and its remainder."""
    if param_copy is not None and param_copy.dtype == torch.int16:
        hi, rem = split_remainder(p)
        return [(param, hi), (param_copy, rem)]
    return [(param, p)] + ([(param_copy, p)] if param_copy is not None else [])


def _write_unless(skip, pairs) -> None:
    """dst.copy_(new) for each pair, or leave every dst untouched when skip is set."""
    for dst, new in pairs:
        if skip is None:
            dst.copy_(new)
        else:
            dst.copy_(torch.where(skip != 0, dst, new.to(dst.dtype)))


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, step, factor, found_inf,
              lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize) -> None:
    p = _master(param, param_copy)
    g = grad.float() * factor
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    step64 = step.double()
    step_size = (lr / (1 - beta1**step64)).float()
    bias_correction2_sqrt = (1 - beta2**step64).sqrt().float()
    writes = [(exp_avg, m), (exp_avg_sq, v)]
    if max_exp_avg_sq is not None:
        v = torch.maximum(max_exp_avg_sq.float(), v)
        writes.append((max_exp_avg_sq, v))
    p = p - step_size * (m / (v.sqrt() / bias_correction2_sqrt + eps))
    _write_unless(found_inf, writes + _weight_writes(param, param_copy, p))


def sgd_step(param, grad, momentum_buffer, param_copy, step, factor, found_inf,
             lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
    p = _master(param, param_copy)
    g = grad.float() * factor
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    writes = []
    if momentum != 0:
        buf = torch.where(step <= 1, g, momentum_buffer.float() * momentum + (1 - dampening) * g)
        writes.append((momentum_buffer, buf))
        g = g + momentum * buf if nesterov else buf
    p = p - lr * g
    _write_unless(found_inf, writes + _weight_writes(param, param_copy, p))


def lion_step(param, grad, exp_avg, param_copy, factor, found_inf, lr, beta1, beta2, weight_decay, maximize) -> None:
    p = _master(param, param_copy)
    g = grad.float() * factor
    if maximize:
        g = -g
    m = exp_avg.float()
    update = torch.sign(beta1 * m + (1 - beta1) * g)
    p = p * (1 - lr * weight_decay) - lr * update
    m = beta2 * m + (1 - beta2) * g
    _write_unless(found_inf, [(exp_avg, m)] + _weight_writes(param, param_copy, p))
