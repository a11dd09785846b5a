"""reports/README.md: the index (machines, commits, dates) and, per device/dtype/direction, tables and plots."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from .figures import roofline, slug, sweep_figures
from .load import GROUP_COLUMNS
from .plots import save
from .profile import profile_section
from .tables import TABLES, fmt, group_table, markdown

HOW_TO_READ = """\
Each section is one machine, device, dtype and direction (`fwd`, or `fwd+bwd` = forward and backward).
Rows are cases (k, channels, heads, resolution, batch); columns are implementations (`conv` is the
nn.Conv2d k x k baseline). A **bold word** in place of a number is the case's status: `oom` (out of
memory), `timeout`, `error`, `incorrect` (output did not match the reference, so it was not timed),
`unsupported` (the implementation does not run on that device/dtype). Plots mark those cases with an x,
labelled with the status, in a shaded band above every curve. A latency marked (noisy) has an IQR above 10%
of its median, or is more than 2x off the median of the same case's other rows on the same machine and commit
(repeat passes, other runs), or was measured while other processes loaded the machine (`contended`); each
latency table says how many were and why. One table compares one run: each table and plot names its run
(the run that measured most of its cases, the newest on a tie) and commit; a cell or a point taken from another
run (where that run lacks the case) is marked †, and the runs it comes from are listed under the table. Throughput = 2 x analytic MACs x (1 for fwd, 3 for
fwd+bwd) / median latency; the analytic MACs count the relative logits per key for `unfold` and factorized
for the others (see docs/design.md). Fraction of peak: of the peak recorded on the row where it has one; else
on GPUs of the published dense peak, on CPUs of the best GFLOP/s of square matrix products (512 to 4096) measured
on that machine at the same thread count (`sasa-bench peak`; bench/report/peaks.py): the table says which; oneDNN's convolutions can exceed it (above 100%). The roofline (GPUs) counts compulsory traffic only (input, output and weights moved
once per pass)."""


def write_report(frame: pd.DataFrame, out_dir: str | os.PathLike, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``out_dir/README.md`` and its PNGs from ``frame`` (see load.rows_frame); returns the README path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(s) for s in sources]
    parts = ["# sasa-bench report", "",
             f"From {len(frame)} result rows (per table one run, see How to read) under {', '.join(sources) or 'the given rows'}.",
             "", "## Machines", "", machines_table(frame), "", "## How to read", "", HOW_TO_READ, ""]
    if (out_dir / "claim.md").exists():
        parts += ["The k = 19 vs k = 3 cost claim: [claim.md](claim.md).", ""]
    for values, group in frame.groupby(list(GROUP_COLUMNS), sort=True, dropna=False):
        parts += group_section(dict(zip(GROUP_COLUMNS, values)), group, out_dir)
    parts += models_section(sources)
    parts += profile_section(frame.attrs.get("profiles") or [], out_dir)
    readme = out_dir / "README.md"
    readme.write_text("\n".join(parts).rstrip() + "\n")
    return readme


def machines_table(frame: pd.DataFrame) -> str:
    """One line per machine: devices, CPU, GPU, commits, date range and row count."""
    rows = []
    for machine, rows_of in frame.groupby("machine", sort=True, dropna=False):
        commits = sorted({f"{str(c)[:10]}{' (dirty)' if d else ''}" for c, d in zip(rows_of["commit"], rows_of["dirty"]) if c})
        stamps = sorted(str(t) for t in rows_of["timestamp"].dropna())
        rows.append([machine, ", ".join(sorted(map(str, rows_of["device"].dropna().unique()))), _unique(rows_of["cpu"]),
                     _unique(rows_of["gpu"]), ", ".join(commits), f"{stamps[0][:10]} .. {stamps[-1][:10]}" if stamps else "",
                     str(len(rows_of))])
    return markdown(["machine", "devices", "CPU", "GPU", "commits", "dates (UTC)", "rows"], rows)


def group_section(group_key: dict, group: pd.DataFrame, out_dir: Path) -> list[str]:
    """The tables and plots of one machine/device/dtype/direction/level (the bare op's sections say so)."""
    device_name = group["device_name"].iloc[0]
    op = group_key["level"] == "op"
    title = f"{device_name}, {group_key['dtype']}, {group_key['direction']}" + (", bare op" if op else "")
    prefix = slug(group_key["machine"], group_key["device"], group_key["dtype"], group_key["direction"], "op" if op else None)
    parts = [f"## {group_key['machine']}: {title}", ""]
    for spec in TABLES.values():
        table = group_table(group, spec)
        parts += [table, ""] if table else []
    figures = sweep_figures(group, title, prefix)
    roof = roofline(group, title, prefix)
    for spec in figures + ([roof] if roof else []):
        parts += [f"![{spec.title.splitlines()[0]}]({save(spec, out_dir)})", ""]
    return parts


# The columns of a models table: what `sasa-bench models --json` rows hold (costs, then one timing per impl).
MODEL_COLUMNS = {"model": "model", "variant": "variant", "params": "params", "flops_paper": "FLOPs (paper convention)",
                 "impl": "impl", "device": "device", "dtype": "dtype", "res": "res (px)", "batch": "batch",
                 "status": "status", "infer_images_per_s": "infer (img/s)", "infer_peak_mem_bytes": "infer peak (bytes)",
                 "train_images_per_s": "train (img/s)", "train_peak_mem_bytes": "train peak (bytes)"}


def models_section(sources: Iterable[str]) -> list[str]:
    """Tables of ``models.json`` files found under the result folders (written by `sasa-bench models --json`):
    the MODEL_COLUMNS a file has; a case that did not run shows its status word, never an error's text."""
    parts = []
    for source in map(Path, sources):
        for path in sorted(source.rglob("models.json")) if source.is_dir() else []:
            data = json.loads(path.read_text())
            rows = data.get("rows", [data]) if isinstance(data, dict) else data
            rows = [r for r in rows if isinstance(r, dict)]
            columns = [c for c in MODEL_COLUMNS if any(c in r for r in rows)]
            if not rows or not columns:
                continue
            cells = [[_cell(r.get(c)) for c in columns] for r in rows]
            parts += [f"## Models: {path.parent.name}", "", markdown([MODEL_COLUMNS[c] for c in columns], cells), ""]
    return parts


def _unique(column: pd.Series) -> str:
    values = sorted({str(v.get("name") if isinstance(v, dict) else v) for v in column.dropna()})
    return ", ".join(values)


def _cell(value) -> str:
    """A models-table cell: numbers with 3 significant digits, nothing for None, anything else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(float(value))
    return "" if value is None else str(value)
