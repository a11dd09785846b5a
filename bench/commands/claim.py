"""`sasa-bench claim`: check the paper's "attention k = 19 costs as much as conv k = 3" (d = 128)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cli import UsageError, add_interleave_flags, comma_choices, interleave_settings, report_problems
from bench.report.claim import claim_data, claim_figures, claim_markdown, measured
from bench.report.load import load, rows_frame
from bench.report.plots import save


def register(subparsers) -> None:
    parser = subparsers.add_parser("claim", help="the k=19 vs k=3 cost claim: reports/claim.md (+ --json)",
                                   description="Analytic MACs under three accountings, crossing k, fvcore counts, params "
                                               "and measured latency/memory ratios. Measuring (when there are no "
                                               "measurements yet unless --no-run, or with --measure or --impl) times the "
                                               "claim cases (attention k = 3..19 and conv k = 3, C = 128, 28x28) interleaved "
                                               "with the conv k = 3 in one worker (bench/interleave.py): each ratio is the "
                                               "median of per-round ratios with a bootstrap 95% interval; its rows are "
                                               "appended to <results>/<machine>/claim.jsonl and the report uses that run.")
    parser.add_argument("--results", nargs="+", default=["results"], metavar="PATH", help="result files or folders (default: results/)")
    parser.add_argument("--out", default="reports", help="output folder for claim.md and its plots (default: reports/)")
    for flag, text in (("--json", "print the numbers as JSON"),
                       ("--no-run", "do not run the claim cases when nothing was measured"),
                       ("--measure", "measure the claim cases now, even if results hold some")):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--impl", metavar="LIST", help="measure now, only these implementations (comma list) beside the conv")
    add_interleave_flags(parser, rounds=40, workers=4)  # 4: runs minutes apart then agree (notes of issue 21)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    interleave = interleave_settings(args)
    impls = _impls(args.impl) if args.impl is not None else None
    if args.no_run and (args.measure or impls):
        raise UsageError("--no-run: cannot be combined with --measure or --impl (they measure)")
    existing = args.results if args.no_run else [p for p in args.results if Path(p).exists()]  # --no-run: missing is an error
    problems: list[str] = []
    frame = load(existing, problems=problems) if existing else rows_frame([])
    if args.measure or impls or (not measured(frame) and not args.no_run):
        frame = rows_frame(measure_claim(args.results[0], impls, interleave))
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


def _impls(text: str) -> list[str]:
    import sasa_impls

    from bench.cases import NOT_TIMED_BY_DEFAULT

    return comma_choices("impl", text, [n for n in sasa_impls.list_impls() if n not in NOT_TIMED_BY_DEFAULT])


def claim_pairs(device: str, dtypes, impls: list[str] | None) -> list:
    """(attention case, its conv k = 3 baseline) for every case of the claim preset (k = 3..19, both directions)."""
    from bench.cases import preset
    from bench.report.claim import CONV_K
    from bench.schema import CONV

    cases = preset("claim", device=device, dtypes=dtypes, impls=None if impls is None else [*impls, CONV])
    base = {(c.dtype, c.direction, c.level, c.res, c.batch, c.channels): c for c in cases if c.impl == CONV and c.k == CONV_K}
    return [(c, base[c.dtype, c.direction, c.level, c.res, c.batch, c.channels]) for c in cases if c.impl != CONV]


def measure_claim(results: str, impls: list[str] | None, interleave) -> list[dict]:
    """Measure the claim's cases interleaved on this machine (CUDA if present, else CPU); their rows."""
    import torch

    from bench.interleave import run_interleaved
    from bench.runner import Settings

    out_dir = results if not Path(results).is_file() else str(Path(results).parent)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = ("float32", "bfloat16") if device == "cuda" else ("float32",)
    return run_interleaved(claim_pairs(device, dtypes, impls), out_dir, "claim", Settings(), interleave, suite="claim")
