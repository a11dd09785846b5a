"""`sasa-bench report`: tables and plots from result rows into reports/README.md and PNGs."""
from __future__ import annotations

import argparse

from bench.cli import UsageError, report_problems
from bench.report.index import write_report
from bench.report.load import load


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write reports/README.md and plots from result rows",
                                   description="Tables (latency, memory, speed-up, GFLOP/s, fraction of peak) and plots "
                                               "per machine/device/dtype/direction; latest run per machine and case.")
    parser.add_argument("--results", nargs="+", default=["results"], metavar="PATH",
                        help="result files or folders (default: results/)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports/)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    frame = load(args.results, problems=problems)
    report_problems(problems)
    if frame.empty and not frame.attrs.get("profiles"):
        raise UsageError(f"--results: no result rows under {' '.join(args.results)} (run `sasa-bench run` first)")
    readme = write_report(frame, args.out, args.results)
    profiles = len(frame.attrs.get("profiles") or [])
    print(f"wrote {readme} ({len(frame)} rows" + (f", {profiles} profile rows)" if profiles else ")"))
    return 0
