"""Boundary-only data parallel over the arenas' gradient buffers (torch.distributed).

The one place that launches collectives for fa.GradAccumulator(..., process_group=pg), in the
manner of Megatron-LM's distributed/ (a contiguous grad buffer cut into buckets, a readiness
count per bucket, buckets reduced in a fixed order):

* Nothing is sent before the last micro-batch of a window: the arenas accumulate locally.
* During the last micro-batch's backward, the C++ Window reports every fold; a bucket whose
  parameters have all been folded is all-reduced asynchronously while the backward goes on.
  Buckets are numbered from the end of the arenas (backprop meets the last layers first) and
  launched strictly in that order, so every rank issues the same collectives in the same
  order whatever its own timing. What is not ready when the backward ends is launched then.
* One small all-reduce per window carries the item count and which parameters got a
  gradient on any rank: the window's mean is over every item of every rank, and a parameter
  used on one rank steps on all (DDP's find_unused_parameters semantics: the others add zero).
* The reduction is a sum; the mean's 1/world joins the step's device-side factor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Elements per all-reduce (a larger parameter is its own bucket): on a GPU, NCCL wants large
# messages; on CPU (gloo) smaller ones start earlier in the backward.
DEFAULT_REDUCE_BUCKET_NUMEL = {"cpu": 1 << 22, "cuda": 1 << 25}


class Bucket:
    """A contiguous range of one arena's gradient buffer, parameters [first, last)."""

    def __init__(self, window_index: int, first: int, last: int, lo: int, hi: int):
        self.window_index, self.first, self.last, self.lo, self.hi = window_index, first, last, lo, hi
        self.expected = 0  # parameters to fold in this micro-batch before the bucket is complete
        self.folded = 0
        self.launched = False


