"""fa.Linear, fa.Embedding and fa.fuse_modules: weight gradients written where they belong.

    model = fa.fuse_modules(model)      # nn.Linear -> fa.Linear, nn.Embedding -> fa.Embedding, in place
    opt = fa.AdamW(model.parameters(), lr=1e-3)
    acc = fa.GradAccumulator(opt, accumulation_steps=4)

fa.Linear and fa.Embedding are nn.Linear and nn.Embedding (subclasses with the same
parameters, state_dict keys and forward numerics). While a full-path GradAccumulator holds
their weights, their backward writes the weight gradient straight into the weight's slice of
the fp32 arena instead of handing autograd a gradient to accumulate:

* Linear: `slice = (first ? 0 : slice) + scale * dY^T X`, one GEMM accumulating in fp32
  (fusedaccum::linear_weight_grad), as Megatron-LM's gradient_accumulation_fusion does; the
  bias gets the column sums of dY the same way (fusedaccum::accumulate).
* Embedding: only the rows that occur, summed per index in a fixed order
  (fusedaccum::embedding_weight_grad); the slice is zeroed on the window's first contribution,
  so untouched rows read zero at the step, and no vocab x dim gradient exists per micro-batch.

No weight gradient reaches autograd, so there is no AccumulateGrad work, no hook fold and no
transient tensor. `first` and the fold scale come from the accumulator's Window (claim), the
same bookkeeping as its folds: a weight that also gets ordinary gradients (an LM head tied to
the embedding through F.linear) lands in the one slice, the first contribution overwriting,
in any order. Everywhere else (no accumulator, a swap-in accumulator, a torch.optim
optimizer, torch.no_grad, inside torch.compile) the forward is torch's own and so is the
gradient.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

# parameter -> (weak reference to its full-path GradAccumulator, window index, parameter index,
# offset in the arena). Weak both ways: a dropped accumulator or parameter leaves no cycle.
_slots = WeakTensorKeyDictionary()


def register(accumulator, window_index: int, window) -> None:
    ref = weakref.ref(accumulator)
    for i, (p, offset) in enumerate(zip(window.arena.params, window.arena.offsets)):
        _slots[p] = (ref, window_index, i, offset)


def unregister(accumulator) -> None:
    for w in accumulator._windows:
        for p in w.arena.params:
            slot = _slots.get(p)
            if slot is not None and slot[0]() is accumulator:
                del _slots[p]


def expose_main_grad(window) -> None:
    """GradAccumulator(..., main_grad=True): p.main_grad is p's slice of the arena, as Megatron-LM's
    DistributedDataParallel sets it, so that layers written for that convention (TransformerEngine's
    fuse_wgrad_accumulation, Megatron's gradient_accumulation_fusion) add their weight gradients into
    the arena and flag it with p.grad_added_to_main_grad = True; the Window then drops the placeholder
    gradient they return. Such layers always add (beta = 1), so the arena starts at zero here and a
    slice they write is zeroed again at the start of every window."""
    with torch.no_grad():
        window.arena.grad.zero_()
    for p, view in zip(window.arena.params, window.grad_views):
        p.main_grad = view
        p.grad_added_to_main_grad = False
    window.set_external(True)


def hide_main_grad(window) -> None:
    for p, view in zip(window.arena.params, window.grad_views):
        if getattr(p, "main_grad", None) is view:
            del p.main_grad
            del p.grad_added_to_main_grad


def _slot_of(param: torch.Tensor | None):
    """(window, index, offset) when a live full-path accumulator takes param's gradient, else None."""
    if param is None or not param.requires_grad:
        return None
    slot = _slots.get(param)
    if slot is None:
        return None
    acc = slot[0]()
    if acc is None or acc._detached:
        return None
    return acc._windows[slot[1]], slot[2], slot[3]


def _fused_slot(param: torch.Tensor):
    """The weight's slot when this forward's backward is to write into the arena, else None.

    Under torch.compile the layer traces as torch's own (fullgraph works; the weight gradient
    takes the accumulator's hook path): the claim is bookkeeping on the host that a compiled
    backward graph cannot call."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return _slot_of(param)


def _claim(slot):
    window, i, offset = slot
    first, scale = window.claim(i)  # raises when the backward is not acc.backward()'s
    return window.arena.grad, offset, scale, first


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, weight_slot, bias_slot, compute_dtype):
        if compute_dtype is not None:  # autocast: the casts F.linear would make, made here so we keep them
            input, weight = input.to(compute_dtype), weight.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
        ctx.save_for_backward(input, weight)
        ctx.slots = weight_slot, bias_slot
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        weight_slot, bias_slot = ctx.slots
        grad_input = grad_output.matmul(weight.to(grad_output.dtype)) if ctx.needs_input_grad[0] else None
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        x = input.reshape(-1, input.shape[-1]).to(dy.dtype)
        if weight_slot is not None:
            grad, offset, scale, first = _claim(weight_slot)
            torch.ops.fusedaccum.linear_weight_grad(grad, offset, dy, x, scale, first)
        if bias_slot is not None:
            grad, offset, scale, first = _claim(bias_slot)
            torch.ops.fusedaccum.accumulate(grad, [dy.sum(0, dtype=torch.float32)], [offset], scale, first, None, None)
        return grad_input, None, None, None, None, None


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, slot, padding_idx, max_norm, norm_type, scale_grad_by_freq):
        ctx.save_for_backward(input)
        ctx.slot, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq = slot, weight.shape[0], padding_idx, scale_grad_by_freq
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad, offset, scale, first = _claim(ctx.slot)
        padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
        torch.ops.fusedaccum.embedding_weight_grad(
            grad, offset, input.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]),
            ctx.num_weights, padding_idx, ctx.scale_grad_by_freq, scale, first,
        )
        return None, None, None, None, None, None, None


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    kind = t.device.type
    if t.is_floating_point() and torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class Linear(nn.Linear):
    """nn.Linear whose weight gradient a full-path GradAccumulator receives straight in its arena."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        slot = _fused_slot(self.weight)
        if slot is None:
            return F.linear(input, self.weight, self.bias)
        return _LinearFunction.apply(input, self.weight, self.bias, slot, _slot_of(self.bias), _autocast_dtype(input))


class Embedding(nn.Embedding):
    """nn.Embedding whose backward adds only the touched rows into a full-path GradAccumulator's arena."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        slot = None if self.sparse else _fused_slot(self.weight)  # sparse: torch's, and the accumulator refuses it
        if slot is None:
            return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        return _EmbeddingFunction.apply(input, self.weight, slot, self.padding_idx, self.max_norm, self.norm_type,
                                        self.scale_grad_by_freq)


_FUSED = {nn.Linear: Linear, nn.Embedding: Embedding}


def fuse_modules(model: nn.Module) -> nn.Module:
    """Turns every nn.Linear and nn.Embedding of `model` (exactly those classes, not subclasses)
    into fa.Linear and fa.Embedding in place and returns the model.

    Only the class changes: the parameters stay the same tensors (an optimizer built before
    keeps working), so do state_dict keys and hooks. Before or after the optimizer and the
    accumulator are built, it makes no difference.
    """
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model
