"""fusedaccum::embedding_weight_grad in Triton: an Embedding's weight gradient, rows only, into
its arena slice,

    W = arena[offset : offset + num_weights * dim].view(num_weights, dim)
    if first: W = 0
    W[u] += scale * sum(grad_output[r] for r with indices[r] == u) / (count(u) if scale_grad_by_freq)

for every index u that occurs, except padding_idx.

Deterministic without atomics: torch sorts the indices (stable, so rows of one index keep
their order) and finds one segment per distinct index; then a program sums one segment's rows
over one BLOCK_D chunk of dim, sequentially in sorted order, in fp32, and writes that chunk of
row u once, rounded once to the arena dtype. Every element of W has one writer, and the sum
order is the same on every run.

The number of segments sizes the launch, so unique_consecutive syncs with the host (as the
torch reference's unique does): this op cannot be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedaccum.triton_kernels._common import LAUNCH_OPTIONS, device_guard, round_to

MAX_BLOCK_D = 512  # dim elements per program, at 4 per thread (num_warps below)
UNROLL = 4  # rows of a segment loaded per loop step


@triton.jit
def _embedding_weight_grad_kernel(w_ptr, grad_ptr, perm_ptr, unique_ptr, start_ptr, count_ptr,
                                  dim, num_weights, padding_idx, stride_r, stride_d, scale,
                                  FREQ: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    seg = tl.program_id(0)
    # int64: dim * stride_d (a column-major grad_output) and u * dim may pass 2**31.
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < dim
    u = tl.load(unique_ptr + seg).to(tl.int64)
    # The padding row is left alone; so is an index outside the table, so that a bad index can
    # never write outside the slice (the forward has refused it already).
    if (u != padding_idx) & (u >= 0) & (u < num_weights):
        start = tl.load(start_ptr + seg)
        count = tl.load(count_ptr + seg)
        grad_cols = grad_ptr + d * stride_d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # One row after the other, in sorted order: the same sum on every run (and the same as
        # the reference's index_add_ on a CPU). UNROLL rows per step: their loads do not depend
        # on each other and can be in flight together; the adds keep the order.
        end = start + count
        unrolled_end = start + count // UNROLL * UNROLL
        for i in range(start, unrolled_end, UNROLL):
            for j in tl.static_range(UNROLL):
                r = tl.load(perm_ptr + i + j)
                acc += tl.load(grad_cols + r * stride_r, mask=mask, other=0.0).to(tl.float32)
        for i in range(unrolled_end, end):
            r = tl.load(perm_ptr + i)
            acc += tl.load(grad_cols + r * stride_r, mask=mask, other=0.0).to(tl.float32)
        if FREQ:
            # IEEE division, as torch's: Triton's `/` on fp32 is the approximate div.full.
            acc = tl.div_rn(acc, count.to(tl.float32))
        w_ptrs = w_ptr + u * dim + d
        new = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale
        tl.store(w_ptrs, round_to(new, w_ptr.dtype.element_ty), mask=mask)


def embedding_weight_grad(arena, offset, indices, grad_output, num_weights, padding_idx,
                          scale_grad_by_freq, scale, first) -> None:
    dim = grad_output.shape[1]
    w = arena[offset : offset + num_weights * dim]
    with device_guard(arena):
        if first:
            w.zero_()
        if indices.numel() == 0 or dim == 0 or num_weights == 0:
            return
        sorted_indices, perm = torch.sort(indices, stable=True)  # perm: int64 rows of grad_output
        unique, counts = torch.unique_consecutive(sorted_indices, return_counts=True)  # host sync
        starts = torch.cumsum(counts, 0) - counts
        block_d = min(MAX_BLOCK_D, max(16, triton.next_power_of_2(dim)))
        grid = (unique.numel(), triton.cdiv(dim, block_d))
        _embedding_weight_grad_kernel[grid](
            w, grad_output, perm, unique, starts, counts,
            dim, num_weights, padding_idx, grad_output.stride(0), grad_output.stride(1), float(scale),
            FREQ=bool(scale_grad_by_freq), BLOCK_D=block_d, UNROLL=UNROLL, num_warps=max(1, block_d // 128),
            **LAUNCH_OPTIONS,
        )
