"""The native data-parallel path, GradAccumulator(..., process_group=pg), on gloo (CPU).

Every case runs in one spawn per world size (2 and 3 ranks), each case in its own process
group, and leaves its results in files; the tests then compare:

* against DDP + no_sync() on every micro-batch but the last + torch.optim (clip_grad_norm_ on
  the reduced gradient where the case clips), different data on every rank: fp32 within 1e-6
  relative, bf16 parameters with master weights within a bf16 ulp or two;
* a parameter used on one rank only in some windows: it steps on every rank with the mean of
  what the ranks gave (the others add zero), as DDP with find_unused_parameters does;
* num_items, a different count on every rank: the single-process mean over all items of all ranks;
* a non-finite gradient on one rank: every rank skips the window, the parameters stay bit-identical;
* collectives: one all-reduce per bucket plus the window's summary, none before the last micro-batch;
* a checkpoint in the middle of a window and one between the last backward and the step resume exactly;
* fused modules (fa.fuse_modules): a fused model matches the same references, and its buckets are
  reduced during the last backward as their fused writes complete; so does a layer that writes
  p.main_grad itself (main_grad=True, as TransformerEngine's fuse_wgrad_accumulation), with and
  without a bf16 wire;
* reduce_dtype=torch.bfloat16: the collectives carry bf16 buckets, and what comes back is the
  ranks' fp32 window sums, each rounded to bf16 once, added (bit-exact with 2 ranks); fp32 and
  bf16 models with it train as DDP + no_sync does within bf16's precision;
* ZeRO-1 (shard_optimizer_state=True) runs every case above too, and: one reduce-scatter and one
  all-gather per bucket, each rank keeping about 1/world of the optimizer state; its state_dict is
  the unsharded run's, and loads into torch.optim and into a single-process fusedaccum optimizer;
* examples/train_ddp.py under torchrun, as the README runs it, to a clean exit.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import io
import math
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fusedaccum as fa
from fusedaccum import dispatch
from spawn import free_port, spawn_and_collect
from test_lion import PaperLion
from test_modules import MainGradNet

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLDS = (2, 3)
WINDOWS = 3
MICRO = 3
CLIP = 0.05  # small enough that every window clips
PG_TIMEOUT_S = 30
SPAWN_TIMEOUT_S = 240
FP32_RTOL = 1e-6
# bf16: the reference accumulates and reduces bf16 gradients where fa accumulates and reduces fp32
# ones (and clips by the norm of those), so the parameters may differ in their last bits: up to 3
# bf16 ulps at the largest weight, while one missed or doubled AdamW update (lr = 2e-2) is 10.
BF16_ULPS = 3
CPU_BACKENDS = [b for b in dispatch.BACKENDS if dispatch.runs_on(b, "cpu")]
REF = "torch.optim"
WIRE = {"fp32": None, "bf16": torch.bfloat16}
BUCKETS = dict(bucket_numel=64, reduce_bucket_numel=100)  # several folds and reductions per backward
# ZeRO-1's state against the unsharded run's after 3 windows: the reduced gradients may differ in
# their last bit (other summation order), which Adam's 1/sqrt(v) and three steps amplify a little.
STATE_RTOL = 1e-5


@dataclass(frozen=True)
class Case:
    opt: str  # AdamW, Adam, SGD
    clip: bool
    dtype: str = "fp32"  # or bf16 (+ master_weights)
    groups: bool = False  # two param groups (biases without weight decay): several arenas, several bucket runs
    master: bool | str = True  # bf16: master_weights (True: an fp32 master; "remainder": broadcast and stepped too)
    shard: bool = False  # ZeRO-1: shard_optimizer_state=True
    fused: bool = False  # fa.fuse_modules(model): the Linear weight gradients written straight into the arena
    wire: str = "fp32"  # "bf16": reduce_dtype=torch.bfloat16 (the DDP reference reduces in the model's dtype)

    @property
    def id(self) -> str:
        return (f"{self.opt}-{'clip' if self.clip else 'noclip'}-{self.dtype}" + ("-2groups" if self.groups else "")
                + ("-remainder" if self.master == "remainder" else "") + ("-zero1" if self.shard else "")
                + ("-fused" if self.fused else "") + ("-bf16wire" if self.wire == "bf16" else ""))

    @property
    def ref_id(self) -> str:  # the DDP reference does not shard or fuse
        return replace(self, shard=False, fused=False, wire="fp32").id

    @property
    def precision(self) -> str:  # what the comparison with the reference allows
        return "bf16" if "bf16" in (self.dtype, self.wire) else "fp32"


UNSHARDED = ([Case(o, c) for o in ("AdamW", "Adam", "SGD", "Lion") for c in (False, True)]
             + [Case("AdamW", True, "bf16"), Case("AdamW", True, "bf16", master="remainder"),
                Case("AdamW", True, groups=True), Case("AdamW", True, wire="bf16"), Case("AdamW", True, "bf16", wire="bf16")])
FUSED = [Case("AdamW", True, fused=True), Case("AdamW", True, shard=True, fused=True),
         Case("AdamW", True, "bf16", fused=True), Case("AdamW", True, groups=True, fused=True),
         Case("AdamW", True, "bf16", fused=True, wire="bf16")]
CASES = UNSHARDED + [replace(c, shard=True) for c in UNSHARDED] + FUSED


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.extra = nn.Linear(8, 4)

    def forward(self, x, use_extra=True):
        y = self.fc2(torch.tanh(self.fc1(x)))
        return y + self.extra(x) if use_extra else y


def _batch(rank: int, window: int, micro: int, rows: int = 4):
    g = torch.Generator().manual_seed(1000 * rank + 10 * window + micro)
    return torch.randn(rows, 8, generator=g), torch.randn(rows, 4, generator=g)


def _opt(lib, case: Case, params):
    kw = dict(lr=5e-2, momentum=0.9, weight_decay=1e-2) if case.opt == "SGD" else dict(lr=2e-2, weight_decay=0.1)
    cls = getattr(lib, case.opt, None)
    if case.opt == "Lion":
        kw = dict(lr=1e-2, weight_decay=0.1)
        cls = fa.Lion if lib is fa else PaperLion  # torch has no Lion: the paper's, written in tests/test_lion.py
    if lib is fa and case.dtype == "bf16":
        kw["master_weights"] = case.master
    params = list(params)
    if case.groups:
        params = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, "lr": 1e-2}]
    return cls(params, **kw)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _model(rank: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(100 + rank)  # the ranks start apart: rank 0's parameters are broadcast
    return _Net().to(dtype)


# -- the runs (inside the spawned ranks) ------------------------------------------------------


def _ref_ddp(case: Case, rank: int, pg):
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    model = _model(rank, dtype)
    ddp = nn.parallel.DistributedDataParallel(model, process_group=pg, bucket_cap_mb=1e-4)
    masters = None
    if case.dtype == "bf16":
        masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
        opt = _opt(torch.optim, case, masters)
    else:
        opt = _opt(torch.optim, case, model.parameters())
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            ctx = ddp.no_sync() if m < MICRO - 1 else _null()
            with ctx:
                (F.mse_loss(ddp(x.to(dtype)).float(), y) / MICRO).backward()
        if masters is not None:
            for p, mp_ in zip(model.parameters(), masters):
                mp_.grad = p.grad.float()
            model.zero_grad()
        params = masters if masters is not None else list(model.parameters())
        if case.clip:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad()
        if masters is not None:
            with torch.no_grad():
                for p, mp_ in zip(model.parameters(), masters):
                    p.copy_(mp_)
    return _snapshot(model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _fa(case: Case, rank: int, pg):
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    model = _model(rank, dtype)
    if case.fused:
        fa.fuse_modules(model)
    acc = fa.GradAccumulator(_opt(fa, case, model.parameters()), accumulation_steps=MICRO,
                             max_grad_norm=CLIP if case.clip else None, process_group=pg,
                             shard_optimizer_state=case.shard, reduce_dtype=WIRE[case.wire], **BUCKETS)
    norms = []
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            acc.backward(F.mse_loss(model(x.to(dtype)).float(), y))
            acc.step()
        norms.append(float(acc.grad_norm))
    state = {k: {n: v.float().clone() for n, v in e.items() if torch.is_tensor(v) and n != "step"}
             for k, e in acc.optimizer.state_dict()["state"].items()}  # a collective under sharding
    return {"params": _snapshot(model), "norms": norms, "state": state, "state_bytes": _state_bytes(acc.optimizer)}


def _state_bytes(opt) -> int:
    """What this process keeps for the optimizer: moments, fp32 masters or remainders."""
    bufs = [t for a in opt.arenas for t in (*a.state.values(), a.master, a.remainder) if t is not None]
    return sum(t.numel() * t.element_size() for t in bufs)


def _uses_extra(rank: int, w: int, m: int) -> bool:
    return w % 2 == 0 and rank == 0 and m == 0  # one rank, one micro-batch, every other window


def _ref_unused(rank: int, world: int, pg):
    """DDP + no_sync semantics written out: local sums, the mean over ranks where any rank has a gradient."""
    model = _model(0)  # rank 0's start, as the broadcast gives fa
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            (F.mse_loss(model(x, _uses_extra(rank, w, m)), y) / MICRO).backward()
        for p in model.parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            has = torch.tensor([float(p.grad is not None)])
            dist.all_reduce(g, group=pg)
            dist.all_reduce(has, group=pg)
            p.grad = g / world if has.item() > 0 else None
        opt.step()
        opt.zero_grad()
    return _snapshot(model)


def _fa_unused(rank: int, world: int, pg):
    model = _model(rank)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1), accumulation_steps=MICRO,
                             process_group=pg, **BUCKETS)
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            acc.backward(F.mse_loss(model(x, _uses_extra(rank, w, m)), y))
            acc.step()
    return _snapshot(model)


def _items_rows(rank: int, w: int, m: int) -> int:
    return 1 + (3 * rank + 2 * w + m) % 5  # a different count on every rank and micro-batch


def _ref_items(world: int):
    """One process, one large batch: the mean over every item of every rank's micro-batches."""
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for w in range(WINDOWS):
        xs, ys = zip(*[_batch(r, w, m, _items_rows(r, w, m)) for r in range(world) for m in range(MICRO)])
        F.mse_loss(model(torch.cat(xs)), torch.cat(ys), reduction="sum").div(torch.cat(ys).shape[0] * 4).backward()
        opt.step()
        opt.zero_grad()
    return _snapshot(model)


