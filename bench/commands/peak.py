"""`sasa-bench peak`: this machine's physical FMA peak per dtype and thread count, for the reports' fraction of peak.

GPUs have published peaks (bench/report/peaks.py); a CPU's depends on its cores, clock and ISA, so it is
measured. The peak is the physical one: the native CPU extension's microbenchmark of independent vector
FMA chains on the widest ISA it is built for (``fma_peak``, csrc/cpu/peak.h), on ``threads`` threads at
once (fp32 and fp64; fp16 and bf16 have no such loop and take the matmul rate, kind "matmul"). Beside it,
as practical references: the best GFLOP/s of square matrix products of a few sizes (the library's
GEMM, which on some CPUs runs narrower code than the machine has) and of Conv2d(128, 128, 3) on
1 x 128 x 32 x 32 (the convolution the claim compares with). Written to ``<results>/<machine>/peak.json``
(one entry per dtype and thread count, with its ``kind``), which `sasa-bench run` copies into each row
and `sasa-bench report` reads for older rows.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .. import measure
from ..cli import check_threads, comma_choices, comma_ints
from ..env import environment, machine_id
from ..report.peaks import PEAK_FILE
from ..runner import Settings
from ..schema import DTYPES

FMA_DTYPES = ("float32", "float64")  # the dtypes fma_peak has a loop for


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("peak", help="measure this CPU's physical FMA peak (and sgemm and conv rates) for the reports")
    parser.add_argument("--out", default="results", help="results folder (default results/); writes OUT/<machine>/peak.json")
    parser.add_argument("--dtype", default="float32", help=f"dtypes among {', '.join(DTYPES)} (default float32)")
    parser.add_argument("--threads", type=int, default=Settings().threads, help="CPU threads (default: the sweeps' default)")
    parser.add_argument("--size", default="512,1024,2048,4096",
                        help="matrix sizes n of the n x n products, comma-separated; the best counts (default 512,1024,2048,4096)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_threads("threads", args.threads)
    path = measure_peaks(args.out, comma_choices("dtype", args.dtype, DTYPES), args.threads, comma_ints("size", args.size))
    print(f"wrote {path}")
    return 0


def fma_peak_gflops(dtype: str, threads: int, seconds: float = 0.3, repeats: int = 5) -> float:
    """The physical FMA peak in GFLOP/s: the best of ``repeats`` runs of the native extension's FMA-chain loop
    (each about ``seconds`` long) on ``threads`` threads at once. ValueError for a dtype without a loop or a
    thread count outside 1 .. os.cpu_count()."""
    from sasa_impls.impls._native_build import cpu_extension

    if dtype not in FMA_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(FMA_DTYPES)}, got {dtype!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= (os.cpu_count() or 1):
        raise ValueError(f"threads: expected an int in 1 .. {os.cpu_count()}, got {threads!r}")
    extension, previous = cpu_extension(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        double, iterations = dtype == "float64", 200_000
        start = time.perf_counter()
        extension.fma_peak(double, threads, iterations)  # warm-up, and how long a run of that many takes
        iterations = max(1000, int(iterations * seconds / max(time.perf_counter() - start, 1e-6)))
        return max(extension.fma_peak(double, threads, iterations) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)


def conv_gflops(dtype: str, settings: measure.TimerSettings) -> float:
    """GFLOP/s of Conv2d(128, 128, 3, padding 1) on 1 x 128 x 32 x 32 in ``dtype`` (a practical reference)."""
    x = torch.randn(1, 128, 32, 32, dtype=getattr(torch, dtype))
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(x.dtype)
    with torch.no_grad():
        timing = measure.time_call(lambda: conv(x), "cpu", settings)
    return 2.0 * 128 * 128 * 9 * 32 * 32 / (timing.median_ms * 1e-3) / 1e9


def measure_peaks(out: str, dtypes: list[str], threads: int, sizes: list[int], min_time_s: float = 1.0) -> Path:
    """Measure each dtype's peak at ``threads`` threads (the physical FMA rate where the extension has a loop
    for it, else the best matmul) with the matmul and conv references (each timed for ``min_time_s``), and
    merge it into the machine's peak file."""
    path = Path(out) / machine_id() / PEAK_FILE
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        peaks = {}
    env = environment()
    settings = measure.TimerSettings(threads=threads, min_time_s=min_time_s, max_time_s=5 * min_time_s)
    for dtype in dtypes:
        by_size = {str(size): measure.matmul_gflops(size, getattr(torch, dtype), "cpu", settings) for size in sizes}
        best = max(by_size, key=by_size.get)
        fma = fma_peak_gflops(dtype, threads, seconds=0.3 * min_time_s) if dtype in FMA_DTYPES else None
        conv = conv_gflops(dtype, settings)
        kind = "fma" if fma is not None else "matmul"
        gflops = fma if fma is not None else by_size[best]
        print(f"{dtype}, {threads} thread(s): peak {gflops:.1f} GFLOP/s ({kind}); references: matmul {by_size[best]:.1f} "
              f"(best of {len(sizes)} sizes: {best} x {best}; " + ", ".join(f"{size}: {g:.1f}" for size, g in by_size.items())
              + f"), Conv2d(128, 128, 3) 32x32 {conv:.1f}")
        peaks.setdefault(dtype, {})[str(threads)] = {"gflops": gflops, "kind": kind, "fma_gflops": fma,
                                                     "matmul_gflops": by_size[best], "size": int(best), "by_size": by_size,
                                                     "conv_gflops": conv, "cpu": env["cpu"],
                                                     "torch": env["torch"], "commit": env["commit"],
                                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(peaks, indent=1, sort_keys=True) + "\n")
    return path
