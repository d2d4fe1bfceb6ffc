"""fusedaccum::embedding_weight_grad: an Embedding's weight gradient, rows only, into its arena slice.

    W = arena[offset : offset + num_weights * dim].view(num_weights, dim)
    if first: W = 0
    W[u] += scale * sum(grad_output[r] for every row r with indices[r] == u) / (count(u) if scale_grad_by_freq)

for every index u that occurs, except padding_idx (-1: none). The sums are in fp32, in the
order of the rows (a stable sort by index, then one segment per index: deterministic), and
each touched row is rounded once to the arena dtype. Torch's dense backward instead allocates
and zeroes a num_weights x dim gradient on every micro-batch to scatter a few rows into it;
here the slice is zeroed once per window (on its first contribution) and each micro-batch
reads and writes only the rows it touched.

Kernels: reference.embedding_weight_grad, csrc/cpu/embedding_weight_grad.cpp,
csrc/cuda/embedding_weight_grad.cu, triton_kernels/embedding_weight_grad.py.
"""
from __future__ import annotations

import torch

from fusedaccum.ops import check_flat, check_float_dtype, define, expect

SCHEMA = (
    "embedding_weight_grad(Tensor(a!) arena, int offset, Tensor indices, Tensor grad_output, int num_weights, "
    "int padding_idx, bool scale_grad_by_freq, float scale, bool first) -> ()"
)


def check(arena, offset, indices, grad_output, num_weights, padding_idx, scale_grad_by_freq, scale, first) -> None:
    check_flat(arena, "the arena")
    expect(indices.layout == torch.strided and indices.dim() == 1 and indices.dtype in (torch.int32, torch.int64),
           f"indices must be a 1-D int32 or int64 tensor; got {indices.dtype} of shape {tuple(indices.shape)}")
    expect(grad_output.layout == torch.strided and grad_output.dim() == 2,
           f"grad_output must be a dense 2-D tensor (rows x dim); got shape {tuple(grad_output.shape)}")
    check_float_dtype(grad_output, "grad_output")
    for t, what in ((indices, "indices"), (grad_output, "grad_output")):
        expect(t.device == arena.device, f"{what} is on {t.device} but the arena is on {arena.device}")
    expect(indices.shape[0] == grad_output.shape[0],
           f"indices has {indices.shape[0]} entries but grad_output has {grad_output.shape[0]} rows")
    expect(num_weights >= 0, f"num_weights must be >= 0; got {num_weights}")
    expect(-1 <= padding_idx < max(num_weights, 1),
           f"padding_idx must be -1 (none) or a row of the table (0..{num_weights - 1}); got {padding_idx}")
    n = num_weights * grad_output.shape[1]
    expect(0 <= offset and offset + n <= arena.numel(),
           f"a {num_weights} x {grad_output.shape[1]} table at offset {offset} does not fit in an arena of {arena.numel()}")


KERNELS = define(SCHEMA, check)
