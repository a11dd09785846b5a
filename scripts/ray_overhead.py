"""What a sweep on Ray costs beside the local runner, and whether the two measure the same times.

One tiny CPU sweep (12 cases), measured two ways, ``--passes`` times each:
1. Wall time: whole sweeps, alternately through the local runner and through the Ray executor on a local Ray
   runtime started and stopped with each sweep (as ``sasa-bench run --executor ray`` does), each sweep with a
   fresh worker forkserver. Per case: all-in (the sweep's wall time / its cases), steady (between the first
   and the last row: what each further case costs); and the fixed costs: until the first row, after the last.
2. Timings: one Ray runtime kept up, every case measured by the local runner and then on Ray, back to back, so
   both see the same moment of this machine's load. Per case: both medians (the median over the passes of each
   row's median), IQRs (likewise) and the range of the passes' medians, and whether they agree: their IQR
   bands (median +- IQR / 2) overlap, their ranges over the passes overlap. The same IQR test between two
   passes of one executor says how often it fails when nothing differs but the moment (the machine's noise).
With ``--threads`` = ``--ray-cpus`` (default 1 and 1), Ray runs one case at a time, as the local runner does.

    python scripts/ray_overhead.py                                  # 3 passes, one case at a time
    python scripts/ray_overhead.py --threads 1 --ray-cpus 2         # Ray runs two cases side by side
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.cases import grid
from bench.ray_executor import ray_executor, start_local_runtime
from bench.runner import Executor, Settings, measure_locally, run_cases, stop_workers
from bench.schema import Case

CASES = grid(["unfold", "im2col_einsum", "conv"], [3, 7], [32], [4], [16], [1], ["float32"], ["cpu"], ["fwd", "fwd+bwd"])


def stamped(executor: Executor, stamps: list[float]) -> Executor:
    """``executor``, noting when each row reaches the driver."""
    def execute(todo, settings, plugins, started):
        for item in executor(todo, settings, plugins, started):
            stamps.append(time.monotonic())
            yield item
    return execute


def sweep_walls(on_ray: bool, settings: Settings, ray_cpus: int) -> dict:
    """Wall times in seconds of one sweep over CASES, from a fresh forkserver (and Ray runtime)."""
    import ray

    stop_workers()
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        start = time.monotonic()
        if on_ray:
            start_local_runtime(cpus=ray_cpus)
        try:
            rows = run_cases(CASES, out, resume=False, progress=False, settings=settings,
                             executor=stamped(ray_executor() if on_ray else measure_locally, stamps))
        finally:
            if on_ray:
                ray.shutdown()
        end = time.monotonic()
    return {"all-in": (end - start) / len(rows), "steady": (stamps[-1] - stamps[0]) / (len(rows) - 1),
            "until the first row": stamps[0] - start, "after the last row": end - stamps[-1]}


def timing(case: Case, executor: Executor, settings: Settings) -> tuple[float, float]:
    """(median, IQR) in ms of one measurement of ``case``."""
    with tempfile.TemporaryDirectory() as out:
        [row] = run_cases([case], out, resume=False, progress=False, settings=settings, executor=executor)
    return row["latency_ms"], row["latency_iqr_ms"]


def bands_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """The IQR bands (median +- IQR / 2) of two (median, IQR) overlap."""
    return abs(a[0] - b[0]) <= (a[1] + b[1]) / 2


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3, help="passes of each part (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per case (default 1)")
    parser.add_argument("--ray-cpus", type=int, default=1, help="CPUs of the local Ray runtime (default 1)")
    parser.add_argument("--min-time", type=float, default=0.2, help="minimum timed seconds per case (default 0.2)")
    parser.add_argument("--max-time", type=float, default=1.0, help="timed seconds per case at most (default 1)")
    args = parser.parse_args()
    if args.passes < 2:
        parser.error("--passes: at least 2 (the noise is the spread between passes)")
    settings = Settings(min_time_s=args.min_time, max_time_s=args.max_time, threads=args.threads)
    print(f"{len(CASES)} cases, {args.passes} passes, {args.threads} thread(s) per case, Ray CPUs {args.ray_cpus}, "
          f"load average {os.getloadavg()}")

    walls: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(args.passes):
        for name in walls:
            walls[name].append(sweep_walls(name == "ray", settings, args.ray_cpus))
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in walls[name][-1].items()), flush=True)

    import ray  # an optional dependency: imported where it is needed

    executors = {"local": measure_locally, "ray": ray_executor()}
    measured: dict[Case, dict[str, list[tuple[float, float]]]] = {case: {"local": [], "ray": []} for case in CASES}
    start_local_runtime(cpus=args.ray_cpus)
    try:
        for _ in range(args.passes):
            for case in CASES:
                for name, executor in executors.items():
                    measured[case][name].append(timing(case, executor, settings))
            print("  timings: one pass done", flush=True)
    finally:
        ray.shutdown()
    print(f"load average after: {os.getloadavg()}\n")

    print("| executor | " + " | ".join(f"{k} (s)" for k in walls["local"][0]) + " |\n|---|---|---|---|---|")
    for name, passes in walls.items():
        print(f"| {name} | " + " | ".join(spread([p[k] for p in passes]) for k in passes[0]) + " |")
    print("\n(per case: the median of the passes, min-max in brackets)\n")

    print("| case | local ms: median (IQR) [passes] | ray ms: median (IQR) [passes] | ray / local | IQR bands overlap "
          "| pass ranges overlap |\n|---|---|---|---|---|---|")
    agree = {"ray vs local": 0, "ranges": 0, "local vs local": 0, "ray vs ray": 0}
    for case, per in measured.items():
        summary = {name: tuple(statistics.median(t[i] for t in runs) for i in (0, 1)) for name, runs in per.items()}
        spans = {name: (min(m for m, _ in runs), max(m for m, _ in runs)) for name, runs in per.items()}
        overlap = bands_overlap(summary["local"], summary["ray"])
        ranges = spans["local"][0] <= spans["ray"][1] and spans["ray"][0] <= spans["local"][1]
        agree["ray vs local"] += overlap
        agree["ranges"] += ranges
        agree["local vs local"] += bands_overlap(*per["local"][:2])
        agree["ray vs ray"] += bands_overlap(*per["ray"][:2])
        cells = [f"{summary[n][0]:.3g} ({summary[n][1]:.2g}) [{spans[n][0]:.3g}-{spans[n][1]:.3g}]" for n in ("local", "ray")]
        print(f"| {case.label()} | {cells[0]} | {cells[1]} | {summary['ray'][0] / summary['local'][0]:.2f} "
              f"| {'yes' if overlap else 'no'} | {'yes' if ranges else 'no'} |")
    n = len(CASES)
    print(f"\nIQR bands overlap: ray vs local {agree['ray vs local']}/{n}; between the first two passes of one "
          f"executor: local {agree['local vs local']}/{n}, ray {agree['ray vs ray']}/{n}. "
          f"Ranges over the passes overlap: {agree['ranges']}/{n}.")


if __name__ == "__main__":
    main()