class DataParallel:
    def __init__(self, windows: list, group, reduce_bucket_numel: int | None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "GradAccumulator(..., process_group=...) needs torch.distributed initialized: call "
                "dist.init_process_group(...) first (torchrun sets the environment it reads)"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, dist.new_group(...)); "
                f"got {type(group).__name__}"
            )
        self.group = group
        self.world = dist.get_world_size(group)
        self.windows = windows
        self._check_same_parameters()
        self._broadcast_parameters()
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, list[int]] = {}  # window index -> per parameter, its bucket's index
        for wi in reversed(range(len(windows))):  # the last arena's end first: backprop order
            self._cut(wi, reduce_bucket_numel)
        self.works: list = []
        self.summary: torch.Tensor | None = None
        self.summary_work = None
        self.next_launch = 0
        self.global_touched: list[list[bool]] | None = None  # the window's union over ranks, once known
        self.items: torch.Tensor | None = None  # the window's items over all ranks, with global_touched

    # -- construction -----------------------------------------------------------------

    def _check_same_parameters(self) -> None:
        mine = [(str(w.arena.dtype), str(w.arena.grad.dtype), [tuple(p.shape) for p in w.arena.params],
                 [bool(p.requires_grad) for p in w.arena.params]) for w in self.windows]
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        for rank, theirs in enumerate(every):
            if theirs != mine:
                raise ValueError(
                    f"data parallel needs the same parameters on every rank (shapes, dtypes, requires_grad, in the "
                    f"same order), but rank {dist.get_rank(self.group)} and rank {rank} differ. Build the model and the "
                    f"optimizer the same way on every rank."
                )

    def _broadcast_parameters(self) -> None:
        """Every rank starts from the first rank's parameters (and fp32 masters or remainders), as DDP does when it wraps."""
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for w in self.windows:
                remainder = w.arena.remainder
                # gloo has no int16: a broadcast copies bits, so the remainder goes as bytes
                for flat in (w.arena.param, w.arena.master, None if remainder is None else remainder.view(torch.uint8)):
                    if flat is not None:
                        dist.broadcast(flat, src=src, group=self.group)

    def _cut(self, wi: int, reduce_bucket_numel: int | None) -> None:
        arena = self.windows[wi].arena
        limit = reduce_bucket_numel or DEFAULT_REDUCE_BUCKET_NUMEL.get(arena.device.type, DEFAULT_REDUCE_BUCKET_NUMEL["cuda"])
        n = len(arena.params)
        of = [0] * n
        last = n
        while last > 0:  # from the end of the arena, whole parameters per bucket
            first, size = last - 1, arena.numels[last - 1]
            while first > 0 and size + arena.numels[first - 1] <= limit:
                first -= 1
                size += arena.numels[first]
            lo, hi = arena.range_of(first, last)
            if first == 0:
                lo = 0
            if last == n:
                hi = arena.numel  # the alignment padding at the end (zero) goes with the last bucket
            for i in range(first, last):
                of[i] = len(self.buckets)
            self.buckets.append(Bucket(wi, first, last, lo, hi))
            last = first
        self.bucket_of[wi] = of

    # -- the last micro-batch -----------------------------------------------------------

    def start_last_micro_batch(self) -> None:
        """Before the last backward of a window: arm the readiness counts and listen to folds."""
        self.wait()  # a window discarded or restarted leaves nothing in flight
        self.global_touched = None
        self.next_launch = 0
        self.works = []
        self.counted = {wi: bytearray(len(w.arena.params)) for wi, w in enumerate(self.windows)}
        for b in self.buckets:
            hooked = self.windows[b.window_index].hooked
            b.expected = sum(hooked[b.first : b.last])
            b.folded = 0
            b.launched = False
        for wi, w in enumerate(self.windows):
            w.set_fold_listener(lambda indices, wi=wi: self._on_folded(wi, indices))

    def _on_folded(self, wi: int, indices: list[int]) -> None:
        of, counted = self.bucket_of[wi], self.counted[wi]
        for i in indices:
            b = self.buckets[of[i]]
            if b.launched:
                raise RuntimeError(
                    f"parameter {i} of param group {self.windows[wi].arena.group_index} got a second gradient in one "
                    f"backward after its bucket's all-reduce had started (a layer used several times under reentrant "
                    f"activation checkpointing?). With process_group=..., checkpoint with "
                    f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False): autograd then sums a parameter's "
                    f"contributions before handing over its gradient."
                )
            if not counted[i]:  # a second contribution before the launch is folded in place: count once
                counted[i] = 1
                b.folded += 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets):
            b = self.buckets[self.next_launch]
            if b.folded < b.expected:
                return
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        w = self.windows[b.window_index]
        touched = w.touched
        with torch.no_grad():
            for i in range(b.first, b.last):
                if not touched[i]:
                    w.grad_views[i].zero_()  # no gradient here this window: the stale slice adds nothing
        b.launched = True
        self.next_launch += 1
        self.works.append(dist.all_reduce(w.arena.grad[b.lo : b.hi], group=self.group, async_op=True))

    def end_of_backward(self, items: torch.Tensor) -> None:
        """After the last backward (every fold done, listening stopped): launch what is left, then the
        window's summary."""
        while self.next_launch < len(self.buckets):
            self._launch(self.buckets[self.next_launch])
        touched = [t for w in self.windows for t in w.touched]
        device = self.windows[0].arena.device if self.windows else items.device
        self.summary = torch.tensor([0.0] + touched, dtype=torch.float64).to(device)
        self.summary[0:1].copy_(items.reshape(1))
        self.summary_work = dist.all_reduce(self.summary, group=self.group, async_op=True)

    def stop_listening(self) -> None:
        for w in self.windows:
            w.set_fold_listener(None)

    # -- the step -----------------------------------------------------------------------

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []
        if self.summary_work is not None:
            self.summary_work.wait()
            self.summary_work = None

    def finish(self) -> tuple[list[list[bool]], torch.Tensor]:
        """Waits for the window's reductions; returns which parameters step (any rank) and the items of all ranks."""
        self.wait()
        if self.global_touched is None:
            self.items = self.summary[0]
            local = [w.touched for w in self.windows]
            if all(t == w.hooked for t, w in zip(local, self.windows)):
                self.global_touched = local  # every parameter that can get a gradient got one: no host read
            else:
                flags = (self.summary[1:] > 0).tolist()
                self.global_touched, k = [], 0
                for t in local:
                    self.global_touched.append(flags[k : k + len(t)])
                    k += len(t)
        return self.global_touched, self.items

    def restore(self, touched: list[list[bool]], items: torch.Tensor) -> None:
        """A checkpoint taken after the window's reductions: they are not run again."""
        self.wait()
        self.global_touched, self.items = [list(t) for t in touched], items

    def discard(self) -> None:
        """The window is dropped (acc.zero_grad(), or the step consumed it)."""
        self.stop_listening()
        self.wait()
        self.global_touched = None
