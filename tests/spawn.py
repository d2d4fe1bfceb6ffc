"""Runs a test's ranks as processes (torch.multiprocessing.spawn) and collects what each left.

Each rank writes its results to OUT/rank<r>.pt as it goes (after every case), so that a hang or
a crash keeps what was done; the tests then compare. A spawn that runs past its time limit is
killed and reported, not waited on."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_collect(worker, args: tuple, world: int, out: Path, timeout_s: float) -> tuple[list[dict], str | None]:
    """worker(rank, *args) on `world` processes; returns each rank's rank<r>.pt (or {}) and what failed."""
    start = time.monotonic()
    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    failure = None
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() - start > timeout_s:
                failure = f"the {world}-rank spawn did not finish in {timeout_s} s (a hang in a collective?)"
                break
    except Exception as e:  # a rank died (its traceback is in the message)
        failure = f"a rank failed: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    ranks = []
    for r in range(world):
        f = Path(out) / f"rank{r}.pt"
        ranks.append(torch.load(f, weights_only=False) if f.exists() else {})
    return ranks, failure
