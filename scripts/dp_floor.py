"""The floor of the data-parallel bench's window on this host, from the parts every side must run.

    python scripts/dp_floor.py [--rounds 10]

Two processes on gloo, one thread each, the bench's gpt-20m layout and probe model (as
`fusedaccum-bench --cases data-parallel`). Each part is timed on both ranks at once, from a
barrier, median of --rounds:

  fwd+bwd       one micro-batch of the probe model, its gradients stolen (torch's first backward)
  accumulate    p.grad += g over every parameter (each later micro-batch, either loop)
  copy          20M floats copied (DDP's bucket copies, in and back; the arena's first fold)
  norm          the gradient's norm (clipping needs it, either loop)
  scale         the gradient times the clip coefficient (clip_grad_norm_'s second pass)
  AdamW         torch's fused AdamW step
  all_reduce    gloo's all-reduce of the whole gradient, with how busy both cores were meanwhile

Any window of N micro-batches + clip + AdamW runs at least
    N fwd+bwd + (N - 1) accumulate + norm + AdamW + all_reduce
(the arena's fold does the accumulates, DDP's autograd does them as torch does). DDP + no_sync()
adds 2 copies and the scale pass; the best fused window adds nothing to the floor. The ratio
(floor + DDP's extra) / floor is what the fused side can win while the all-reduce costs its
wall time. It can go below that only by filling the all-reduce's idle core time (gloo waits on
the peer part of the time) with the last backward's work; the second ratio printed is that
extreme, with every idle moment filled and none on DDP's side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedaccum.bench.cases import random_tensors
from fusedaccum.bench.data_parallel import Probe, _free_port, dp_layout
from fusedaccum.bench.timing import reuse_freed_memory

N = 4  # micro-batches per window, as the bench


def _busy() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the whole machine."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]


def _worker(rank: int, port: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    init = random_tensors(dp_layout("full").shapes, torch.float32, torch.device("cpu"), seed=1)
    model = Probe(init, [torch.tensor(0.7)] * N)
    params = list(model.parameters())
    model(0).backward()
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    other = flat.clone()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.step()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(0).backward()

    parts = {
        "fwd+bwd": fwd_bwd,
        "accumulate": lambda: torch._foreach_add_(grads, grads),
        "copy": lambda: other.copy_(flat),
        "norm": lambda: torch.linalg.vector_norm(flat),
        "scale": lambda: torch._foreach_mul_(grads, 0.5),
        "AdamW": opt.step,
        "all_reduce": lambda: dist.all_reduce(flat),
    }
    ms, busy = {}, 0.0
    for name, fn in parts.items():
        fn()
        times = []
        before = _busy()
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        after = _busy()
        ms[name] = statistics.median(times)
        if name == "all_reduce":  # the barriers' share is small against 40 ms collectives
            busy = 1 - (after[1] - before[1]) / (after[0] - before[0])
    if rank == 0:
        for name, t in ms.items():
            print(f"{name:12s} {t:6.1f} ms")
        floor = N * ms["fwd+bwd"] + (N - 1) * ms["accumulate"] + ms["norm"] + ms["AdamW"] + ms["all_reduce"]
        ddp = floor + 2 * ms["copy"] + ms["scale"]
        idle = (1 - busy) * ms["all_reduce"]
        print(f"both cores {100 * busy:.0f}% busy during the all-reduce ({idle:.1f} ms of each core idle)")
        print(f"window floor {floor:.1f} ms; DDP + no_sync() at least {ddp:.1f} ms: at most {ddp / floor:.2f}x "
              f"while the all-reduce costs its wall time; {ddp / (floor - idle):.2f}x with every idle moment of it "
              f"filled by the backward")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo of torch 2.14 may abort in the interpreter's teardown (see the bench)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    reuse_freed_memory()  # as the bench: no page faults from freed and re-faulted gradients
    mp.spawn(_worker, args=(_free_port(), args.rounds), nprocs=2)


if __name__ == "__main__":
    main()
