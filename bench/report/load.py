"""Result rows as a pandas DataFrame, one row per measured case, with the derived columns reports use.

Columns are the row schema's (bench/schema.py, every field present), plus ``source`` (the file),
``device_name``, ``peak_flops`` (what a fraction of peak divides by) with ``peak_source`` (where it came
from), ``series`` (bench.schema.series: the implementation variant a table column or a plot line is
labelled with, so variants of one implementation never share a cell), ``outlier`` and, when one row per
case is kept, ``table_run`` and ``other_run``.

One run per table: of the rows of one group (GROUP_COLUMNS: the rows one set of tables and plots shows),
the *table run* is the run that measured the most of the group's cases, the newest of those on a tie; each
case shows the table run's row (its newest repeat) where that run has one, else the case's newest row,
which is then ``other_run`` (reports mark it † and name its run and commit). So one table compares rows of
one run, never a contended run's k = 3 beside a quiet run's k = 7 without saying so.

Outliers: a measured row whose latency is more than OUTLIER_FACTOR times off (either way) the median (the
lower middle one for an even count) of the other rows of the same case, machine and commit (repeat passes
and other runs: its siblings) has
``outlier`` True; reports mark it noisy like a wide IQR (bench.report.tables.is_noisy). A computed
column, not a row field: it depends on which rows are read together.
"""
from __future__ import annotations

import os
import statistics
from typing import Iterable

import pandas as pd

from bench.schema import CASE_FIELDS, FIELDS, Status, series
from bench.store import read_rows

from .peaks import measured_peaks, row_peak

CASE_COLUMNS = CASE_FIELDS  # impl k channels heads res batch dtype device direction level relative impl_options
GROUP_COLUMNS = ("machine", "device", "dtype", "direction", "level")  # one set of tables per group
SWEEP_COLUMNS = ("k", "channels", "heads", "res", "batch")  # the case variables inside a group
BASELINE_IMPL = "unfold"
OUTLIER_FACTOR = 2.0  # latency / median of its siblings (or the inverse) above which a row is an outlier


def rows_frame(rows: Iterable[dict], latest: bool = True, measured: dict | None = None) -> pd.DataFrame:
    """Normalized rows -> DataFrame with every schema column plus the derived ones, ``peak_flops`` included
    (GPUs: published; CPUs: ``measured`` peaks, bench.report.peaks.measured_peaks).

    ``latest`` keeps only the newest row (by timestamp) per machine and case: a rerun replaces an
    older measurement of the same case on the same machine.
    """
    frame = pd.DataFrame(list(rows), columns=None)
    for column in FIELDS:
        if column not in frame.columns:
            frame[column] = None
    if frame.empty:
        return frame
    frame = frame.sort_values("timestamp", kind="stable", na_position="first").reset_index(drop=True)
    frame["outlier"] = outliers(frame.to_dict("records"))
    if latest:
        frame = one_run_per_table(frame)
    records = frame.to_dict("records")
    frame["device_name"] = [device_name(row) for row in records]
    frame["series"] = [series(row) for row in records]
    peaks = [row_peak_flops(row, measured or {}) for row in frame.to_dict("records")]
    frame["peak_flops"] = [peak for peak, _ in peaks]
    frame["peak_source"] = [source for _, source in peaks]
    return frame


def outliers(records: list[dict]) -> list[bool]:
    """Per row: measured, and more than OUTLIER_FACTOR off the median latency of its siblings (the other
    measured rows of the same machine, commit and case), see the module docstring."""
    siblings: dict[tuple, list[int]] = {}
    for index, row in enumerate(records):
        if is_ok(row):
            siblings.setdefault((row.get("machine"), row.get("commit"), *(row.get(c) for c in CASE_COLUMNS)), []).append(index)
    flags = [False] * len(records)
    for indices in siblings.values():
        for index in indices if len(indices) > 1 else ():
            mine = as_number(records[index]["latency_ms"])
            others = statistics.median_low(as_number(records[i]["latency_ms"]) for i in indices if i != index)
            flags[index] = mine > 0 and others > 0 and max(mine / others, others / mine) > OUTLIER_FACTOR
    return flags


