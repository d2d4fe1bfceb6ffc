"""What a run leaves behind: tables on the terminal (rich when it is installed, plain text
otherwise), and in the output folder one JSON, one CSV and (with matplotlib) one PNG per run,
plus latest-<device>.json/.png copies under stable names."""
from __future__ import annotations

import csv
import importlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from fusedaccum.bench.cases import Precision, Row

TABLE_SECTIONS = {
    "accumulate": "1. Accumulate one micro-batch into existing gradients",
    "boundary": "2. Boundary: clip + optimizer step (+ AMP) + zero_grad",
    "window": "3. Whole window: N micro-batches (fresh autograd grads) + boundary",
    "sweep": "4. Size sweep: one fp32 tensor",
    "end-to-end": "5. End to end: optimizer steps per second",
    "host": "6. Host overhead: thousands of tiny gradients (the time is the host's, not the kernels')",
    "data-parallel": "7. Data parallel: 2 processes on gloo, whole window per rank",
    "fused-modules": "8. Fused modules: gradients written straight into the arena (fa.fuse_modules)",
}


def optional(module: str):
    """matplotlib / rich if installed (pip install 'fusedaccum[bench]'), else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# A side above the reference by more than timing noise did not do the work it is credited with
# (or the reference is wrong): flagged, never reported as a result.
SUSPECT_ABOVE = 1.10


def row_record(row: Row, ref_gbps: float) -> dict:
    """A row with its derived numbers: ratio, GB/s at the floor bytes, % of the reference
    bandwidth, and `suspect` when a side is faster than the reference allows."""
    rec = asdict(row)
    rec["ratio"] = row.ratio
    for side in ("standard", "fused"):
        seconds = rec[f"{side}_s"]
        if row.floor_bytes_per_param is None:
            rec[f"{side}_gbps"] = rec[f"{side}_pct_of_reference"] = None
            rec[f"{side}_per_s"] = 1.0 / seconds
        else:
            gbps = row.floor_bytes_per_param * row.params / seconds / 1e9
            rec[f"{side}_gbps"] = gbps
            rec[f"{side}_pct_of_reference"] = 100.0 * gbps / ref_gbps
            rec[f"{side}_per_s"] = None
    rec["suspect"] = False
    if row.floor_bytes_per_param is not None:
        moved = {"standard": row.standard_bytes_per_param or row.floor_bytes_per_param,
                 "fused": row.floor_bytes_per_param}
        rec["suspect"] = any(moved[side] * row.params / rec[f"{side}_s"] / 1e9 > SUSPECT_ABOVE * ref_gbps
                             for side in moved)
    return rec


def _bandwidth_line(bw: dict) -> str:
    between = bw.get("in_place_add_between_jobs")
    drift = f", in-place add between jobs {between['min']:.1f}-{between['max']:.1f}" if between else ""
    return (f"{bw['reference']:.1f} GB/s (STREAM-style, best of copy {bw['copy']:.1f}, add {bw['add']:.1f}, "
            f"in-place add {bw['add_in_place']:.1f}{drift}; {bw['counting']})")


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def table_cells(rows: list[dict], e2e: bool) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one section's table (the ratio last)."""
    header = ["model" if e2e else "layout", "dtype", "backend", "case", "standard", "fused", "std time", "fused time"]
    header += ["std calls/s", "fused calls/s"] if e2e else ["std GB/s", "fused GB/s", "std % ref", "fused % ref"]
    header.append("std/fused")
    cells = []
    for r in rows:
        line = [r["layout"], r["dtype"], r["backend"], r["case"], r["standard"], r["fused"],
                _time(r["standard_s"]), _time(r["fused_s"])]
        if e2e:
            line += [f"{r['standard_per_s']:.1f}", f"{r['fused_per_s']:.1f}"]
        else:
            line += [f"{r['standard_gbps']:.1f}", f"{r['fused_gbps']:.1f}",
                     f"{r['standard_pct_of_reference']:.0f}%", f"{r['fused_pct_of_reference']:.0f}%"]
        if r.get("suspect"):
            line[-1] += " SUSPECT"
        line.append(f"{r['ratio']:.2f}x")
        cells.append(line)
    return header, cells


