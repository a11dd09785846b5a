"""Markdown tables: one row per case (k, channels, heads, res, batch), one column per implementation.

A cell holds the metric, or the row's status word (oom, timeout, error, incorrect, unsupported) when the
case has no measurement, so failures stay visible next to the numbers. A latency whose spread is large
(IQR above NOISY_SPREAD of the median) is marked "(noisy)", and its table says how many were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from bench.schema import CONV

from .load import BASELINE_IMPL, SWEEP_COLUMNS, as_number, is_ok
from .metrics import METRICS, Metric

NOISY_SPREAD = 0.10  # IQR / median above which a latency is marked noisy
NOISY_MARK = "(noisy)"
SWEEP_HEADERS = {"k": "k", "channels": "channels", "heads": "heads", "res": "res (px)", "batch": "batch"}


def fmt(value: float | None) -> str:
    """A number with 3 significant digits (no exponent below 1e6), '' for None."""
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table of already formatted cells (pandas): columns of numbers right-aligned, text left."""
    frame = pd.DataFrame([[str(cell) for cell in row] for row in rows], columns=[str(h) for h in headers])
    align = ["right" if next((c for c in frame[column] if c), "")[:1] in "0123456789+-" else "left" for column in frame]
    return frame.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


def impl_order(impls: Sequence[str]) -> list[str]:
    """Implementation series (bench.schema.series): the baseline (unfold) first, the conv last, the rest alphabetical."""
    def rank(name: str) -> tuple[int, str]:
        return (0 if name == BASELINE_IMPL else 2 if name == CONV else 1, name)
    return sorted(set(impls), key=rank)


@dataclass(frozen=True)
class TableSpec:
    """A table over one group: ``cell(row, rows_of_the_same_case_by_impl) -> str``."""

    title: str
    unit: str
    cell: Callable[[dict, dict[str, dict]], str]
    impls: Callable[[list[str]], list[str]] = lambda impls: impls
    shown: Callable[[list[dict]], bool] = lambda rows: True
    footer: Callable[[list[dict]], str | None] = lambda rows: None  # a line under the table


def metric_cell(metric: Metric) -> Callable[[dict, dict[str, dict]], str]:
    """Cell showing ``metric``, or the status word where the row has no value."""
    def cell(row: dict, _case: dict[str, dict]) -> str:
        value = metric.of(row)
        return fmt(value) if value is not None else _missing(row)
    return cell


def is_noisy(row: dict) -> bool:
    """True for a measured latency whose IQR is above NOISY_SPREAD of its median."""
    median, iqr = as_number(row.get("latency_ms")), as_number(row.get("latency_iqr_ms"))
    return is_ok(row) and iqr is not None and iqr > NOISY_SPREAD * median


def latency_cell(row: dict, _case: dict[str, dict]) -> str:
    """'median ± IQR' in ms, marked (noisy) when the IQR is large, or the status word."""
    if not is_ok(row):
        return _missing(row)
    iqr = as_number(row.get("latency_iqr_ms"))
    text = fmt(as_number(row["latency_ms"])) + (f" ± {fmt(iqr)}" if iqr is not None else "")
    return f"{text} {NOISY_MARK}" if is_noisy(row) else text


def noisy_count(rows: list[dict]) -> str:
    """How many of the measured latencies are marked noisy, and what to do about them."""
    timed = [row for row in rows if is_ok(row)]
    noisy = sum(is_noisy(row) for row in timed)
    advice = ": measure them again (`--repeat`, a longer `--min-time`) before relying on them" if noisy else ""
    return f"{noisy} of {len(timed)} latencies are noisy (IQR above {NOISY_SPREAD:.0%} of the median), marked {NOISY_MARK}{advice}."


def speedup_cell(row: dict, case: dict[str, dict]) -> str:
    """unfold latency / this latency at the same case (>1: faster than unfold)."""
    base = case.get(BASELINE_IMPL)
    if not is_ok(row):
        return _missing(row)
    if base is None or not is_ok(base):
        return "n/a"
    return f"{as_number(base['latency_ms']) / as_number(row['latency_ms']):.2f}×"


def _missing(row: dict) -> str:
    status = row.get("status") or "n/a"
    return "n/a" if status == "ok" else f"**{status}**"


TABLES: dict[str, TableSpec] = {
    "latency": TableSpec("Latency, median ± IQR", "ms", latency_cell, footer=noisy_count),
    "memory": TableSpec("Peak memory", "MiB", metric_cell(METRICS["memory"])),
    "speedup": TableSpec(f"Speed-up over {BASELINE_IMPL} (higher is faster)", "×", speedup_cell,
                         lambda impls: [i for i in impls if i != BASELINE_IMPL]),
    "gflops": TableSpec("Achieved throughput, 2 × analytic MACs × passes / latency", "GFLOP/s", metric_cell(METRICS["gflops"])),
    "peak_fraction": TableSpec("Fraction of peak FLOP/s (GPU: published dense peak; CPU: measured sgemm, `sasa-bench peak`)", "%", metric_cell(METRICS["peak_fraction"]),
                               shown=lambda rows: any(METRICS["peak_fraction"].of(r) is not None for r in rows)),
}


def group_table(frame: pd.DataFrame, spec: TableSpec) -> str | None:
    """One Markdown table of ``spec`` over the rows of one device/dtype/direction group (None: not shown)."""
    records = frame.to_dict("records")
    if not spec.shown(records):
        return None
    impls = spec.impls(impl_order([r["series"] for r in records]))
    cases: dict[tuple, dict[str, dict]] = {}
    for row in records:
        cases.setdefault(tuple(row.get(c) for c in SWEEP_COLUMNS), {})[row["series"]] = row
    headers = [SWEEP_HEADERS[c] for c in SWEEP_COLUMNS] + [f"{impl} ({spec.unit})" for impl in impls]
    rows = []
    for key in sorted(cases, key=lambda key: tuple(_sort_key(v) for v in key)):
        by_impl = cases[key]
        rows.append([fmt(as_number(v)) if as_number(v) is not None else "" for v in key]
                    + [spec.cell(by_impl[i], by_impl) if i in by_impl else "" for i in impls])
    footer = spec.footer(records)
    return f"**{spec.title}** ({spec.unit})\n\n" + markdown(headers, rows) + (f"\n\n{footer}" if footer else "")


def _sort_key(value) -> tuple[int, float]:
    number = as_number(value)
    return (1, 0.0) if number is None else (0, number)
