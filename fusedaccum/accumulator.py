"""fa.GradAccumulator: catches gradients as autograd produces them and folds them into the
optimizer's flat arenas with the accumulate op.

Two ways in:

* swap-in (no accumulation_steps): the user's loop stays `(loss / N).backward()`,
  `opt.step()`, `opt.zero_grad()`. Where the arena dtype equals the parameter dtype the
  accumulator stays out of the way: p.grad is torch's own, and the step reads it. Where they
  differ (bf16/fp16 parameters, fp32 arena) the gradients are hidden: at the end of each
  backward p.grad is folded into the fp32 arena and set to None; a window ends at
  optimizer.step().
* full path (accumulation_steps=N): `acc.backward(loss)` applies 1/N (or 1/items) inside the
  kernel, `acc.step()` closes the window with the clip coefficient, the inverse loss scale
  and skip-on-inf folded into the one fused step. Gradients are taken as they are produced
  (bucketed, one launch per bucket) and their memory released at once.

Per window, a parameter's first fold overwrites its slice of the arena, so nothing is zeroed.

The per-gradient work (hook, bucket, release of p.grad, launch of the fold) runs in C++:
fusedaccum._C.Window (csrc/window.cpp), one per arena whose gradients are taken over. This file
decides what a window is and when it closes; the Window files and folds.
"""
from __future__ import annotations

import functools
import numbers
import operator
import sys
import warnings
import weakref

import torch

from fusedaccum import dispatch, modules
from fusedaccum.arena import Arena
from fusedaccum.ops.accumulate import DENSE_ONLY
from fusedaccum.optim import FusedOptimizer

# Elements per launch of folding (a larger parameter is its own bucket). On a CPU a bucket the
# size of L2 is folded while its gradients are still in cache (2,000 x 4K window: 10% faster
# than 16M); on a GPU launches are what cost, and the whole L2 is not worth chasing.
DEFAULT_BUCKET_NUMEL = {"cpu": 1 << 18, "cuda": 1 << 24}
ACCUM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _explain(arena: Arena, kind: str, i: int) -> str:
    """The message of an error found by the C++ hook on parameter i of `arena`."""
    p = arena.params[i]
    if kind == "param":
        return arena.param_error(i)
    if kind == "sparse":
        return f"a parameter got a {p.grad.layout} gradient; {DENSE_ONLY}"
    if kind == "stale_main_grad":
        return (
            f"parameter {i} of param group {arena.group_index} got its gradient through p.main_grad "
            f"(p.grad_added_to_main_grad=True) for the first time after an earlier window had filled its slice of the "
            f"arena another way, so it was added to a stale gradient. Call acc.zero_grad() to start the window over: "
            f"from then on its slice is zeroed at the start of every window"
        )
    if kind == "grad":
        return (f"parameter {i} of param group {arena.group_index} got a {p.grad.dtype} gradient on {p.grad.device}; "
                f"fusedaccum accumulates float32, bfloat16 and float16 gradients on the parameter's device ({arena.device})")
    return (
        "a parameter managed by a full-path GradAccumulator got a gradient outside acc.backward(): "
        "call acc.backward(loss) instead of loss.backward() (it applies 1/N itself)"
    )


def _queue_end_of_backward_if_alive(accumulator: weakref.ref) -> None:
    # Called by a Window's hook: a weak reference, so that the hooks on the parameters do not
    # keep a dropped accumulator (and its optimizer) alive.
    acc = accumulator()
    if acc is not None:
        acc._queue_end_of_backward()


def _remove_hooks(windows: list) -> None:
    for w in windows:
        w.remove_hooks()


def _extension():
    if not dispatch.extension_loaded():
        raise RuntimeError(
            "fa.GradAccumulator needs the compiled extension fusedaccum._C (its gradient hooks are C++), which did not "
            "load; reinstall with `pip install --no-build-isolation .` after torch"
        )
    from fusedaccum import _C

    return _C


