"""Bench section "data-parallel": 2 processes on gloo (CPU), a GPT-like layout, N micro-batches.

Five ways to run the same window (N micro-batches of the probe model + clip + AdamW), timed in
alternation inside the same two processes:

  DDP, every micro-batch   DistributedDataParallel reduces after every backward (no no_sync)
  DDP + no_sync()          only the last micro-batch reduces (the usual accumulation loop)
  process_group=           fa.GradAccumulator reduces the arena during the last backward
  process_group= + ZeRO-1  the same with shard_optimizer_state=True: reduce-scatter, each rank
                           steps its half, all-gather of the parameters
  process_group=, bf16 wire reduce_dtype=torch.bfloat16: the same reduction in half the bytes
                           (each rank's fp32 window sum rounded to bf16 once; a different
                           result from the others', within bf16's precision)

Also measured, per window: the bytes each rank sends through the collectives (DDP through a
comm hook, fusedaccum by counting its calls), counted as a ring does (NCCL's "bus bytes"): an
all-reduce of B bytes sends 2 (w-1)/w B, a reduce-scatter of B bytes or an all-gather into B
bytes (w-1)/w B; and the optimizer state each rank keeps.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import fusedaccum as fa
from fusedaccum import distributed as fdp
from fusedaccum.bench.cases import MAX_GRAD_NORM, Layout, Row, Settings, gpt2_shapes, probe_loss, random_tensors

WORLD = 2
SIDES = ("DDP, every micro-batch", "DDP + no_sync()", "process_group=", "process_group= + ZeRO-1",
         "process_group=, bf16 wire")
BF16_WIRE = SIDES[4]


def dp_layout(scale: str) -> Layout:
    if scale == "tiny":
        return Layout("gpt-tiny", gpt2_shapes(512, 64, 64, 1), "tiny: d=64, 1 block, vocab 512")
    if scale == "quick":
        return Layout("gpt-5m", gpt2_shapes(4096, 256, 256, 4), "quick: GPT-2's shapes at d=256, 4 blocks, vocab 4096")
    return Layout("gpt-20m", gpt2_shapes(8192, 512, 512, 5), "GPT-2's shapes at d=512, 5 blocks, vocab 8192")


class Probe(nn.Module):
    """The bench's probe model (sum_i <p_i, w_i>) as a module, so that DDP can wrap it."""

    def __init__(self, init: list[torch.Tensor], scales: list[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t.clone()) for t in init])
        self.scales = scales

    def forward(self, k: int) -> torch.Tensor:
        return probe_loss(list(self.params), [self.scales[k]] * len(self.params))


def _state_bytes(opt) -> int:
    if isinstance(opt, fa.AdamW):
        return sum(t.numel() * t.element_size() for a in opt.arenas for t in [*a.state.values(), a.steps]
                   + [t for t in (a.master, a.remainder) if t is not None])
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _ring_bytes(kind: str, whole: torch.Tensor) -> float:
    """Bytes one rank sends for a collective over `whole`, done as a ring."""
    share = (WORLD - 1) / WORLD * whole.numel() * whole.element_size()
    return 2 * share if kind == "all_reduce" else share