def _fa_items(rank: int, pg):
    model = _model(rank)
    acc = fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulation_steps=MICRO,
                             process_group=pg, **BUCKETS)
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m, _items_rows(rank, w, m))
            acc.backward(F.mse_loss(model(x), y, reduction="sum"), num_items=y.numel())
            acc.step()
    return _snapshot(model)


def _fa_nonfinite(rank: int, shard: bool, pg):
    model = _model(rank)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2), accumulation_steps=MICRO, max_grad_norm=1.0,
                             loss_scale="dynamic", process_group=pg, shard_optimizer_state=shard, **BUCKETS)
    out = {}
    for w in range(WINDOWS):
        before = _snapshot(model)
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            if w == 1 and rank == 1 and m == 0:
                x[0, 0] = float("inf")  # one rank, one micro-batch
            acc.backward(F.mse_loss(model(x), y))
            acc.step()
        out[w] = {"skipped": acc.step_skipped, "moved": any(not torch.equal(before[n], v) for n, v in _snapshot(model).items())}
        out[("scale", w)] = acc.loss_scale
    out["params"] = _snapshot(model)
    return out


COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


@contextlib.contextmanager
def _collectives_seen():
    """Records every collective fusedaccum issues, in order, as (kind, the dtype of the whole
    buffer it reduces or gathers)."""
    from fusedaccum import distributed as fdp

    real = {"all_reduce": dist.all_reduce, "reduce_scatter": fdp._reduce_scatter, "all_gather": fdp._all_gather}
    seen = []

    def recorded(kind):
        def call(tensor, *a, **k):
            whole = a[0] if kind == "reduce_scatter" else tensor  # reduce_scatter(this rank's piece, whole)
            seen.append((kind, str(whole.dtype)))
            return real[kind](tensor, *a, **k)

        return call

    dist.all_reduce, fdp._reduce_scatter, fdp._all_gather = (recorded(kind) for kind in COLLECTIVES)
    try:
        yield seen
    finally:
        dist.all_reduce, fdp._reduce_scatter, fdp._all_gather = real.values()


