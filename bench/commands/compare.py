"""`sasa-bench compare A B`: two result sets side by side per case; --fail-above for CI."""
from __future__ import annotations

import argparse

from bench.cli import (UsageError, add_interleave_flags, comma_choices, interleave_settings, parse_device, report_problems,
                       write_output)
from bench.report.compare import (compare, compare_markdown, failures, interleaved_entries, interleaved_markdown, load_side,
                                  parse_fail_above)
from bench.report.load import provenance


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
    interleaved = parser.add_argument_group(
        "interleaved", "--interleaved: A and B are implementation variants (IMPL or IMPL:key=value,...), measured now "
        "on this machine on the cases of --suite, each A case and its B twin timed in alternating rounds in one worker "
        "(bench/interleave.py). Ratio = median over rounds of B / A with a bootstrap 95% interval; beyond noise when "
        "the interval excludes 1 and |ratio - 1| > --threshold. (Two commits cannot share a process: to compare "
        "commits, compare their stored rows, or check each commit out and compare variants interleaved there.)")
    interleaved.add_argument("--interleaved", action="store_true", help="measure A and B now, interleaved")
    interleaved.add_argument("--suite", default="quick", help="preset whose cases are measured (default: quick)")
    interleaved.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    interleaved.add_argument("--dtype", default="float32", help="dtype of the cases (default: float32)")
    interleaved.add_argument("--direction", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd (default: both)")
    add_interleave_flags(interleaved, rounds=30)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.threshold >= 0:
        raise UsageError(f"--threshold: expected a fraction >= 0, got {args.threshold}")
    limit = parse_fail_above(args.fail_above) if args.fail_above is not None else None
    if args.interleaved:
        return run_interleaved(args, limit)
    problems: list[str] = []
    sides = [load_side(spec, args.results, side, problems) for spec, side in ((args.a, "A"), (args.b, "B"))]
    report_problems(problems)
    entries = compare(*sides, args.threshold)
    table = "\n\n".join([compare_markdown(entries, args.a, args.b),
                          *(f"{name}: {provenance(side.to_dict('records'))}" for name, side in zip("AB", sides))])
    print(table)
    if args.out:
        write_output("out", args.out, table + "\n")
    marked = sum(bool(e["mark"]) for e in entries)
    print(f"\n{len(entries)} cases compared, {marked} changed beyond noise")
    if limit is None:
        return 0
    failed = failures(entries, limit)
    for entry in failed:
        print(f"FAIL: {entry['impl']} k={entry['k']} C={entry['channels']} {entry['res']}px {entry['dtype']} "
              f"{entry['device']} {entry['direction']}: " + (f"{entry['ratio']:.3f} x" if entry["ratio"] else entry["mark"]))
    return 1 if failed else 0


def variant(text: str, name: str) -> tuple[str, str]:
    """'IMPL' or 'IMPL:key=value,...' -> (impl, canonical options text); UsageError naming A or B."""
    import sasa_impls
    from sasa_impls.registry import options_text

    from bench.schema import CONV

    impl, _, options = text.partition(":")
    if impl != CONV and impl not in sasa_impls.list_impls():
        raise UsageError(f"{name}: with --interleaved, expected an implementation ({', '.join(sasa_impls.list_impls())}, "
                         f"{CONV}) with optional :key=value options, got {text!r}")
    if impl == CONV:
        return impl, ""
    return impl, options_text(sasa_impls.get_impl(impl).parse_options(options))


def run_interleaved(args: argparse.Namespace, limit: float | None) -> int:
    """`compare --interleaved A B`: B's variant against A's on every case of --suite, measured now."""
    from dataclasses import replace

    from bench.cases import preset
    from bench.interleave import run_interleaved as measure
    from bench.runner import Settings
    from bench.schema import DIRECTIONS, DTYPES

    (impl_a, options_a), (impl_b, options_b) = variant(args.a, "A"), variant(args.b, "B")
    dtype = comma_choices("dtype", args.dtype, DTYPES)[0]
    directions = comma_choices("direction", args.direction, DIRECTIONS)
    settings = interleave_settings(args)
    cases = [replace(c, impl_options=options_a)
             for c in preset(args.suite, parse_device(args.device), (dtype,), [impl_a], directions)]
    pairs = [(replace(c, impl=impl_b, impl_options=options_b), c) for c in cases]
    rows = {_key(row): row for row in measure(pairs, None, "compare", Settings(), settings)}
    entries = interleaved_entries([(rows[_key(a.__dict__)], rows[_key(b.__dict__)]) for b, a in pairs], args.threshold)
    table = interleaved_markdown(entries) + "\n\n" + provenance(list(rows.values()))
    print(table)
    if args.out:
        write_output("out", args.out, table + "\n")
    print(f"\n{len(entries)} cases compared interleaved, {sum(bool(e['mark']) for e in entries)} changed beyond noise")
    failed = failures(entries, limit) if limit is not None else []
    for entry in failed:
        print(f"FAIL: k={entry['k']} C={entry['channels']} {entry['res']}px {entry['direction']}: "
              + (f"{entry['ratio']:.3f} x" if entry["ratio"] else entry["mark"]))
    return 1 if failed else 0


def _key(fields: dict) -> tuple:
    from bench.schema import CASE_FIELDS

    return tuple(fields[name] for name in CASE_FIELDS)
