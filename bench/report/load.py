"""Result rows as a pandas DataFrame, one row per measured case, with the derived columns reports use."""
from __future__ import annotations

import os
from typing import Iterable

import pandas as pd

from bench.cases import Case
from bench.store import read_rows

CASE_COLUMNS = tuple(Case.__dataclass_fields__)  # impl, k, channels, heads, res, batch, dtype, device, direction
GROUP_COLUMNS = ("machine", "device", "dtype", "direction")  # one set of tables per group
SWEEP_COLUMNS = ("k", "channels", "heads", "res", "batch")  # the case variables inside a group
ROW_COLUMNS = CASE_COLUMNS + (
    "status", "error", "latency_ms", "latency_iqr_ms", "peak_mem_bytes", "macs_analytic", "flops_fvcore",
    "params", "machine", "run_id", "suite", "commit", "dirty", "cpu", "gpu", "timestamp",
)
DIRECTION_PASSES = {"fwd": 1, "fwd+bwd": 3}  # forward-pass equivalents: backward ~ 2 forwards
BASELINE_IMPL = "unfold"


def rows_frame(rows: Iterable[dict], latest: bool = True) -> pd.DataFrame:
    """Rows -> DataFrame with every column of ROW_COLUMNS (missing ones as None) plus derived columns.

    ``latest`` keeps only the newest row (by timestamp) per machine and case: a rerun replaces an
    older measurement of the same case on the same machine.
    """
    frame = pd.DataFrame(list(rows))
    for column in ROW_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    if frame.empty:
        return frame
    frame = frame.sort_values("timestamp", kind="stable", na_position="first")
    if latest:
        frame = frame.drop_duplicates(subset=["machine", *CASE_COLUMNS], keep="last")
    frame = frame.reset_index(drop=True)
    frame["device_name"] = [device_name(row) for row in frame.to_dict("records")]
    frame["gflops"] = [achieved_gflops(row) for row in frame.to_dict("records")]
    return frame


def load(paths: Iterable[str | os.PathLike], latest: bool = True) -> pd.DataFrame:
    """Every row under ``paths`` (result files or folders) as a frame; see :func:`rows_frame`."""
    return rows_frame(read_rows(paths), latest=latest)


def is_ok(row: dict) -> bool:
    """True when the row carries a measurement (status ok and a latency)."""
    return row.get("status") == "ok" and as_number(row.get("latency_ms")) is not None


def device_name(row: dict) -> str:
    """Human name of the device a row ran on: the GPU's name on CUDA, the CPU model otherwise."""
    gpu = row.get("gpu")
    if isinstance(gpu, dict):
        gpu = gpu.get("name")
    if str(row.get("device", "")).startswith("cuda") and gpu:
        return str(gpu)
    return str(row.get("cpu") or row.get("device") or "unknown")


def achieved_gflops(row: dict) -> float | None:
    """2 x macs_analytic x passes / latency, in GFLOP/s (passes: 1 for fwd, 3 for fwd+bwd)."""
    macs, latency = as_number(row.get("macs_analytic")), as_number(row.get("latency_ms"))
    passes = DIRECTION_PASSES.get(row.get("direction"))
    if not is_ok(row) or macs is None or not latency or passes is None:
        return None
    return 2.0 * macs * passes / (latency * 1e-3) / 1e9


def as_number(value) -> float | None:
    """``value`` as a float, or None when it is missing / not a number (NaN included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number