def _fa_count(rank: int, shard: bool, pg):
    """Counts the collectives fusedaccum issues (by kind), after each micro-batch and at each step."""
    model = _model(rank)
    opt = fa.AdamW(model.parameters(), lr=2e-2)
    acc = fa.GradAccumulator(opt, accumulation_steps=MICRO, max_grad_norm=1.0,
                             process_group=pg, shard_optimizer_state=shard, **BUCKETS)
    log = []
    with _collectives_seen() as seen:
        step_range = opt._step_range

        def logged_step_range(*a, **k):  # the step launches, in order with the collectives
            seen.append(("step", None))
            return step_range(*a, **k)

        opt._step_range = logged_step_range

        def counts():
            return {k: sum(kind == k for kind, _ in seen) for k in COLLECTIVES}

        for w in range(2):
            for m in range(MICRO):
                x, y = _batch(rank, w, m)
                acc.backward(F.mse_loss(model(x), y))
                log.append(("backward", w, m, counts()))
                acc.step()
                log.append(("step", w, m, counts()))
    return {"log": log, "buckets": len(acc._dp.buckets), "order": [kind for kind, _ in seen]}


def _main_grad_batch(rank: int, k: int):
    g = torch.Generator().manual_seed(500 + 10 * rank + k)
    return torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 3, generator=g)


def _ref_main_grad(rank: int, pg):
    torch.manual_seed(11)
    model = MainGradNet()  # without main_grad attributes its layer hands autograd the gradient
    ddp = nn.parallel.DistributedDataParallel(model, process_group=pg, bucket_cap_mb=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)
    for k in range(WINDOWS * MICRO):
        x, y = _main_grad_batch(rank, k)
        with ddp.no_sync() if k % MICRO < MICRO - 1 else _null():
            (F.mse_loss(ddp(x), y) / MICRO).backward()
        if k % MICRO == MICRO - 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad()
    return _snapshot(model)


def _fa_main_grad(rank: int, wire: str, pg):
    torch.manual_seed(11)
    model = MainGradNet()
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1), accumulation_steps=MICRO,
                             max_grad_norm=CLIP, main_grad=True, process_group=pg, reduce_dtype=WIRE[wire], **BUCKETS)
    for k in range(WINDOWS * MICRO):
        x, y = _main_grad_batch(rank, k)
        acc.backward(F.mse_loss(model(x), y))
        acc.step()
        assert model.w.grad is None and model.w.grad_added_to_main_grad is False
    return _snapshot(model)


def _fa_ready(rank: int, fused: bool, pg):
    """How many buckets were reduced before the last backward ended: with every parameter used, all of
    them (a bucket starts when its last parameter's gradient is in, fused writes counted as folds)."""
    model = _model(rank)
    if fused:
        fa.fuse_modules(model)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2), accumulation_steps=MICRO, process_group=pg,
                             **BUCKETS)
    dp, seen = acc._dp, []
    real = dp.end_of_backward

    def end_of_backward(items):
        seen.append(dp.next_launch)
        real(items)

    dp.end_of_backward = end_of_backward
    for m in range(MICRO):
        x, y = _batch(rank, 0, m)
        acc.backward(F.mse_loss(model(x), y))
        acc.step()
    return {"launched_in_backward": seen, "buckets": len(dp.buckets)}


def _fa_wire(rank: int, shard: bool, pg):
    """reduce_dtype=torch.bfloat16 seen from inside: each bucket's local fp32 window sum as the
    launch finds it, what the reduction leaves where the step reads it (this rank's pieces when
    sharded), what the arena holds then, and the dtypes the collectives were handed."""
    model = _model(rank)
    acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2), accumulation_steps=MICRO, max_grad_norm=CLIP,
                             process_group=pg, shard_optimizer_state=shard, reduce_dtype=torch.bfloat16, **BUCKETS)
    dp, local, real_launch = acc._dp, {}, acc._dp._launch

    def launch(b):
        local[dp.buckets.index(b)] = dp.windows[b.window_index].arena.grad[b.lo : b.hi].clone()
        real_launch(b)

    dp._launch = launch
    with _collectives_seen() as dtypes:
        for m in range(MICRO):
            x, y = _batch(rank, 0, m)
            acc.backward(F.mse_loss(model(x), y))
            if m == MICRO - 1:
                dp.wait()
                reduced, arena = {}, {}
                for k, b in enumerate(dp.buckets):
                    x0, y0 = b.mine(rank) if shard else (b.lo, b.hi)
                    reduced[k] = (x0 - b.lo, dp.reduced_grad(b.window_index)[x0:y0].clone())
                    arena[k] = dp.windows[b.window_index].arena.grad[b.lo : b.hi].clone()
            acc.step()
    return {"local": local, "reduced": reduced, "arena": arena, "dtypes": dtypes}


