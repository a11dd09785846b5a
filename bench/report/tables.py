"""Markdown tables: one row per case (k, channels, heads, res, batch), one column per implementation.

A cell holds the metric, or the row's status word (oom, timeout, error, incorrect, unsupported) when the
case has no measurement, so failures stay visible next to the numbers. A latency is marked "(noisy)" when
its spread is large (IQR above NOISY_SPREAD of the median), when it is an outlier among the same case's
other rows (bench.report.load.outliers) or when its row was measured ``contended`` (other processes
loaded the machine); its table says how many were and why. Every table ends with where its rows come
from (bench.report.load.provenance); a cell from another run than the table's is marked OTHER_RUN_MARK.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from bench.schema import CONV

from .load import BASELINE_IMPL, OUTLIER_FACTOR, SWEEP_COLUMNS, as_number, is_ok, provenance
from .metrics import METRICS, Metric

NOISY_SPREAD = 0.10  # IQR / median above which a latency is marked noisy
NOISY_MARK = "(noisy)"
OTHER_RUN_MARK = "†"
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


def noise_reasons(row: dict) -> list[str]:
    """Why a measured latency is not to be trusted alone: its IQR is above NOISY_SPREAD of its median, it
    is an outlier among its siblings (``outlier``), or it was measured ``contended``; [] when none."""
    if not is_ok(row):
        return []
    median, iqr = as_number(row.get("latency_ms")), as_number(row.get("latency_iqr_ms"))
    reasons = ["wide IQR"] if iqr is not None and iqr > NOISY_SPREAD * median else []
    reasons += ["outlier"] if row.get("outlier") is True else []
    return reasons + (["contended"] if row.get("contended") is True else [])


def is_noisy(row: dict) -> bool:
    """True for a measured latency with a reason not to trust it (:func:`noise_reasons`)."""
    return bool(noise_reasons(row))


def latency_cell(row: dict, _case: dict[str, dict]) -> str:
    """'median ± IQR' in ms, marked (noisy) when the IQR is large, or the status word."""
    if not is_ok(row):
        return _missing(row)
    iqr = as_number(row.get("latency_iqr_ms"))
    text = fmt(as_number(row["latency_ms"])) + (f" ± {fmt(iqr)}" if iqr is not None else "")
    return f"{text} {NOISY_MARK}" if is_noisy(row) else text


def noisy_count(rows: list[dict]) -> str:
    """How many of the measured latencies are marked noisy, why, and what to do about them."""
    timed = [row for row in rows if is_ok(row)]
    noisy = sum(is_noisy(row) for row in timed)
    why = {reason: sum(reason in noise_reasons(row) for row in timed) for reason in ("wide IQR", "outlier", "contended")}
    count = ", ".join(f"{n} {reason}" for reason, n in why.items() if n)
    advice = ": measure them again (`--repeat`, a longer `--min-time`) before relying on them" if noisy else ""
    return (f"{noisy} of {len(timed)} latencies are noisy{f' ({count})' if count else ''}, marked {NOISY_MARK}: IQR above "
            f"{NOISY_SPREAD:.0%} of the median, more than {OUTLIER_FACTOR:g}x off the median of the same case's other rows "
            f"(same machine and commit), or measured while other processes loaded the machine{advice}.")


def peak_sources(rows: list[dict]) -> str | None:
    """Which peak the fraction-of-peak cells divide by: the one recorded on the row, or a fallback."""
    sources = [row["peak_source"] for row in rows if METRICS["peak_fraction"].of(row) is not None and row.get("peak_source")]
    fallback = [source for source in sources if not source.startswith("row")]
    if not sources:
        return None
    if not fallback:
        return "Every cell uses the peak recorded on its row."
    where = "the published GPU peak" if set(fallback) == {"published"} else "the machine's peak.json (`sasa-bench peak`)"
    return (f"{len(sources) - len(fallback)} cells use the peak recorded on their row; {len(fallback)} use {where} "
            "(their rows record none).")


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
                               shown=lambda rows: any(METRICS["peak_fraction"].of(r) is not None for r in rows),
                               footer=peak_sources),
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
                    + [_marked(spec.cell(by_impl[i], by_impl), by_impl[i]) if i in by_impl else "" for i in impls])
    footer = "\n\n".join(line for line in (spec.footer(records), provenance(records)) if line)
    return f"**{spec.title}** ({spec.unit})\n\n" + markdown(headers, rows) + f"\n\n{footer}"


def _marked(text: str, row: dict) -> str:
    """A cell, with OTHER_RUN_MARK when its row comes from another run than its table's."""
    return f"{text} {OTHER_RUN_MARK}" if row.get("other_run") is True else text


def _sort_key(value) -> tuple[int, float]:
    number = as_number(value)
    return (1, 0.0) if number is None else (0, number)
