"""The benchmark cases: the standard PyTorch loop against fusedaccum, on the same data.

Sections (each a list of jobs; a job times the standard side once and the fused side on
every selected backend, after checking that both compute the same thing):

  accumulate   one micro-batch (not the first) folded into existing gradients
  precision    bf16 gradients summed in bf16 (autograd) vs in the fp32 arena, against float64
  boundary     the end of a window: clip + optimizer step (+ GradScaler) + zero_grad
  window       N micro-batches of a real backward + the boundary
  sweep        one tensor of 2^16.. elements: accumulate and AdamW step, for GB/s vs size
  end-to-end   the seed training loop and a small transformer LM, optimizer steps per second
  host         thousands of tiny gradients: the host's time per gradient and per call
  data-parallel  2 processes on gloo: DDP (with and without no_sync) against process_group=
                 (whole, ZeRO-1, a bf16 wire)

GB/s always counts the floor bytes of DESIGN.md (the bytes fusedaccum must move), for the
standard side too, so GB/s ratios equal time ratios and "% of copy" says how close each side
comes to the machine's limit.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
from dataclasses import dataclass, field
from typing import Callable
import statistics
import time

import torch

import fusedaccum as fa
from fusedaccum.arena import ALIGN
from fusedaccum.bench.lion import ForeachLion
from fusedaccum.bench.timing import Clock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_GRAD_NORM = 1.0
PRECISION_MICRO_BATCHES = 16
SECTIONS = ("accumulate", "boundary", "window", "sweep", "end-to-end", "host", "data-parallel", "fused-modules")

# -- floors (DESIGN.md, bytes per parameter) ----------------------------------------------


def accumulate_floor(grad_dtype: torch.dtype, first: bool = False) -> int:
    """Read the gradient, read (unless first) and write the fp32 arena: 12 B fp32, 10 B bf16."""
    return grad_dtype.itemsize + (0 if first else 4) + 4


def step_floor(optimizer: str, master: bool | str) -> int:
    """Read param (fp32 master), fp32 grad and state; write param and state (and the bf16 copy).

    Adam/AdamW: 28 B, 30 B with a master. SGD with momentum and Lion: 20 B (22 B with a master).
    master="remainder": the bf16 parameter and its int16 remainder are read and written in the
    master's place (4 B each way, as the master's), and there is no copy to write: 28 B again.
    """
    state = 1 if optimizer in ("SGD", "Lion") else 2
    return 4 * (2 + state) + 4 * (1 + state) + (2 if master is True else 0)


# -- layouts -----------------------------------------------------------------------------


@dataclass
class Layout:
    name: str
    shapes: list[tuple[int, ...]]
    note: str = ""  # how it was scaled down from the real thing, if it was

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def gpt2_shapes(vocab=50257, positions=1024, d=768, blocks=12) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 (Hugging Face Conv1D weights are in x out)."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + block * blocks + [(d,), (d,)]


def layouts(device_type: str, scale: str) -> dict[str, Layout]:
    """scale: "full", "quick" (smaller on CPU, to finish in a minute) or "tiny" (tests)."""
    seed = Layout("seed", [(1000, 128), (1000, 128), (1000,)])
    if scale == "tiny":
        return {
            "seed": seed,
            "gpt2-small": Layout("gpt2-small", gpt2_shapes(512, 64, 64, 1), "tiny: d=64, 1 block, vocab 512"),
            "many-small": Layout("many-small", [(4096,)] * 50, "tiny: 50 tensors"),
            "one-huge": Layout("one-huge", [(1 << 16,)], "tiny: 64K elements"),
        }
    if scale == "quick" and device_type == "cpu":
        return {
            "seed": seed,
            "gpt2-small": Layout("gpt2-small", gpt2_shapes(4096, 256, 768, 1),
                                 "quick on CPU: 1 block, vocab 4096, 256 positions (d=768 kept)"),
            "many-small": Layout("many-small", [(4096,)] * 500, "quick on CPU: 500 tensors"),
            "one-huge": Layout("one-huge", [(4 << 20,)], "quick on CPU: 4M elements"),
        }
    huge = 64 << 20 if device_type == "cuda" else 8 << 20
    return {
        "seed": seed,
        "gpt-20m": Layout("gpt-20m", gpt2_shapes(8192, 512, 512, 5), "GPT-2's shapes at d=512, 5 blocks, vocab 8192"),
        "gpt2-small": Layout("gpt2-small", gpt2_shapes()),
        "many-small": Layout("many-small", [(4096,)] * 2000),
        "one-huge": Layout("one-huge", [(huge,)], "" if device_type == "cuda" else "8M elements on CPU"),
    }


def sweep_sizes(device_type: str, scale: str) -> list[int]:
    if scale == "tiny":
        return [1 << 12, 1 << 14]
    if device_type == "cuda":
        return [1 << k for k in range(16, 27, 2 if scale == "quick" else 1)]
    return [1 << k for k in range(16, 23 if scale == "quick" else 25, 2)]


# -- results -----------------------------------------------------------------------------


@dataclass
class Row:
    """One comparison: the same work done the standard way and the fusedaccum way."""

    section: str
    layout: str
    dtype: str
    backend: str
    case: str
    standard: str  # what the standard side runs
    fused: str  # what the fused side runs
    standard_s: float  # median seconds per call
    fused_s: float
    params: int  # parameters (elements) the work covers
    floor_bytes_per_param: float | None  # DESIGN.md floor; None where bytes say nothing (end to end)
    # What the standard side really moves, where that is less than the floor (bf16 += bf16:
    # 6 B); only the SUSPECT check uses it, GB/s stay at the floor bytes for both sides.
    standard_bytes_per_param: float | None = None
    # Median minor page faults per call (CPU rows that allocate: window, end to end): memory that
    # arrives as fresh pages, which the time includes.
    standard_faults: float | None = None
    fused_faults: float | None = None

    @property
    def ratio(self) -> float:
        """standard time / fused time: above 1, fused is faster."""
        return self.standard_s / self.fused_s


@dataclass
class Precision:
    backend: str
    micro_batches: int
    elements: int
    standard_bf16_rel_err: float  # max |sum - exact| / max |exact|, bf16 grads summed in bf16
    fused_fp32_rel_err: float  # the same for the fp32 arena


@dataclass
class Settings:
    device: torch.device
    dtypes: list[str]
    backends: list[str]
    layouts: dict[str, Layout]
    accumulation_steps: int
    scale: str
    clock: Clock
    notes: list[str] = field(default_factory=list)


@dataclass
class Job:
    label: str  # shown on the progress bar
    run: Callable[[], list]  # -> [Row | Precision]


# -- helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def backend(name: str):
    fa.set_backend(name)
    try:
        yield
    finally:
        fa.set_backend(None)


def release() -> None:
    """Frees what the last variant held now, not at some later collection: optimizers sit in
    reference cycles (opt._accumulator <-> acc.optimizer, torch's for-loop optimizers), and a
    few GB of gpt2-small state per variant would otherwise pile up. (Cheap: the CLI freezes
    the objects that existed before the jobs, so a collect scans only what the jobs made.)"""
    gc.collect()


def fa_backend() -> str:
    """The backend fusedaccum runs on right now (for messages)."""
    return fa.backends()["forced"] or "default"


def random_tensors(shapes, dtype, device, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    # uniform_ rather than randn: several times faster on CPU for 100M elements
    return [torch.empty(s, device=device).uniform_(-1, 1).to(dtype) for s in shapes]


def leaf_params(init: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(t.clone()) for t in init]


def probe_loss(params, weights) -> torch.Tensor:
    """sum_i <p_i, w_i>: the cheapest model there is. Its backward writes one fresh gradient per
    parameter, as a real backward does, so what differs between the loops is what happens to
    gradients after autograd has made them. (stack, not a chain of adds: fewer launches.)"""
    return torch.stack([(p * w).sum() for p, w in zip(params, weights)]).sum()


def assert_same(got, want, dtype: torch.dtype, what: str, lr: float = 1e-3) -> None:
    """Fused and standard must agree before their times mean anything."""
    # fp32: rounding only. bf16: the standard side rounds to bf16 in places the fused side
    # does not (bf16 state, bf16 sums), so one or two bf16 ulps, or about one lr step near 0.
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1.6e-2, 2 * lr)
    for i, (g, w) in enumerate(zip(got, want)):
        try:
            torch.testing.assert_close(g.detach().float(), w.detach().float(), rtol=rtol, atol=atol)
        except AssertionError as e:
            raise AssertionError(f"benchmark check failed, {what}, tensor {i}: fused != standard\n{e}") from None


def arena_offsets(shapes) -> tuple[list[int], int]:
    """Offsets as fusedaccum's arenas lay parameters out (ALIGN-element aligned)."""
    offsets, end = [], 0
    for s in shapes:
        offsets.append(end)
        end = -(-(end + _numel(s)) // ALIGN) * ALIGN
    return offsets, end


def arena_views(arena, shapes, offsets):
    return [arena[o : o + _numel(s)].view(s) for s, o in zip(shapes, offsets)]


@functools.cache
def torch_variants(optimizer: str, device_type: str, dtype: torch.dtype) -> dict[str, dict]:
    """torch.optim implementations to compare with: for-loop, foreach, and fused where it runs."""
    if optimizer == "Lion":
        return {"foreach": {}}  # bench/lion.py, the only one
    variants = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}}
    p = torch.nn.Parameter(torch.zeros(4, device=device_type, dtype=dtype))
    p.grad = torch.ones_like(p)
    try:
        getattr(torch.optim, optimizer)([p], lr=1e-3, fused=True).step()
        variants["fused"] = {"fused": True}
    except (RuntimeError, ValueError, NotImplementedError):
        pass
    return variants


