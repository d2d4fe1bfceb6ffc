"""Where a boundary's and an accumulate's time goes, kernel by kernel (torch.profiler).

    python scripts/gpu_profile.py [--device cuda|cpu] [--scale full|tiny] [--out DIR]

The first GPU run (H200, 2026-12-04) left this open: the fused boundary of GPT-2 small
(clip + AdamW) took 2.04 ms where its floor bytes take 0.82 ms at the reference bandwidth, with
the CUDA and the Triton kernels alike, and SGD and Lion (fewer bytes) took 1.7 ms: about 1.1 ms
that the bytes do not explain. The accumulate of one 64M tensor took 260 µs against 199 µs for
`p.grad += g`. Each call here is measured three ways:

  event   as the bench times it (its Clock: setup, cache flush, then CUDA events from a
          synchronized start, so the host's latency before the first kernel counts; on CPU wall time)
  host    perf_counter until the call returns, nothing synchronized: what the host spends
  kernels the profiler's device time per kernel (on CPU: per op, self CPU time)

Kernels that add up to well below `event` mean the call waits on the host (launch latency, a
gap between launches); a main kernel far from the floor means the kernel itself. Results are
printed and written to OUT/profile.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fusedaccum as fa
from fusedaccum import dispatch
from fusedaccum.bench.cases import (MAX_GRAD_NORM, backend, gpt2_shapes, leaf_params, probe_loss, random_tensors,
                                    reopen_window)
from fusedaccum.bench.timing import Clock

REPS = 7


def device_time_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def measure(fn, setup, clock: Clock) -> dict:
    cuda = clock.cuda
    event = clock.measure(fn, setup)  # the bench's own timer: setup, cache flush, then the timed call
    hosts = []
    for _ in range(REPS):
        setup()
        clock.sync()
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        clock.sync()
    setup()
    clock.sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        clock.sync()
    if cuda:
        rows = [(e.key, e.count, device_time_us(e)) for e in prof.key_averages() if device_time_us(e) > 0]
    else:
        rows = [(e.key, e.count, float(e.self_cpu_time_total)) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    return {"event_us": 1e6 * event, "host_us": 1e6 * statistics.median(hosts),
            "kernels_us": sum(r[2] for r in rows), "kernels": [{"name": n, "count": c, "us": t} for n, c, t in rows]}


def boundary_cases(device: torch.device, shapes, backends: list[str]) -> dict:
    """acc.step() of a window whose gradients are in the arena (norm already folded), and the
    standard clip + torch's fused AdamW + zero_grad, on the same parameters and gradients."""
    init = random_tensors(shapes, torch.float32, device, seed=1)
    grads = random_tensors(shapes, torch.float32, device, seed=2)
    params = leaf_params(init)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)

    def standard():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()

    def restore():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    cases = {"boundary: clip + torch fused AdamW + zero_grad": (standard, restore)}
    for b in backends:
        with backend(b):
            fparams = leaf_params(init)
            acc = fa.GradAccumulator(fa.AdamW(fparams, lr=1e-3, weight_decay=1e-2), accumulation_steps=1,
                                     max_grad_norm=MAX_GRAD_NORM)
            acc.backward(probe_loss(fparams, grads))
            acc.step()
        cases[f"boundary: acc.step() [{b}]"] = (acc.step, lambda b=b, acc=acc: (fa.set_backend(b), reopen_window(acc)))
    return cases


def accumulate_cases(device: torch.device, numel: int, backends: list[str]) -> dict:
    """One micro-batch (not the first) of one tensor: torch's in-place add against the op."""
    grad, new = random_tensors([(numel,), (numel,)], torch.float32, device, seed=3)
    cases = {f"accumulate 1 x {numel}: p.grad += g": (lambda: grad.add_(new), lambda: None)}
    op = torch.ops.fusedaccum.accumulate
    for b in backends:
        arena = grad.clone()
        cases[f"accumulate 1 x {numel}: fusedaccum op [{b}]"] = (
            lambda arena=arena: op(arena, [new], [0], 1.0, False, None, None), lambda b=b: fa.set_backend(b))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    backends = [b for b in ("cuda", "triton", "cpp") if b in fa.backends()["available"] and dispatch.runs_on(b, device.type)]
    if args.scale == "tiny":
        shapes, numel = gpt2_shapes(vocab=512, positions=64, d=64, blocks=2), 1 << 16
    else:
        shapes, numel = gpt2_shapes(), 64 << 20 if device.type == "cuda" else 16 << 20
    cases = {**boundary_cases(device, shapes, backends), **accumulate_cases(device, numel, backends)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_profile on {name}: torch {torch.__version__}, backends {backends}, GPT-2 shapes "
          f"({sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters, {len(shapes)} tensors)")
    clock = Clock(device, min_time=0.05, min_reps=REPS)
    results = {}
    for label, (fn, setup) in cases.items():
        r = results[label] = measure(fn, setup, clock)
        print(f"\n{label}\n  event {r['event_us']:9.1f} us   host {r['host_us']:9.1f} us   "
              f"{'kernels' if device.type == 'cuda' else 'ops (self CPU)'} {r['kernels_us']:9.1f} us")
        for k in r["kernels"][:8]:
            print(f"    {k['us']:9.1f} us  x{k['count']:<4d} {k['name'][:100]}")
    fa.set_backend(None)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        info = {"device": name, "torch": torch.__version__, "backends": backends, "scale": args.scale}
        (out / "profile.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
        print(f"\nwrote {out / 'profile.json'}")


if __name__ == "__main__":
    main()