def _build_adamw(rank: int, pg, shard: bool = False, wire: torch.dtype | None = None, between=None):
    """between(model): done after the optimizer is built, before the accumulator."""
    model = _model(rank)
    opt = fa.AdamW(model.parameters(), lr=2e-2)
    if between is not None:
        between(model)
    acc = fa.GradAccumulator(opt, accumulation_steps=MICRO, max_grad_norm=CLIP,
                             process_group=pg, shard_optimizer_state=shard, reduce_dtype=wire, **BUCKETS)
    return model, acc


def _save_and_rebuild(model, acc, rank: int, pg, shard: bool, wire: torch.dtype | None = None):
    """torch.save and torch.load of everything, then a new model, optimizer and accumulator that load it."""
    saved = torch.load(_roundtrip({"model": model.state_dict(), "opt": acc.optimizer.state_dict(),
                                   "acc": acc.state_dict()}), weights_only=False)
    model, acc = _build_adamw(rank, pg, shard, wire)
    model.load_state_dict(saved["model"])
    acc.optimizer.load_state_dict(saved["opt"])
    acc.load_state_dict(saved["acc"])
    return model, acc


def _fa_resume(rank: int, after_backward: bool, shard: bool, pg, wire: torch.dtype | None = None):
    """Saves and resumes in window 1: after its first micro-batch, or after its last backward (the
    gradients reduced, the step not taken)."""
    model, acc = _build_adamw(rank, pg, shard, wire)
    for w in range(WINDOWS):
        for m in range(MICRO):
            if w == 1 and m == 1 and not after_backward:
                model, acc = _save_and_rebuild(model, acc, rank, pg, shard, wire)
            x, y = _batch(rank, w, m)
            acc.backward(F.mse_loss(model(x), y))
            if w == 1 and m == MICRO - 1 and after_backward:
                model, acc = _save_and_rebuild(model, acc, rank, pg, shard, wire)
            acc.step()
    return _snapshot(model)


def _fa_plain(rank: int, shard: bool, pg, wire: torch.dtype | None = None, between=None):
    model, acc = _build_adamw(rank, pg, shard, wire, between)
    for w in range(WINDOWS):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            acc.backward(F.mse_loss(model(x), y))
            acc.step()
    return _snapshot(model)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _fa_zero1_checkpoint(rank: int, pg):
    """A sharded run's state as users see it: optimizer.state[p] (the step only), state_dict()
    (whole tensors) loaded into torch.optim and into a single-process fusedaccum optimizer, and
    what refuses to run on a sharded optimizer."""
    import copy

    model, acc = _build_adamw(rank, pg, shard=True)
    for w in range(2):
        for m in range(MICRO):
            x, y = _batch(rank, w, m)
            acc.backward(F.mse_loss(model(x), y))
            acc.step()
    opt = acc.optimizer
    out = {"visible": sorted({tuple(sorted(e)) for e in opt.state.values()}),
           "shard": [a.shard_numel for a in opt.arenas], "numel": [a.numel for a in opt.arenas],
           "buckets": [sum(b.window_index == wi for b in acc._dp.buckets) for wi in range(len(opt.arenas))]}
    saved = _roundtrip(opt.state_dict()).getvalue()
    stepped = {}
    for name, lib in (("torch", torch.optim), ("fa", fa)):
        twin = copy.deepcopy(model)
        other = lib.AdamW(twin.parameters(), lr=2e-2)
        other.load_state_dict(torch.load(io.BytesIO(saved), weights_only=False))  # torch.optim steps loaded tensors in place
        g = torch.Generator().manual_seed(7)
        for p in twin.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        other.step()
        stepped[name] = _snapshot(twin)
    out["stepped"] = stepped
    errors = {}
    for what, fn in (
        ("deepcopy", lambda: copy.deepcopy(opt)),
        ("unsharded accumulator", lambda: fa.GradAccumulator(opt, accumulation_steps=MICRO, process_group=pg)),
        ("other buckets", lambda: fa.GradAccumulator(opt, accumulation_steps=MICRO, process_group=pg,
                                                     shard_optimizer_state=True, reduce_bucket_numel=1000)),
    ):
        try:
            fn()
            errors[what] = None
        except (ValueError, RuntimeError) as e:
            errors[what] = str(e)
    try:  # the refused accumulators replaced `acc`, and left the optimizer without one
        opt.step()
        errors["step without the accumulator"] = None
    except RuntimeError as e:
        errors["step without the accumulator"] = str(e)
    out["errors"] = errors
    return out


