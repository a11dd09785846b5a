"""Markdown tables: one row per case (k, channels, heads, res, batch), one column per implementation.

A cell holds the metric, or the row's status word (oom, timeout, error, incorrect, unsupported) when the
case has no measurement, so failures stay visible next to the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from .load import BASELINE_IMPL, SWEEP_COLUMNS, as_number, is_ok
from .metrics import METRICS, Metric

CONV_IMPL = "conv"
SWEEP_HEADERS = {"k": "k", "channels": "channels", "heads": "heads", "res": "res (px)", "batch": "batch"}


def fmt(value: float | None) -> str:
    """A number with 3 significant digits (no exponent below 1e6), '' for None."""
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (numbers right-aligned by the caller's order)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def impl_order(impls: Sequence[str]) -> list[str]:
    """The baseline (unfold) first, the conv last, the rest alphabetical."""
    def rank(name: str) -> tuple[int, str]:
        return (0 if name == BASELINE_IMPL else 2 if name == CONV_IMPL else 1, name)
    return sorted(set(impls), key=rank)


@dataclass(frozen=True)
class TableSpec:
    """A table over one group: ``cell(row, rows_of_the_same_case_by_impl) -> str``."""

    title: str
    unit: str
    cell: Callable[[dict, dict[str, dict]], str]
    impls: Callable[[list[str]], list[str]] = lambda impls: impls
    shown: Callable[[list[dict]], bool] = lambda rows: True


def metric_cell(metric: Metric) -> Callable[[dict, dict[str, dict]], str]:
    """Cell showing ``metric``, or the status word where the row has no value."""
    def cell(row: dict, _case: dict[str, dict]) -> str:
        value = metric.of(row)
        return fmt(value) if value is not None else _missing(row)
    return cell


def latency_cell(row: dict, _case: dict[str, dict]) -> str:
    """'median ± IQR' in ms, or the status word."""
    if not is_ok(row):
        return _missing(row)
    iqr = as_number(row.get("latency_iqr_ms"))
    return fmt(as_number(row["latency_ms"])) + (f" ± {fmt(iqr)}" if iqr is not None else "")


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
    "latency": TableSpec("Latency, median ± IQR", "ms", latency_cell),
    "memory": TableSpec("Peak memory", "MiB", metric_cell(METRICS["memory"])),
    "speedup": TableSpec(f"Speed-up over {BASELINE_IMPL} (higher is faster)", "×", speedup_cell,
                         lambda impls: [i for i in impls if i != BASELINE_IMPL]),
    "gflops": TableSpec("Achieved throughput, 2 × analytic MACs × passes / latency", "GFLOP/s", metric_cell(METRICS["gflops"])),
    "peak_fraction": TableSpec("Fraction of the GPU's peak FLOP/s", "%", metric_cell(METRICS["peak_fraction"]),
                               shown=lambda rows: any(METRICS["peak_fraction"].of(r) is not None for r in rows)),
}


def group_table(frame: pd.DataFrame, spec: TableSpec) -> str | None:
    """One Markdown table of ``spec`` over the rows of one device/dtype/direction group (None: not shown)."""
    records = frame.to_dict("records")
    if not spec.shown(records):
        return None
    impls = spec.impls(impl_order([r["impl"] for r in records]))
    cases: dict[tuple, dict[str, dict]] = {}
    for row in records:
        cases.setdefault(tuple(row.get(c) for c in SWEEP_COLUMNS), {})[row["impl"]] = row
    headers = [SWEEP_HEADERS[c] for c in SWEEP_COLUMNS] + [f"{impl} ({spec.unit})" for impl in impls]
    rows = []
    for key in sorted(cases, key=lambda key: tuple(_sort_key(v) for v in key)):
        by_impl = cases[key]
        rows.append([fmt(as_number(v)) if as_number(v) is not None else "" for v in key]
                    + [spec.cell(by_impl[i], by_impl) if i in by_impl else "" for i in impls])
    return f"**{spec.title}** ({spec.unit})\n\n" + markdown(headers, rows)


def _sort_key(value) -> tuple[int, float]:
    number = as_number(value)
    return (1, 0.0) if number is None else (0, number)
