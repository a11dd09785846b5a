"""Result rows as a pandas DataFrame, one row per measured case, with the derived columns reports use.

Columns are the row schema's (bench/schema.py, every field present), plus ``source`` (the file),
``device_name``, ``peak_flops`` (what a fraction of peak divides by) and ``series`` (bench.schema.series: the implementation variant a table column or a plot
line is labelled with, so variants of one implementation never share a cell).
"""
from __future__ import annotations

import os
from typing import Iterable

import pandas as pd

from bench.schema import CASE_FIELDS, FIELDS, Status, series
from bench.store import read_rows

from .peaks import measured_peaks, row_peak

CASE_COLUMNS = CASE_FIELDS  # impl k channels heads res batch dtype device direction level relative impl_options
GROUP_COLUMNS = ("machine", "device", "dtype", "direction", "level")  # one set of tables per group
SWEEP_COLUMNS = ("k", "channels", "heads", "res", "batch")  # the case variables inside a group
BASELINE_IMPL = "unfold"


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
    frame = frame.sort_values("timestamp", kind="stable", na_position="first")
    if latest:
        frame = frame.drop_duplicates(subset=["machine", *CASE_COLUMNS], keep="last")
    frame = frame.reset_index(drop=True)
    records = frame.to_dict("records")
    frame["device_name"] = [device_name(row) for row in records]
    frame["series"] = [series(row) for row in records]
    frame["peak_flops"] = [row_peak(row, measured or {}) for row in frame.to_dict("records")]
    return frame


def load(paths: Iterable[str | os.PathLike], latest: bool = True, problems: list[str] | None = None) -> pd.DataFrame:
    """Every row under ``paths`` (result files or folders) as a frame (see :func:`rows_frame`), with the peak
    FLOP/s each row is compared with (``peak_flops``: bench.report.peaks); lines that are not rows go to
    ``problems`` (bench.store.read_rows)."""
    paths = list(paths)
    return rows_frame(read_rows(paths, problems), latest=latest, measured=measured_peaks(paths))


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