def _worker(rank: int, init_method: str, shapes, n: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    init = random_tensors(shapes, torch.float32, torch.device("cpu"), seed=1)
    torch.manual_seed(4 + rank)  # each rank its own data
    scales = [w for w in torch.rand(n) + 0.5]
    sent = {side: 0 for side in SIDES}
    counting = {"on": False}

    def ddp_side(side: str, no_sync: bool):
        model = Probe(init, scales)
        ddp = nn.parallel.DistributedDataParallel(model)

        def hook(state, bucket):
            if counting["on"]:
                sent[side] += _ring_bytes("all_reduce", bucket.buffer())
            return default_hooks.allreduce_hook(None, bucket)  # DDP's own reduction, counted

        ddp.register_comm_hook(None, hook)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def window():
            for k in range(n):
                if no_sync and k < n - 1:
                    with ddp.no_sync():
                        (ddp(k) / n).backward()
                else:
                    (ddp(k) / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()

        return window, opt, model

    def fa_side(side: str, shard: bool, wire: torch.dtype | None = None):
        model = Probe(init, scales)
        opt = fa.AdamW(model.parameters(), lr=1e-3)
        acc = fa.GradAccumulator(opt, accumulation_steps=n, max_grad_norm=MAX_GRAD_NORM,
                                 process_group=dist.group.WORLD, shard_optimizer_state=shard, reduce_dtype=wire)
        real = {"all_reduce": dist.all_reduce, "_reduce_scatter": fdp._reduce_scatter, "_all_gather": fdp._all_gather}

        def counted(name, arg):  # arg: which argument is the whole buffer
            def call(*a, **k):
                if counting["on"]:
                    sent[side] += _ring_bytes(name, a[arg])
                return real[name](*a, **k)

            return call

        def window():
            dist.all_reduce = counted("all_reduce", 0)
            fdp._reduce_scatter, fdp._all_gather = counted("_reduce_scatter", 1), counted("_all_gather", 0)
            try:
                for k in range(n):
                    acc.backward(model(k))
                    acc.step()
            finally:
                dist.all_reduce, fdp._reduce_scatter, fdp._all_gather = real.values()

        window.keep = acc
        return window, opt, model

    windows, opts, models = {}, {}, {}
    makers = (lambda: ddp_side(SIDES[0], False), lambda: ddp_side(SIDES[1], True),
              lambda: fa_side(SIDES[2], False), lambda: fa_side(SIDES[3], True),
              lambda: fa_side(BF16_WIRE, False, torch.bfloat16))
    for side, make in zip(SIDES, makers):
        windows[side], opts[side], models[side] = make()
    # One window each, counted: the bytes sent, and the check that all computed the same (the bf16
    # wire within what one AdamW step from a gradient rounded to bf16 can move: lr * 2^-7).
    counting["on"] = True
    for side in SIDES:
        windows[side]()
    counting["on"] = False
    first = [p.detach() for p in models[SIDES[0]].parameters()]
    for side in SIDES[1:]:
        tol = dict(rtol=0, atol=1e-3 * 2.0**-7) if side == BF16_WIRE else dict(rtol=1e-5, atol=1e-6)
        for a, b in zip(first, models[side].parameters()):
            torch.testing.assert_close(b.detach(), a, **tol, msg=f"{side} differs from {SIDES[0]}")
    times = {side: [] for side in SIDES}
    for _ in range(rounds):  # in alternation: every side sees the same machine
        for side in SIDES:
            dist.barrier()
            start = time.perf_counter()
            windows[side]()
            dist.barrier()
            times[side].append(time.perf_counter() - start)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "sent": sent, "state": {s: _state_bytes(opts[s]) for s in SIDES}}, f)
    dist.barrier()  # rank 1 keeps its group until rank 0 has written
    dist.destroy_process_group()
    # Everything is written: leave without the interpreter's teardown, where torch 2.14's gloo
    # aborts now and then ("terminate called without an active exception", SIGABRT after atexit;
    # 1-3 in 25 spawns of plain DDP without fusedaccum here), which would fail the job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel_job(s: Settings) -> list[Row]:
    layout = dp_layout(s.scale)
    n = s.accumulation_steps
    rounds = {"tiny": 2, "quick": 3}.get(s.scale, 15)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dp.json")
        mp.spawn(_worker, args=(f"tcp://127.0.0.1:{_free_port()}", layout.shapes, n, rounds, out), nprocs=WORLD)
        with open(out) as f:
            res = json.load(f)
    t = {side: statistics.median(v) for side, v in res["times"].items()}
    case = f"{WORLD} ranks (gloo), {n} micro-batches + AdamW + clip"
    rows = [Row("data-parallel", layout.name, "fp32", fa.backends()["default"]["cpu"], case, side, fa_side,
                t[side], t[fa_side], layout.numel, None) for fa_side in SIDES[2:] for side in SIDES[:2]]
    per_param = {side: res["sent"][side] / layout.numel for side in SIDES}
    state = {side: res["state"][side] / layout.numel for side in SIDES}
    s.notes.append(
        "data-parallel: bytes each rank sends per window and parameter (ring): "
        + ", ".join(f"{side} {per_param[side]:.2f}" for side in SIDES)
        + "; optimizer state per rank and parameter: "
        + ", ".join(f"{side} {state[side]:.2f} B" for side in SIDES)
        + " (fp32 moments; ZeRO-1 keeps 1/world of them; the bf16 wire keeps a 2 B buffer per parameter besides)"
    )
    return rows
