"""fusedaccum-bench (also python -m fusedaccum.bench): the standard accumulation loop vs
fusedaccum, case by case, with the results in --out as JSON, CSV and a PNG plot.

    fusedaccum-bench --quick                      # about a minute, default device
    fusedaccum-bench --device cpu --backend all   # every backend that runs on the CPU

rich (live progress, coloured tables) and matplotlib (the PNG) are optional: without them the
tables are plain text and the JSON and CSV are written all the same.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import fusedaccum as fa
from fusedaccum import dispatch
from fusedaccum.bench import report
from fusedaccum.bench.cases import DTYPES, SECTIONS, Precision, Settings, layouts, plan, release
from fusedaccum.bench.timing import Clock, reuse_freed_memory

# Per (device, scale): timed seconds to aim for per measurement, min and max timed calls.
# CUDA timings are steady, so shorter runs suffice (scripts/gpu_check.sh runs --quick, a share of
# 9 minutes per case section). On a shared CPU host a 0.3 s window timed 3 times gave 0.78x in
# one run and 1.00-1.09x in four others: CPU full runs time every side at least 7 times.
CLOCK = {
    ("cpu", "full"): (0.25, 7, 50), ("cpu", "quick"): (0.02, 3, 15),
    ("cuda", "full"): (0.1, 5, 100), ("cuda", "quick"): (0.02, 3, 20),
}
TINY_CLOCK = (0.002, 2, 3)


def parse_args(argv):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="fusedaccum-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                   help=f"where to run (default here: {default_device})")
    p.add_argument("--quick", action="store_true", help="about a minute: shorter timings, smaller layouts on CPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for the JSON, CSV and PNG (default benchmarks/results)")
    p.add_argument("--backend", default=None,
                   help="a fusedaccum backend, or 'all' (default: the device's default backend)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "all"], default="all",
                   help="parameter / gradient dtype of the layout cases (default all)")
    p.add_argument("--layout", default="all", help="seed, gpt2-small, many-small, one-huge or all")
    p.add_argument("--accumulation-steps", type=int, default=4, metavar="N",
                   help="micro-batches per window (default 4)")
    p.add_argument("--cases", default="all", help=f"comma-separated subset of {', '.join(SECTIONS)} (default all)")
    p.add_argument("--jobs-log", type=Path, default=None, metavar="FILE",
                   help="also append each job's rows to FILE (JSON lines) as soon as the job ends, so that a "
                        "run killed at a time limit keeps what it measured")
    p.add_argument("--malloc", choices=["reuse", "system"], default="reuse",
                   help="CPU: 'reuse' (default) pins glibc's malloc to reuse freed memory (no mmapped blocks), so that no "
                        "side's gradients arrive as fresh pages by chance of what the process allocated before; "
                        "'system' leaves glibc's own adaptive thresholds (page faults per call are reported either way)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy sizes, for the smoke test
    args = p.parse_args(argv)
    if args.accumulation_steps < 1:
        p.error("--accumulation-steps must be at least 1")
    return args


def choose_backends(arg: str | None, device: str) -> list[str]:
    if arg is None:
        return [dispatch.backend_for(torch.device(device))]  # FUSEDACCUM_BACKEND if set, else the default
    if arg == "all":
        # Triton on CPU is its interpreter: a correctness tool, not something to time.
        return [b for b in fa.backends()["available"]
                if dispatch.runs_on(b, device) and not (b == "triton" and device == "cpu")]
    if not dispatch.runs_on(arg, device):
        raise SystemExit(f"backend {arg!r} cannot run on {device} here; available: {fa.backends()['available']}")
    return [arg]


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        info = {"type": "cuda", "name": name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        model = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        cores = os.cpu_count()
        name = f"{model} ({cores} cores)"
        info = {"type": "cpu", "name": name, "cores": cores, "torch_threads": torch.get_num_threads()}
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return info


def versions() -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "fusedaccum": fa.__version__, "cuda": torch.version.cuda}


def git_state() -> dict:
    """The commit of the source tree fusedaccum was imported from (null outside a git checkout)."""
    where = Path(fa.__file__).resolve().parent

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=where, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_busy_elsewhere(seconds: float = 0.25) -> float | None:
    """Fraction of all CPUs busy while this process sleeps (Linux /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class JobsLog:
    """--jobs-log: one JSON line per finished job (and one header line), flushed at once."""

    def __init__(self, path: Path | None, header: dict):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a")
            self.write({"header": header})

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run_jobs(jobs, log: JobsLog, ref_gbps: float,
             after_each: Callable[[], object] | None = None) -> tuple[list, list[dict], str | None]:
    """Runs the jobs in order: (results, errors, the job that was interrupted or None). A job that
    raises is reported and the next one runs; Ctrl-C (or `timeout -s INT`) stops the run, keeping
    what was measured. `after_each` runs after every job (main: the reference's in-place add,
    timed between jobs)."""
    progress_mod = report.optional("rich.progress")
    results, errors, interrupted = [], [], None
    # The jobs free what they built with gc.collect(); frozen, the objects that exist now
    # (torch, matplotlib, ...) are not scanned again, which makes each collect ~free.
    gc.collect()
    gc.freeze()
    progress = None
    try:
        if progress_mod is not None:
            columns = [progress_mod.TextColumn("{task.description:<42}"), progress_mod.BarColumn(),
                       progress_mod.MofNCompleteColumn(), progress_mod.TimeElapsedColumn()]
            progress = progress_mod.Progress(*columns, transient=False)
            progress.start()
            task = progress.add_task("benchmarking", total=len(jobs))
        for k, job in enumerate(jobs, 1):
            if progress is not None:
                progress.update(task, description=job.label)
            start = time.perf_counter()
            failed = False
            try:
                got = job.run()
            except KeyboardInterrupt:
                interrupted = job.label
                errors.append({"job": job.label, "error": "interrupted (SIGINT): this and the later jobs did not run"})
                log.write({"job": job.label, "interrupted": True, "seconds": time.perf_counter() - start})
                break
            except Exception as exc:  # one broken case must not cost the measurements of the others
                got, failed = [], True
                errors.append({"job": job.label, "error": f"{type(exc).__name__}: {exc}"})
                log.write({"job": job.label, "error": traceback.format_exc(), "seconds": time.perf_counter() - start})
                traceback.print_exc()
            else:
                log.write({"job": job.label, "seconds": time.perf_counter() - start,
                           "rows": [report.row_record(r, ref_gbps) for r in got if not isinstance(r, Precision)],
                           "precision": report.precision_records([r for r in got if isinstance(r, Precision)])})
            results += got
            fa.set_backend(None)  # a timed call's setup (cases.under) leaves its backend forced
            release()
            if after_each is not None:
                after_each()
            line = f"[{k}/{len(jobs)}] {job.label}: {time.perf_counter() - start:.1f} s" + (" FAILED" if failed else "")
            if progress is None:
                print(line, flush=True)
            else:
                progress.advance(task)
                if not progress.console.is_terminal:  # a log has no live bar: say where the run is
                    progress.console.print(line, markup=False)
        if progress is not None:
            progress.update(task, description="interrupted" if interrupted else "done")
    finally:
        if progress is not None:
            progress.stop()
        gc.unfreeze()
    return results, errors, interrupted


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    device = torch.device(args.device)
    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    backends = choose_backends(args.backend, device.type)
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
    all_layouts = layouts(device.type, scale)
    if args.layout != "all" and args.layout not in all_layouts:
        raise SystemExit(f"unknown layout {args.layout!r}; choose from {', '.join(all_layouts)} or all")
    chosen = all_layouts if args.layout == "all" else {args.layout: all_layouts[args.layout]}
    sections = list(SECTIONS) if args.cases == "all" else [c.strip() for c in args.cases.split(",")]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    # Before anything large is allocated: the pinned thresholds then hold for every block.
    malloc = "system"
    if device.type == "cpu" and args.malloc == "reuse":
        malloc = "reuse (glibc: no mmapped blocks, trim threshold 2 GB)" if reuse_freed_memory() else "system (not glibc)"
    min_time, min_reps, max_reps = TINY_CLOCK if args.tiny else CLOCK[device.type, scale]
    clock = Clock(device, min_time, min_reps, max_reps)
    settings = Settings(device, dtypes, backends, chosen, args.accumulation_steps, scale, clock)
    settings.notes += [f"layout {lay.name}: {lay.note}" for lay in chosen.values() if lay.note]
    if "bf16" in dtypes and "window" in sections:
        settings.notes.append("window, bf16: no swap-in row (p.grad of bf16 params cannot show the fp32 arena to "
                              "clip_grad_norm_); standard is torch AdamW on bf16 params, fused keeps an fp32 master")
    if "bf16" in dtypes and "boundary" in sections:
        settings.notes.append("boundary, bf16: standard is torch.optim on bf16 params (bf16 state); fused keeps "
                              "an fp32 master (master_weights=True, 30 B floor)")

    busy = cpu_busy_elsewhere() if device.type == "cpu" else None
    if busy is not None and busy > 0.2:
        settings.notes.append(f"other processes kept {100 * busy:.0f}% of the CPUs busy at the start: "
                              f"CPU timings of this run are noisy")
    now = datetime.datetime.now(datetime.timezone.utc)
    bandwidth = clock.reference_bandwidth()
    ref_gbps = bandwidth["reference"]
    jobs = plan(settings, sections)
    log = JobsLog(args.jobs_log, {"timestamp": now.isoformat(timespec="seconds"), "device": device_info(device),
                                  "versions": versions(), "scale": scale, "backends": backends,
                                  "reference_bandwidth": bandwidth, "jobs": [j.label for j in jobs]})
    try:
        # A shared host's bandwidth drifts within a run and the reference is the best it showed:
        # timed only at the start and the end, one run's came out at 59-67 GB/s while its kernels
        # ran at up to 150 % of that.
        between: list[float] = []
        results, errors, interrupted = run_jobs(jobs, log, ref_gbps, lambda: between.append(clock.in_place_add_gbps()))
    finally:
        log.close()
    # Measured again at the end (and its in-place add between jobs): the bandwidth of a shared
    # host drifts, and the limit is the best the machine showed.
    bandwidth["reference_at_start"] = ref_gbps
    if between:
        bandwidth["in_place_add_between_jobs"] = {"samples": len(between), "min": min(between), "max": max(between)}
    bandwidth["reference"] = ref_gbps = max(ref_gbps, clock.reference_bandwidth()["reference"], *between)
    if interrupted:
        settings.notes.append(f"interrupted during job '{interrupted}': it and the jobs after it did not run")
    rows = [r for r in results if not isinstance(r, Precision)]
    run = {
        "schema": "fusedaccum-bench/1",
        "timestamp": now.isoformat(timespec="seconds"),
        "timestamp_compact": now.strftime("%Y%m%dT%H%M%SZ"),
        "device": device_info(device),
        "versions": versions(),
        "git": git_state(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scale": scale,
        "backends": backends,
        "fusedaccum_backends": fa.backends(),
        "timing": {"method": clock.method, "min_time_s": min_time, "min_reps": min_reps, "max_reps": max_reps,
                   "cpu_busy_elsewhere_at_start": busy, "malloc": malloc},
        "reference_bandwidth": bandwidth,
        "layouts": {lay.name: {"params": lay.numel, "tensors": len(lay.shapes), "note": lay.note}
                    for lay in chosen.values()},
        "notes": settings.notes,
        "rows": [report.row_record(r, ref_gbps) for r in rows],
        "precision": report.precision_records([r for r in results if isinstance(r, Precision)]),
        "errors": errors,
    }
    report.print_tables(run)
    paths = report.write_all(run, args.out)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
