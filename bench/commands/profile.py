"""`sasa-bench profile`: where each case's time and memory go, stage by stage (bench/profiling/).

Takes the case flags of `sasa-bench run`; each case is gated and profiled in an isolated worker; rows are
appended to OUT/<machine>/profile-<name or suite or "adhoc">.jsonl (their ``profiler`` field tells them
from `run`'s rows), a table per case is printed, or with --json the rows as a JSON list on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import store
from ..cli import UsageError, check_name, check_threads
from ..plugins import load_plugins
from ..profiling import counters
from ..profiling.cuda import needs_gpu
from ..profiling.executor import profile_executor
from ..profiling.task import ProfileOptions
from ..runner import Settings, results_path, run_cases
from ..schema import Case
from .run import add_case_flags, build_cases

# The timer of the un-profiled latency each row compares its profile with (shorter than `run`'s: a profile
# is about shares, and every case also runs its profiled calls and, for fused kernels, the ablation's variants).
TIMER = Settings(warmup=2, reps=5, min_time_s=0.2, max_time_s=2.0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile", help="where each implementation's time and memory go, stage by stage",
        description="Profile cases (the case flags of `sasa-bench run`) with torch.profiler: time, share, GFLOP/s and "
                    "allocations per stage (projections, logits, relative, softmax, aggregate, layout, other), fused "
                    "kernels by ablation; rows to OUT/<machine>/profile-<name>.jsonl.")
    add = parser.add_argument
    add_case_flags(add)
    add("--threads", type=int, default=TIMER.threads, help=f"CPU threads (default {TIMER.threads})")
    add("--timeout", type=float, default=TIMER.timeout_s, help=f"seconds per case and per gate (default {TIMER.timeout_s:g})")
    add("--out", default="results", help="results folder (default results/): rows go to OUT/<machine>/profile-<name>.jsonl")
    add("--name", help="result file name after 'profile-' (default: the suite, or 'adhoc')")
    add("--json", action="store_true", help="print the rows as a JSON list on stdout (no tables, no progress)")
    add("--trace", metavar="DIR", help="write a Chrome/Perfetto trace per case to DIR (the row's `trace`)")
    add("--memory-snapshot", metavar="DIR", help="CUDA: write the caching allocator's history per case to DIR (HTML)")
    add("--ncu", action="store_true", help="CUDA: Nsight Compute metrics of the step (occupancy, DRAM bytes, SM and tensor pipes)")
    add("--counters", action="store_true", help="CPU hardware counters with perf stat, where the machine has a PMU")
    add("--resume", action="store_true", help="skip cases this commit already profiled in the result file")
    add("--allow-concurrent", action="store_true", help="another sasa-bench process measuring here is intended: no warning")
    add("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)


def notes(args: argparse.Namespace) -> list[str]:
    """One line per asked-for extra that cannot run here (the rest of the profile runs)."""
    lines = [needs_gpu(flag, args.device) for flag, asked in (("--ncu", args.ncu), ("--memory-snapshot", args.memory_snapshot)) if asked]
    if args.counters and not args.device.startswith("cuda"):
        lines.append(counters.unavailable())
    return [line for line in lines if line]


def stage_table(row: dict) -> Table:
    """One case's stages: ms, share, GFLOP/s, allocations and method; the totals in the title."""
    title = f"{Case(**{k: row[k] for k in Case.__dataclass_fields__}).label()}: {row['status']}"
    if row.get("profile_total_ms") is not None:
        title += f", profiled {row['profile_total_ms']:.3g} ms/step, un-profiled {row['unprofiled_ms']:.3g} ms"
    table = Table(title=escape(title), show_edge=False, header_style="bold", title_justify="left")
    for header in ("stage", "ms", "share", "GFLOP/s", "alloc MiB", "method"):
        table.add_column(header, justify="left" if header in ("stage", "method") else "right")
    for name, stage in (row.get("stages") or {}).items():
        table.add_row(name, f"{stage['ms']:.3g}", f"{stage['share']:.1%}" if stage["share"] is not None else "-",
                      f"{stage['gflops']:.3g}" if stage.get("gflops") else "-",
                      f"{stage['alloc_bytes'] / 2**20:.3g}" if stage.get("alloc_bytes") is not None else "-",
                      escape(stage["method"]))
    for caption in (row.get("error"), row.get("profile_residual") and f"residual: {row['profile_residual']}",
                    row.get("trace") and f"trace: {row['trace']}"):
        if caption:
            table.add_row("", "", "", "", "", escape(caption))
    return table


def run(args: argparse.Namespace) -> int:
    load_plugins()
    check_threads("threads", args.threads)
    if not args.timeout > 0:
        raise UsageError(f"--timeout: expected a positive number, got {args.timeout}")
    if args.name is not None:
        check_name("name", args.name)
    args.executor = "local"  # build_cases reads it (profiles run on this machine)
    cases = build_cases(args)
    name = f"profile-{args.name or args.suite or 'adhoc'}"
    path = results_path(args.out, name)
    try:
        store.prepare(path)
    except ValueError as error:
        raise UsageError(f"--out: {error}") from None
    for line in notes(args):
        print(f"sasa-bench profile: {line}", file=sys.stderr)
    options = ProfileOptions(trace_dir=args.trace, memory_snapshot_dir=args.memory_snapshot,
                             counters=args.counters and not counters.unavailable(), ncu=args.ncu)
    settings = Settings(warmup=TIMER.warmup, reps=TIMER.reps, min_time_s=TIMER.min_time_s, max_time_s=TIMER.max_time_s,
                        threads=args.threads, timeout_s=args.timeout)
    rows = run_cases(cases, args.out, resume=args.resume, suite=args.suite, progress=not (args.quiet or args.json), name=name,
                     settings=settings, executor=profile_executor(options), allow_concurrent=args.allow_concurrent)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    console = Console(width=200)
    for row in rows:
        console.print(stage_table(row))
        console.print()
    print(f"{len(rows)} row(s) appended to {path}")
    return 0
