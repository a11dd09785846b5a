"""`sasa-bench peak`: this machine's practical fp32 peak (a large sgemm), for the reports' fraction of peak.

GPUs have published peaks (bench/report/peaks.py); a CPU's depends on its cores, clock and ISA, so it is
measured: the GFLOP/s of a large matrix product at the thread count the sweeps use. Written to
``<results>/<machine>/peak.json`` (one entry per dtype and thread count), which `sasa-bench report` reads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import measure
from ..cli import UsageError, comma_choices
from ..env import environment, machine_id
from ..report.peaks import PEAK_FILE
from ..runner import Settings
from ..schema import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("peak", help="measure this CPU's peak FLOP/s (a large sgemm) for the reports")
    parser.add_argument("--out", default="results", help="results folder (default results/); writes OUT/<machine>/peak.json")
    parser.add_argument("--dtype", default="float32", help=f"dtypes among {', '.join(DTYPES)} (default float32)")
    parser.add_argument("--threads", type=int, default=Settings().threads, help="CPU threads (default: the sweeps' default)")
    parser.add_argument("--size", type=int, default=4096, help="matrix size n of the n x n product (default 4096)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("threads", args.threads), ("size", args.size)):
        if value < 1:
            raise UsageError(f"--{flag}: expected a positive integer, got {value}")
    path = measure_peaks(args.out, comma_choices("dtype", args.dtype, DTYPES), args.threads, args.size)
    print(f"wrote {path}")
    return 0


def measure_peaks(out: str, dtypes: list[str], threads: int, size: int) -> Path:
    """Measure each dtype's matmul GFLOP/s at ``threads`` threads and merge them into the machine's peak file."""
    path = Path(out) / machine_id() / PEAK_FILE
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        peaks = {}
    env = environment()
    settings = measure.TimerSettings(threads=threads, min_time_s=1.0)
    for dtype in dtypes:
        gflops = measure.matmul_gflops(size, getattr(torch, dtype), "cpu", settings)
        print(f"{dtype}, {threads} thread(s): {gflops:.1f} GFLOP/s ({size} x {size} matmul)")
        peaks.setdefault(dtype, {})[str(threads)] = {"gflops": gflops, "size": size, "cpu": env["cpu"],
                                                     "torch": env["torch"], "commit": env["commit"],
                                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(peaks, indent=1, sort_keys=True) + "\n")
    return path
