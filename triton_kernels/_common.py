"""Pieces shared by the Triton kernels: dtype mapping, rounding to the storage dtype, fp64
scalars passed as bits, launch options and the device guard.

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (which must be
set before triton is imported; fusedaccum.dispatch only allows CPU tensors in that mode).
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The same flag as a constexpr, so that jit code can branch on it at compile time.
_INTERPRET = tl.constexpr(INTERPRET)

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# enable_fp_fusion=False: Triton contracts a * b + c into one fma by default. The reference
# (separate torch ops) and elementwise.h round every multiply and add, so the kernels do too:
# the same operation order, the same roundings. The kernels are memory-bound, so this costs
# nothing measurable. (The interpreter drops the option.)
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def f64_bits(x: float) -> int:
    """A Python float as the int64 holding its bits.

    Triton passes Python floats to kernels as fp32; the step constants need the doubles (as
    torch.optim's Python floats are), so they travel as int64 bits and are bitcast back
    (from_bits) inside the kernel. Exact, and no extra launch or copy to the device.
    """
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def from_bits(bits):
    # An int argument whose value fits in 32 bits (0.0, -tiny) arrives as i32: widen first.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even (as torch's .to() and static_cast do).

    On the GPU this is the plain conversion (cvt.rn). The interpreter (triton 3.8) converts
    fp32 -> bf16 by truncating, so there the rounding is done by hand on the bits; fp16 and
    fp32 go through numpy and are right already.
    """
    if _INTERPRET and DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round half to even on the dropped 16 bits
        u = tl.where(x != x, 0x7FC0, u)  # keep NaNs NaN (the carry could turn one into a number)
        y = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def splat(ptr, BLOCK: tl.constexpr):
    """The one-element tensor at `ptr` (found_inf, step), loaded once and splatted to a block.

    Comparisons are made on the splatted block, not on the scalar: the interpreter (triton 3.8)
    types a scalar comparison as its operands' dtype, and once splatted it is no longer a
    boolean. On the GPU either way compiles to the same code (a uniform mask keeps the vector
    accesses).
    """
    return tl.broadcast_to(tl.load(ptr), [BLOCK])


@triton.jit
def block_and_keep(found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """This program's id and element offsets (int64 first: arenas may pass 2**31 elements), and
    the write mask of an optimizer step: all false when found_inf is set (a NaN flag skips too,
    as the reference's `found_inf != 0` does)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND_INF:
        keep = splat(found_inf_ptr, BLOCK) == 0.0
    else:
        keep = tl.full([BLOCK], 1, tl.int1)
    return pid, offs, keep


# master_weights="remainder": a bf16 parameter and an int16 remainder are together the fp32
# master, bit for bit (csrc/elementwise.h merge_remainder / split_remainder). The step's math
# runs on the merged fp32 value; the new value is split back into the two halves.


@triton.jit
def merge_remainder(hi, rem):
    """bf16 hi, int16 rem -> the fp32 with bits (hi << 16) + rem, the remainder sign-extended
    (a negative one takes back the one that rounding added to the high half)."""
    u = hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16  # zero-extended
    u = u + rem.to(tl.int32).to(tl.uint32, bitcast=True)  # sign-extended, wraps mod 2**32
    return u.to(tl.float32, bitcast=True)


@triton.jit
def split_remainder(x):
    """fp32 x -> (bf16 high half rounded half up in magnitude, int16 low 16 bits); a NaN stays
    a NaN (made quiet: its high half alone, or with the carry, could read as an infinity or -0)."""
    u = x.to(tl.uint32, bitcast=True)
    rem = (u & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
    hi = tl.where(x != x, (u >> 16) | 0x0040, (u >> 16) + ((u >> 15) & 1))
    return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), rem


@triton.jit
def load_weight(param_ptr, copy_ptr, offs, mask, REMAINDER: tl.constexpr):
    """The fp32 value a step updates: the parameter, or the master that the bf16 parameter and
    its int16 remainder (at copy_ptr) are together."""
    if REMAINDER:
        p = merge_remainder(tl.load(param_ptr + offs, mask=mask, other=0.0),
                            tl.load(copy_ptr + offs, mask=mask, other=0))
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return p


@triton.jit
def store_weight(param_ptr, copy_ptr, offs, p, mask, HAS_COPY: tl.constexpr, REMAINDER: tl.constexpr):
    """Writes the new fp32 value: to the parameter (and its rounded low-precision copy), or
    split into the bf16 parameter and its int16 remainder."""
    if REMAINDER:
        hi, rem = split_remainder(p)
        tl.store(param_ptr + offs, hi, mask=mask)
        tl.store(copy_ptr + offs, rem, mask=mask)
    else:
        tl.store(param_ptr + offs, round_to(p, param_ptr.dtype.element_ty), mask=mask)
        if HAS_COPY:
            tl.store(copy_ptr + offs, round_to(p, copy_ptr.dtype.element_ty), mask=mask)
