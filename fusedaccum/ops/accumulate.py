"""fusedaccum::accumulate: fold one micro-batch's gradients into a flat arena.

    arena[off_i : off_i + n_i] = (first ? 0 : arena[...]) + scale * grads[i].flatten()

for every gradient i, in one launch. Gradients may be fp32, bf16 or fp16 and need not be
contiguous or of the arena's dtype; the sum is computed in fp32 and rounded once to the arena
dtype. When `sumsq` is given, the sum of squares of the new arena values is added to it; when
`found_inf` is given, it is set to 1 if any new value is not finite. The accumulator asks for
both on the last micro-batch of a window, so clipping and skip-on-inf cost no extra pass.

Kernels: reference.accumulate, csrc/cpu/accumulate.cpp, csrc/cuda/accumulate.cu,
triton_kernels/accumulate.py.
"""
from __future__ import annotations

import operator

import torch

from fusedaccum.ops import DTYPES, check_flat, check_float_dtype, check_scalar, define, expect

DENSE_ONLY = (
    "fusedaccum accumulates dense gradients only: use nn.Embedding(sparse=False), or keep this "
    "parameter on a torch.optim optimizer"
)

SCHEMA = (
    "accumulate(Tensor(a!) arena, Tensor[] grads, int[] offsets, float scale, bool first, "
    "Tensor(b!)? sumsq, Tensor(c!)? found_inf) -> ()"
)


def check(arena, grads, offsets, scale, first, sumsq, found_inf) -> None:
    check_flat(arena, "the arena")
    expect(len(grads) == len(offsets), f"accumulate got {len(grads)} gradients but {len(offsets)} offsets")
    # Runs once per launch over possibly thousands of gradients: whole-list checks first,
    # the per-gradient walk only to name the offender.
    if not (
        {g.layout for g in grads} <= {torch.strided}
        and {g.dtype for g in grads} <= set(DTYPES)
        and {g.device for g in grads} <= {arena.device}
        and min(offsets, default=0) >= 0
        and max(map(operator.add, offsets, (g.numel() for g in grads)), default=0) <= arena.numel()
    ):
        for i, (g, off) in enumerate(zip(grads, offsets)):
            expect(g.layout == torch.strided, f"gradient {i} is {g.layout}; {DENSE_ONLY}")
            check_float_dtype(g, f"gradient {i}")
            expect(g.device == arena.device, f"gradient {i} is on {g.device} but its arena is on {arena.device}")
            expect(0 <= off and off + g.numel() <= arena.numel(),
                   f"gradient {i} ({g.numel()} elements at offset {off}) does not fit in an arena of {arena.numel()}")
    check_scalar(sumsq, "sumsq", arena)
    check_scalar(found_inf, "found_inf", arena)


KERNELS = define(SCHEMA, check)

