"""GPU-only profiling: the CUDA caching allocator's history (``--memory-snapshot``) and Nsight Compute (``--ncu``).

Without a CUDA device each says so in one line (:func:`needs_gpu`) and the rest of the profile runs. Written
without a GPU to run it: validated where one exists (the GPU issue runs it).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..schema import Case

NVTX_RANGE = "sasa_step"
NCU_METRICS = {
    "achieved_occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "dram_bytes": "dram__bytes.sum",
    "sm_throughput_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor_pipe_pct": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "duration_ns": "gpu__time_duration.sum",
}


def needs_gpu(flag: str, device: str) -> str:
    """The one line a GPU-only flag prints on a case that is not on CUDA ("" on CUDA)."""
    return "" if device.startswith("cuda") else f"{flag}: needs a CUDA device (this case runs on {device}); skipped"


def memory_snapshot(fn: Callable[[], object], path: Path) -> str:
    """Run ``fn`` once with the allocator's history recorded; write torch's HTML view of it to ``path``."""
    import torch
    from torch.cuda._memory_viz import trace_plot

    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    path.write_text(trace_plot(snapshot))
    return str(path)


def ncu_metrics(case: Case, timeout_s: float) -> dict:
    """Nsight Compute's metrics of the case's step (``--clock-control none``, only the kernels inside the NVTX
    range around one step), summed over the step's kernels (occupancy and throughputs: duration-weighted means)."""
    ncu = shutil.which("ncu")
    if ncu is None:
        return {"note": "--ncu: Nsight Compute (ncu) is not on PATH; skipped"}
    command = [ncu, "--clock-control", "none", "--nvtx", "--nvtx-include", f"{NVTX_RANGE}/", "--csv", "--page", "raw",
               "--metrics", ",".join(NCU_METRICS.values()), sys.executable, "-m", "bench.profiling.cuda", json.dumps(asdict(case))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=os.environ)
    if done.returncode != 0:
        return {"note": f"--ncu: ncu exited with {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:300]}"}
    return summarise(done.stdout)


def summarise(text: str) -> dict:
    """ncu's raw CSV (one row per kernel) as the row's ``counters``: kernels, DRAM bytes, duration, and the
    duration-weighted occupancy and throughputs."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = [r for r in csv.DictReader(io.StringIO("\n".join(lines))) if r.get(NCU_METRICS["duration_ns"], "").replace(".", "", 1).isdigit()]
    if not rows:
        return {"note": "--ncu: no kernel inside the NVTX range was profiled"}
    number = lambda r, key: float(r[NCU_METRICS[key]].replace(",", ""))  # noqa: E731
    duration = sum(number(r, "duration_ns") for r in rows)
    out = {"source": "ncu", "kernels": len(rows), "duration_ns": duration, "dram_bytes": sum(number(r, "dram_bytes") for r in rows)}
    for key in ("achieved_occupancy", "sm_throughput_pct", "tensor_pipe_pct"):
        out[key] = sum(number(r, key) * number(r, "duration_ns") for r in rows) / duration if duration else None
    return out


def _main(case_json: str) -> None:
    """Under ncu: build the case, warm up, then one step inside the NVTX range."""
    import torch

    from .. import pipeline

    case = Case(**json.loads(case_json))
    fn = pipeline.step(pipeline.build(case))
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(NVTX_RANGE)
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    _main(sys.argv[1])
