"""fa.GradAccumulator: catches gradients as autograd produces them and folds them into the
optimizer's flat arenas with the accumulate op.

Two ways in:

* swap-in (no accumulation_steps): the user's loop stays `(loss / N).backward()`,
  `opt.step()`, `opt.zero_grad()`. Where the arena dtype equals the parameter dtype, p.grad is
  a view of the arena after each backward, so code that reads or clips p.grad keeps working.
* full path (accumulation_steps=N): `acc.backward(loss)` applies 1/N (or 1/items) inside the
  kernel, `acc.step()` closes the window with the clip coefficient, the inverse loss scale
  and skip-on-inf folded into the one fused step.

Per window, a parameter's first fold overwrites its slice of the arena, so nothing is zeroed.
Small parameters are bucketed: a bucket is folded in one launch once all its gradients are in
(or at the end of the backward pass), and the transient gradients are released.
"""
from __future__ import annotations

import functools
import weakref

import torch

from fusedaccum.arena import Arena
from fusedaccum.ops.accumulate import DENSE_ONLY
from fusedaccum.optim import FusedOptimizer
from fusedaccum.reference import add_sum_of_squares

DEFAULT_BUCKET_NUMEL = 1 << 24  # elements per launch of folding; a larger parameter is its own bucket


def _call_if_alive(accumulator: weakref.ref, window: int, i: int, p: torch.Tensor) -> None:
    # Hooks live on the parameters, where the garbage collector cannot see them: a hook that
    # held the accumulator or its windows (which hold the parameters) would keep them all alive
    # forever. With a weak reference a dropped accumulator and optimizer are freed, and the
    # parameters can join a new fusedaccum optimizer.
    acc = accumulator()
    if acc is not None:
        acc._on_grad(acc._windows[window], i, p)


class _Window:
    """The accumulator's per-arena window state."""

    def __init__(self, arena: Arena, visible: bool, bucket_numel: int):
        n = len(arena.params)
        self.arena = arena
        self.visible = visible  # p.grad shows the arena view between backward and step
        self.grad_views = arena.views(arena.grad)
        self.touched = [False] * n  # received a gradient in this window
        self.touched_last = [False] * n  # ... in the last micro-batch (its fold computed the norm)
        self.hooked = [False] * n
        self.bucket_of, self.bucket_size, size = [], [], 0
        for numel in arena.numels:
            if not self.bucket_size or size + numel > bucket_numel:
                self.bucket_size.append(0)
                size = 0
            self.bucket_of.append(len(self.bucket_size) - 1)
            size += numel
        self.pending: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.bucket_size]


