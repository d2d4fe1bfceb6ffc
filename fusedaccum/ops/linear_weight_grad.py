"""fusedaccum::linear_weight_grad: a Linear layer's weight gradient, written into its arena slice.

    W = arena[offset : offset + out * in].view(out, in)
    W = (first ? 0 : W) + scale * grad_output^T @ input

with grad_output [rows, out] and input [rows, in] (a batch x sequence input flattened to rows).
The product accumulates in fp32 whatever the inputs' dtype (bf16 and fp16 inputs are not
rounded to their own dtype first, as torch's weight gradient is) and is rounded once to the
arena dtype. This is the GEMM of Megatron-LM's gradient_accumulation_fusion: beta = 1 into the
fp32 gradient buffer, beta = 0 on the window's first contribution, so nothing is zeroed and no
weight gradient tensor exists. fa.Linear's backward calls it (fusedaccum/modules.py).

Kernels: reference.linear_weight_grad, csrc/cpu/linear_weight_grad.cpp,
csrc/cuda/linear_weight_grad.cu, triton_kernels/linear_weight_grad.py.
"""
from __future__ import annotations

import torch

from fusedaccum.ops import check_flat, check_float_dtype, define, expect

SCHEMA = "linear_weight_grad(Tensor(a!) arena, int offset, Tensor grad_output, Tensor input, float scale, bool first) -> ()"


def check(arena, offset, grad_output, input, scale, first) -> None:
    check_flat(arena, "the arena")
    for t, what in ((grad_output, "grad_output"), (input, "input")):
        expect(t.layout == torch.strided, f"{what} is {t.layout}; fusedaccum needs dense tensors")
        expect(t.dim() == 2, f"{what} must be 2-D (rows x features); got shape {tuple(t.shape)}")
        check_float_dtype(t, what)
        expect(t.device == arena.device, f"{what} is on {t.device} but the arena is on {arena.device}")
    expect(grad_output.dtype == input.dtype,
           f"grad_output is {grad_output.dtype} but input is {input.dtype}; pass both in one dtype")
    expect(grad_output.shape[0] == input.shape[0],
           f"grad_output has {grad_output.shape[0]} rows but input has {input.shape[0]}")
    n = grad_output.shape[1] * input.shape[1]
    expect(0 <= offset and offset + n <= arena.numel(),
           f"a {grad_output.shape[1]} x {input.shape[1]} weight at offset {offset} does not fit in an arena of "
           f"{arena.numel()}")


KERNELS = define(SCHEMA, check)
