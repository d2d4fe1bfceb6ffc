"""What a run leaves behind: rich tables on the terminal, and in the output folder one JSON,
one CSV and one PNG per run, plus latest-<device>.json/.png copies under stable names."""
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
}


def require(module: str):
    """Imports matplotlib / rich on first use, with the fix in the error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f"fusedaccum-bench needs {module.split('.')[0]}: pip install 'fusedaccum[bench]' "
            f"(or: pip install matplotlib rich)"
        ) from None


def row_record(row: Row, copy_gbps: float) -> dict:
    """A row with its derived numbers: ratio, GB/s at the floor bytes, % of copy bandwidth."""
    rec = asdict(row)
    rec["ratio"] = row.ratio
    for side in ("standard", "fused"):
        seconds = rec[f"{side}_s"]
        if row.floor_bytes_per_param is None:
            rec[f"{side}_gbps"] = rec[f"{side}_pct_of_copy"] = None
            rec[f"{side}_per_s"] = 1.0 / seconds
        else:
            gbps = row.floor_bytes_per_param * row.params / seconds / 1e9
            rec[f"{side}_gbps"] = gbps
            rec[f"{side}_pct_of_copy"] = 100.0 * gbps / copy_gbps
            rec[f"{side}_per_s"] = None
    return rec


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_tables(run: dict) -> None:
    escape = require("rich.markup").escape  # "[cpp]" would otherwise read as a style tag
    console = require("rich.console").Console()
    if not console.is_terminal:  # a log file: wide enough that no column wraps
        console = require("rich.console").Console(width=220)
    Table = require("rich.table").Table
    dev = run["device"]
    console.print(
        f"\n[bold]fusedaccum-bench[/] on {dev['name']} ({dev['type']}), scale {run['scale']}, "
        f"N={run['args']['accumulation_steps']}, copy bandwidth [bold]{run['copy_bandwidth_gbps']:.1f} GB/s[/]"
    )
    for note in run["notes"]:
        console.print(escape(f"  note: {note}"))
    for section, title in TABLE_SECTIONS.items():
        rows = [r for r in run["rows"] if r["section"] == section]
        if not rows:
            continue
        e2e = section == "end-to-end"
        table = Table(title=title, title_justify="left", show_lines=False)
        for col in ("layout", "dtype", "backend", "case", "standard", "fused"):
            table.add_column("model" if e2e and col == "layout" else col)
        table.add_column("std time", justify="right")
        table.add_column("fused time", justify="right")
        if e2e:
            table.add_column("std steps/s", justify="right")
            table.add_column("fused steps/s", justify="right")
        else:
            for col in ("std GB/s", "fused GB/s", "std % copy", "fused % copy"):
                table.add_column(col, justify="right")
        table.add_column("std/fused", justify="right", style="bold")
        for r in rows:
            cells = [r["layout"], r["dtype"], r["backend"], r["case"], r["standard"], r["fused"],
                     _time(r["standard_s"]), _time(r["fused_s"])]
            if e2e:
                cells += [f"{r['standard_per_s']:.1f}", f"{r['fused_per_s']:.1f}"]
            else:
                cells += [f"{r['standard_gbps']:.1f}", f"{r['fused_gbps']:.1f}",
                          f"{r['standard_pct_of_copy']:.0f}%", f"{r['fused_pct_of_copy']:.0f}%"]
            ratio = r["ratio"]
            cells.append(f"[{'green' if ratio > 1 else 'red'}]{ratio:.2f}x[/]")
            table.add_row(*cells)
        console.print(table)
        if section == "accumulate" and run["precision"]:
            for p in run["precision"]:
                console.print(escape(
                    f"  precision [{p['backend']}]: {p['micro_batches']} bf16 micro-batches of {p['elements']} "
                    f"elements, max |error| / max |sum| vs float64: bf16 sum (standard) "
                    f"{p['standard_bf16_rel_err']:.2e}, fp32 arena (fused) {p['fused_fp32_rel_err']:.2e}"
                ))
    console.print("  GB/s counts DESIGN.md's floor bytes for both sides (so a side that moves fewer bytes, "
                  "as bf16 += bf16 does, can pass the copy bandwidth); std/fused > 1: fused is faster.")
    if run["device"]["type"] == "cpu":
        console.print("  On CPU a copy's stores also read their lines first, which read+write counting does not "
                      "see: streaming kernels can show more than 100% of copy.")


def write_all(run: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{run['device']['slug']}-{run['timestamp_compact']}"
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(run, indent=1) + "\n")
    write_csv(run["rows"], paths["csv"])
    plot(run, paths["png"])
    # Stable names for the README: copies of the newest run on this kind of device.
    kind = run["device"]["type"]
    latest = {**run, "run_file": paths["json"].name}
    paths["latest_json"] = out / f"latest-{kind}.json"
    paths["latest_json"].write_text(json.dumps(latest, indent=1) + "\n")
    paths["latest_png"] = out / f"latest-{kind}.png"
    shutil.copyfile(paths["png"], paths["latest_png"])
    return paths


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["section"])
        writer.writeheader()
        writer.writerows(rows)


def plot(run: dict, path: Path) -> None:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
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
    left.axhline(run["copy_bandwidth_gbps"], color="black", linewidth=1, label="copy bandwidth")
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


def precision_records(items: list[Precision]) -> list[dict]:
    return [asdict(p) for p in items]