def _fa_sharded_checkpoint(rank: int, dtype: str, pg):
    """ZeRO-1 saved per rank with sharded_state_dict() in the middle of window 1 (with the model and
    the accumulator), loaded into a new model, optimizer and accumulator: the run ends where never
    stopping does; what each rank saved is its share of the state; other layouts are refused."""

    def build(reduce_bucket_numel=BUCKETS["reduce_bucket_numel"]):
        model = _model(rank, torch.bfloat16 if dtype == "bf16" else torch.float32)
        kw = dict(master_weights="remainder") if dtype == "bf16" else {}
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1, **kw),
                                 accumulation_steps=MICRO, max_grad_norm=CLIP, process_group=pg,
                                 shard_optimizer_state=True, bucket_numel=BUCKETS["bucket_numel"],
                                 reduce_bucket_numel=reduce_bucket_numel)
        return model, acc

    out = {}
    for stop in (False, True):
        model, acc = build()
        for w in range(WINDOWS):
            for m in range(MICRO):
                if stop and w == 1 and m == 1:
                    sharded = acc.optimizer.sharded_state_dict()
                    kept = [t for sh in sharded["fusedaccum_shards"]
                            for t in (*sh["state"].values(), sh["master"], sh["remainder"]) if t is not None]
                    out["saved_bytes"] = sum(t.numel() * t.element_size() for t in kept)
                    out["state_bytes"] = _state_bytes(acc.optimizer)
                    saved = torch.load(_roundtrip({"model": model.state_dict(), "opt": sharded, "acc": acc.state_dict()}),
                                       weights_only=False)
                    model, acc = build()
                    model.load_state_dict(saved["model"])
                    acc.optimizer.load_sharded_state_dict(saved["opt"])
                    acc.load_state_dict(saved["acc"])
                x, y = _batch(rank, w, m)
                acc.backward(F.mse_loss(model(x.to(model.fc1.weight.dtype)).float(), y))
                acc.step()
        out["stopped" if stop else "straight"] = _snapshot(model)
    errors = {}
    for what, fn in (
        ("other buckets", lambda: build(reduce_bucket_numel=1000)[1].optimizer.load_sharded_state_dict(saved["opt"])),
        ("whole format", lambda: build()[1].optimizer.load_sharded_state_dict(acc.optimizer.state_dict())),
        ("unsharded", lambda: fa.AdamW(_model(rank).parameters()).sharded_state_dict()),
    ):
        try:
            fn()
            errors[what] = None
        except (ValueError, RuntimeError) as e:
            errors[what] = str(e)
    out["errors"] = errors
    return out


def _fa_mismatch(rank: int, pg):
    model = nn.Linear(8, 4 + rank)  # a different shape on every rank
    try:
        fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=2, process_group=pg)
    except ValueError as e:
        return str(e)
    return None


def _fa_options_mismatch(rank: int, pg):
    model = nn.Linear(8, 4)
    try:  # a bf16 wire on rank 0 only: the collectives would not match
        fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=2, process_group=pg,
                           reduce_dtype=torch.bfloat16 if rank == 0 else None)
    except ValueError as e:
        return str(e)
    return None


def _guard(fn, *args) -> dict:
    try:
        return {"ok": fn(*args)}
    except BaseException:  # noqa: BLE001 - the test reports it
        return {"error": traceback.format_exc()}


def _worker(rank: int, world: int, init_method: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    results: dict = {}
    path = os.path.join(out_dir, f"rank{rank}.pt")

    def run(key, backend, fn, *args):
        pg = dist.new_group(backend="gloo", timeout=timeout)
        fa.set_backend(backend)
        try:
            results[key] = _guard(fn, *args, pg)
        finally:
            fa.set_backend(None)
            dist.destroy_process_group(pg)
        torch.save(results, path + ".tmp")
        os.replace(path + ".tmp", path)

    for case in UNSHARDED:
        if case.id == case.ref_id:  # the cases that differ in fa's options only share a reference
            run((REF, case.id), None, _ref_ddp, case, rank)
    run((REF, "unused"), None, _ref_unused, rank, world)
    run((REF, "main_grad"), None, _ref_main_grad, rank)
    for b in backends:
        for case in CASES:
            run((b, case.id), b, _fa, case, rank)
        run((b, "unused"), b, _fa_unused, rank, world)
        for wire in WIRE:
            run((b, "main_grad-" + wire), b, _fa_main_grad, rank, wire)
        run((b, "items"), b, _fa_items, rank)
        for shard in (False, True):
            z = "-zero1" if shard else ""
            run((b, "nonfinite" + z), b, _fa_nonfinite, rank, shard)
            run((b, "count" + z), b, _fa_count, rank, shard)
            run((b, "plain" + z), b, _fa_plain, rank, shard)
            run((b, "resume-mid" + z), b, _fa_resume, rank, False, shard)
            run((b, "resume-reduced" + z), b, _fa_resume, rank, True, shard)
            run((b, "wire" + z), b, _fa_wire, rank, shard)
        bf16_wire = dict(wire=torch.bfloat16)
        for shard in (False, True):
            z = "-zero1" * shard + "-bf16wire"
            run((b, "plain" + z), b, functools.partial(_fa_plain, **bf16_wire), rank, shard)
            run((b, "resume-mid" + z), b, functools.partial(_fa_resume, **bf16_wire), rank, False, shard)
            run((b, "resume-reduced" + z), b, functools.partial(_fa_resume, **bf16_wire), rank, True, shard)
        # every parameter copied between the optimizer and the accumulator (Accelerate under torchrun)
        run((b, "copied"), b, functools.partial(_fa_plain, between=lambda m: m.to("cpu:0")), rank, False)
        run((b, "zero1-checkpoint"), b, _fa_zero1_checkpoint, rank)
        for dtype in ("fp32", "bf16"):
            run((b, "zero1-sharded-checkpoint-" + dtype), b, _fa_sharded_checkpoint, rank, dtype)
        for fused in (False, True):
            run((b, "ready" + "-fused" * fused), b, _fa_ready, rank, fused)
        run((b, "mismatch"), b, _fa_mismatch, rank)
        run((b, "mismatch-options"), b, _fa_options_mismatch, rank)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=[f"{w}ranks" for w in WORLDS])
def spawned(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"dp{world}")
    ranks, failure = spawn_and_collect(_worker, (world, f"tcp://127.0.0.1:{free_port()}", str(out), CPU_BACKENDS),
                                       world, out, SPAWN_TIMEOUT_S)
    return world, ranks, failure


