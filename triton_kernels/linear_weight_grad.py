"""fusedaccum::linear_weight_grad in Triton: a Linear layer's weight gradient, straight into its
arena slice,

    W = arena[offset : offset + out * in].view(out, in)
    W = (first ? 0 : W) + scale * grad_output^T @ input

as one tiled GEMM over the reduction dim `rows`. A program owns one BLOCK_M x BLOCK_N tile of W
(pid_m over out, pid_n over in) and walks all of `rows`, so each element of W is written by
one program, once: the product accumulates in fp32 (tl.dot with an fp32 accumulator, whatever
the inputs' dtype), then old + scale * product is formed in fp32 and rounded once to the arena
dtype. With first the old W is never loaded (it may hold NaN: beta = 0 in addmm terms).

Both inputs are read in place through their strides (a transposed grad_output or input needs
no copy). fp32 inputs use input_precision="ieee": the default on a GPU is tf32, which would
round the inputs to 10-bit mantissas. 16-bit inputs go to the tensor cores as they are (their
products are exact in fp32).

No split over `rows`: each tile is one program's sequential reduction, so the result is
deterministic and rounded once; a small W with many rows leaves SMs idle, which is the price.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedaccum.triton_kernels._common import _INTERPRET, INTERPRET, LAUNCH_OPTIONS, device_guard, round_to

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by input dtype; fixed, no autotuning.
# 16-bit inputs run on the tensor cores with large tiles; fp32 "ieee" runs on the FMA units,
# where smaller tiles keep the registers and the shared memory (3 stages) in bounds. The
# interpreter computes each program with numpy: small tiles keep the test grid quick there
# (the kernel is the same; every edge is masked for any block size).
GPU_BLOCKS = {
    torch.float16: (128, 128, 32, 8, 3),
    torch.bfloat16: (128, 128, 32, 8, 3),
    torch.float32: (64, 64, 32, 4, 3),
}
INTERPRET_BLOCKS = (32, 32, 32, 4, 1)  # tl.dot needs every block dim >= 16


@triton.jit
def _dot_operand(t):
    """A loaded tile as tl.dot takes it. The interpreter (triton 3.8) holds bf16 as raw uint16
    bits and its tl.dot multiplies those bits as integers: there the tile goes as fp32 (exact,
    and the products are exact in fp32 either way). On the GPU bf16 stays bf16."""
    if _INTERPRET and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _linear_weight_grad_kernel(w_ptr, dy_ptr, x_ptr, rows, out_features, in_features,
                               stride_dy_r, stride_dy_c, stride_x_r, stride_x_c, scale,
                               FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    # int64 indices: a strided operand (column-major grad_output: stride rows) or W itself may
    # pass 2**31 elements.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < out_features
    mask_n = offs_n < in_features
    k = tl.arange(0, BLOCK_K).to(tl.int64)

    # A = grad_output^T tile [BLOCK_M, BLOCK_K]: element (m, r) is grad_output[r, m]. The row
    # offsets are recomputed per step in int64 rather than advanced by BLOCK_K * stride, which
    # Triton would form in int32 for a stride argument that fits int32.
    a_cols = dy_ptr + offs_m[:, None] * stride_dy_c
    b_cols = x_ptr + offs_n[None, :] * stride_x_c
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, rows, BLOCK_K):
        r = k0 + k
        mask_k = r < rows
        # Masked lanes load 0: they add nothing to the product.
        a = tl.load(a_cols + r[None, :] * stride_dy_r, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + r[:, None] * stride_x_r, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(_dot_operand(a), _dot_operand(b), acc, input_precision="ieee")

    w_ptrs = w_ptr + offs_m[:, None] * in_features + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if FIRST:
        new = scale * acc
    else:
        new = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * acc
    tl.store(w_ptrs, round_to(new, w_ptr.dtype.element_ty), mask=mask)


def linear_weight_grad(arena, offset, grad_output, input, scale, first) -> None:
    rows, out_features = grad_output.shape
    in_features = input.shape[1]
    n = out_features * in_features
    if n == 0:
        return
    w = arena[offset : offset + n]
    with device_guard(arena):
        if rows == 0:
            # An empty product: first leaves zeros, otherwise W stays as it is.
            if first:
                w.zero_()
            return
        block_m, block_n, block_k, num_warps, num_stages = (
            INTERPRET_BLOCKS if INTERPRET else GPU_BLOCKS[grad_output.dtype])
        grid = (triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
        _linear_weight_grad_kernel[grid](
            w, grad_output, input, rows, out_features, in_features,
            grad_output.stride(0), grad_output.stride(1), input.stride(0), input.stride(1), float(scale),
            FIRST=bool(first), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages, **LAUNCH_OPTIONS,
        )