def _plain_table(title: str, header: list[str], cells: list[list[str]]) -> str:
    """A fixed-width text table: text columns left-aligned, the numbers (from "std time" on) right."""
    first_number = header.index("std time")
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]

    def line(row):
        return "  ".join(v.rjust(w) if i >= first_number else v.ljust(w)
                         for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return "\n".join([title, line(header), rule] + [line(row) for row in cells])


def print_tables(run: dict) -> None:
    """The run's tables on stdout: rich when it is installed, plain text otherwise."""
    rich_console, rich_table, rich_markup = (optional(m) for m in ("rich.console", "rich.table", "rich.markup"))
    if rich_console and rich_table and rich_markup:
        console = rich_console.Console()
        if not console.is_terminal:  # a log file: wide enough that no column wraps
            console = rich_console.Console(width=220)
        escape = rich_markup.escape  # "[cpp]" would otherwise read as a style tag
    else:
        console = escape = None

    def say(text: str = "") -> None:
        if console is None:
            print(text, flush=True)
        else:
            console.print(escape(text))

    dev = run["device"]
    say(f"\nfusedaccum-bench on {dev['name']} ({dev['type']}), scale {run['scale']}, "
        f"N={run['args']['accumulation_steps']}, reference bandwidth {_bandwidth_line(run['reference_bandwidth'])}")
    if run["timing"].get("malloc"):
        say(f"  malloc: {run['timing']['malloc']}")
    for note in run["notes"]:
        say(f"  note: {note}")
    for section, title in TABLE_SECTIONS.items():
        rows = [r for r in run["rows"] if r["section"] == section]
        if not rows:
            continue
        header, cells = table_cells(rows, section in ("end-to-end", "host", "data-parallel", "fused-modules"))
        if console is None:
            say("\n" + _plain_table(title, header, cells))
        else:
            table = rich_table.Table(title=title, title_justify="left", show_lines=False)
            first_number = header.index("std time")
            for i, col in enumerate(header):
                table.add_column(col, justify="right" if i >= first_number else "left",
                                 style="bold" if col == "std/fused" else None)
            for r, line in zip(rows, cells):
                ratio = f"[{'green' if r['ratio'] > 1 else 'red'}]{line[-1]}[/]"
                table.add_row(*[escape(v) for v in line[:-1]], ratio)
            console.print(table)
        faulted = [r for r in rows if r.get("standard_faults") is not None]
        if faulted:
            say("  page faults per call (median), standard / fused: " + "; ".join(
                f"{r['layout']} [{r['backend']}] {r['standard']} vs {r['fused']} {r['standard_faults']:.0f} / {r['fused_faults']:.0f}" for r in faulted))
        if section == "accumulate" and run["precision"]:
            for p in run["precision"]:
                say(f"  precision [{p['backend']}]: {p['micro_batches']} bf16 micro-batches of {p['elements']} "
                    f"elements, max |error| / max |sum| vs float64: bf16 sum (standard) "
                    f"{p['standard_bf16_rel_err']:.2e}, fp32 arena (fused) {p['fused_fp32_rel_err']:.2e}")
    for err in run.get("errors", []):
        say(f"  ERROR in job {err['job']}: {err['error']}")
    say("  GB/s counts DESIGN.md's floor bytes for both sides (so a side that moves fewer bytes, "
        "as bf16 += bf16 does, can pass the reference); std/fused > 1: fused is faster.")
    suspects = [r for r in run["rows"] if r.get("suspect")]
    if suspects:
        say(f"  SUSPECT: {len(suspects)} row(s) report more than {100 * SUSPECT_ABOVE:.0f}% of the reference bandwidth, "
            f"which the machine cannot do at those bytes: a timing or byte-count error, not a result.")


def write_all(run: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{run['device']['slug']}-{run['timestamp_compact']}"
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
    paths["json"].write_text(json.dumps(run, indent=1) + "\n")
    write_csv(run["rows"], paths["csv"])
    if plot(run, out / f"{stem}.png"):
        paths["png"] = out / f"{stem}.png"
    # Stable names for the README: copies of the newest run on this kind of device.
    kind = run["device"]["type"]
    latest = {**run, "run_file": paths["json"].name}
    paths["latest_json"] = out / f"latest-{kind}.json"
    paths["latest_json"].write_text(json.dumps(latest, indent=1) + "\n")
    if "png" in paths:
        paths["latest_png"] = out / f"latest-{kind}.png"
        shutil.copyfile(paths["png"], paths["latest_png"])
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["section"])
        writer.writeheader()
        writer.writerows(rows)


def plot(run: dict, path: Path) -> bool:
    """The PNG; False (and no file) without matplotlib."""
    matplotlib = optional("matplotlib")
    if matplotlib is None:
        return False
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    fig.suptitle(f"fusedaccum-bench: {run['device']['name']} ({run['scale']}, {run['timestamp']})", fontsize=11)

    # Left: GB/s vs size, standard and fused, accumulate and step, for every backend.
    sweep = [r for r in run["rows"] if r["section"] == "sweep"]
    backends = sorted({r["backend"] for r in sweep})
    for case, marker in (("accumulate", "o"), ("AdamW step", "s")):
        rows = [r for r in sweep if r["case"] == case]
        if not rows:
            continue
        std = {r["params"]: r for r in rows}  # the standard side is the same for every backend
        xs = sorted(std)
        left.plot(xs, [std[x]["standard_gbps"] for x in xs], marker=marker, linestyle="--",
                  label=f"{case}: {std[xs[0]]['standard']}")
        for b in backends:
            mine = sorted((r["params"], r["fused_gbps"]) for r in rows if r["backend"] == b)
            left.plot(*zip(*mine), marker=marker, label=f"{case}: fusedaccum [{b}]")
    left.axhline(run["reference_bandwidth"]["reference"], color="black", linewidth=1,
                 label="reference (best of copy, add, in-place add)")
    left.set_xscale("log", base=2)
    left.set_xlabel("elements (one fp32 tensor)")
    left.set_ylabel("GB/s at floor bytes (12 B accumulate, 28 B AdamW)")
    left.set_title("Achieved bandwidth vs size")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)

    # Right: whole-window time per layout: standard vs swap-in vs full (first dtype and backend).
    window = [r for r in run["rows"] if r["section"] == "window"]
    if window:
        first = (window[0]["dtype"], window[0]["backend"])
        window = [r for r in window if (r["dtype"], r["backend"]) == first]
        layouts = list(dict.fromkeys(r["layout"] for r in window))
        series = list(dict.fromkeys([r["standard"] for r in window] + [r["fused"] for r in window]))
        width = 0.8 / len(series)
        for k, name in enumerate(series):
            times = []
            for layout in layouts:
                t = [r["standard_s"] for r in window if r["layout"] == layout and r["standard"] == name]
                t += [r["fused_s"] for r in window if r["layout"] == layout and r["fused"] == name]
                times.append(1e3 * t[0] if t else 0.0)
            right.bar([i + k * width for i in range(len(layouts))], times, width, label=name)
        right.set_xticks([i + 0.4 - width / 2 for i in range(len(layouts))], layouts)
        right.set_yscale("log")
        right.set_ylabel("ms per window")
        right.set_title(f"Whole window ({run['args']['accumulation_steps']} micro-batches + AdamW + clip), "
                        f"{first[0]}, backend {first[1]}", fontsize=9)
        right.legend(fontsize=8)
        right.grid(alpha=0.3, axis="y")
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def precision_records(items: list[Precision]) -> list[dict]:
    return [asdict(p) for p in items]