def _queue_callback(fn) -> None:
    if "torch._dynamo.compiled_autograd" in sys.modules and sys.modules["torch._dynamo.compiled_autograd"].in_compiled_autograd_region:
        raise RuntimeError(
            "fusedaccum's GradAccumulator does not run under compiled autograd (torch._dynamo.compiled_autograd): "
            "it needs the eager engine's end-of-backward callback. Run backward without compiled autograd, or use the "
            "fusedaccum optimizer without a GradAccumulator (its step reads p.grad)."
        )
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class GradAccumulator:
    def __init__(
        self,
        optimizer: FusedOptimizer,
        accumulation_steps: int | None = None,
        max_grad_norm: float | None = None,
        loss_scale: float | str | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
        bucket_numel: int | None = None,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        process_group=None,
        shard_optimizer_state: bool = False,
        reduce_bucket_numel: int | None = None,
        reduce_dtype: torch.dtype | None = None,
        main_grad: bool = False,
    ):
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                f"GradAccumulator needs a fusedaccum optimizer (fa.SGD, fa.Adam, fa.AdamW); got "
                f"{type(optimizer).__name__}. Build the optimizer with fusedaccum: it owns the arenas."
            )
        optimizer._check_current()
        self.full = accumulation_steps is not None
        if self.full:
            accumulation_steps = _positive_int(accumulation_steps, "accumulation_steps")
        if max_grad_norm is not None and not (_is_number(max_grad_norm) and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a positive finite number; got {max_grad_norm!r}")
        if loss_scale is not None and not self.full:
            raise ValueError(
                "loss_scale belongs to the full path: pass accumulation_steps=N and drive the loop with "
                "acc.backward(loss) and acc.step() (in swap-in mode use torch.amp.GradScaler as usual)"
            )
        if accum_dtype is not None and accum_dtype not in ACCUM_DTYPES:
            raise ValueError(f"accum_dtype must be torch.float32, torch.bfloat16, torch.float16 or None; got {accum_dtype}")
        if bucket_numel is not None:
            bucket_numel = _positive_int(bucket_numel, "bucket_numel")
        if reduce_bucket_numel is not None:
            reduce_bucket_numel = _positive_int(reduce_bucket_numel, "reduce_bucket_numel")
        if process_group is not None and not self.full:
            raise ValueError(
                "process_group belongs to the full path: pass accumulation_steps=N and drive the loop with "
                "acc.backward(loss) and acc.step(). In swap-in mode wrap the model in DistributedDataParallel as usual."
            )
        if reduce_dtype is not None and reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"reduce_dtype must be None (the arena's own dtype: an exact fp32 reduction), torch.float32 or "
                f"torch.bfloat16 (half the bytes on the wire: each rank's fp32 window sum is rounded to bf16 once); "
                f"got {reduce_dtype}"
            )
        if reduce_dtype is not None and process_group is None:
            raise ValueError(
                "reduce_dtype is the dtype of the data-parallel reduction: pass process_group=... too "
                "(dist.group.WORLD, or the data-parallel group)"
            )
        if shard_optimizer_state and process_group is None:
            raise ValueError(
                "shard_optimizer_state=True shards the optimizer state across the ranks of a process group: pass "
                "process_group=... too (dist.group.WORLD, or the data-parallel group)"
            )
        if main_grad and not self.full:
            raise ValueError(
                "main_grad=True belongs to the full path (layers that write p.main_grad themselves, as Megatron-LM's "
                "and TransformerEngine's do, need the window the full path keeps): pass accumulation_steps=N"
            )
        self._main_grad = bool(main_grad)
        self._bucket_numel = bucket_numel
        if self.full and not any(p.requires_grad for a in optimizer.arenas for p in a.params):
            raise ValueError("the optimizer has no parameter that requires grad: nothing to accumulate")
        if optimizer._accumulator is not None:
            optimizer._accumulator._detach()  # a new accumulator replaces the old one
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.accum_dtype = accum_dtype
        self.device = optimizer.arenas[0].device if optimizer.arenas else torch.device("cpu")
        # Under torch.distributed, swap-in keeps every p.grad visible: DDP reads and rewrites
        # p.grad at the end of backward (and only on synced micro-batches), so hiding it would
        # reduce the wrong gradient. The native data-parallel path is the full path's.
        self._distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

        self._dynamic = loss_scale == "dynamic"
        self._scale = None
        if loss_scale is not None:
            if not self._dynamic and not (_is_number(loss_scale) and 0 < loss_scale < float("inf")):
                raise ValueError(f'loss_scale must be "dynamic" or a positive finite number; got {loss_scale!r}')
            init = 2.0**16 if self._dynamic else float(loss_scale)
            self._scale = torch.full((), init, dtype=torch.float32, device=self.device)
            self._growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)
            self._growth = (growth_factor, backoff_factor, growth_interval)

        self._windows: list = []  # fusedaccum._C.Window, one per arena whose gradients are taken over
        self._window_of: dict[int, object] = {}  # id(arena) -> its window
        # Hooks off the parameters when this accumulator is dropped (garbage-collected).
        weakref.finalize(self, _remove_hooks, self._windows)
        self._detached = False
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._closing = False  # acc.step() is running optimizer.step()
        self._callback_queued = False
        self._stats_now = False
        self._warned_hidden = False
        self._fold_scale = 1.0
        self._items = torch.zeros((), dtype=torch.float64, device=self.device)  # items of this window
        self._reset_counts()
        self._grad_norm = None
        self._found_inf = None
        self._process_group = process_group
        self._reduce_bucket_numel = reduce_bucket_numel
        self._reduce_dtype = reduce_dtype
        self._shard = bool(shard_optimizer_state)
        self._dp = None  # fusedaccum.distributed.DataParallel under process_group=...
        optimizer._accumulator = self
        try:
            self._attach_arenas(optimizer.arenas)
        except BaseException:
            self._detach()  # refused (e.g. by the ranks' checks): the optimizer is left without an accumulator
            raise

    # -- public API -------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, num_items=None, **backward_kwargs) -> None:
        """loss.backward() for one micro-batch, folding its gradients into the arena.

        Without num_items the loss is a mean and each micro-batch counts 1/N. With num_items the
        loss is a sum over num_items items (tokens) and the window ends as the exact mean over
        all items of the window.
        """
        self._check_attached()
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
        if uses_items:
            num_items = _check_items(num_items)
        if self._micro_step == 0:
            self._uses_items = uses_items
        elif uses_items != self._uses_items:
            raise ValueError(
                "num_items was passed to some acc.backward() calls of this window but not others; pass it to "
                "every call of a window (loss = sum over items) or to none (loss = mean)"
            )
        self._adopt_new_params()
        self._check_untouched_grads()
        for w in self._windows:
            w.follow_current_stream()  # the hooked nodes run on this backward's stream
        last = self._micro_step == n - 1
        # Data parallel: the norm and the non-finite flag are the reduced gradient's, read at the step.
        self._stats_now = last and self._dp is None
        if self._stats_now:
            for sumsq, found_inf in self._stats.values():
                sumsq.zero_()
                found_inf.zero_()
        self._fold_scale = 1.0 if uses_items else 1.0 / n
        if self._main_grad and self._fold_scale != 1.0:
            # Layers that add into p.main_grad themselves cannot apply 1/N: it goes into the loss,
            # as in the standard loop, and every gradient arrives already scaled.
            loss = loss * self._fold_scale
            self._fold_scale = 1.0
        if self._scale is not None:
            loss = loss * self._scale
        reduce_now = last and self._dp is not None
        if reduce_now:
            self._dp.start_last_micro_batch()
        self._set_mode(in_backward=True)
        try:
            loss.backward(**backward_kwargs)
        finally:
            self._set_mode(in_backward=False)
            for w in self._windows:
                w.flush_all()
            if reduce_now:
                self._dp.stop_listening()
        # After backward (and every end-of-backward callback, DistributedDataParallel's
        # all-reduce among them): a p.grad now did not come through the hooks.
        self._check_untouched_grads()
        if uses_items:
            # On the device, whatever num_items is: adding a Python number is a kernel with a
            # scalar argument, so no copy from the host happens (and a window can be captured).
            self._items.add_(num_items.to(self.device) if torch.is_tensor(num_items) else num_items)
        if reduce_now:
            self._dp.end_of_backward(self._items)
        self._micro_step += 1
        self._awaiting_step = True

    def step(self) -> bool:
        """Closes the window after its last micro-batch (returns True); otherwise returns False."""
        self._check_attached()
        if not self.full:
            raise RuntimeError("acc.step() is the full path (accumulation_steps=N); in swap-in mode call optimizer.step()")
        if self._micro_step == 0:
            raise RuntimeError("acc.step() with no acc.backward() in this window: call acc.backward(loss) first")
        self._awaiting_step = False
        if self._micro_step < self.accumulation_steps:
            return False
        # Through optimizer.step(), so that its hooks run and LR schedulers see the step.
        self._closing = True
        try:
            self.optimizer.step()
        finally:
            self._closing = False
        return True

    def zero_grad(self) -> None:
        """Discards the current window: what was accumulated since the last step is dropped and
        the next micro-batch starts a new window (e.g. after an exception inside acc.backward())."""
        self._check_attached()
        if self._dp is not None:
            self._dp.discard()
        for w in self._windows:
            w.drop_deferred()
            w.restart()
        self._reset_counts()
        self._callback_queued = False
        if self.full:
            self._clear_grads()
        else:
            self.optimizer.zero_grad()

    @property
    def sync_gradients(self) -> bool:
        """True while the current micro-batch is the last of its window (HF Accelerate's name).

        A micro-batch is current from the acc.step() before it up to its own acc.step(): read
        before its forward it says whether this one closes the window (e.g. to skip DDP's sync),
        read between acc.backward() and acc.step() it still speaks of the micro-batch just run
        (Accelerate's `if accelerator.sync_gradients:` after backward)."""
        if not self.full:
            return True
        current = self._micro_step - 1 if self._awaiting_step else self._micro_step
        return current >= self.accumulation_steps - 1

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
        # Data parallel, after the last backward and before the step: the reduced window.
        reduced = self._dp is not None and self._micro_step == self.accumulation_steps
        touched, items = self._dp.finish() if reduced else ([w.touched for w in self._windows], self._items)
        return {
            "micro_step": self._micro_step,
            "awaiting_step": self._awaiting_step,
            "uses_items": self._uses_items,
            "items": items.clone(),
            "touched": touched,
            # reduced: where the reduction left them (a bf16 reduction's buffer, or the arena)
            "grads": [self._dp.reduced_grad(i) if reduced else w.arena.grad for i, w in enumerate(self._windows)],
            "loss_scale": None if self._scale is None else (self._scale, self._growth_tracker),
            "reduced": reduced,
            "shards": self._dp.ranges() if reduced else None,  # ZeRO-1: only these ranges of the grads are reduced
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_attached()
        if len(state["grads"]) != len(self._windows):
            raise ValueError("this accumulator state was saved for a different set of arenas (other model or optimizer)")
        if state.get("reduced") and self._dp is not None and state.get("shards") != self._dp.ranges():
            raise ValueError(
                "this accumulator state was saved between the last acc.backward() and acc.step() of a data-parallel "
                "window with another sharding of the optimizer state (shard_optimizer_state, world size, rank or "
                "reduce_bucket_numel differ): each rank's gradients are reduced only where it kept state. Load it with "
                "the same settings, or save at another point of the window"
            )
        self._micro_step = state["micro_step"]
        self._awaiting_step = state.get("awaiting_step", False)  # absent in states saved before it was kept
        self._uses_items = state["uses_items"]
        self._items.copy_(state["items"])
        with torch.no_grad():
            for w, touched, grad in zip(self._windows, state["touched"], state["grads"]):
                w.restart()
                w.arena.grad.copy_(grad)
                w.set_touched(list(touched))
                if self._main_grad:  # slices that p.main_grad writers add into start at zero
                    for view, t in zip(w.grad_views, touched):
                        if not t:
                            view.zero_()
                    w.set_external(True)
        if state["loss_scale"] is not None and self._scale is not None:
            self._scale.copy_(state["loss_scale"][0])
            self._growth_tracker.copy_(state["loss_scale"][1])
        if self._dp is not None:
            self._dp.discard()
            if state.get("reduced"):
                self._dp.restore(state["touched"], self._items.clone())
        elif state.get("reduced"):
            raise ValueError(
                "this accumulator state was saved by a data-parallel run between its last acc.backward() and "
                "acc.step() (the gradients are already reduced across ranks): load it into an accumulator with "
                "process_group=..., or save it at another point of the window"
            )

    # -- attaching to the optimizer's arenas ------------------------------------------

    def _attach_arenas(self, arenas: list[Arena]) -> None:
        for arena in arenas:
            dtype = arena.dtype if self.accum_dtype is None or (self._distributed and not self.full) else self.accum_dtype
            arena.ensure_grad(dtype)
            if not self.full and arena.grad.dtype == arena.dtype:
                continue  # swap-in with visible gradients: p.grad is torch's, the step reads it
            if arena.device not in self._stats:  # (sum of squares, non-finite flag) of the last fold
                sumsq = torch.zeros((), dtype=torch.float32, device=arena.device)
                self._stats[arena.device] = (sumsq, torch.zeros_like(sumsq))
            w = _extension().Window(
                arena.grad, arena.params, arena.offsets,
                self._bucket_numel or DEFAULT_BUCKET_NUMEL.get(arena.device.type, DEFAULT_BUCKET_NUMEL["cuda"]),
                self.full, *self._stats[arena.device],
                functools.partial(_explain, arena), arena.take_back,
                functools.partial(_queue_end_of_backward_if_alive, weakref.ref(self)),
            )
            w.arena, w.grad_views = arena, arena.views(arena.grad)
            self._windows.append(w)
            self._window_of[id(arena)] = w
            w.hook_all()
            if self.full:
                modules.register(self, len(self._windows) - 1, w)  # fa.Linear / fa.Embedding write into it
            if self._main_grad:
                modules.expose_main_grad(w)
        if self._process_group is not None:
            from fusedaccum.distributed import DataParallel

            if self._dp is not None:
                self._dp.discard()
            self._dp = DataParallel(self._windows, self._process_group, self._reduce_bucket_numel, self._shard,
                                    self._reduce_dtype)
            if self._shard:
                self.optimizer._unpublish_shards()

    def _adopt_new_params(self) -> None:
        """Hooks parameters that started requiring grad after the accumulator was created."""
        for w in self._windows:
            w.hook_all()

    def _set_mode(self, in_backward: bool) -> None:
        for w in self._windows:
            native = dispatch.backend_for(w.arena.device) in ("cpp", "cuda")
            w.set_mode(self._fold_scale, self._stats_now, in_backward, native)

    def _set_swap_in_mode(self) -> None:
        """Swap-in folds: the gradients as they are (the user's loss already carries 1/N), no norm."""
        self._fold_scale, self._stats_now = 1.0, False
        self._set_mode(in_backward=False)

    def _detach(self) -> None:
        """Takes this accumulator's hooks off the parameters; it can no longer be used."""
        _remove_hooks(self._windows)
        modules.unregister(self)
        if self._main_grad:
            for w in self._windows:
                modules.hide_main_grad(w)
        self._detached = True
        if self.optimizer._accumulator is self:
            self.optimizer._accumulator = None

    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError(
                "this GradAccumulator was replaced (a newer GradAccumulator or a newer fusedaccum optimizer took over "
                "its parameters): use the newer one"
            )

    # -- folding (the per-gradient work is fusedaccum._C.Window's) -------------------------

    def _queue_end_of_backward(self) -> None:
        """Swap-in with hidden gradients: fold p.grad once the backward is over."""
        if not self._callback_queued:
            self._callback_queued = True
            # Queued again from inside: runs after every callback queued during this backward
            # (DistributedDataParallel's finalize_backward among them).
            _queue_callback(lambda: _queue_callback(self._end_of_backward))

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._set_swap_in_mode()
        for w in self._windows:
            w.fold_deferred()
            w.follow_current_stream()  # the caller's stream (callbacks run on it): the next backward's, likely

    def _check_untouched_grads(self, w=None) -> None:
        for w in self._windows if w is None else [w]:
            if w.first_grad() >= 0:
                # A parameter converted to another dtype or device gets a new AccumulateGrad
                # node, without the hook: say that, not that the gradient came from elsewhere.
                w.arena.take_back_params()
                raise RuntimeError(
                    "a parameter of a full-path GradAccumulator has a p.grad that did not come through acc.backward(): "
                    "it was written after the accumulator took the gradient (DistributedDataParallel does this when it "
                    "all-reduces), set by hand, or left from a loss.backward() before the accumulator was attached. "
                    "Under a DDP-wrapped model use swap-in mode (GradAccumulator(opt), loss.backward(), opt.step()) or "
                    "the native data-parallel path on the unwrapped model (GradAccumulator(..., process_group=pg): it "
                    "reduces the gradients itself); otherwise call acc.zero_grad() to drop stray gradients."
                )

    # -- window boundaries --------------------------------------------------------------

    def _reset_counts(self) -> None:
        self._micro_step = 0
        self._awaiting_step = False  # an acc.backward() not yet followed by acc.step()
        self._uses_items = None
        self._items.zero_()

    def _clear_grads(self) -> None:
        for w in self._windows:
            w.clear_grads()

    def _collect(self, arena: Arena) -> list[bool]:
        """The optimizer's _reconcile asks which parameters of `arena` step, and with what gradient."""
        w = self._window_of.get(id(arena))
        if w is None:
            return self.optimizer._gather_grads(arena)  # visible gradients: p.grad is the truth
        if self.full:
            self._check_untouched_grads(w)
            if self._dp is not None:
                return self._dp.global_touched[self._windows.index(w)]  # any rank's gradient steps
            return w.touched
        # Hidden: a p.grad set by hand after the last backward joins the window (and stays, as in torch).
        self._set_swap_in_mode()
        w.fold_grads()
        return w.touched

    def _optimizer_step(self) -> None:
        self._check_attached()
        if self.full and self._closing:
            self._close_window()
            return
        if self.full:
            raise RuntimeError(
                "this optimizer's GradAccumulator owns the window (accumulation_steps was given): call acc.step() "
                "after each acc.backward() instead of optimizer.step()"
            )
        self._adopt_new_params()
        touched = self.optimizer._reconcile()
        factor, found_inf = self.optimizer._grad_scaler_inputs()
        if (factor or found_inf) and any(w.any_touched() for w in self._windows):
            raise RuntimeError(
                "torch.amp.GradScaler cannot see the gradients this GradAccumulator hides (bf16/fp16 parameters, fp32 "
                "arena): it would step with scaled gradients and miss overflows. Use the full path's own loss scaling, "
                "GradAccumulator(opt, accumulation_steps=N, loss_scale='dynamic'), or accum_dtype=None to keep p.grad "
                "visible to the scaler."
            )
        self._warn_hidden_once()
        if self.max_grad_norm is not None:
            with torch.no_grad():
                scale = factor.get(self.device, torch.ones((), device=self.device))
                self._grad_norm = self._swap_in_sumsq(touched).sqrt() * scale
                coef = scale * self._clip_coefficient()
            factor = {a.device: coef.to(a.device) for a in self.optimizer.arenas}
        self.optimizer._fused_step(touched, factor=factor, found_inf=found_inf)
        for w in self._windows:
            w.restart()

    def _restart_window(self) -> None:
        """optimizer.zero_grad(): in swap-in mode the hidden window starts over, as p.grad would."""
        if self.full:
            raise RuntimeError(
                "optimizer.zero_grad() is not needed with a full-path GradAccumulator: acc.step() starts the next "
                "window (the first micro-batch overwrites the arena); acc.zero_grad() discards a window"
            )
        for w in self._windows:
            w.restart()

    def _warn_hidden_once(self) -> None:
        if self._warned_hidden or self.max_grad_norm is not None or not any(w.any_touched() for w in self._windows):
            return
        self._warned_hidden = True
        dtypes = sorted({str(w.arena.dtype).replace("torch.", "") for w in self._windows})
        warnings.warn(
            f"fusedaccum: the gradients of the {'/'.join(dtypes)} parameters are accumulated in "
            f"{str(self._windows[0].arena.grad.dtype).replace('torch.', '')} inside the optimizer and p.grad stays "
            f"None, so torch.nn.utils.clip_grad_norm_ (HF Trainer's max_grad_norm, accelerator.clip_grad_norm_, "
            f"Lightning's gradient_clip_val) sees no gradient and clips nothing. To clip, pass "
            f"GradAccumulator(opt, max_grad_norm=...); to keep torch's own p.grad in the parameter dtype instead, "
            f"pass accum_dtype=None.",
            stacklevel=4,
        )

    def _swap_in_sumsq(self, touched: list[list[bool]]) -> torch.Tensor:
        """Sum of squares of the gradients about to be stepped (swap-in clipping: one read pass)."""
        sumsq = torch.zeros((), dtype=torch.float32, device=self.device)
        for arena, t in zip(self.optimizer.arenas, touched):
            part = torch.zeros((), dtype=torch.float32, device=arena.device)
            _add_squares(arena.step_grads(t), part, None)
            sumsq += part.to(self.device)
        return sumsq

    def _clip_coefficient(self) -> torch.Tensor:
        """min(1, max_grad_norm / (grad_norm + 1e-6)): clip_grad_norm_'s formula."""
        return (self.max_grad_norm / (self._grad_norm + 1e-6)).clamp(max=1.0)

    def _close_window(self) -> None:
        items, norms = self._items, []
        if self._dp is not None:
            # Waits for the reductions, measuring each bucket's norm as soon as it is reduced (the
            # reduced gradient's norm and inf flag, identical on every rank, so all clip and skip
            # alike; with ZeRO-1 this rank's pieces, summed across ranks below). _reconcile then
            # reads the union of touched.
            with torch.no_grad():
                _, items = self._dp.finish(norms)
        touched = self.optimizer._reconcile()
        with torch.no_grad():
            if self._dp is None:
                # Norm and inf flag of parameters whose last gradient came before the last micro-batch.
                for w in self._windows:
                    ever, last = w.touched, w.touched_last
                    if ever != last:
                        views = [w.grad_views[i] for i, (t, t_last) in enumerate(zip(ever, last)) if t and not t_last]
                        _add_squares(views, *self._stats[w.arena.device])
            else:
                for device, (sumsq, found_inf) in self._stats.items():
                    sumsq.zero_()
                    found_inf.zero_()
                    _add_norms([n for n in norms if n.device == device], sumsq, found_inf)
            devices = list(self._stats)
            sumsq = sum(self._stats[d][0].to(self.device) for d in devices)
            found_inf = torch.stack([self._stats[d][1].to(self.device) for d in devices]).amax()
            if self._dp is not None and self._dp.shard:
                sumsq, found_inf = self._dp.reduce_stats(sumsq, found_inf)  # each rank measured its pieces
            factor = torch.ones((), device=self.device)
            if self._dp is not None and not self._uses_items:
                factor = factor / self._dp.world  # the reduction summed the ranks' means
            if self._uses_items:
                # A window without items (all padding) has no mean: it is skipped like a non-finite one.
                found_inf = torch.maximum(found_inf, (items <= 0).float())
                factor = (1.0 / items.clamp_min(1)).float()
            if self._scale is not None:
                factor = factor / self._scale
            self._grad_norm = sumsq.sqrt() * factor
            if self.max_grad_norm is not None:
                factor = factor * self._clip_coefficient()
            self._found_inf = found_inf
            sharded = self._dp is not None and self._dp.shard
            self.optimizer._fused_step(
                touched,
                factor={d: factor.to(d) for d in devices},
                found_inf={d: found_inf.to(d) for d in devices},
                # ZeRO-1: a bucket's parameters are all-gathered once this rank has stepped its piece
                # of them, while it steps the next pieces.
                stepped=self._dp.start_param_gathers() if sharded else None,
                # a bf16 reduction's result is read where it is, in bf16
                grads=None if self._dp is None else {id(w.arena): self._dp.reduced_grad(i) for i, w in enumerate(self._windows)},
            )
            if sharded:
                self._dp.all_gather_params()  # the buckets not gathered yet; waits for all
            if self._dynamic:
                torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, *self._growth)
        for w in self._windows:
            w.restart()
        if self._dp is not None:
            self._dp.discard()
        self._reset_counts()


