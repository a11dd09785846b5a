"""`sasa-bench claim`: check the paper's "attention k = 19 costs as much as conv k = 3" (d = 128)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cli import report_problems
from bench.report.claim import claim_data, claim_figures, claim_markdown, measured
from bench.report.load import load, rows_frame
from bench.report.plots import save


def register(subparsers) -> None:
    parser = subparsers.add_parser("claim", help="the k=19 vs k=3 cost claim: reports/claim.md (+ --json)",
                                   description="Analytic MACs under three accountings, crossing k, fvcore counts, params "
                                               "and measured latency/memory ratios; runs the claim preset when there "
                                               "are no measurements yet (unless --no-run).")
    parser.add_argument("--results", nargs="+", default=["results"], metavar="PATH", help="result files or folders (default: results/)")
    parser.add_argument("--out", default="reports", help="output folder for claim.md and its plots (default: reports/)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--no-run", action="store_true", help="do not run the claim preset when nothing was measured")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    existing = [p for p in args.results if Path(p).exists()]
    problems: list[str] = []
    frame = load(existing, problems=problems) if existing else rows_frame([])
    if not measured(frame) and not args.no_run:
        frame = load([*existing, measure_claim(args.results[0])], problems=problems)
    report_problems(sorted(set(problems)))
    numbers = claim_data(frame)
    out = Path(args.out)
    files = [save(spec, out) for spec in claim_figures(numbers)]
    (out / "claim.md").write_text(claim_markdown(numbers, files))
    if args.json:
        print(json.dumps(numbers, indent=2, default=str))
    else:
        print("\n".join(numbers["verdicts"]["accountings"] + numbers["verdicts"]["devices"]))
        print(f"wrote {out / 'claim.md'}")
    return 0


def measure_claim(results: str) -> str:
    """Run the claim preset on this machine (CUDA if present, else CPU); returns the folder written."""
    import torch

    from bench.cases import preset
    from bench.runner import run_cases

    out_dir = results if not Path(results).is_file() else str(Path(results).parent)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = ("float32", "bfloat16") if device == "cuda" else ("float32",)
    run_cases(preset("claim", device=device, dtypes=dtypes), out_dir=out_dir, suite="claim")
    return out_dir