def one_run_per_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per machine and case, from the table run of its group where it has one (module docstring),
    with ``table_run`` and ``other_run``; ``frame`` is sorted by timestamp."""
    frame = frame.copy()
    frame["run"] = frame["run_id"].fillna("unknown run").astype(str)
    kept = []
    for _, group in frame.groupby(list(GROUP_COLUMNS), sort=False, dropna=False):
        cases = group.groupby("run")[list(CASE_COLUMNS)].apply(lambda rows: len(rows.drop_duplicates()))
        newest = group.groupby("run")["timestamp"].apply(lambda stamps: str(stamps.dropna().max()))
        table_run = max(cases.index, key=lambda run: (cases[run], newest[run]))
        ordered = group.assign(_own=group["run"] == table_run).sort_values("_own", kind="stable")
        chosen = ordered.drop_duplicates(subset=list(CASE_COLUMNS), keep="last").drop(columns="_own")
        kept.append(chosen.assign(table_run=table_run, other_run=chosen["run"] != table_run))
    merged = pd.concat(kept).drop(columns="run").sort_values("timestamp", kind="stable", na_position="first")
    return merged.reset_index(drop=True)


def row_peak_flops(row: dict, measured: dict) -> tuple[float | None, str | None]:
    """The peak FLOP/s a row's fraction of peak divides by and where it comes from: the peak recorded on
    the row (``peak_gflops``, ``peak_kind``) where it has one, else the published GPU peak or the machine's
    ``peak.json`` (bench.report.peaks.row_peak)."""
    recorded = as_number(row.get("peak_gflops"))
    if recorded is not None:
        return recorded * 1e9, f"row ({row.get('peak_kind') or 'recorded'})"
    fallback = row_peak(row, measured)
    if fallback is None:
        return None, None
    return fallback, "published" if str(row.get("device", "")).startswith("cuda") else "peak.json"


def provenance(rows: list[dict]) -> str:
    """Where a table's or a plot's rows come from: the table run (commit, dates) and the other runs of cells marked †."""
    def described(run: str) -> str:
        mine = [r for r in rows if str(r.get("run_id") or "unknown run") == run]
        commits = sorted({str(r.get("commit") or "?")[:10] + (" (dirty)" if r.get("dirty") is True else "") for r in mine})
        stamps = sorted(str(r["timestamp"])[:10] for r in mine if r.get("timestamp") is not None and r["timestamp"] == r["timestamp"])
        when = f", {stamps[0]}" + (f" .. {stamps[-1]}" if stamps[-1] != stamps[0] else "") if stamps else ""
        return f"{run} (commit {', '.join(commits)}{when})"

    runs = list(dict.fromkeys(str(r.get("run_id") or "unknown run") for r in rows))
    main = next((r.get("table_run") for r in rows if r.get("table_run")), runs[0] if runs else None)
    others = [run for run in runs if run != main]
    text = f"Rows from run {described(main)}" if main else "No rows"
    return text + (f"; † cells from other runs: {'; '.join(described(run) for run in others)}." if others else ".")


def load(paths: Iterable[str | os.PathLike], latest: bool = True, problems: list[str] | None = None) -> pd.DataFrame:
    """Every row under ``paths`` (result files or folders) as a frame (see :func:`rows_frame`), with the peak
    FLOP/s each row is compared with (``peak_flops``: bench.report.peaks); lines that are not rows go to
    ``problems`` (bench.store.read_rows). The rows of `sasa-bench profile` (``profiler`` set) are not
    measurements of `run`: they stay out of the frame, in ``frame.attrs["profiles"]`` (bench/report/profile.py)."""
    paths = list(paths)
    rows, peaks = list(read_rows(paths, problems)), measured_peaks(paths)
    frame = rows_frame([r for r in rows if not r.get("profiler")], latest=latest, measured=peaks)
    profiles = rows_frame([r for r in rows if r.get("profiler")], latest=latest, measured=peaks)
    frame.attrs["profiles"] = profiles.to_dict("records") if not profiles.empty else []
    return frame


def is_ok(row: dict) -> bool:
    """True when the row carries a measurement (status ok and a latency)."""
    return row.get("status") == Status.OK and as_number(row.get("latency_ms")) is not None


def device_name(row: dict) -> str:
    """Human name of the device a row ran on: the GPU's name on CUDA, the CPU model otherwise."""
    gpu = row.get("gpu")
    if isinstance(gpu, dict):
        gpu = gpu.get("name")
    if str(row.get("device", "")).startswith("cuda") and gpu:
        return str(gpu)
    return str(row.get("cpu") or row.get("device") or "unknown")


def as_number(value) -> float | None:
    """``value`` as a float, or None when it is missing / not a number (NaN included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number
