"""Boundary-only data parallel over the arenas' gradient buffers (torch.distributed).

The one place that launches collectives for fa.GradAccumulator(..., process_group=pg), in the
manner of Megatron-LM's distributed/ (a contiguous grad buffer cut into buckets, a readiness
count per bucket, buckets reduced in a fixed order):

* Nothing is sent before the last micro-batch of a window: the arenas accumulate locally.
* During the last micro-batch's backward, the C++ Window reports every fold; a bucket whose
  parameters have all been folded is reduced asynchronously while the backward goes on.
  Buckets are numbered from the end of the arenas (backprop meets the last layers first) and
  launched strictly in that order, so every rank issues the same collectives in the same
  order whatever its own timing. What is not ready when the backward ends is launched then.
* One small all-reduce per window carries the item count and which parameters got a
  gradient on any rank: the window's mean is over every item of every rank, and a parameter
  used on one rank steps on all (DDP's find_unused_parameters semantics: the others add zero).
* The reduction is a sum; the mean's 1/world joins the step's device-side factor.
* reduce_dtype=torch.bfloat16 sends each bucket as bf16 (half the bytes): each rank's window is
  still summed in the fp32 arena, its sum is rounded to bf16 once into a bf16 buffer the size of
  the arena (kept for the accumulator's life: 2 B per parameter, as DDP keeps its buckets), the
  ranks' sums are added in bf16 by the collective in that buffer, and the reduced gradient stays
  there: the norm and the optimizer step read it in bf16 (no pass widens it back into the arena,
  which keeps the rank's own fp32 sum).

With shard_optimizer_state=True (ZeRO-1) each bucket is cut into `world` equal pieces and
rank r keeps the optimizer state (and fp32 master or remainder) of its piece only: the bucket
is reduce-scattered in place instead of all-reduced, each rank steps its pieces, and the
updated parameters are all-gathered in place. Buckets then cut through parameters, at
multiples of world * ALIGN elements so that every piece is aligned; the arena's last
world * ALIGN elements or fewer form a small bucket of their own, staged through a padded
buffer (the collectives want world equal pieces).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fusedaccum.arena import ALIGN

# Elements per reduction (unsharded, a larger parameter is its own bucket): on a GPU, NCCL
# wants large messages; on CPU (gloo) smaller ones start earlier in the backward.
DEFAULT_REDUCE_BUCKET_NUMEL = {"cpu": 1 << 22, "cuda": 1 << 25}

# torch 2.14 renamed the single-tensor collectives (the old names warn).
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class Bucket:
    """A contiguous range [lo, hi) of one arena's gradient buffer and the parameters it holds
    (whole ones, or with sharding any that intersect it)."""

    def __init__(self, window_index: int, lo: int, hi: int, params: list[int]):
        self.window_index, self.lo, self.hi, self.params = window_index, lo, hi, params
        self.piece = 0  # elements per rank (sharded): rank r keeps [lo + r * piece, lo + (r + 1) * piece) ∩ [lo, hi)
        self.staged = False  # (sharded) hi - lo is not world * piece: the collectives go through a padded copy
        self.expected = 0  # parameters to fold in this micro-batch before the bucket is complete
        self.folded = 0
        self.launched = False

    def mine(self, rank: int) -> tuple[int, int]:
        """The range of the arena this rank keeps state for (sharded); may be empty at the end."""
        return min(self.lo + rank * self.piece, self.hi), min(self.lo + (rank + 1) * self.piece, self.hi)


class DataParallel:
    def __init__(self, windows: list, group, reduce_bucket_numel: int | None, shard: bool = False,
                 reduce_dtype: torch.dtype | None = None):
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
        self.rank = dist.get_rank(group)
        self.shard = bool(shard)
        self.reduce_dtype = reduce_dtype  # None: each arena's gradient dtype
        self.windows = windows
        self._check_same_setup()
        self.buckets: list[Bucket] = []
        # window index -> per parameter, the indices of the buckets that hold it
        self.bucket_of: dict[int, list[list[int]]] = {}
        for wi in reversed(range(len(windows))):  # the last arena's end first: backprop order
            self._cut(wi, reduce_bucket_numel)
        self._broadcast_parameters()
        self._shard_arenas()
        self.reductions: list = []  # the window's bucket reductions: (collective, what to do once done or None, bucket)
        self.reduced: list[Bucket] = []  # buckets whose reduction is done and whose norm is not measured yet
        self.works: list = []  # other collectives (ZeRO-1's gathers): (collective, what to do once done or None)
        self.pending_gathers: list[list[Bucket]] = []  # ZeRO-1, during the step: per arena, buckets not gathered yet
        self.wires: dict[int, torch.Tensor] = {}  # with reduce_dtype: per arena, what goes over the wire (kept)
        self.summary: torch.Tensor | None = None
        self.summary_work = None
        self.next_launch = 0
        self.global_touched: list[list[bool]] | None = None  # the window's union over ranks, once known
        self.items: torch.Tensor | None = None  # the window's items over all ranks, with global_touched

    # -- construction -----------------------------------------------------------------

    def _check_same_setup(self) -> None:
        mine = [(str(w.arena.dtype), str(w.arena.grad.dtype), [tuple(p.shape) for p in w.arena.params],
                 [bool(p.requires_grad) for p in w.arena.params]) for w in self.windows]
        every = [None] * self.world
        options = (self.shard, str(self.reduce_dtype))
        dist.all_gather_object(every, (options, mine), group=self.group)
        for rank, (theirs_options, theirs) in enumerate(every):
            if theirs != mine:
                raise ValueError(
                    f"data parallel needs the same parameters on every rank (shapes, dtypes, requires_grad, in the "
                    f"same order), but rank {self.rank} and rank {rank} differ. Build the model and the "
                    f"optimizer the same way on every rank."
                )
            if theirs_options != options:
                raise ValueError(
                    f"(shard_optimizer_state, reduce_dtype) is {options} on rank {self.rank} but {theirs_options} on "
                    f"rank {rank}: pass the same GradAccumulator arguments on every rank"
                )

    def _broadcast_parameters(self) -> None:
        """Every rank starts from the first rank's parameters (and fp32 masters or remainders), as DDP
        does when it wraps. An arena sharded by an earlier accumulator keeps its pieces of the masters
        and remainders: they are this rank's own."""
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for w in self.windows:
                w.arena.take_back_params()  # the broadcast writes the arena: the parameters must alias it
                flats = [w.arena.param]
                if not w.arena.sharded:
                    # gloo and NCCL have no int16: a broadcast copies bits, so the remainder goes as bytes
                    remainder = w.arena.remainder
                    flats += [w.arena.master, None if remainder is None else remainder.view(torch.uint8)]
                for flat in flats:
                    if flat is not None:
                        dist.broadcast(flat, src=src, group=self.group)

    def _cut(self, wi: int, reduce_bucket_numel: int | None) -> None:
        arena = self.windows[wi].arena
        limit = reduce_bucket_numel or DEFAULT_REDUCE_BUCKET_NUMEL.get(arena.device.type, DEFAULT_REDUCE_BUCKET_NUMEL["cuda"])
        ranges = self._element_ranges(arena, limit) if self.shard else self._parameter_ranges(arena, limit)
        of: list[list[int]] = [[] for _ in arena.params]
        for lo, hi in ranges:
            params = [i for i, (o, n) in enumerate(zip(arena.offsets, arena.numels)) if o < hi and o + n > lo]
            b = Bucket(wi, lo, hi, params)
            if self.shard:
                unit = self.world * ALIGN
                b.piece = -(-(hi - lo) // unit) * ALIGN
                b.staged = (hi - lo) != self.world * b.piece
            for i in params:
                of[i].append(len(self.buckets))
            self.buckets.append(b)
        self.bucket_of[wi] = of

    @staticmethod
    def _parameter_ranges(arena, limit: int) -> list[tuple[int, int]]:
        """Whole parameters per bucket, from the end of the arena."""
        out, n, last = [], len(arena.params), len(arena.params)
        while last > 0:
            first, size = last - 1, arena.numels[last - 1]
            while first > 0 and size + arena.numels[first - 1] <= limit:
                first -= 1
                size += arena.numels[first]
            lo, hi = arena.range_of(first, last)
            if first == 0:
                lo = 0
            if last == n:
                hi = arena.numel  # the alignment padding at the end (zero) goes with the last bucket
            out.append((lo, hi))
            last = first
        return out

    def _element_ranges(self, arena, limit: int) -> list[tuple[int, int]]:
        """Sharded: from the end of the arena, a bucket of what is past the last multiple of
        world * ALIGN, then buckets of `limit` elements rounded up to that unit."""
        unit = self.world * ALIGN
        limit = -(-limit // unit) * unit
        out, hi = [], arena.numel
        if hi % unit:
            out.append((hi - hi % unit, hi))
            hi -= hi % unit
        while hi > 0:
            out.append((max(0, hi - limit), hi))
            hi = out[-1][0]
        return out

    def _shard_arenas(self) -> None:
        """ZeRO-1: each arena keeps the state of this rank's pieces of its buckets."""
        for wi, w in enumerate(self.windows):
            arena = w.arena
            if not self.shard:
                if arena.sharded:
                    raise ValueError(
                        "this optimizer's state is sharded across ranks (an earlier GradAccumulator had "
                        "shard_optimizer_state=True): pass shard_optimizer_state=True again, or load "
                        "opt.state_dict() into a new optimizer"
                    )
                continue
            ranges = sorted(b.mine(self.rank) for b in self.buckets if b.window_index == wi)
            ranges = [(lo, hi) for lo, hi in ranges if hi > lo]
            if arena.sharded:
                if [(lo, hi) for lo, hi, _ in arena.owned] != ranges:
                    raise ValueError(
                        "this optimizer's state is already sharded differently (another process group, world size or "
                        "reduce_bucket_numel): pass the same ones as the first sharded GradAccumulator, or load "
                        "opt.state_dict() into a new optimizer"
                    )
                arena.sharding = self
            else:
                arena.shard(ranges, self)

    # -- the last micro-batch -----------------------------------------------------------

    def start_last_micro_batch(self) -> None:
        """Before the last backward of a window: arm the readiness counts and listen to folds."""
        self.wait()  # a window discarded or restarted leaves nothing in flight
        self.global_touched = None
        self.next_launch = 0
        self.reduced = []
        self.counted = {wi: bytearray(len(w.arena.params)) for wi, w in enumerate(self.windows)}
        for b in self.buckets:
            hooked = self.windows[b.window_index].hooked
            b.expected = sum(hooked[i] for i in b.params)
            b.folded = 0
            b.launched = False
        for wi, w in enumerate(self.windows):
            w.set_fold_listener(lambda indices, wi=wi: self._on_folded(wi, indices))

    def _on_folded(self, wi: int, indices: list[int]) -> None:
        of, counted = self.bucket_of[wi], self.counted[wi]
        for i in indices:
            for k in of[i]:
                if self.buckets[k].launched:
                    raise RuntimeError(
                        f"parameter {i} of param group {self.windows[wi].arena.group_index} got a second gradient in "
                        f"one backward after its bucket's reduction had started (a layer used several times under "
                        f"reentrant activation checkpointing?). With process_group=..., checkpoint with "
                        f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False): autograd then sums a "
                        f"parameter's contributions before handing over its gradient."
                    )
            if not counted[i]:  # a second contribution before the launch is folded in place: count once
                counted[i] = 1
                for k in of[i]:
                    self.buckets[k].folded += 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets):
            b = self.buckets[self.next_launch]
            if b.folded < b.expected:
                return
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        w = self.windows[b.window_index]
        arena, touched = w.arena, w.touched
        with torch.no_grad():
            for i in b.params:
                if not touched[i]:  # no gradient here this window: the stale slice adds nothing
                    o = arena.offsets[i]
                    arena.grad[max(o, b.lo) : min(o + arena.numels[i], b.hi)].zero_()
        b.launched = True
        self.next_launch += 1
        flat = arena.grad
        wire = self._wire(b.window_index)
        if wire is not None:
            wire[b.lo : b.hi].copy_(flat[b.lo : b.hi])  # the rank's fp32 window sum, rounded once
            flat = wire  # the reduction happens there, and its result stays there
        if self.shard:
            self.reductions.append((*self._reduce_scatter(flat, b), b))
            return
        self.reductions.append((dist.all_reduce(flat[b.lo : b.hi], group=self.group, async_op=True), None, b))

    def _wire(self, wi: int) -> torch.Tensor | None:
        """Arena `wi`'s buffer in reduce_dtype, or None where its gradient is already in that dtype."""
        grad = self.windows[wi].arena.grad
        if self.reduce_dtype is None or self.reduce_dtype == grad.dtype:
            return None
        if wi not in self.wires:
            self.wires[wi] = grad.new_zeros(grad.numel(), dtype=self.reduce_dtype)
        return self.wires[wi]

    def reduced_grad(self, wi: int) -> torch.Tensor:
        """Where arena `wi`'s reduced gradient is once the window's reductions are done (this rank's
        pieces of it when sharded): its reduce_dtype buffer, or the arena's gradient itself."""
        wire = self._wire(wi)
        return self.windows[wi].arena.grad if wire is None else wire

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

    # -- the sharded collectives (in place, as NCCL and gloo allow) ----------------------

    def _reduce_scatter(self, flat: torch.Tensor, b: Bucket):
        """Starts summing flat[b.lo:b.hi] over the ranks into this rank's piece of it (through a
        padded copy where the bucket is not world equal pieces)."""
        r, s = self.rank, b.piece
        if not b.staged:
            piece = flat[b.lo + r * s : b.lo + (r + 1) * s]
            return _reduce_scatter(piece, flat[b.lo : b.hi], group=self.group, async_op=True), None
        padded = flat.new_zeros(self.world * s)
        padded[: b.hi - b.lo].copy_(flat[b.lo : b.hi])
        work = _reduce_scatter(padded[r * s : (r + 1) * s], padded, group=self.group, async_op=True)
        x, y = b.mine(r)
        return work, lambda: flat[x:y].copy_(padded[r * s : r * s + y - x])

    def _all_gather(self, flat: torch.Tensor, b: Bucket, mine: torch.Tensor | None = None):
        """Starts filling flat[b.lo:b.hi] with every rank's piece (this rank's: `mine`, or already in place)."""
        r, s = self.rank, b.piece
        x, y = b.mine(r)
        if not b.staged:
            if mine is not None:
                flat[x:y].copy_(mine)
            return _all_gather(flat[b.lo : b.hi], flat[x:y], group=self.group, async_op=True), None
        padded = flat.new_zeros(self.world * s)
        padded[r * s : r * s + y - x].copy_(flat[x:y] if mine is None else mine)
        work = _all_gather(padded, padded[r * s : (r + 1) * s], group=self.group, async_op=True)
        return work, lambda: flat[b.lo : b.hi].copy_(padded[: b.hi - b.lo])

    def start_param_gathers(self):
        """Before a sharded step: returns the optimizer's `stepped(arena, end)` callback, which starts
        the all-gather of each bucket's parameters once this rank has stepped its piece of it (its
        piece lies below `end`), in order of the buckets' place in the arena: the first buckets'
        gathers run while the rank steps the next pieces. Every rank starts the same gathers in the
        same order: the step goes through the arenas in the same order on every rank (which
        parameters step is the same everywhere) and reports the end of each arena it steps, so that
        an arena's gathers are all started before the next arena's."""
        self.pending_gathers = [sorted((b for b in self.buckets if b.window_index == wi), key=lambda b: b.lo)
                                for wi in range(len(self.windows))]
        index = {id(w.arena): wi for wi, w in enumerate(self.windows)}

        def stepped(arena, end: int) -> None:
            if id(arena) in index:  # else not an arena this data-parallel setup reduces
                self._start_gathers(index[id(arena)], end)

        return stepped

    def _start_gathers(self, wi: int, end: float) -> None:
        """Starts the pending all-gathers of arena `wi` whose piece on this rank lies below `end`."""
        queue, param = self.pending_gathers[wi], self.windows[wi].arena.param
        while queue and queue[0].mine(self.rank)[1] <= end:
            self.works.append(self._all_gather(param, queue.pop(0)))

    def all_gather_params(self) -> None:
        """After a sharded step: starts the gathers the step did not (those of arenas in which no
        parameter had a gradient on any rank), arena by arena, and waits until every rank's updated
        pieces of the parameters are everywhere."""
        with torch.no_grad():
            for wi in range(len(self.pending_gathers)):
                self._start_gathers(wi, float("inf"))
            self.pending_gathers = []
            self.wait()

    def gather(self, arena, buf: torch.Tensor) -> torch.Tensor:
        """A shard buffer of `arena` (state, master or remainder) made whole: a new flat tensor of
        arena.numel elements, the same on every rank. A collective."""
        wi = next(k for k, w in enumerate(self.windows) if w.arena is arena)
        wire = torch.int32 if buf.dtype == torch.int16 else buf.dtype  # gloo and NCCL have no int16
        out = torch.zeros(arena.numel, dtype=wire, device=buf.device)
        with torch.no_grad():
            for b in self.buckets:
                if b.window_index == wi:
                    x, y = b.mine(self.rank)
                    c = arena.pieces(x, y)[0][2] if y > x else 0
                    self.works.append(self._all_gather(out, b, buf[c : c + y - x].to(wire)))
            self.wait()
        return out.to(buf.dtype)

    def reduce_stats(self, sumsq: torch.Tensor, found_inf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sharded: each rank measured its pieces of the gradient; the window's norm and
        non-finite flag are over all of them (the same on every rank, so all clip and skip alike)."""
        both = torch.stack([sumsq.float(), found_inf.float()])
        dist.all_reduce(both, group=self.group)
        bad = (both[1] > 0) | ~both[0].isfinite()
        return both[0], bad.float()

    # -- the step -----------------------------------------------------------------------

    def ranges(self) -> list[list[tuple[int, int]]] | None:
        """What each arena keeps (sharded), to tell whether a saved reduced window fits this layout."""
        if not self.shard:
            return None
        return [[(lo, hi) for lo, hi, _ in w.arena.owned] for w in self.windows]

    def wait(self, norms: list | None = None) -> None:
        """Waits for every collective in flight. With `norms` (a list), the norm of each bucket's
        reduced gradient is appended as soon as its reduction is done (see reduced_norms)."""
        for work, then, b in self.reductions:
            work.wait()
            if then is not None:
                then()
            self.reduced.append(b)
            if norms is not None:
                self.reduced_norms(norms)  # while the later buckets are still on the wire
        self.reductions = []
        for work, then in self.works:
            work.wait()
            if then is not None:
                then()
        self.works = []
        if self.summary_work is not None:
            self.summary_work.wait()
            self.summary_work = None

    def reduced_norms(self, norms: list) -> None:
        """Appends to `norms` the fp32 norm of each reduced bucket not measured yet: the bucket's
        whole range, or with ZeRO-1 this rank's piece of it (reduce_stats adds the ranks' pieces).
        Each bucket is measured whole, in one op: a parameter without a gradient on any rank was
        zeroed before the reduction (_launch) and the alignment padding is zero, so the range's
        norm is the norm of the window's gradients in it, the same on every rank."""
        for b in self.reduced:
            lo, hi = b.mine(self.rank) if self.shard else (b.lo, b.hi)
            if hi > lo:
                norms.append(torch.linalg.vector_norm(self.reduced_grad(b.window_index)[lo:hi], dtype=torch.float32))
        self.reduced = []

    def finish(self, norms: list | None = None) -> tuple[list[list[bool]], torch.Tensor]:
        """Waits for the window's reductions; returns which parameters step (any rank) and the items
        of all ranks. With `norms`, also every reduced bucket's norm (reduced_norms), each measured
        as soon as its reduction is done, so that measuring overlaps the reductions still in flight."""
        self.wait(norms)
        if norms is not None:
            self.reduced_norms(norms)  # buckets reduced before this call (a checkpoint waited, or restored them)
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
        self.reduced = list(self.buckets)  # the loaded gradients are reduced: measured at the step
        for wi in range(len(self.windows)):
            wire = self._wire(wi)
            if wire is not None:  # the step reads the reduced gradient there (exact: it is in reduce_dtype)
                wire.copy_(self.windows[wi].arena.grad)

    def discard(self) -> None:
        """The window is dropped (acc.zero_grad(), or the step consumed it)."""
        self.stop_listening()
        self.wait()
        self.global_touched = None
        self.reduced = []
