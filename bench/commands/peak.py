"""`sasa-bench peak`: this machine's practical fp32 peak (a large sgemm), for the reports' fraction of peak.

GPUs have published peaks (bench/report/peaks.py); a CPU's depends on its cores, clock and ISA, so it is
measured: the best GFLOP/s of square matrix products of a few sizes (BLAS reaches its best at a size that
depends on the caches) at the thread count the sweeps use. A tuned kernel (oneDNN's convolutions) can
still beat it: a fraction above 100% says so, it is not clipped. Written to
``<results>/<machine>/peak.json`` (one entry per dtype and thread count), which `sasa-bench report` reads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import measure
from ..cli import UsageError, comma_choices, comma_ints
from ..env import environment, machine_id
from ..report.peaks import PEAK_FILE
from ..runner import Settings
from ..schema import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("peak", help="measure this CPU's peak FLOP/s (the best sgemm of a few sizes) for the reports")
    parser.add_argument("--out", default="results", help="results folder (default results/); writes OUT/<machine>/peak.json")
    parser.add_argument("--dtype", default="float32", help=f"dtypes among {', '.join(DTYPES)} (default float32)")
    parser.add_argument("--threads", type=int, default=Settings().threads, help="CPU threads (default: the sweeps' default)")
    parser.add_argument("--size", default="512,1024,2048,4096",
                        help="matrix sizes n of the n x n products, comma-separated; the best counts (default 512,1024,2048,4096)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise UsageError(f"--threads: expected a positive integer, got {args.threads}")
    path = measure_peaks(args.out, comma_choices("dtype", args.dtype, DTYPES), args.threads, comma_ints("size", args.size))
    print(f"wrote {path}")
    return 0


def measure_peaks(out: str, dtypes: list[str], threads: int, sizes: list[int]) -> Path:
    """Measure each dtype's best matmul GFLOP/s over ``sizes`` at ``threads`` threads and merge it into the
    machine's peak file (with the GFLOP/s of every size)."""
    path = Path(out) / machine_id() / PEAK_FILE
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        peaks = {}
    env = environment()
    settings = measure.TimerSettings(threads=threads, min_time_s=1.0)
    for dtype in dtypes:
        by_size = {str(size): measure.matmul_gflops(size, getattr(torch, dtype), "cpu", settings) for size in sizes}
        best = max(by_size, key=by_size.get)
        print(f"{dtype}, {threads} thread(s): {by_size[best]:.1f} GFLOP/s (best of {len(sizes)} sizes: {best} x {best}; "
              + ", ".join(f"{size}: {gflops:.1f}" for size, gflops in by_size.items()) + ")")
        peaks.setdefault(dtype, {})[str(threads)] = {"gflops": by_size[best], "size": int(best), "by_size": by_size,
                                                     "cpu": env["cpu"],
                                                     "torch": env["torch"], "commit": env["commit"],
                                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(peaks, indent=1, sort_keys=True) + "\n")
    return path