def best_variant(optimizer: str, device_type: str, dtype: torch.dtype) -> str:
    return "fused" if "fused" in torch_variants(optimizer, device_type, dtype) else "foreach"


@functools.cache
def amp_unavailable(device_type: str) -> str | None:
    """Why torch.amp.GradScaler cannot run on this device (None when it can)."""
    p = torch.nn.Parameter(torch.zeros(4, device=device_type))
    p.grad = torch.ones_like(p)
    opt = torch.optim.SGD([p], lr=1e-3)
    try:
        scaler = torch.amp.GradScaler(device_type)
        scaler.scale(torch.ones((), device=device_type))
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def reopen_window(acc: fa.GradAccumulator) -> None:
    """Puts a just-closed one-micro-batch window back to "all micro-batches in", so that
    acc.step() can be timed again on the same arena: the gradients, and the norm and inf flag
    that the last fold computed, are still there (the accumulator's own bookkeeping)."""
    acc._micro_step = acc.accumulation_steps
    for w in acc._windows:
        w.set_touched([True] * len(w.touched), last=True)


# -- 1. accumulate -------------------------------------------------------------------------


def accumulate_job(s: Settings, layout: Layout, dtype_name: str) -> list[Row]:
    dtype, dev, shapes = DTYPES[dtype_name], s.device, layout.shapes
    label = f"accumulate {layout.name} {dtype_name}"
    start = random_tensors(shapes, dtype, dev, seed=1)  # the window's gradients so far
    new = random_tensors(shapes, dtype, dev, seed=2)  # this micro-batch's
    exact = [a.float() + g.float() for a, g in zip(start, new)]  # one rounding away from both results

    grads = [a.clone() for a in start]

    def per_param():  # autograd's AccumulateGrad: `variable.grad += new_grad`, one kernel each
        for a, g in zip(grads, new):
            a.add_(g)

    def foreach():
        torch._foreach_add_(grads, new)

    def foreach_and_norm():  # the last micro-batch of a window, and clip_grad_norm_'s norm
        torch._foreach_add_(grads, new)
        torch.nn.utils.get_total_norm(grads)

    per_param()
    assert_same(grads, exact, dtype, label)
    calls = {"p.grad += g": per_param, "_foreach_add_": foreach, "_foreach_add_ + norm": foreach_and_norm}

    def fused_calls(b: str) -> tuple:
        offsets, numel = arena_offsets(shapes)
        arena = torch.zeros(numel, device=dev)
        for view, a in zip(arena_views(arena, shapes, offsets), start):
            view.copy_(a)
        sumsq, found_inf = torch.zeros((), device=dev), torch.zeros((), device=dev)
        op = torch.ops.fusedaccum.accumulate

        def fused():
            op(arena, new, offsets, 1.0, False, None, None)

        def fused_and_norm():
            sumsq.zero_()  # the accumulator zeroes it once per window; here once per call
            op(arena, new, offsets, 1.0, False, sumsq, found_inf)

        fused, fused_and_norm = under(b, fused), under(b, fused_and_norm)
        fused_and_norm()
        assert_same(arena_views(arena, shapes, offsets), exact, torch.float32, f"{label} [{b}]")
        # float64 reference: torch's fp32 CPU norm of a 38M-element tensor is off by ~3e-3.
        norm = torch.stack([torch.linalg.vector_norm(e, dtype=torch.float64) for e in exact]).norm()
        torch.testing.assert_close(sumsq.sqrt().double(), norm, rtol=1e-5, atol=0)
        assert found_inf.item() == 0
        return fused, fused_and_norm

    for b in s.backends:
        calls[(b, False)], calls[(b, True)] = fused_calls(b)
    times = s.clock.measure_interleaved(calls)  # both sides in alternation: the same machine
    rows = []
    for b in s.backends:
        for name in ("p.grad += g", "_foreach_add_", "_foreach_add_ + norm"):
            last = name.endswith("norm")
            rows.append(Row("accumulate", layout.name, dtype_name, b,
                            "last micro-batch (+ norm)" if last else "one micro-batch",
                            name, "accumulate op + norm, inf flag" if last else "accumulate op",
                            times[name], times[(b, last)], layout.numel, accumulate_floor(dtype),
                            standard_bytes_per_param=accumulate_floor(dtype) if dtype == torch.float32 else 6))
    return rows