def _results(spawned, key) -> list:
    world, ranks, failure = spawned
    out = []
    for rank in range(world):
        if key not in ranks[rank]:
            pytest.fail(f"no result for {key} on rank {rank}: {failure or 'the worker did not reach it'}")
        res = ranks[rank][key]
        if "error" in res:
            pytest.fail(f"{key} raised on rank {rank}:\n{res['error']}")
        out.append(res["ok"])
    return out


def _backend(device_backend) -> str:
    device, backend = device_backend
    if device.type != "cpu":
        pytest.skip("data parallel is tested with gloo on CPU tensors (several processes on one machine)")
    return backend


def _close(got: dict, want: dict, dtype: str, what: str, rtol: float = FP32_RTOL) -> list[str]:
    problems = []
    for name, w in want.items():
        if w.numel() == 0:
            continue
        err, scale = (got[name] - w).abs().max().item(), w.abs().max().item()
        tol = rtol * scale if dtype == "fp32" else BF16_ULPS * 2.0 ** (math.floor(math.log2(scale)) - 7)
        if not err <= tol:
            problems.append(f"{what} {name}: max |fa - reference| = {err:.3g} > {tol:.3g} (max |reference| {scale:.3g})")
    return problems


def _identical_across_ranks(per_rank: list[dict], what: str) -> None:
    for rank, snap in enumerate(per_rank[1:], 1):
        for name, t in snap.items():
            assert torch.equal(t, per_rank[0][name]), f"{what}: rank {rank} and rank 0 differ in {name}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_ddp_no_sync_and_torch_optim(case, device_backend, spawned):
    b = _backend(device_backend)
    refs, got = _results(spawned, (REF, case.ref_id)), _results(spawned, (b, case.id))
    _identical_across_ranks(refs, "the DDP reference")
    _identical_across_ranks([g["params"] for g in got], "fa")
    problems = [p for r in range(len(refs)) for p in _close(got[r]["params"], refs[r], case.precision, f"rank {r}")]
    assert not problems, "data parallel differs from DDP + no_sync + torch.optim:\n" + "\n".join(problems)
    assert len({tuple(g["norms"]) for g in got}) == 1, "the ranks see different gradient norms"


def test_parameters_copied_before_the_accumulator_start_from_rank_0s(device_backend, spawned):
    b = _backend(device_backend)
    got, want = _results(spawned, (b, "copied")), _results(spawned, (b, "plain"))
    _identical_across_ranks(got, "fa after model.to('cpu:0')")
    for name, t in want[0].items():
        assert torch.equal(got[0][name], t), f"{name}: not the run without the copy"


def test_a_parameter_used_on_one_rank_steps_everywhere(device_backend, spawned):
    b = _backend(device_backend)
    refs, got = _results(spawned, (REF, "unused")), _results(spawned, (b, "unused"))
    _identical_across_ranks(got, "fa")
    problems = [p for r in range(len(refs)) for p in _close(got[r], refs[r], "fp32", f"rank {r}")]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("wire", list(WIRE))
def test_a_layer_writing_p_main_grad_is_reduced_like_ddp(wire, device_backend, spawned):
    b = _backend(device_backend)
    refs, got = _results(spawned, (REF, "main_grad")), _results(spawned, (b, "main_grad-" + wire))
    _identical_across_ranks(got, "fa")
    problems = [p for r in range(len(refs)) for p in _close(got[r], refs[r], wire, f"rank {r}")]
    assert not problems, "\n".join(problems)


def test_num_items_is_the_mean_over_every_rank(device_backend, spawned):
    b = _backend(device_backend)
    world = spawned[0]
    got = _results(spawned, (b, "items"))
    want = _ref_items(world)
    _identical_across_ranks(got, "fa")
    problems = _close(got[0], want, "fp32", "rank 0")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("z", ["", "-zero1"], ids=["whole", "zero1"])
def test_a_non_finite_gradient_on_one_rank_skips_the_window_everywhere(z, device_backend, spawned):
    b = _backend(device_backend)
    got = _results(spawned, (b, "nonfinite" + z))
    for rank, res in enumerate(got):
        # The dynamic loss scale backs off on every rank alike (GradScaler's 0.5 after an overflow).
        assert [res[("scale", w)] for w in range(WINDOWS)] == [2.0**16, 2.0**15, 2.0**15], f"rank {rank}"
        assert res[1] == {"skipped": True, "moved": False}, f"rank {rank}, the window with the inf: {res[1]}"
        for w in (0, 2):
            assert res[w] == {"skipped": False, "moved": True}, f"rank {rank}, window {w}: {res[w]}"
    _identical_across_ranks([r["params"] for r in got], "after a skipped window")


@pytest.mark.parametrize("shard", [False, True], ids=["whole", "zero1"])
def test_one_reduction_per_bucket_and_none_before_the_last_micro_batch(shard, device_backend, spawned):
    b = _backend(device_backend)
    for rank, res in enumerate(_results(spawned, (b, "count-zero1" if shard else "count"))):
        n = res["buckets"]
        assert n >= 3, "the test model should span several buckets"
        # Per window: the buckets' reductions and the window's summary (items, which parameters stepped)
        # in the last backward; sharded, at the step, the norm and inf flag of the pieces, and the
        # parameters' all-gathers.
        if shard:
            last_backward = {"all_reduce": 1, "reduce_scatter": n, "all_gather": 0}
            at_step = {"all_reduce": 1, "reduce_scatter": 0, "all_gather": n}
        else:
            last_backward = {"all_reduce": n + 1, "reduce_scatter": 0, "all_gather": 0}
            at_step = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}
        for kind, w, m, counts in res["log"]:
            last = m == MICRO - 1
            want = {k: w * (last_backward[k] + at_step[k]) + last * (last_backward[k] + (kind == "step") * at_step[k])
                    for k in counts}
            assert counts == want, f"rank {rank}: after {kind} of window {w} micro-batch {m}: {counts}; want {want}"
        if shard:
            # The parameters' all-gathers start while the rank still steps its later pieces.
            order = res["order"]
            tail = order[max(i for i, kind in enumerate(order) if kind == "reduce_scatter") + 1 :]
            steps = [i for i, kind in enumerate(tail) if kind == "step"]
            assert tail.count("all_gather") == n and len(steps) >= 2, f"rank {rank}: {tail}"
            assert tail.index("all_gather") < steps[-1], f"rank {rank}: no gather before the last step launch: {tail}"


