"""fusedaccum::accumulate in Triton: fold a list of gradients into a flat arena,

    arena[off_i : off_i + n_i] = (first ? 0 : arena[...]) + scale * grads[i].flatten()

in fp32, rounded once to the arena dtype, with one launch per gradient dtype (usually one).

The gradients are read in place through a table of their addresses (an int64 tensor cast to
pointers in the kernel), and the work is a list of fixed-size blocks (gradient, start): a
program folds one block. The block list depends only on the sizes and offsets, so it is built
once per layout and cached on the device; per call only the address table is copied (pinned,
asynchronously). The address-table pointer cast also works under TRITON_INTERPRET=1 on CPU
tensors (checked with triton 3.8), so the interpreter runs this same single launch: there is
no per-gradient fallback.

Statistics: with sumsq/found_inf each program writes the fp64 sum of squares of the values
it stored (after rounding to the arena dtype) to its own slot of a partials buffer; torch sums
the partials (a fixed order, so deterministic) and updates sumsq/found_inf on the device, with
no host sync. A double sum of squares of finite floats cannot overflow, so a non-finite total
means a NaN or an inf was stored.
"""
from __future__ import annotations

from collections import OrderedDict

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


@triton.jit
def _accumulate_kernel(arena_ptr, grad_addrs, grad_meta, work_ptr, partials_ptr, scale,
                       GRAD_DTYPE: tl.constexpr, FIRST: tl.constexpr, STATS: tl.constexpr,
                       ARENA_ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # int64 before any multiply: arenas and block lists may pass 2**31 elements.
    pid = tl.program_id(0).to(tl.int64)
    gi = tl.load(work_ptr + 2 * pid)  # the block: gradient (index in this launch's group) ...
    start = tl.load(work_ptr + 2 * pid + 1)  # ... and its first element in that gradient
    arena_pos = tl.load(grad_meta + 2 * gi) + start  # the gradient's arena offset
    count = tl.minimum(tl.load(grad_meta + 2 * gi + 1) - start, BLOCK)  # its numel
    G_BYTES: tl.constexpr = GRAD_DTYPE.primitive_bitwidth // 8
    A_BYTES: tl.constexpr = arena_ptr.dtype.element_ty.primitive_bitwidth // 8
    g_addr = tl.load(grad_addrs + gi) + start * G_BYTES
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


# (device, numels, offsets) -> (work, meta) on that device: work is int64 [blocks, 2] (gradient
# index, start), meta int64 [gradients, 2] (arena offset, numel). Both depend only on the
# layout, which repeats every micro-batch: built once, a handful of entries kept.
_LAYOUT_CACHE: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 32


def _layout(device: torch.device, numels: tuple, offsets: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, numels, offsets)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None:
        _LAYOUT_CACHE.move_to_end(key)
        return hit
    n = torch.tensor(numels, dtype=torch.int64)
    blocks = (n + BLOCK - 1) // BLOCK
    gi = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    start = (torch.arange(gi.numel(), dtype=torch.int64) - first_block[gi]) * BLOCK
    work = _to_device(torch.stack([gi, start], dim=1).contiguous(), device)
    meta = _to_device(torch.stack([torch.tensor(offsets, dtype=torch.int64), n], dim=1).contiguous(), device)
    _LAYOUT_CACHE[key] = (work, meta)
    if len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return work, meta


# Tables copied while a CUDA graph was being captured: every replay copies from the same host
# address again, so those must live as long as the process (one per captured launch).
_CAPTURED_TABLES: list[torch.Tensor] = []


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    if torch.cuda.is_current_stream_capturing():
        # pin_memory() may query events to recycle blocks, which global-mode capture forbids;
        # a plain host tensor kept alive forever is what the captured copy node reads.
        _CAPTURED_TABLES.append(t)
        return t.to(device, non_blocking=True)
    # Pinned and non_blocking: no host sync. The caching host allocator keeps the pinned block
    # until the copy has run, so it is safe to drop it right away.
    return t.pin_memory().to(device, non_blocking=True)


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
    layouts = [_layout(device, tuple(g.numel() for g, _ in items), tuple(off for _, off in items))
               for items in groups.values()]
    # One address table for all groups (a single copy to the device); each launch gets its slice.
    addrs = _to_device(torch.tensor([g.data_ptr() for items in groups.values() for g, _ in items],
                                    dtype=torch.int64), device)
    total_blocks = sum(work.shape[0] for work, _ in layouts)
    # Without statistics nothing is written there: any pointer fills the slot.
    partials = torch.empty(total_blocks, dtype=torch.float64, device=device) if stats else addrs

    arena_aligned = arena.data_ptr() % 16 == 0
    first_grad = first_block = 0
    with device_guard(arena):
        for (dtype, items), (work, meta) in zip(groups.items(), layouts):
            nblocks = work.shape[0]
            _accumulate_kernel[(nblocks,)](
                arena, addrs[first_grad:], meta, work, partials[first_block:] if stats else partials, float(scale),
                GRAD_DTYPE=TL_DTYPES[dtype], FIRST=bool(first), STATS=stats,
                ARENA_ALIGNED=arena_aligned, BLOCK=BLOCK, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
            )
            first_grad += len(items)
            first_block += nblocks

    if stats:
        total = partials.sum()  # fp64, fixed reduction order: the same bits on every run
        if sumsq is not None:
            sumsq.add_(total.float())
        if found_inf is not None:
            found_inf.masked_fill_(~total.isfinite(), 1.0)
