"""`sasa-bench compare A B`: two result sets side by side per case; --fail-above for CI."""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.cli import UsageError, report_problems
from bench.report.compare import compare, compare_markdown, failures, load_side, parse_fail_above


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare two result sets (files, folders, commits or machines) case by case",
        description="A and B: a result file or folder, or selectors on --results: commit=SHA (prefix), machine=ID, "
                    "run=RUN_ID, suite=NAME, joined by commas. Ratio = B / A latency. A change is beyond noise when "
                    "[median - IQR, median + IQR] of A and B do not overlap and |ratio - 1| > --threshold.")
    parser.add_argument("a", metavar="A", help="the baseline (old) result set")
    parser.add_argument("b", metavar="B", help="the new result set")
    parser.add_argument("--results", default="results", help="folder the selectors apply to (default: results/)")
    parser.add_argument("--threshold", type=float, default=0.05, help="smallest relative change that counts (default 0.05)")
    parser.add_argument("--fail-above", metavar="X",
                        help="exit 1 when a case slowed down beyond noise by more than X, or stopped running (ok -> oom, "
                             "error...). X: a fraction (0.1), a percentage (10%%) or a ratio (1.1x): all mean 10%% slower")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.threshold >= 0:
        raise UsageError(f"--threshold: expected a fraction >= 0, got {args.threshold}")
    limit = parse_fail_above(args.fail_above) if args.fail_above is not None else None
    problems: list[str] = []
    sides = [load_side(spec, args.results, side, problems) for spec, side in ((args.a, "A"), (args.b, "B"))]
    report_problems(problems)
    entries = compare(*sides, args.threshold)
    table = compare_markdown(entries, args.a, args.b)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    marked = sum(bool(e["mark"]) for e in entries)
    print(f"\n{len(entries)} cases compared, {marked} changed beyond noise")
    if limit is None:
        return 0
    failed = failures(entries, limit)
    for entry in failed:
        print(f"FAIL: {entry['impl']} k={entry['k']} C={entry['channels']} {entry['res']}px {entry['dtype']} "
              f"{entry['device']} {entry['direction']}: " + (f"{entry['ratio']:.3f} x" if entry["ratio"] else entry["mark"]))
    return 1 if failed else 0
