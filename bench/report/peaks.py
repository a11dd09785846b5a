"""Peak throughput for the fraction-of-peak columns and rooflines: published for known GPUs, measured for CPUs.

GPUs (dense, no sparsity): fp32 is the non-tensor-core rate (the suite measures with TF32 off); fp16 and
bf16 are the dense tensor-core rates. Names are matched as substrings of the NVML name, first match wins.
CPUs: the physical FMA peak (kind "fma": the native extension's loop of independent vector FMAs; "matmul" for dtypes
without one, the best square matrix product) measured by `sasa-bench peak` on the machine itself, per dtype and
thread count, in ``<results>/<machine>/peak.json``. Each row measured since records the peak that held then
(``peak_gflops``, ``peak_kind``: :func:`recorded_peak`), so re-measuring the peak never rewrites old rows; rows
from before fall back to the file (whose entries then had the matmul rate).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s per dtype name and memory bandwidth (bytes/s) of one GPU model."""

    flops: dict[str, float]
    bandwidth: float


_H100_SXM = Peak({"float32": 67e12, "bfloat16": 989e12, "float16": 989e12}, 3.35e12)
PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak({"float32": 51e12, "bfloat16": 756e12, "float16": 756e12}, 2.0e12)),
    ("H100", _H100_SXM),
    ("H200", Peak(_H100_SXM.flops, 4.8e12)),  # same compute as H100 SXM, faster memory
    ("A100", Peak({"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 2.039e12)),
)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def dtype_name(dtype) -> str:
    """Canonical dtype name: 'torch.bfloat16', 'bf16' and 'bfloat16' all give 'bfloat16'."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def element_size(dtype) -> int:
    """Bytes per element of a floating dtype name."""
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(dtype_name(dtype), 4)


def gpu_peak(gpu_name: str | None) -> Peak | None:
    """The peak of the GPU whose NVML name contains a known model, else None (unknown: no fraction shown)."""
    for pattern, peak in PEAKS:
        if gpu_name and pattern.lower() in gpu_name.lower():
            return peak
    return None


def peak_flops(gpu_name: str | None, dtype) -> float | None:
    """Peak FLOP/s of ``gpu_name`` in ``dtype``, or None when either is unknown."""
    peak = gpu_peak(gpu_name)
    return peak.flops.get(dtype_name(dtype)) if peak else None


PEAK_FILE = "peak.json"


def measured_peaks(paths: Iterable[str | os.PathLike]) -> dict[tuple[str, str, int], float]:
    """(machine, dtype, threads) -> FLOP/s from every ``<machine>/peak.json`` under the result folders ``paths``."""
    found = {}
    for folder in (Path(p) for p in paths):
        for path in sorted(folder.rglob(PEAK_FILE)) if folder.is_dir() else []:
            for dtype, by_threads in json.loads(path.read_text()).items():
                for threads, entry in by_threads.items():
                    found[path.parent.name, dtype, int(threads)] = entry["gflops"] * 1e9
    return found


def recorded_peak(out_dir: str | os.PathLike, machine: str | None, device: str, dtype, threads: int) -> dict:
    """The row fields of the CPU peak that holds now for (machine, dtype, threads): ``peak_gflops`` and
    ``peak_kind`` from ``<out_dir>/<machine>/peak.json``, None where none was measured (or on GPUs)."""
    entry = None
    if machine and not str(device).startswith("cuda"):
        try:
            entry = json.loads((Path(out_dir) / machine / PEAK_FILE).read_text()).get(dtype_name(dtype), {}).get(str(threads))
        except (OSError, ValueError):
            entry = None
    return {"peak_gflops": entry["gflops"] if entry else None, "peak_kind": entry.get("kind", "matmul") if entry else None}


def row_peak(row: dict, measured: dict[tuple[str, str, int], float]) -> float | None:
    """The peak FLOP/s a row is compared with: its GPU's published one, else the CPU peak the row recorded when
    measured, else its CPU's measured one in the peak file (same threads)."""
    if str(row.get("device", "")).startswith("cuda"):
        return peak_flops(row.get("device_name"), row.get("dtype"))
    recorded = row.get("peak_gflops")
    if isinstance(recorded, (int, float)) and recorded == recorded and recorded > 0:
        return float(recorded) * 1e9
    try:
        threads = int(row.get("threads"))
    except (TypeError, ValueError):  # missing (None, NaN)
        return None
    return measured.get((row.get("machine"), dtype_name(row.get("dtype")), threads))