class GradAccumulator:
    def __init__(
        self,
        optimizer: FusedOptimizer,
        accumulation_steps: int | None = None,
        max_grad_norm: float | None = None,
        loss_scale: float | str | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                f"GradAccumulator needs a fusedaccum optimizer (fa.SGD, fa.Adam, fa.AdamW); got "
                f"{type(optimizer).__name__}. Build the optimizer with fusedaccum: it owns the arenas."
            )
        if optimizer._accumulator is not None:
            raise ValueError("this optimizer already has a GradAccumulator; attach one accumulator per optimizer")
        self.full = accumulation_steps is not None
        if self.full and (not isinstance(accumulation_steps, int) or accumulation_steps < 1):
            raise ValueError(f"accumulation_steps must be a positive int; got {accumulation_steps!r}")
        if not self.full and (max_grad_norm is not None or loss_scale is not None):
            raise ValueError(
                "max_grad_norm and loss_scale belong to the full path: pass accumulation_steps=N and drive the "
                "loop with acc.backward(loss) and acc.step() (in swap-in mode clip p.grad yourself)"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive; got {max_grad_norm}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.accum_dtype = accum_dtype
        self.bucket_numel = bucket_numel
        self.device = optimizer.arenas[0].device if optimizer.arenas else torch.device("cpu")

        self._dynamic = loss_scale == "dynamic"
        self._scale = None
        if loss_scale is not None:
            if not self._dynamic and not (isinstance(loss_scale, (int, float)) and loss_scale > 0):
                raise ValueError(f'loss_scale must be "dynamic" or a positive number; got {loss_scale!r}')
            init = 2.0**16 if self._dynamic else float(loss_scale)
            self._scale = torch.full((), init, dtype=torch.float32, device=self.device)
            self._growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)
            self._growth = (growth_factor, backoff_factor, growth_interval)

        self._windows: list[_Window] = []
        self._handles = []
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._in_backward = False
        self._closing = False  # acc.step() is running optimizer.step()
        self._callback_queued = False
        self._stats_now = False
        self._fold_scale = 1.0
        self._items = torch.zeros((), dtype=torch.float64, device=self.device)  # items of this window
        self._reset_counts()
        self._grad_norm = None
        self._found_inf = None
        optimizer._accumulator = self
        self._attach_arenas(optimizer.arenas)

    # -- public API -------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, num_items=None, **backward_kwargs) -> None:
        """loss.backward() for one micro-batch, folding its gradients into the arena.

        Without num_items the loss is a mean and each micro-batch counts 1/N. With num_items the
        loss is a sum over num_items items (tokens) and the window ends as the exact mean over
        all items of the window.
        """
        if not self.full:
            raise RuntimeError(
                "acc.backward() is the full path: create GradAccumulator(opt, accumulation_steps=N). "
                "In swap-in mode keep calling loss.backward()"
            )
        n = self.accumulation_steps
        if self._micro_step >= n:
            raise RuntimeError(
                f"acc.backward() past the end of the window: all {n} micro-batches are in. Call acc.step() "
                f"after every acc.backward() (it closes the window and returns True on the last one)"
            )
        uses_items = num_items is not None
        if self._micro_step == 0:
            self._uses_items = uses_items
        elif uses_items != self._uses_items:
            raise ValueError(
                "num_items was passed to some acc.backward() calls of this window but not others; pass it to "
                "every call of a window (loss = sum over items) or to none (loss = mean)"
            )
        self._adopt_new_params()
        self._stats_now = self._micro_step == n - 1
        if self._stats_now:
            for sumsq, found_inf in self._stats.values():
                sumsq.zero_()
                found_inf.zero_()
        self._fold_scale = 1.0 if uses_items else 1.0 / n
        if self._scale is not None:
            loss = loss * self._scale
        self._in_backward = True
        try:
            loss.backward(**backward_kwargs)
        finally:
            self._in_backward = False
            self._flush_all()
        if uses_items:
            # On the device, whatever num_items is: adding a Python number is a kernel with a
            # scalar argument, so no copy from the host happens (and a window can be captured).
            self._items.add_(num_items.to(self.device) if torch.is_tensor(num_items) else num_items)
        self._micro_step += 1

    def step(self) -> bool:
        """Closes the window after its last micro-batch (returns True); otherwise returns False."""
        if not self.full:
            raise RuntimeError("acc.step() is the full path (accumulation_steps=N); in swap-in mode call optimizer.step()")
        if self._micro_step == 0:
            raise RuntimeError("acc.step() with no acc.backward() in this window: call acc.backward(loss) first")
        if self._micro_step < self.accumulation_steps:
            return False
        # Through optimizer.step(), so that its hooks run and LR schedulers see the step.
        self._closing = True
        try:
            self.optimizer.step()
        finally:
            self._closing = False
        return True

    @property
    def sync_gradients(self) -> bool:
        """True while the current micro-batch is the last of its window (HF Accelerate's name)."""
        if not self.full:
            return True
        return self._micro_step >= self.accumulation_steps - 1

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total gradient norm of the last closed window, before clipping (a device tensor)."""
        return self._grad_norm

    @property
    def loss_scale(self) -> float:
        return 1.0 if self._scale is None else float(self._scale)

    @property
    def step_skipped(self) -> bool:
        """True when the last window closed without an update (a non-finite gradient)."""
        return self._found_inf is not None and bool(self._found_inf)

    def state_dict(self) -> dict:
        return {
            "micro_step": self._micro_step,
            "uses_items": self._uses_items,
            "items": self._items.clone(),
            "touched": [list(w.touched) for w in self._windows],
            "grads": [w.arena.grad for w in self._windows],
            "loss_scale": None if self._scale is None else (self._scale, self._growth_tracker),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["grads"]) != len(self._windows):
            raise ValueError("this accumulator state was saved for a different set of arenas (other model or optimizer)")
        self._micro_step = state["micro_step"]
        self._uses_items = state["uses_items"]
        self._items.copy_(state["items"])
        with torch.no_grad():
            for w, touched, grad in zip(self._windows, state["touched"], state["grads"]):
                w.arena.grad.copy_(grad)
                w.touched = list(touched)
                w.touched_last = [False] * len(touched)
                for i, p in enumerate(w.arena.params):
                    if w.visible:
                        p.grad = w.grad_views[i] if touched[i] else None
        if state["loss_scale"] is not None and self._scale is not None:
            self._scale.copy_(state["loss_scale"][0])
            self._growth_tracker.copy_(state["loss_scale"][1])

    # -- attaching to the optimizer's arenas ------------------------------------------

    def _attach_arenas(self, arenas: list[Arena]) -> None:
        for arena in arenas:
            arena.ensure_grad(self.accum_dtype or arena.dtype)
            visible = not self.full and arena.grad.dtype == arena.dtype
            w = _Window(arena, visible, self.bucket_numel)
            self._windows.append(w)
            if arena.device not in self._stats:  # (sum of squares, non-finite flag) of the last fold
                sumsq = torch.zeros((), dtype=torch.float32, device=arena.device)
                self._stats[arena.device] = (sumsq, torch.zeros_like(sumsq))
            for i in range(len(arena.params)):
                self._hook(w, i)

    def _hook(self, w: _Window, i: int) -> None:
        p = w.arena.params[i]
        if w.hooked[i] or not p.requires_grad:
            return
        hook = functools.partial(_call_if_alive, weakref.ref(self), self._windows.index(w), i)
        self._handles.append(p.register_post_accumulate_grad_hook(hook))
        w.hooked[i] = True
        w.bucket_size[w.bucket_of[i]] += 1

    def _adopt_new_params(self) -> None:
        """Hooks parameters that started requiring grad after the accumulator was created."""
        for w in self._windows:
            if all(w.hooked):
                continue
            for i, p in enumerate(w.arena.params):
                if not w.hooked[i] and p.requires_grad:
                    if p.grad is not None:  # produced before it was hooked (swap-in): fold it now
                        self._fold(w, [(i, p.grad)], first=True)
                        if not w.visible:
                            p.grad = None
                    self._hook(w, i)

    # -- folding ---------------------------------------------------------------------------

    def _on_grad(self, w: _Window, i: int, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        if self.full and not self._in_backward:
            raise RuntimeError(
                "a parameter managed by a full-path GradAccumulator got a gradient outside acc.backward(): "
                "call acc.backward(loss) instead of loss.backward() (it applies 1/N itself)"
            )
        if g.layout != torch.strided:
            raise ValueError(f"a parameter got a {g.layout} gradient; {DENSE_ONLY}")
        if w.visible and g.data_ptr() == w.grad_views[i].data_ptr():
            return  # autograd added this micro-batch into the visible arena view in place
        p.grad = None
        b = w.bucket_of[i]
        w.pending[b].append((i, g))
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_all)
        if len(w.pending[b]) == w.bucket_size[b]:
            self._flush(w, b)

    def _flush(self, w: _Window, b: int) -> None:
        items, w.pending[b] = w.pending[b], []
        # A visible view that autograd did not add into was reset (p.grad = None) or replaced
        # by an out-of-place sum: either way the new gradient is the whole value, so overwrite.
        adds = [(i, g) for i, g in items if w.touched[i] and not w.visible]
        overwrites = [(i, g) for i, g in items if not w.touched[i] or w.visible]
        self._fold(w, overwrites, first=True)
        self._fold(w, adds, first=False)

    def _fold(self, w: _Window, items: list[tuple[int, torch.Tensor]], first: bool) -> None:
        if not items:
            return
        sumsq, found_inf = self._stats[w.arena.device] if self._stats_now else (None, None)
        offsets = [w.arena.offsets[i] for i, _ in items]
        with torch.no_grad():
            torch.ops.fusedaccum.accumulate(
                w.arena.grad, [g for _, g in items], offsets, self._fold_scale, first, sumsq, found_inf
            )
        for i, _ in items:
            w.touched[i] = True
            w.touched_last[i] = self._stats_now
            if w.visible:
                w.arena.params[i].grad = w.grad_views[i]

    def _flush_all(self) -> None:
        self._callback_queued = False
        for w in self._windows:
            for b, pending in enumerate(w.pending):
                if pending:
                    self._flush(w, b)

    # -- window boundaries --------------------------------------------------------------

    def _reset_counts(self) -> None:
        self._micro_step = 0
        self._uses_items = None
        self._items.zero_()

    def _optimizer_step(self) -> None:
        if self.full and self._closing:
            self._close_window()
            return
        if self.full:
            raise RuntimeError(
                "this optimizer's GradAccumulator owns the window (accumulation_steps was given): call acc.step() "
                "after each acc.backward() instead of optimizer.step()"
            )
        self._flush_all()
        self._adopt_new_params()
        self.optimizer._fused_step([w.touched for w in self._windows], factor={}, found_inf={})

    def _restart_window(self, set_to_none: bool) -> None:
        """optimizer.zero_grad() in swap-in mode: the next fold of each parameter overwrites."""
        if self.full:
            raise RuntimeError(
                "optimizer.zero_grad() is not needed with a full-path GradAccumulator: acc.step() starts the next "
                "window (the first micro-batch overwrites the arena)"
            )
        self._flush_all()
        for w in self._windows:
            for i, p in enumerate(w.arena.params):
                if set_to_none:
                    w.touched[i] = False
                    p.grad = None
                elif p.grad is not None or w.touched[i]:
                    w.grad_views[i].zero_()
                    w.touched[i] = True
                    if w.visible:
                        p.grad = w.grad_views[i]

    def _close_window(self) -> None:
        with torch.no_grad():
            # Norm and inf flag of parameters whose last gradient came before the last micro-batch.
            for w in self._windows:
                sumsq, found_inf = self._stats[w.arena.device]
                for i in range(len(w.arena.params)):
                    if w.touched[i] and not w.touched_last[i]:
                        add_sum_of_squares(w.grad_views[i], sumsq, found_inf)
            devices = list(self._stats)
            sumsq = sum(self._stats[d][0].to(self.device) for d in devices)
            found_inf = torch.stack([self._stats[d][1].to(self.device) for d in devices]).amax()
            if self._uses_items:
                factor = (1.0 / self._items.clamp_min(1)).float()
            else:
                factor = torch.ones((), device=self.device)
            if self._scale is not None:
                factor = factor / self._scale
            self._grad_norm = sumsq.sqrt() * factor
            if self.max_grad_norm is not None:
                factor = factor * (self.max_grad_norm / (self._grad_norm + 1e-6)).clamp(max=1.0)
            self._found_inf = found_inf
            self.optimizer._fused_step(
                [w.touched for w in self._windows],
                factor={d: factor.to(d) for d in devices},
                found_inf={d: found_inf.to(d) for d in devices},
            )
            if self._dynamic:
                torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, *self._growth)
        for w in self._windows:
            w.touched = [False] * len(w.touched)
            w.touched_last = [False] * len(w.touched)
        self._reset_counts()
