"""Smoke test of fusedaccum-bench: main() in-process on toy sizes writes a complete run."""
import json
import math
import re
import sys

import pytest

from fusedaccum.bench.__main__ import main

OPTIONAL = ("rich", "rich.console", "rich.table", "rich.markup", "rich.progress", "matplotlib", "matplotlib.pyplot")


def test_bench_without_rich_or_matplotlib_prints_plain_tables(tmp_path, monkeypatch, capsys):
    """The GPU image may lack both: the tables come out as text, the JSON and CSV as usual."""
    for name in OPTIONAL:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    argv = ["--device", "cpu", "--tiny", "--layout", "many-small", "--dtype", "fp32",
            "--cases", "accumulate", "--accumulation-steps", "2", "--malloc", "system", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1. Accumulate one micro-batch" in out and "std/fused" in out and "┃" not in out
    runs = [p for p in tmp_path.glob("*.json") if not p.name.startswith("latest-")]
    assert len(runs) == 1 and runs[0].with_suffix(".csv").exists() and not runs[0].with_suffix(".png").exists()
    run = json.loads(runs[0].read_text())
    assert {r["section"] for r in run["rows"]} == {"accumulate"} and run["timing"]["malloc"] == "system"


def test_bench_cli_writes_a_complete_run(tmp_path):
    pytest.importorskip("rich")
    pytest.importorskip("matplotlib")
    argv = ["--device", "cpu", "--tiny", "--layout", "many-small", "--dtype", "fp32",
            "--cases", "accumulate,boundary,window,sweep", "--accumulation-steps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0

    runs = [p for p in tmp_path.glob("*.json") if not p.name.startswith("latest-")]
    assert len(runs) == 1 and runs[0].with_suffix(".csv").exists() and runs[0].with_suffix(".png").exists()
    latest = json.loads((tmp_path / "latest-cpu.json").read_text())
    assert latest["run_file"] == runs[0].name
    run = json.loads(runs[0].read_text())
    for key in ("timestamp", "device", "versions", "git", "args", "scale", "backends", "reference_bandwidth",
                "layouts", "rows", "precision", "notes", "timing"):
        assert key in run, key
    assert run["device"]["type"] == "cpu" and run["device"]["name"]
    assert {"torch", "fusedaccum", "triton"} <= set(run["versions"])
    assert "commit" in run["git"]
    assert run["scale"] == "tiny" and run["reference_bandwidth"]["reference"] >= run["reference_bandwidth"]["copy"] > 0
    between = run["reference_bandwidth"]["in_place_add_between_jobs"]  # sampled after every job
    assert between["samples"] >= len({r["section"] for r in run["rows"]})  # at least a job per section
    assert run["reference_bandwidth"]["reference"] >= between["max"] >= between["min"] > 0

    sections = {r["section"] for r in run["rows"]}
    assert sections == {"accumulate", "boundary", "window", "sweep"}
    for r in run["rows"]:
        assert r["dtype"] == "fp32" and (r["layout"] == "many-small" or r["section"] == "sweep")
        for value in (r["ratio"], r["standard_s"], r["fused_s"], r["standard_gbps"], r["fused_gbps"],
                      r["standard_pct_of_reference"], r["fused_pct_of_reference"]):
            assert math.isfinite(value) and value > 0, r
        assert r["ratio"] == pytest.approx(r["standard_s"] / r["fused_s"])
        # The window rows say how many page faults each side took (CPU); the others do not allocate.
        assert (r["standard_faults"] is not None and r["fused_faults"] is not None) == (r["section"] == "window"), r
    assert run["timing"]["malloc"].startswith("reuse" if sys.platform.startswith("linux") else "system")


def test_bench_data_parallel_section(tmp_path):
    """Two gloo processes: DDP with and without no_sync against process_group= (whole, ZeRO-1, a bf16
    wire), plus the bytes sent and the optimizer state kept per rank."""
    argv = ["--device", "cpu", "--tiny", "--cases", "data-parallel", "--accumulation-steps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = [p for p in tmp_path.glob("*.json") if not p.name.startswith("latest-")]
    run = json.loads(runs[0].read_text())
    rows = run["rows"]
    assert [(r["standard"], r["fused"]) for r in rows] == [
        (std, fused) for fused in ("process_group=", "process_group= + ZeRO-1", "process_group=, bf16 wire")
        for std in ("DDP, every micro-batch", "DDP + no_sync()")]
    assert all(r["section"] == "data-parallel" and r["fused_s"] > 0 for r in rows)
    note = next(n for n in run["notes"] if n.startswith("data-parallel"))
    sides = r"(DDP, every micro-batch|DDP \+ no_sync\(\)|process_group= \+ ZeRO-1|process_group=, bf16 wire|process_group=) ([\d.]+)"
    sent_part, state_part = note.split("optimizer state")
    sent = {side: float(x) for side, x in re.findall(sides + r"[,;]", sent_part)}
    state = {side: float(x) for side, x in re.findall(sides + r" B", state_part)}
    # fp32, 2 ranks, 2 micro-batches, a ring: an all-reduce sends 4 B per parameter, DDP reduces on every
    # micro-batch; reduce-scatter + all-gather send what one all-reduce does.
    assert sent["DDP, every micro-batch"] == 8.0 and sent["DDP + no_sync()"] == 4.0
    assert 4.0 <= sent["process_group= + ZeRO-1"] < 4.1
    # AdamW's two fp32 moments (8 B per parameter), half of them per rank with ZeRO-1 (+ the step counts).
    assert state["DDP + no_sync()"] == 8.0 and 8.0 <= state["process_group="] < 8.1
    assert 4.0 <= state["process_group= + ZeRO-1"] < 4.1
    assert 4.0 <= sent["process_group="] < 4.1, "the arena's alignment padding and the window's summary: a few elements"
    assert 2.0 <= sent["process_group=, bf16 wire"] < 2.1, "bf16 buckets: half the bytes"
    assert 8.0 <= state["process_group=, bf16 wire"] < 8.1


def test_bench_host_section(tmp_path):
    """Thousands of tiny parameters (200 at --tiny): the host's time per micro-batch, per fold and at
    the boundary, for the compiled backend, with the notes that compare them to issue 13's targets."""
    argv = ["--device", "cpu", "--tiny", "--cases", "host", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = [p for p in tmp_path.glob("*.json") if not p.name.startswith("latest-")]
    run = json.loads(runs[0].read_text())
    rows = run["rows"]
    assert [(r["backend"], r["case"], r["fused"]) for r in rows] == [
        ("cpp", "micro-batch backward", "acc.backward(loss)"),
        ("cpp", "one call over every gradient", "fusedaccum.accumulate (from Python)"),
        ("cpp", "one call over every gradient", "the accumulator's fold (C++)"),
        ("cpp", "window boundary (clip + AdamW)", "acc.step()"),
    ]
    for r in rows:
        assert r["section"] == "host" and r["layout"] == "200 x 16" and r["params"] == 200 * 16, r
        assert math.isfinite(r["ratio"]) and r["standard_s"] > 0 and r["fused_s"] > 0, r
    notes = [n for n in run["notes"] if n.startswith("host [cpp]")]
    assert len(notes) == 3 and "µs per parameter with fusedaccum" in notes[2]


def test_bench_fused_modules_section(tmp_path):
    """The tied LM three ways (standard, full path, fused modules) and the embedding backward alone,
    with the window memory per side and the boundary read pass's cost."""
    argv = ["--device", "cpu", "--tiny", "--cases", "fused-modules", "--accumulation-steps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = [p for p in tmp_path.glob("*.json") if not p.name.startswith("latest-")]
    run = json.loads(runs[0].read_text())
    assert not run.get("errors")
    rows = run["rows"]
    backends = sorted({r["backend"] for r in rows})
    lm = [r for r in rows if r["layout"].startswith("lm-")]
    emb = [r for r in rows if r["layout"].startswith("embedding-")]
    assert sorted(r["fused"] for r in lm) == sorted(["full path", "full path + fuse_modules"] * len(backends))
    assert {r["layout"] for r in emb} == {"embedding-2k", "embedding-8k"}
    assert all(r["section"] == "fused-modules" and r["fused_s"] > 0 and r["standard_s"] > 0 for r in rows)
    memory = next(n for n in run["notes"] if "memory per window" in n)
    per_side = dict(re.findall(r"(standard|full path \+ fuse_modules|full path) (?:\[\w+\] )?([\d.]+)", memory))
    # The fused side's window needs no weight gradient tensors: less than the others, and at least the arena.
    assert 4.0 <= float(per_side["full path + fuse_modules"]) < float(per_side["full path"])
    assert float(per_side["full path + fuse_modules"]) < float(per_side["standard"])
    assert any("read pass" in n for n in run["notes"])
    moved = [n for n in run["notes"] if n.startswith("embedding backward")]
    assert len(moved) == 2


@pytest.fixture(autouse=True)
def _restore_malloc_environment(monkeypatch):
    """main() pins malloc for the processes it starts through these variables: undone after each test."""
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


REUSE_PROBE = r"""
import torch
from fusedaccum.bench.timing import page_faults, reuse_freed_memory

def faults_of_a_gradient(mb):
    before = page_faults()
    torch.empty(mb << 18).fill_(1.0)  # allocated, touched, freed: as a backward's gradient
    return page_faults() - before

system = max(min(faults_of_a_gradient(mb) for _ in range(3)) for mb in (16, 48))
assert reuse_freed_memory()
# The heap grows to the pattern first (an aligned block does not fit the hole of an equal one).
rounds = [max(faults_of_a_gradient(16), faults_of_a_gradient(48)) for _ in range(10)]
reused = max(rounds[-3:])
print(system, reused)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_stops_fresh_pages_for_freed_blocks():
    """Started with glibc returning every block of 128 KB and more to the kernel, 16 MB and
    48 MB blocks (the latter above any mmap threshold glibc allows) fault in 4K pages each time;
    after reuse_freed_memory() they come back from the heap once it has grown to the pattern."""
    import os
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", REUSE_PROBE], env=env, capture_output=True, text=True, check=True)
    system, reused = map(int, out.stdout.split())
    assert system > 3000 and reused < 300, (system, reused)


def test_clock_counts_the_page_faults_of_each_side():
    import mmap

    import torch

    from fusedaccum.bench.timing import Clock

    clock = Clock(torch.device("cpu"), min_time=0.0, min_reps=3, max_reps=3)
    kept = torch.zeros(1 << 20)
    faults = {}
    # Fresh pages whatever malloc does (an earlier test may have pinned it): an anonymous mmap.
    clock.measure_interleaved({"fresh 64 MB": lambda: torch.frombuffer(mmap.mmap(-1, 64 << 20), dtype=torch.uint8).fill_(1),
                               "in place": lambda: kept.add_(1.0)}, faults)
    assert faults["fresh 64 MB"] > 10000 and faults["in place"] < 100, faults


def test_gpu_profile_script_splits_each_call_into_event_host_and_kernels(tmp_path):
    """scripts/gpu_profile.py, which gpu_check runs on the GPU, runs here on toy sizes: every
    call has its three times, and the profiler sees the fused kernels where they run."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_profile.py"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--scale", "tiny", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / "profile.json").read_text())["results"]
    fused_step = [k for k in results if k.startswith("boundary: acc.step()")]
    fused_acc = [k for k in results if "fusedaccum op" in k]
    assert "boundary: clip + torch fused AdamW + zero_grad" in results and fused_step and fused_acc
    for label, r in results.items():
        assert r["event_us"] > 0 and r["host_us"] > 0 and r["kernels_us"] > 0, label
    assert all(any("adam_step" in k["name"] for k in results[c]["kernels"]) for c in fused_step)
    assert all(any("accumulate" in k["name"] for k in results[c]["kernels"]) for c in fused_acc)
