"""Timers, and the reference bandwidth that achieved bandwidths are compared with.

Every number is a median over single calls, each preceded by untimed work: the caller's
`setup` (restore gradients, reopen a window) and a cache flush, so that a small problem is not
served from cache unless a real loop would keep it there. On CUDA a short plain call is timed
with triton.testing.do_bench (which flushes the L2 the same way); a long call, a call that
needs a setup, or a machine without triton uses CUDA events around each call. On CPU each call
is timed with perf_counter. Every measurement starts with a warm-up call.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from typing import Callable

import torch

COPY_ELEMENTS = {"cuda": 64 << 20, "cpu": 32 << 20}  # fp32 elements: far larger than the last-level cache
# Written before each timed call to evict the caches: triton's 256 MB on CUDA; on CPU 128 MB,
# which measured enough here (a 32 MB-L3 EPYC VM whose caches still held a 64 MB working set).
FLUSH_BYTES = {"cuda": 256 << 20, "cpu": 128 << 20}


# glibc's mallopt parameters, and the values "reuse" pins them to: no block is mmapped (each
# would be returned to the kernel when freed), and the heap's top is kept up to 2 GB.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_REUSE = {"MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0), "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, (1 << 31) - 1)}


def reuse_freed_memory() -> bool:
    """Pins glibc's malloc so that freed memory is reused instead of returned to the kernel; in
    this process (mallopt) and in processes it starts (the environment variables).

    Why: glibc mmaps a large block (above a threshold it moves by itself, up to 32 MB) and
    unmaps it when freed, and returns the heap's top to the kernel past a trim threshold; a
    large block is served from the heap only where a free chunk happens to fit. Whether a
    backward's fresh gradients arrive as new pages (a page fault and a kernel zeroing per 4 KB)
    then depends on what the process allocated before. Measured here on gpt-20m's window: 0 or
    42-160K page faults per window by process, about 50 ms or 88-102 ms for the same code; on
    the tied 32K LM's standard window 115K faults (its 33.5 MB gradients) or none. Pinned, no
    side of a row pays for that coin flip. Returns False where the C library is not glibc
    (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    for env, (param, value) in _REUSE.items():
        if not mallopt(param, value):
            return False
        os.environ[env] = str(value)
    return True


def page_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Clock:
    """Median wall time of a callable on one device.

    `min_time` is the timed time to aim for per measurement (seconds); `max_reps` caps the
    number of timed calls, `min_reps` floors it (a slow call is still timed a few times).
    """

    def __init__(self, device: torch.device, min_time: float, min_reps: int = 3, max_reps: int = 100):
        self.device = device
        self.min_time = min_time
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.cuda = device.type == "cuda"
        self._flush_buffer = torch.empty(FLUSH_BYTES[device.type] // 4, dtype=torch.float32, device=device)
        self.method = "median of single calls, caches flushed before each"
        self._do_bench = None
        if self.cuda:
            try:
                from triton.testing import do_bench  # lazily: triton is optional and slow to import

                self._do_bench = do_bench
                self.method = ("triton.testing.do_bench median (short calls); "
                               "CUDA events (long calls, calls with a setup)")
            except ImportError:
                self.method = "CUDA events, median of single calls, L2 flushed before each (triton missing)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        # fill_, not zero_: on CPU zero_ is a single-threaded memset that can stream past the cache.
        self._flush_buffer.fill_(1.0)

    def measure(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
        """Median seconds of fn(), with setup() (untimed) before every call. fn may be a
        callable with `.timed = (fn, setup)` (cases.under), as in measure_interleaved."""
        if setup is None and hasattr(fn, "timed"):
            fn, setup = fn.timed
        # Warm-up: a first call pays for allocation, lazy initialisation and code paths that
        # run once; a second (skipped for calls slower than min_time) gives the estimate
        # that sizes the repeat count.
        estimate = self._one_call(fn, setup)
        if self._do_bench is not None and setup is None and estimate < self.min_time / 10:
            # Short CUDA calls: do_bench's many repeats. (For long ones its fixed 5 estimate
            # calls and single repeat would cost more and tell less than the loop below.)
            return self._do_bench_median(fn)
        if estimate < self.min_time:
            estimate = self._one_call(fn, setup)
        reps = int(min(self.max_reps, max(self.min_reps, self.min_time / max(estimate, 1e-9))))
        return statistics.median(self._one_call(fn, setup) for _ in range(reps))

    def _one_call(self, fn, setup, faults: list | None = None) -> float:
        if setup is not None:
            setup()
        self.flush()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        before = page_faults() if faults is not None else 0
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        if faults is not None:
            faults.append(page_faults() - before)
        return seconds

    def measure_interleaved(self, calls: dict, faults: dict | None = None) -> dict:
        """Median seconds of each call, timed in alternation (one call of each per round, its
        setup and a cache flush before it), so that every side sees the same machine: on a
        shared host the memory bandwidth drifts by 2x and more within a minute, and sides timed
        one after the other can each catch a different moment (how a `p.grad += g` row once
        came out at twice the machine's bandwidth). A call is fn, (fn, setup), or a callable
        with `.timed = (fn, setup)` (cases.under). On CPU, `faults` (a dict) receives the median
        minor page faults per call of each: a side whose memory arrives as fresh pages pays for
        them, and a reader should see it."""
        calls = {k: c if isinstance(c, tuple) else getattr(c, "timed", (c, None)) for k, c in calls.items()}
        estimate = max(self._one_call(fn, setup) for fn, setup in calls.values())  # also the warm-up
        rounds = int(min(self.max_reps, max(self.min_reps, self.min_time / max(estimate, 1e-9))))
        times: dict = {name: [] for name in calls}
        counted: dict = {name: [] for name in calls}
        track = faults is not None and not self.cuda
        for _ in range(rounds):
            for name, (fn, setup) in calls.items():
                times[name].append(self._one_call(fn, setup, counted[name] if track else None))
        if track:
            faults.update({name: statistics.median(c) for name, c in counted.items()})
        return {name: statistics.median(t) for name, t in times.items()}

    def host_time(self, fn: Callable[[], object], calls: int = 20, warmup: int = 3, runs: int = 5) -> float:
        """Seconds per call of issuing fn() back to back with warm caches: the host's cost. On
        CUDA the device is synchronized only after the calls, so that tiny kernels queue up and
        the wall time is the host's. The best of `runs` runs (host noise only ever adds)."""
        for _ in range(warmup):
            fn()
        self.sync()
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
            self.sync()
        return best

    def _do_bench_median(self, fn) -> float:
        # do_bench's warmup/rep are milliseconds of GPU time; min_time sets the scale.
        rep_ms = max(10.0, 1e3 * self.min_time)
        return self._do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median") / 1e3

    def in_place_add_gbps(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> float:
        """GB/s of torch's a += b over fp32 arrays far larger than the last-level cache: the
        reference's best kernel, alone (the CLI samples it between jobs)."""
        if a is None or b is None:
            a = torch.zeros(COPY_ELEMENTS[self.device.type], device=self.device)
            b = torch.ones_like(a)
        return 3 * a.element_size() * a.numel() / self.measure(lambda: a.add_(b)) / 1e9

    def reference_bandwidth(self) -> dict:
        """The machine's streaming limit, STREAM-style, with torch's own kernels on all threads
        over fp32 arrays far larger than the last-level cache: copy (a = b), add (a = b + c),
        and the in-place add a += b, which is the access pattern of an accumulate or an
        optimizer step. GB/s count the bytes read and written; the write-allocate reads of a
        destination that is not read (copy, add) are not counted, as in STREAM, so those two
        come out lower than the in-place add, whose written lines were read anyway. The
        reference is the best of the three."""
        n = COPY_ELEMENTS[self.device.type]
        b = torch.randn(n, device=self.device)
        c = torch.randn(n, device=self.device)
        a = torch.empty_like(b)
        gbps = {
            "copy": 2 * 4 * n / self.measure(lambda: a.copy_(b)) / 1e9,
            "add": 3 * 4 * n / self.measure(lambda: torch.add(b, c, out=a)) / 1e9,
            "add_in_place": self.in_place_add_gbps(a, b),
        }
        return {**gbps, "reference": max(gbps.values()), "elements": n,
                "counting": "bytes read + written; write-allocate reads not counted (STREAM's convention)"}