@pytest.mark.parametrize("z", ["", "-zero1"], ids=["whole", "zero1"])
def test_a_bf16_wire_adds_the_ranks_fp32_sums_rounded_once(z, device_backend, spawned):
    b = _backend(device_backend)
    got = _results(spawned, (b, "wire" + z))
    world = len(got)
    for rank, res in enumerate(got):
        kinds = {kind: {d for k, d in res["dtypes"] if k == kind} for kind, _ in res["dtypes"]}
        # The buckets go as bf16; the window's summary (items, which parameters stepped) and the
        # sharded norm stay exact.
        wire = "reduce_scatter" if z else "all_reduce"
        assert "torch.bfloat16" in kinds[wire], f"rank {rank}: the collectives saw {res['dtypes']}"
        assert kinds.get("reduce_scatter", set()) <= {"torch.bfloat16"}, f"rank {rank}: {res['dtypes']}"
        assert len(res["local"]) >= 3 and res["local"].keys() == res["reduced"].keys()
        for k, (start, reduced) in res["reduced"].items():
            assert reduced.dtype == torch.bfloat16, "the reduction's result stays in bf16, where the norm and the step read it"
            assert torch.equal(res["arena"][k], res["local"][k]), f"rank {rank}, bucket {k}: no pass writes the arena"
            reduced = reduced.float()
            rounded = [got[r]["local"][k].bfloat16().double() for r in range(world)]
            want = sum(rounded)[start : start + reduced.numel()]
            if world == 2:  # one bf16 addition: exact to the bit whatever the order
                want = want.bfloat16().float()
                assert torch.equal(reduced, want), f"rank {rank}, bucket {k}: not the ranks' bf16 sums added"
            else:  # world - 1 additions in bf16, in the collective's order
                bound = (world - 1) * 2.0**-8 * sum(r.abs() for r in rounded)[start : start + reduced.numel()]
                err = (reduced.double() - want).abs()
                assert bool((err <= bound).all()), f"rank {rank}, bucket {k}: off by {(err - bound).max():.3g}"
    if not z:
        for k in got[0]["reduced"]:
            for rank in range(1, world):
                assert torch.equal(got[rank]["reduced"][k][1], got[0]["reduced"][k][1]), f"bucket {k}: ranks differ"


@pytest.mark.parametrize("fused", ["", "-fused"], ids=["hooks", "fused"])
def test_buckets_are_reduced_as_their_gradients_complete(fused, device_backend, spawned):
    b = _backend(device_backend)
    for rank, res in enumerate(_results(spawned, (b, "ready" + fused))):
        assert res["buckets"] >= 3
        assert res["launched_in_backward"] == [res["buckets"]], f"rank {rank}: {res}"


@pytest.mark.parametrize("z", ["", "-zero1", "-bf16wire", "-zero1-bf16wire"], ids=["whole", "zero1", "bf16wire", "zero1-bf16wire"])
@pytest.mark.parametrize("where", ["resume-mid", "resume-reduced"])
def test_resume_per_rank(where, z, device_backend, spawned):
    b = _backend(device_backend)
    want, got = _results(spawned, (b, "plain" + z)), _results(spawned, (b, where + z))
    for rank in range(len(got)):
        for name, t in want[rank].items():
            assert torch.equal(got[rank][name], t), f"rank {rank}: {name} differs after resuming ({where})"


@pytest.mark.parametrize("case", UNSHARDED, ids=[c.id for c in UNSHARDED])
def test_zero1_keeps_a_share_of_the_state_and_its_state_dict_is_the_whole_runs(case, device_backend, spawned):
    b = _backend(device_backend)
    whole, sharded = _results(spawned, (b, case.id)), _results(spawned, (b, replace(case, shard=True).id))
    world = len(whole)
    # Every element's state is kept on exactly one rank; fp32 masters and remainders too.
    assert sum(g["state_bytes"] for g in sharded) == whole[0]["state_bytes"]
    assert max(g["state_bytes"] for g in sharded) < whole[0]["state_bytes"] * (1 / world + 0.2)
    # The gathered state_dict: the whole run's (the sums of a reduce-scatter and of an all-reduce
    # may round differently).
    for rank in range(world):
        want, got = whole[rank]["state"], sharded[rank]["state"]
        assert got.keys() == want.keys(), f"rank {rank}: state for parameters {sorted(got)}; want {sorted(want)}"
        for k in want:
            assert got[k].keys() == want[k].keys(), f"rank {rank}, parameter {k}: {sorted(got[k])}; want {sorted(want[k])}"
            # (a bf16 wire: the sums of 3 ranks may round differently by a bf16 ulp)
            problems = _close(got[k], want[k], case.wire, f"rank {rank}, parameter {k}", rtol=STATE_RTOL)
            assert not problems, "\n".join(problems)