def precision_job(s: Settings) -> list[Precision]:
    """bf16 gradients summed in bf16 (what autograd does for bf16 params) and in the fp32
    arena, each against the float64 sum of the same bf16 values."""
    n = 1 << (14 if s.scale == "tiny" else 20)
    torch.manual_seed(3)
    grads = [torch.randn(n, device=s.device).to(torch.bfloat16) for _ in range(PRECISION_MICRO_BATCHES)]
    exact = torch.stack([g.double() for g in grads]).sum(0)
    in_bf16 = torch.zeros(n, dtype=torch.bfloat16, device=s.device)
    for g in grads:
        in_bf16.add_(g)

    def rel_err(x):
        return ((x.double() - exact).abs().max() / exact.abs().max()).item()

    out = []
    for b in s.backends:
        with backend(b):
            arena = torch.empty(n, device=s.device)
            for k, g in enumerate(grads):
                torch.ops.fusedaccum.accumulate(arena, [g], [0], 1.0, k == 0, None, None)
        out.append(Precision(b, len(grads), n, rel_err(in_bf16), rel_err(arena)))
    return out


# -- 2. boundary ---------------------------------------------------------------------------

OPTIMIZERS = {  # name: (torch class, fusedaccum class, hyperparameters)
    "AdamW": (torch.optim.AdamW, fa.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    "Adam": (torch.optim.Adam, fa.Adam, {"lr": 1e-3}),
    "SGD": (torch.optim.SGD, fa.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "Lion": (ForeachLion, fa.Lion, {"lr": 1e-4, "weight_decay": 1e-2}),  # torch has none: a foreach one
}


def boundary_job(s: Settings, layout: Layout, dtype_name: str, optimizer: str, amp: bool) -> list[Row]:
    """Standard: [GradScaler.unscale_] + clip_grad_norm_ + step [+ GradScaler.update] + zero_grad.
    Fused: acc.step() of a window whose gradients are in the arena (norm already folded)."""
    dtype, dev = DTYPES[dtype_name], s.device
    torch_cls, fa_cls, hyper = OPTIMIZERS[optimizer]
    master = dtype != torch.float32
    loss_scale = 2.0**16  # GradScaler's and fusedaccum's initial dynamic scale
    case = f"{optimizer} + clip" + (" + fp16 AMP" if amp else "")
    label = f"boundary {case} {layout.name} {dtype_name}"
    init = random_tensors(layout.shapes, dtype, dev, seed=1)
    window_grads = random_tensors(layout.shapes, dtype, dev, seed=2)

    def standard_calls(variants: dict[str, dict]) -> tuple[dict, list[torch.Tensor]]:
        """One boundary call per torch variant, all on the same parameters and gradients (the
        values do not matter for the time; the first variant's first step is the reference)."""
        pristine = [g * loss_scale for g in window_grads] if amp else window_grads
        params = leaf_params(init)
        grads = [g.clone() for g in pristine]

        def restore():  # untimed: the window's gradients back in place (clip and unscale_ work in place)
            torch._foreach_copy_(grads, pristine)
            for p, g in zip(params, grads):
                p.grad = g

        calls, expected = {}, None
        for name, kw in variants.items():
            with torch.no_grad():
                torch._foreach_copy_(params, init)
            opt = torch_cls(params, **hyper, **kw)
            scaler = torch.amp.GradScaler(dev.type, init_scale=loss_scale) if amp else None
            if scaler is not None:
                scaler.scale(torch.ones((), device=dev))  # GradScaler creates its scale lazily here

            def boundary(opt=opt, scaler=scaler):
                if scaler is not None:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()

            restore()
            boundary()
            if expected is None:
                expected = [p.detach().clone() for p in params]
            calls[name] = (boundary, restore)
        return calls, expected

    def fused_call(b: str, expected) -> tuple:
        with backend(b):
            params = leaf_params(init)
            acc = fa.GradAccumulator(fa_cls(params, master_weights=master, **hyper), accumulation_steps=1,
                                     max_grad_norm=MAX_GRAD_NORM, loss_scale="dynamic" if amp else None)
            acc.backward(probe_loss(params, window_grads))  # the window's gradients into the arena
            assert acc.step()
            assert_same(params, expected, dtype, f"{label} [{b}]", lr=hyper["lr"])

        return acc.step, lambda: (fa.set_backend(b), reopen_window(acc))  # the switch untimed, as under() does

    variants = torch_variants(optimizer, dev.type, dtype)
    if s.scale == "quick" and optimizer != "AdamW":
        variants = {k: v for k, v in variants.items() if k == best_variant(optimizer, dev.type, dtype)}
    calls, expected = standard_calls(variants)
    for b in s.backends:
        calls[("fused", b)] = fused_call(b, expected)
    times = s.clock.measure_interleaved(calls)  # every side in alternation: the same machine
    rows = []
    for b in s.backends:
        rows += [Row("boundary", layout.name, dtype_name, b, case,
                     "plain-PyTorch foreach Lion" if optimizer == "Lion" else f"torch {name}", "acc.step()", times[name],
                     times[("fused", b)], layout.numel, step_floor(optimizer, master)) for name in variants]
    return rows


def master_mode_job(s: Settings, layout: Layout) -> list[Row]:
    """bf16 AdamW + clip: acc.step() with an fp32 master (master_weights=True: 30 B per step,
    14 B of weights and state per parameter) against bf16 parameters + int16 remainders
    ("remainder": 28 B per step, 12 B per parameter). Both keep the same fp32 master exactly."""
    dtype, dev = torch.bfloat16, s.device
    hyper = OPTIMIZERS["AdamW"][2]
    init = random_tensors(layout.shapes, dtype, dev, seed=1)
    window_grads = random_tensors(layout.shapes, dtype, dev, seed=2)

    def call(b: str, mode) -> tuple:
        with backend(b):
            params = leaf_params(init)
            acc = fa.GradAccumulator(fa.AdamW(params, master_weights=mode, **hyper), accumulation_steps=1,
                                     max_grad_norm=MAX_GRAD_NORM)
            acc.backward(probe_loss(params, window_grads))
            assert acc.step()

        return acc.step, params, lambda: (fa.set_backend(b), reopen_window(acc))  # the switch untimed

    calls, rows = {}, []
    for b in s.backends:
        step_true, p_true, reopen_true = call(b, True)
        step_rem, p_rem, reopen_rem = call(b, "remainder")
        assert_same(p_rem, p_true, dtype, f"boundary master modes {layout.name} [{b}]", lr=hyper["lr"])
        calls[("true", b)] = (step_true, reopen_true)
        calls[("remainder", b)] = (step_rem, reopen_rem)
    times = s.clock.measure_interleaved(calls)
    for b in s.backends:
        rows.append(Row("boundary", layout.name, "bf16", b, "AdamW + clip, master weights",
                        "master_weights=True (fp32 master)", 'master_weights="remainder"', times[("true", b)],
                        times[("remainder", b)], layout.numel, step_floor("AdamW", "remainder"),
                        standard_bytes_per_param=step_floor("AdamW", True)))
    return rows


# -- 3. whole window -----------------------------------------------------------------------


def window_job(s: Settings, layout: Layout, dtype_name: str) -> list[Row]:
    """N micro-batches (autograd makes fresh gradients each time) + clip + AdamW step."""
    dtype, dev, n = DTYPES[dtype_name], s.device, s.accumulation_steps
    master = dtype != torch.float32
    label = f"window {layout.name} {dtype_name}"
    init = random_tensors(layout.shapes, dtype, dev, seed=1)
    torch.manual_seed(4)
    scales = [w for w in torch.rand(n, device=dev) + 0.5]  # one 0-dim weight per micro-batch
    hyper = {"lr": 1e-3}

    def standard_loop(params, opt):  # the seed's loop, with clipping; also the swap-in loop
        def window():
            for k in range(n):
                (probe_loss(params, [scales[k]] * len(params)) / n).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
        return window

    def full_path(params, acc):
        def window():
            for k in range(n):
                acc.backward(probe_loss(params, [scales[k]] * len(params)))
                acc.step()
        return window

    def standard_call(variant: str) -> tuple:
        params = leaf_params(init)
        opt = torch.optim.AdamW(params, **hyper, **torch_variants("AdamW", dev.type, dtype)[variant])
        window = standard_loop(params, opt)
        window()
        return window, [p.detach().clone() for p in params]

    def fused_call(b: str, mode: str, expected):
        with backend(b):
            params = leaf_params(init)
            opt = fa.AdamW(params, master_weights=master, **hyper)
            if mode == "swap-in":
                acc = fa.GradAccumulator(opt)
                window = standard_loop(params, opt)
            else:
                acc = fa.GradAccumulator(opt, accumulation_steps=n, max_grad_norm=MAX_GRAD_NORM)
                window = full_path(params, acc)
            window()
            assert_same(params, expected, dtype, f"{label} {mode} [{b}]")

        timed = under(b, window)
        timed.keep = acc  # the accumulator lives as long as its window
        return timed

    variants = ["foreach"] + (["fused"] if "fused" in torch_variants("AdamW", dev.type, dtype) else [])
    if s.scale == "quick":
        variants = variants[-1:]
    calls, expected = {}, None
    for name in variants:
        calls[f"torch AdamW {name}"], after_one = standard_call(name)
        expected = expected or after_one
    # Swap-in clips p.grad, which shows the arena only where it has the parameters' dtype.
    modes = ["full path"] if master else ["swap-in", "full path"]
    for b in s.backends:
        for mode in modes:
            calls[(b, mode)] = fused_call(b, mode, expected)
    faults: dict = {}
    times = s.clock.measure_interleaved(calls, faults)  # every side in alternation: the same machine
    floor = accumulate_floor(dtype, first=True) + (n - 1) * accumulate_floor(dtype) + step_floor("AdamW", master)
    rows = []
    for b in s.backends:
        for mode in modes:
            rows += [Row("window", layout.name, dtype_name, b, f"{n} micro-batches + AdamW + clip", f"torch AdamW {name}",
                         mode, times[f"torch AdamW {name}"], times[(b, mode)], layout.numel, floor,
                         standard_faults=faults.get(f"torch AdamW {name}"), fused_faults=faults.get((b, mode)))
                     for name in variants]
    return rows


# -- 4. size sweep -------------------------------------------------------------------------


def sweep_job(s: Settings, n: int) -> list[Row]:
    """One fp32 tensor of n elements: accumulate, and a bare AdamW step (no clip)."""
    dev = s.device
    start, new = random_tensors([(n,), (n,)], torch.float32, dev, seed=1)
    variant = best_variant("AdamW", dev.type, torch.float32)
    hyper = {"lr": 1e-3, "weight_decay": 1e-2}

    def standard_calls() -> tuple[Callable, Callable, torch.Tensor]:
        grad = start.clone()
        (p,) = leaf_params([start])
        p.grad = new.clone()
        opt = torch.optim.AdamW([p], **hyper, **torch_variants("AdamW", dev.type, torch.float32)[variant])
        opt.step()
        return (lambda: grad.add_(new)), opt.step, p.detach().clone()

    def fused_calls(b: str, expected) -> tuple[Callable, Callable]:
        with backend(b):
            arena = start.clone()
            op = torch.ops.fusedaccum.accumulate
            op(arena, [new], [0], 1.0, False, None, None)
            assert_same([arena], [start + new], torch.float32, f"sweep accumulate {n} [{fa_backend()}]")
            (p,) = leaf_params([start])
            p.grad = new.clone()
            opt = fa.AdamW([p], **hyper)
            opt.step()  # gathers p.grad into the arena, then steps: from here the arena holds it
            assert_same([p], [expected], torch.float32, f"sweep AdamW step {n} [{fa_backend()}]")
        # The bare fused pass over the arena: what acc.step() launches, without the norm and
        # factor arithmetic before it.
        return (under(b, lambda: op(arena, [new], [0], 1.0, False, None, None)),
                under(b, lambda: opt._fused_step([[True]], factor={}, found_inf={})))

    standard_acc, standard_step, expected = standard_calls()
    accumulate_calls, step_calls = {"standard": standard_acc}, {"standard": standard_step}
    for b in s.backends:
        accumulate_calls[b], step_calls[b] = fused_calls(b, expected)
    acc_s = s.clock.measure_interleaved(accumulate_calls)  # every side in alternation: the same machine
    step_s = s.clock.measure_interleaved(step_calls)
    rows = []
    for b in s.backends:
        rows.append(Row("sweep", f"1 x {n}", "fp32", b, "accumulate", "p.grad += g", "accumulate op",
                        acc_s["standard"], acc_s[b], n, accumulate_floor(torch.float32)))
        rows.append(Row("sweep", f"1 x {n}", "fp32", b, "AdamW step", f"torch AdamW {variant}", "fused step",
                        step_s["standard"], step_s[b], n, step_floor("AdamW", master=False)))
    return rows


def under(b: str, fn: Callable) -> Callable:
    """fn, run with fusedaccum's backend forced to b. When the Clock times it, the switch is
    the call's untimed setup (`.timed`): set_backend costs microseconds, which a 64K-element
    accumulate row would otherwise charge to the fused side. The CLI restores the default
    backend after each job."""
    def run():
        with backend(b):
            return fn()
    run.timed = (fn, lambda: fa.set_backend(b))
    return run


# -- 5. end to end -------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """A 2-layer causal transformer LM (d=128), the smallest model that looks like an LLM."""

    def __init__(self, vocab=1000, d=128, layers=2, heads=4, seq=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def end_to_end_job(s: Settings, model_name: str) -> list[Row]:
    """Optimizer steps (windows of N micro-batches) per second of a real training loop."""
    dev, n = s.device, s.accumulation_steps
    torch.manual_seed(0)
    if model_name == "seed":  # the seed: Embedding(1000,128) + Linear(128,1000), Adam 1e-3, 8x20
        vocab, shape, clip = 1000, (8, 20), None
        base = torch.nn.Sequential(torch.nn.Embedding(vocab, 128), torch.nn.Linear(128, vocab)).to(dev)
        torch_cls, fa_cls, hyper = torch.optim.Adam, fa.Adam, {"lr": 1e-3}
    else:  # a small transformer LM, AdamW + clipping as LMs are trained
        vocab, shape, clip = 1000, (8, 64), MAX_GRAD_NORM
        base = TinyLM(vocab).to(dev)
        torch_cls, fa_cls, hyper = torch.optim.AdamW, fa.AdamW, {"lr": 1e-3}
    gen = torch.Generator().manual_seed(1)
    data = [tuple(torch.randint(0, vocab, shape, generator=gen).to(dev) for _ in "xy") for _ in range(n)]

    def loss_of(model, x, y):
        return torch.nn.functional.cross_entropy(model(x).view(-1, vocab), y.view(-1))

    def standard_loop(model, opt):
        def window():
            for x, y in data:
                (loss_of(model, x, y) / n).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
        return window

    def full_path(model, acc):
        def window():
            for x, y in data:
                acc.backward(loss_of(model, x, y))
                acc.step()
        return window

    def standard_call() -> tuple[Callable, list[torch.Tensor]]:
        model = copy.deepcopy(base)
        window = standard_loop(model, torch_cls(model.parameters(), **hyper))
        window()
        return window, [p.detach().clone() for p in model.parameters()]

    def fused_call(b: str, mode: str, expected) -> Callable:
        with backend(b):
            model = copy.deepcopy(base)
            opt = fa_cls(model.parameters(), **hyper)
            if mode == "swap-in":
                acc = fa.GradAccumulator(opt)
                window = standard_loop(model, opt)
            else:
                acc = fa.GradAccumulator(opt, accumulation_steps=n, max_grad_norm=clip)
                window = full_path(model, acc)
            window()
            assert_same(list(model.parameters()), expected, torch.float32,
                        f"end-to-end {model_name} {mode} [{fa_backend()}]")
        timed = under(b, window)
        timed.keep = acc  # the accumulator lives as long as its window
        return timed

    calls = {}
    calls["standard"], expected = standard_call()
    modes = ["swap-in", "full path"] if model_name == "seed" else ["full path"]
    for b in s.backends:
        for mode in modes:
            calls[(b, mode)] = fused_call(b, mode, expected)
    faults: dict = {}
    times = s.clock.measure_interleaved(calls, faults)  # every side in alternation: the same machine
    rows = []
    for b in s.backends:
        for mode in modes:
            rows.append(Row("end-to-end", model_name, "fp32", b, f"train window (N={n}, batch {shape[0]}x{shape[1]})",
                            f"torch.optim.{torch_cls.__name__}", mode, times["standard"], times[(b, mode)],
                            sum(p.numel() for p in base.parameters()), None,
                            standard_faults=faults.get("standard"), fused_faults=faults.get((b, mode))))
    return rows


# -- the plan ------------------------------------------------------------------------------


# -- 6. host overhead --------------------------------------------------------------------

HOST_GRADIENTS = 2000


def host_job(s: Settings) -> list[Row]:
    """Thousands of 16-element parameters: the kernels have nothing to do, so the times
    (back-to-back calls, warm caches: Clock.host_time) are the host's. Four comparisons: a
    micro-batch's backward (torch's AccumulateGrad against the accumulator's C++ hooks and folds),
    one accumulate call from Python over every gradient (against torch._foreach_add_), the fold
    the accumulator makes from C++ (the same call without the trip through Python), and the
    window's boundary (clip + AdamW + zero_grad against acc.step())."""
    n, dev = (200 if s.scale == "tiny" else HOST_GRADIENTS), s.device
    init = random_tensors([(16,)] * n, torch.float32, dev, seed=1)
    weights = random_tensors([(16,)] * n, torch.float32, dev, seed=2)
    grads = random_tensors([(16,)] * n, torch.float32, dev, seed=3)
    layout = f"{n} x 16"
    rows = []
    for b in s.backends:
        if b not in ("cpp", "cuda"):
            continue  # the Python backends are not where the host time is meant to go
        with backend(b):
            standard_params = leaf_params(init)
            standard_params_grads = [torch.zeros_like(p) for p in standard_params]
            for p, g in zip(standard_params, standard_params_grads):
                p.grad = g

            def standard_backward():  # a micro-batch after the first: AccumulateGrad adds into p.grad
                probe_loss(standard_params, weights).backward()

            params = leaf_params(init)
            acc = fa.GradAccumulator(fa.AdamW(params), accumulation_steps=1 << 30)

            def fused_backward():
                acc.backward(probe_loss(params, weights))

            # Paired rounds: the difference of two 70 ms backwards is a few percent of each, below
            # this host's drift between minutes, so each round times both and the median of the
            # per-round differences is the accumulator's cost.
            standard_backward(), fused_backward()  # warm-up
            pairs = [(s.clock.host_time(standard_backward, 1, warmup=0, runs=1),
                      s.clock.host_time(fused_backward, 1, warmup=0, runs=1))
                     for _ in range(5 if s.scale == "tiny" else 15)]
            standard_s = statistics.median(a for a, _ in pairs)
            fused_s = statistics.median(b for _, b in pairs)
            rows.append(Row("host", layout, "fp32", b, "micro-batch backward", "loss.backward()", "acc.backward(loss)",
                            standard_s, fused_s, n * 16, None))
            per_grad_us = statistics.median(b - a for a, b in pairs) / n * 1e6
            s.notes.append(f"host [{b}]: the accumulator adds {per_grad_us:.2f} µs per gradient per micro-batch to "
                           f"torch's own backward ({n} gradients; target <= 1 µs)")

            arena = torch.zeros(n * 16, device=dev)
            offsets = [16 * i for i in range(n)]
            targets = [t.clone() for t in grads]
            foreach = s.clock.host_time(lambda: torch._foreach_add_(targets, grads))
            public = s.clock.host_time(lambda: torch.ops.fusedaccum.accumulate(arena, grads, offsets, 0.5, False, None, None))
            rows.append(Row("host", layout, "fp32", b, "one call over every gradient", "torch._foreach_add_",
                            "fusedaccum.accumulate (from Python)", foreach, public, n * 16, None))
            window = acc._windows[0]
            for p, g in zip(params, grads):
                p.grad = g
            in_cpp = s.clock.host_time(window.fold_grads)
            for p in params:
                p.grad = None
            rows.append(Row("host", layout, "fp32", b, "one call over every gradient", "torch._foreach_add_",
                            "the accumulator's fold (C++)", foreach, in_cpp, n * 16, None))
            s.notes.append(f"host [{b}]: one accumulate over {n} gradients: {public * 1e3:.3f} ms from Python, "
                           f"{in_cpp * 1e3:.3f} ms from the accumulator's C++ fold (target <= 0.2 ms)")
            del acc
            standard_s, fused_s = _boundary_host_times(s, init, weights, rounds=5 if s.scale == "tiny" else 15)
            rows.append(Row("host", layout, "fp32", b, "window boundary (clip + AdamW)",
                            "clip_grad_norm_ + fused AdamW + zero_grad", "acc.step()", standard_s, fused_s, n * 16, None))
            s.notes.append(f"host [{b}]: the window boundary costs {fused_s / n * 1e6:.2f} µs per parameter with "
                           f"fusedaccum, {standard_s / n * 1e6:.2f} µs with torch ({n} parameters)")
        release()
    return rows


def _boundary_host_times(s: Settings, init, weights, rounds: int) -> tuple[float, float]:
    """Median seconds to issue a window's boundary, after a backward each round (untimed): torch's
    clip_grad_norm_ + fused AdamW step + zero_grad, and acc.step() (full path, N = 1). On CUDA the
    device is synchronized after the timed call, so the time is the host's."""
    standard_params = leaf_params(init)
    opt = torch.optim.AdamW(standard_params, lr=1e-3, fused=True)
    params = leaf_params(init)
    acc = fa.GradAccumulator(fa.AdamW(params, lr=1e-3), accumulation_steps=1, max_grad_norm=MAX_GRAD_NORM)

    def standard_step():
        torch.nn.utils.clip_grad_norm_(standard_params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()

    sides = {"standard": (lambda: probe_loss(standard_params, weights).backward(), standard_step),
             "fused": (lambda: acc.backward(probe_loss(params, weights)), acc.step)}
    times = {side: [] for side in sides}
    for r in range(rounds + 2):  # two warm-up rounds
        for side, (backward, step) in sides.items():
            backward()
            s.clock.sync()
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[side].append(time.perf_counter() - t0)
            s.clock.sync()
    return statistics.median(times["standard"]), statistics.median(times["fused"])


def plan(s: Settings, sections: list[str]) -> list[Job]:
    jobs = []
    amp = amp_unavailable(s.device.type) is None
    if "boundary" in sections and "fp32" in s.dtypes and not amp:
        s.notes.append(f"fp16 AMP boundary skipped: GradScaler does not run on {s.device.type} "
                       f"({amp_unavailable(s.device.type)})")
    for name, layout in s.layouts.items():
        for dt in s.dtypes:
            if "accumulate" in sections:
                jobs.append(Job(f"accumulate {name} {dt}", functools.partial(accumulate_job, s, layout, dt)))
            if "boundary" in sections:
                for opt_name in OPTIMIZERS:
                    for with_amp in (False, True) if amp and opt_name == "AdamW" and dt == "fp32" else (False,):
                        jobs.append(Job(f"boundary {opt_name}{' AMP' if with_amp else ''} {name} {dt}",
                                        functools.partial(boundary_job, s, layout, dt, opt_name, with_amp)))
                if dt == "bf16":
                    jobs.append(Job(f"boundary master modes {name}", functools.partial(master_mode_job, s, layout)))
            if "window" in sections:
                jobs.append(Job(f"window {name} {dt}", functools.partial(window_job, s, layout, dt)))
    if "accumulate" in sections and "bf16" in s.dtypes:
        jobs.append(Job("precision bf16", functools.partial(precision_job, s)))
    if "sweep" in sections:
        for n in sweep_sizes(s.device.type, s.scale):
            jobs.append(Job(f"sweep {n}", functools.partial(sweep_job, s, n)))
    if "host" in sections:
        jobs.append(Job("host overhead", functools.partial(host_job, s)))
    if "end-to-end" in sections:
        for model_name in ("seed", "transformer-lm"):
            jobs.append(Job(f"end-to-end {model_name}", functools.partial(end_to_end_job, s, model_name)))
    if "fused-modules" in sections:
        from fusedaccum.bench import fused_modules

        for batch in fused_modules.lm_batches(s.scale):
            jobs.append(Job(f"fused-modules LM {batch} per micro-batch", functools.partial(fused_modules.lm_job, s, batch)))
        for vocab in (2048, 8192) if s.scale == "tiny" else (32768, 131072):
            jobs.append(Job(f"fused-modules embedding {vocab}", functools.partial(fused_modules.embedding_job, s, vocab)))
    if "data-parallel" in sections:
        if s.device.type == "cpu" and torch.distributed.is_available() and torch.distributed.is_gloo_available():
            from fusedaccum.bench.data_parallel import data_parallel_job

            jobs.append(Job("data-parallel", functools.partial(data_parallel_job, s)))
        else:
            s.notes.append("data-parallel skipped: it runs 2 processes on gloo with CPU tensors (--device cpu)")
    return jobs
