"""Figure specs from result rows (the data side of plots.py): sweeps of one metric over one case variable."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.flops import conv_macs_per_pixel
from bench.schema import CONV

from .load import SWEEP_COLUMNS, as_number
from .metrics import METRICS, Metric
from .peaks import gpu_peak, peak_flops
from .plots import Line, LinePlot, Point, Roofline
from .tables import OTHER_RUN_MARK, impl_order

X_LABELS = {"k": "kernel size k", "res": "resolution (px, square input)", "channels": "channels (d_in = d_out)"}
LOG_X = {"k": False, "res": True, "channels": True}


@dataclass(frozen=True)
class Sweep:
    """A family of figures: ``metric`` vs ``x``, one figure per setting of the other case variables.

    ``second``: a second metric drawn per implementation beside the first (fvcore's count beside the analytic);
    ``conv_k3``: add the k = 3 convolution's MACs as a reference line.
    """

    metric: str
    x: str
    second: str | None = None
    conv_k3: bool = False


SWEEPS = (
    Sweep("latency", "k"),
    Sweep("memory", "k"),
    Sweep("latency", "res"),
    Sweep("latency", "channels"),
    Sweep("macs", "k", second="fvcore", conv_k3=True),
)


def slug(*parts) -> str:
    """File-name-safe join of ``parts``."""
    text = "_".join(str(p) for p in parts if p is not None and p != "")
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text.replace("+", ""))


def sweep_figures(group: pd.DataFrame, title: str, prefix: str) -> list[LinePlot]:
    """Every figure of SWEEPS that the rows of one group support (at least two values of x)."""
    return [fig for sweep in SWEEPS for fig in _sweep(group, sweep, title, prefix)]


def _sweep(group: pd.DataFrame, sweep: Sweep, title: str, prefix: str) -> list[LinePlot]:
    metric = METRICS[sweep.metric]
    fixed = [c for c in SWEEP_COLUMNS if c != sweep.x]
    records = group.to_dict("records")
    attention = [r for r in records if r["impl"] != CONV]
    keys = sorted({tuple(r[c] for c in fixed) for r in attention}, key=str)
    figures = []
    for key in keys:
        setting = dict(zip(fixed, key))
        rows = [r for r in records if all(r[c] == v for c, v in setting.items() if not (c == "heads" and r["impl"] == CONV))]
        if max(len({r[sweep.x] for r in rows if r["series"] == name}) for name in {r["series"] for r in attention}) < 2:
            continue  # no attention implementation varies along x here
        lines = _lines(rows, sweep.x, metric)
        if sweep.second:
            lines = [Line(f"{line.label} ({sweep.metric})", line.points) for line in lines]
            lines += [Line(f"{line.label} ({sweep.second})", line.points)
                      for line in _lines(rows, sweep.x, METRICS[sweep.second]) if any(p.y is not None for p in line.points)]
        references = []
        if sweep.conv_k3:
            channels, res, batch = (as_number(setting.get(c)) for c in ("channels", "res", "batch"))
            if None not in (channels, res, batch):
                references.append(("conv k=3", conv_macs_per_pixel(int(channels), int(channels), 3) * batch * res * res * 1e-9))
        where = ", ".join(f"{c}={v:g}" if isinstance(v, (int, float)) else f"{c}={v}" for c, v in setting.items())
        figures.append(LinePlot(
            name=slug(prefix, sweep.metric, "vs", sweep.x, *(f"{c}{v}" for c, v in setting.items())),
            title=f"{metric.title} vs {sweep.x}: {title}\n{where}\n{run_line(rows)}",
            x_label=X_LABELS[sweep.x], y_label=metric.label, lines=lines, log_x=LOG_X[sweep.x], log_y=metric.log,
            references=references,
        ))
    return figures


def run_line(rows: list[dict]) -> str:
    """The figure's run and commit(s), and how many of its points (marked †) come from other runs."""
    runs = sorted({str(r["table_run"]) for r in rows if r.get("table_run")})
    commits = sorted({str(r.get("commit") or "?")[:10] for r in rows})
    others = sum(r.get("other_run") is True for r in rows)
    return (f"run {', '.join(runs) or 'unknown'}, commit {', '.join(commits)}"
            + (f"; {OTHER_RUN_MARK} {others} points from other runs" if others else ""))


def _lines(rows: list[dict], x: str, metric: Metric) -> list[Line]:
    """One line per implementation: (x, value) points, or (x, None, status) where there is no value."""
    lines = []
    for impl in impl_order([r["series"] for r in rows]):
        points = [Point(float(r[x]), metric.of(r), r.get("status") or "n/a", OTHER_RUN_MARK if r.get("other_run") is True else "")
                  for r in rows if r["series"] == impl]
        lines.append(Line(impl, sorted(points, key=lambda p: p.x)))
    return lines


def roofline(group: pd.DataFrame, title: str, prefix: str) -> Roofline | None:
    """The roofline of a GPU group whose peak is known, else None."""
    records = group.to_dict("records")
    if not records or not str(records[0].get("device", "")).startswith("cuda"):
        return None
    peak = gpu_peak(records[0].get("device_name"))
    flops = peak_flops(records[0].get("device_name"), records[0].get("dtype"))
    if peak is None or flops is None:
        return None
    points: dict[str, list[tuple[float, float]]] = {}
    for row in records:
        x, gflops = METRICS["intensity"].of(row), METRICS["gflops"].of(row)
        if x is not None and gflops is not None:
            points.setdefault(row["series"], []).append((x, gflops * 1e9))
    if not points:
        return None
    return Roofline(slug(prefix, "roofline"), f"Roofline: {title}", flops, peak.bandwidth, points)
