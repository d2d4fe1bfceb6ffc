"""fusedaccum::accumulate in Triton: fold a list of gradients into a flat arena,

    arena[off_i : off_i + n_i] = (first ? 0 : arena[...]) + scale * grads[i].flatten()

in fp32, rounded once to the arena dtype, with one launch per gradient dtype (usually one).

The gradients are read in place through a table with one row per gradient: (address, arena
offset, numel, first block). A program folds one block of BLOCK elements and finds its row by
binary search over the first-block column. The table is built per call (no cache to outgrow
or to free under a graph) and reaches the device without a host sync:

* eagerly, as one pinned, asynchronous copy;
* under CUDA graph capture, where a copy would read host memory on every replay (memory that
  must then outlive the graph), written by small kernels whose arguments are the table's
  words: the captured graph owns the table's content, and the table itself is an ordinary
  allocation of the graph's pool, rewritten before each replay reads it.

The address cast also works under TRITON_INTERPRET=1 on CPU tensors (checked with triton 3.8),
so the interpreter runs this same launch: there is no per-gradient fallback.

Statistics: with sumsq/found_inf each program writes the fp64 sum of squares of the values
it stored (after rounding to the arena dtype) to its own slot of a partials buffer; torch sums
the partials (a fixed order, so deterministic) and updates sumsq/found_inf on the device, with
no host sync. A double sum of squares of finite floats cannot overflow, so a non-finite total
means a NaN or an inf was stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedaccum.triton_kernels._common import LAUNCH_OPTIONS, TL_DTYPES, device_guard, round_to

BLOCK = 2048  # elements per program
# 4 elements per thread: one 128-bit access for fp32, and a single register layout for every
# dtype (with more, bf16/fp16 tensors get 8 per thread and fp32 ones 4, and Triton converts
# between the two through shared memory).
NUM_WARPS = BLOCK // (4 * 32)


@triton.jit
def _fold_block(arena_ptr, arena_pos, g_addr, count, scale,
                GRAD_DTYPE: tl.constexpr, FIRST: tl.constexpr, STATS: tl.constexpr,
                BLOCK: tl.constexpr, FAST: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    # The pointers are made here, in each branch of the caller, so that the alignment hints of
    # the fast path are attached to ops of that branch only, never to values the slow path uses.
    a_ptr = arena_ptr + arena_pos
    g_ptr = g_addr.to(tl.pointer_type(GRAD_DTYPE))
    if FAST:
        # A whole block, both sides 16-byte aligned (checked at run time by the caller): with
        # the hints and no mask the loads and stores become 128-bit vectors. Without them the
        # compiler knows nothing of a pointer loaded from memory and uses scalar accesses.
        a_ptr = tl.multiple_of(a_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        g = tl.load(g_ptr + idx).to(tl.float32)
        if FIRST:
            new = scale * g
        else:
            new = tl.load(a_ptr + idx).to(tl.float32) + scale * g
        out = round_to(new, arena_ptr.dtype.element_ty)
        tl.store(a_ptr + idx, out)
    else:
        mask = idx < count
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if FIRST:
            new = scale * g
        else:
            new = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32) + scale * g
        out = round_to(new, arena_ptr.dtype.element_ty)
        tl.store(a_ptr + idx, out, mask=mask)
    sq = 0.0
    if STATS:
        # Squares of the stored (rounded) values, in fp64 as the reference; masked lanes hold 0.
        v = out.to(tl.float32).to(tl.float64)
        sq = tl.sum(v * v, axis=0)
    return sq


ROW_WORDS = tl.constexpr(4)  # table row: gradient address, arena offset, numel, first block


@triton.jit
def _accumulate_kernel(arena_ptr, table_ptr, num_rows, partials_ptr, scale,
                       GRAD_DTYPE: tl.constexpr, FIRST: tl.constexpr, STATS: tl.constexpr,
                       ARENA_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # int64 before any multiply: arenas and block counts may pass 2**31 elements.
    pid = tl.program_id(0).to(tl.int64)
    # The row whose blocks include this one: the last row whose first block is <= pid.
    lo = tl.zeros((), tl.int64)
    hi = lo + num_rows - 1  # (no .to() on num_rows: Triton makes an argument equal to 1 a constant)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        below = tl.load(table_ptr + ROW_WORDS * mid + 3) <= pid
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    row = table_ptr + ROW_WORDS * lo
    start = (pid - tl.load(row + 3)) * BLOCK  # first element of this block in its gradient
    arena_pos = tl.load(row + 1) + start
    count = tl.minimum(tl.load(row + 2) - start, BLOCK)
    G_BYTES: tl.constexpr = GRAD_DTYPE.primitive_bitwidth // 8
    A_BYTES: tl.constexpr = arena_ptr.dtype.element_ty.primitive_bitwidth // 8
    g_addr = tl.load(row) + start * G_BYTES
    if ARENA_ALIGNED:
        # Most blocks are whole and aligned (torch allocations are; arena offsets usually are).
        # Tails and gradients at odd addresses (views with a storage offset) take the masked
        # scalar path.
        fast = (count == BLOCK) & (g_addr % 16 == 0) & ((arena_pos * A_BYTES) % 16 == 0)
        if fast:
            sq = _fold_block(arena_ptr, arena_pos, g_addr, count, scale,
                             GRAD_DTYPE, FIRST, STATS, BLOCK, True)
        else:
            sq = _fold_block(arena_ptr, arena_pos, g_addr, count, scale,
                             GRAD_DTYPE, FIRST, STATS, BLOCK, False)
    else:  # an arena view at an odd address: no vector path at all
        sq = _fold_block(arena_ptr, arena_pos, g_addr, count, scale,
                         GRAD_DTYPE, FIRST, STATS, BLOCK, False)
    if STATS:
        tl.store(partials_ptr + pid, sq)


# Under capture the table is written by kernels that carry its words as arguments. Every word
# is passed biased into [2**31, 2**63) so that Triton types all of them int64 (it picks int32
# for small values, which would compile one variant per pattern), and none is specialized.
WORDS_PER_WRITE = 16
_BIAS = tl.constexpr(1 << 40)


@triton.jit(do_not_specialize=[f"w{k}" for k in range(WORDS_PER_WRITE)])
def _write_words(dst, w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15):
    tl.store(dst + 0, w0 - _BIAS)
    tl.store(dst + 1, w1 - _BIAS)
    tl.store(dst + 2, w2 - _BIAS)
    tl.store(dst + 3, w3 - _BIAS)
    tl.store(dst + 4, w4 - _BIAS)
    tl.store(dst + 5, w5 - _BIAS)
    tl.store(dst + 6, w6 - _BIAS)
    tl.store(dst + 7, w7 - _BIAS)
    tl.store(dst + 8, w8 - _BIAS)
    tl.store(dst + 9, w9 - _BIAS)
    tl.store(dst + 10, w10 - _BIAS)
    tl.store(dst + 11, w11 - _BIAS)
    tl.store(dst + 12, w12 - _BIAS)
    tl.store(dst + 13, w13 - _BIAS)
    tl.store(dst + 14, w14 - _BIAS)
    tl.store(dst + 15, w15 - _BIAS)


def table_on_device(words: list[int], device: torch.device, capturing: bool) -> torch.Tensor:
    """The int64 table `words` on `device`, with no host sync (see the module docstring)."""
    host = torch.tensor(words, dtype=torch.int64)
    if device.type != "cuda" and not capturing:
        return host
    if not capturing:
        # Pinned and non_blocking: the caching host allocator keeps the pinned block until the
        # copy has run, so it is safe to drop it right away.
        return host.pin_memory().to(device, non_blocking=True)
    padded = words + [0] * (-len(words) % WORDS_PER_WRITE)
    table = torch.empty(len(padded), dtype=torch.int64, device=device)
    for k in range(0, len(padded), WORDS_PER_WRITE):
        _write_words[(1,)](table[k:], *(w + _BIAS.value for w in padded[k:k + WORDS_PER_WRITE]))
    return table[: len(words)]


def accumulate(arena, grads, offsets, scale, first, sumsq, found_inf) -> None:
    stats = sumsq is not None or found_inf is not None
    groups: dict = {}  # gradient dtype -> [(flat contiguous gradient, offset)]
    for g, off in zip(grads, offsets):
        if g.numel() == 0:
            continue
        # Non-contiguous gradients are copied once; the copies live in `groups` until after
        # the launch (and the caching allocator orders their reuse after it on the stream).
        groups.setdefault(g.dtype, []).append((g.contiguous(), int(off)))
    if not groups:
        return  # nothing stored: the sum of squares is 0 and found_inf stays as it is

    device = arena.device
    # One table for all groups (one copy to the device); launch k reads rows from its first.
    words, launches = [], []
    for dtype, items in groups.items():
        blocks = 0
        launches.append((dtype, len(words) // ROW_WORDS.value, len(items)))
        for g, off in items:
            words += (g.data_ptr(), off, g.numel(), blocks)
            blocks += -(-g.numel() // BLOCK)
        launches[-1] += (blocks,)
    with device_guard(arena):
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        table = table_on_device(words, device, capturing)
        total_blocks = sum(nblocks for *_, nblocks in launches)
        # Without statistics nothing is written there: any pointer fills the slot.
        partials = torch.empty(total_blocks, dtype=torch.float64, device=device) if stats else table
        arena_aligned = arena.data_ptr() % 16 == 0
        first_block = 0
        for dtype, first_row, num_rows, nblocks in launches:
            _accumulate_kernel[(nblocks,)](
                arena, table[first_row * ROW_WORDS.value:], num_rows, partials[first_block:] if stats else partials,
                float(scale), GRAD_DTYPE=TL_DTYPES[dtype], FIRST=bool(first), STATS=stats,
                ARENA_ALIGNED=arena_aligned, BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
            )
            first_block += nblocks

    if stats:
        total = partials.sum()  # fp64, fixed reduction order: the same bits on every run
        if sumsq is not None:
            sumsq.add_(total.float())
        if found_inf is not None:
            found_inf.masked_fill_(~total.isfinite(), 1.0)