def test_zero1_state_dict_loads_into_torch_optim_and_one_process(device_backend, spawned):
    b = _backend(device_backend)
    for rank, res in enumerate(_results(spawned, (b, "zero1-checkpoint"))):
        # optimizer.state[p] shows what this rank has whole: the step count.
        assert res["visible"] == [("step",)], f"rank {rank}: optimizer.state shows {res['visible']}"
        problems = _close(res["stepped"]["fa"], res["stepped"]["torch"], "fp32", f"rank {rank}")
        assert not problems, "a sharded state_dict loaded into fa.AdamW and torch.optim.AdamW:\n" + "\n".join(problems)
        errors = res["errors"]
        assert "cannot be copied" in (errors["deepcopy"] or ""), errors["deepcopy"]
        assert "shard_optimizer_state=True again" in (errors["unsharded accumulator"] or ""), errors
        assert "sharded differently" in (errors["other buckets"] or ""), errors
        assert "sharded across ranks" in (errors["step without the accumulator"] or ""), errors
    shards = [res["shard"] for res in _results(spawned, (b, "zero1-checkpoint"))]
    numel, buckets = res["numel"], res["buckets"]
    world = len(shards)
    for a in range(len(numel)):
        assert sum(s[a] for s in shards) == numel[a], f"arena {a}: the shards do not cover it once"
        # Pieces round up to ALIGN elements per bucket, no more.
        assert max(s[a] for s in shards) <= numel[a] / world + 16 * buckets[a], f"arena {a}: {[s[a] for s in shards]}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=["fp32", "bf16-remainder"])
def test_zero1_sharded_checkpoint_per_rank_resumes_exactly(dtype, device_backend, spawned):
    b = _backend(device_backend)
    got = _results(spawned, (b, "zero1-sharded-checkpoint-" + dtype))
    for rank, res in enumerate(got):
        for name, t in res["straight"].items():
            assert torch.equal(res["stopped"][name], t), f"rank {rank}: {name} differs after a sharded resume"
        # What a rank writes is what it keeps: its share of the moments and masters, nothing whole.
        assert res["saved_bytes"] == res["state_bytes"] > 0, res
        errors = res["errors"]
        assert "another layout" in (errors["other buckets"] or ""), errors
        assert "not a sharded_state_dict" in (errors["whole format"] or ""), errors
        assert "save opt.state_dict()" in (errors["unsharded"] or ""), errors
    whole = sum(r["saved_bytes"] for r in got)
    assert max(r["saved_bytes"] for r in got) < whole * (1 / len(got) + 0.2)


def test_ranks_with_different_parameters_are_refused(device_backend, spawned):
    b = _backend(device_backend)
    for rank, message in enumerate(_results(spawned, (b, "mismatch"))):
        assert message is not None and "same parameters on every rank" in message, f"rank {rank}: {message}"
    for rank, message in enumerate(_results(spawned, (b, "mismatch-options"))):
        assert message is not None and "same GradAccumulator arguments" in message, f"rank {rank}: {message}"


def test_process_group_needs_torch_distributed_and_the_full_path():
    model = nn.Linear(4, 4)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=2, process_group=object())
    with pytest.raises(ValueError, match="full path"):
        fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), process_group=object())
    with pytest.raises(ValueError, match="pass process_group"):
        fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=2, reduce_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="reduce_dtype must be"):
        fa.GradAccumulator(fa.SGD(model.parameters(), lr=0.1), accumulation_steps=2, process_group=object(),
                           reduce_dtype=torch.float16)


def _nccl_worker(rank: int, init_method: str, out: str) -> None:
    dist.init_process_group("nccl", init_method=init_method, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    result = {}
    for name, pg, shard, wire in (("nccl", dist.group.WORLD, False, None), ("nccl-zero1", dist.group.WORLD, True, None),
                                  ("nccl-bf16wire", dist.group.WORLD, True, torch.bfloat16), ("single", None, False, None)):
        torch.manual_seed(100)
        model = _Net().to(device)
        kw = dict(process_group=pg, shard_optimizer_state=shard, reduce_dtype=wire, **BUCKETS) if pg is not None else {}
        acc = fa.GradAccumulator(fa.AdamW(model.parameters(), lr=2e-2), accumulation_steps=MICRO, max_grad_norm=CLIP, **kw)
        for w in range(WINDOWS):
            for m in range(MICRO):
                x, y = _batch(0, w, m)
                acc.backward(F.mse_loss(model(x.to(device)), y.to(device)), num_items=y.numel())
                acc.step()
        result[name] = {k: v.cpu() for k, v in _snapshot(model).items()}
    torch.save(result, out)
    dist.destroy_process_group()


def test_nccl_world_of_one_equals_the_single_process_path(tmp_path):
    """On a GPU machine: the NCCL path end to end, whole and sharded (world size 1: the reduction is the
    identity; with a bf16 wire, the rounding to bf16)."""
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    out = str(tmp_path / "nccl.pt")
    mp.spawn(_nccl_worker, args=(f"tcp://127.0.0.1:{free_port()}", out), nprocs=1)
    res = torch.load(out, weights_only=False)
    problems = (_close(res["nccl"], res["single"], "fp32", "nccl") + _close(res["nccl-zero1"], res["single"], "fp32", "zero1")
                + _close(res["nccl-bf16wire"], res["single"], "bf16", "zero1 with a bf16 wire"))
    assert not problems, "\n".join(problems)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_ddp.py"


@pytest.mark.parametrize("flags", [[], ["--shard", "--bf16-wire"]], ids=["whole", "zero1-bf16wire"])
def test_the_torchrun_example_runs(flags, tmp_path):
    """The README's command, as a user runs it: torchrun, 2 ranks on gloo, to a clean exit."""
    if not EXAMPLE.exists():
        pytest.skip("examples/ is not next to tests/ (an installed copy of the tests)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           "--windows", "3", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert "parameters identical on every rank" in res.stdout, out
    assert res.returncode == 0, out