def _add_squares(tensors: list[torch.Tensor], sumsq: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    """sumsq += the sum of every element squared; found_inf = 1 where one is not finite.

    For the ranges no fold measured (swap-in clipping, parameters last folded before the last
    micro-batch; data parallel measures its reduced buckets the same way, in
    DataParallel.reduced_norms): one read pass through torch's fp32 norm (cascade summation,
    every thread; 20x faster on a CPU than a float64 sum). A norm past 1.8e19, whose fp32 square
    overflows, reads as non-finite: the window is skipped as for an inf.
    """
    _add_norms([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors], sumsq, found_inf)


def _add_norms(norms: list[torch.Tensor], sumsq: torch.Tensor, found_inf: torch.Tensor | None) -> None:
    """sumsq += the sum of the squared norms; found_inf = 1 where that is not finite."""
    if not norms:
        return
    total = torch.stack(norms).square().sum()
    sumsq += total
    if found_inf is not None:
        found_inf.copy_(torch.where(total.isfinite(), found_inf, torch.ones_like(found_inf)))


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(value, name: str) -> int:
    """Any integer type (numpy's too), not bool, at least 1."""
    if isinstance(value, bool) or torch.is_tensor(value):
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer; got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value}")
    return value


def _check_items(num_items):
    """num_items: a positive number or one-element tensor (a device tensor is checked at the step)."""
    if torch.is_tensor(num_items):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor; got a tensor of shape {tuple(num_items.shape)}")
        if num_items.device.type == "cpu" and not num_items.item() > 0:
            raise ValueError(f"num_items must be positive (the number of items summed in this loss); got {num_items.item()}")
        return num_items.reshape(())
    if isinstance(num_items, bool) or not _is_number(num_items) or not num_items > 0:
        raise ValueError(f"num_items must be a positive number (the number of items summed in this loss); got {num_items!r}")
    return num_items
