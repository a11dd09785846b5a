"""`sasa-bench run`: measure a preset (--suite) or an explicit grid, append rows under results/."""
from __future__ import annotations

import argparse

import torch

import sasa_impls

from .. import worker
from ..cases import CONV, DIRECTIONS, DTYPES, PRESETS, default_impls, grid, preset
from ..cli import UsageError, comma_choices, comma_ints, parse_device
from ..runner import Settings, results_path, run_cases

# Shape flags of an explicit grid, with their defaults; a preset (--suite) defines these itself.
SHAPE_DEFAULTS = {"k": "7", "channels": "64", "heads": "8", "res": "32", "batch": "1"}
DEFAULT = Settings()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="measure implementations over a preset or a grid of shapes")
    add = parser.add_argument
    add("--suite", help=f"a preset: {', '.join(PRESETS)} (else the grid given by the flags below)")
    add("--impl", help="comma-separated implementations and/or 'conv' (default: every one available here "
                       "except the reference, plus conv)")
    add("--k", help=f"kernel sizes, odd (default {SHAPE_DEFAULTS['k']})")
    add("--channels", help=f"d_in = d_out (default {SHAPE_DEFAULTS['channels']})")
    add("--heads", help=f"attention heads, dividing channels (default {SHAPE_DEFAULTS['heads']})")
    add("--res", help=f"image height = width (default {SHAPE_DEFAULTS['res']})")
    add("--batch", help=f"batch sizes (default {SHAPE_DEFAULTS['batch']}; presets: 1 on cpu, 8 on cuda)")
    add("--dtype", default="float32", help=f"dtypes among {', '.join(DTYPES)} (default float32)")
    add("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    add("--direction", default=",".join(DIRECTIONS), help="fwd and/or fwd+bwd (default both)")
    add("--out", default="results", help="results folder (default results/); rows go to OUT/<machine>/<name>.jsonl")
    add("--name", help="result file name (default: the suite, or 'adhoc')")
    add("--resume", action="store_true", help="skip cases this commit already finished in the result file")
    add("--repeat", type=int, default=1, help="passes over the cases (default 1; 2+ shows the timing noise)")
    add("--timeout", type=float, default=DEFAULT.timeout_s, help=f"seconds per case and per correctness gate (default {DEFAULT.timeout_s:g})")
    add("--warmup", type=int, default=DEFAULT.warmup, help=f"untimed calls before timing (default {DEFAULT.warmup})")
    add("--reps", type=int, default=DEFAULT.reps, help=f"minimum timed calls (default {DEFAULT.reps})")
    add("--min-time", type=float, default=DEFAULT.min_time_s, help=f"minimum total timed seconds per case (default {DEFAULT.min_time_s:g})")
    add("--threads", type=int, default=DEFAULT.threads, help=f"CPU threads, recorded in the rows (default {DEFAULT.threads})")
    add("--memory-limit", type=float, help="cap each case's address space growth, in MiB (RLIMIT_AS)")
    add("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)


def _check_settings(args: argparse.Namespace) -> Settings:
    for flag, value, low in (("repeat", args.repeat, 1), ("reps", args.reps, 1), ("warmup", args.warmup, 0), ("threads", args.threads, 1)):
        if value < low:
            raise UsageError(f"--{flag}: expected an integer >= {low}, got {value}")
    for flag, value in (("timeout", args.timeout), ("memory-limit", args.memory_limit)):
        if value is not None and not value > 0:
            raise UsageError(f"--{flag}: expected a positive number, got {value}")
    if not args.min_time >= 0:
        raise UsageError(f"--min-time: expected a number >= 0, got {args.min_time}")
    limit = int(args.memory_limit * 2**20) if args.memory_limit else None
    return Settings(warmup=args.warmup, reps=args.reps, min_time_s=args.min_time, threads=args.threads,
                    timeout_s=args.timeout, memory_limit_bytes=limit)


def build_cases(args: argparse.Namespace) -> list:
    """The cases the flags ask for; UsageError naming the flag for bad input."""
    device = parse_device(args.device)
    dtypes = comma_choices("dtype", args.dtype, DTYPES)
    directions = comma_choices("direction", args.direction, DIRECTIONS)
    impls = comma_choices("impl", args.impl, sasa_impls.list_impls() + [CONV]) if args.impl else default_impls(device, dtypes[0])
    if args.suite:
        given = [f"--{flag}" for flag in SHAPE_DEFAULTS if getattr(args, flag) is not None and flag != "batch"]
        if given:
            raise UsageError(f"{given[0]}: the preset {args.suite!r} sets the shapes; drop it or use no --suite")
        if args.suite not in PRESETS:
            raise UsageError(f"--suite: unknown preset {args.suite!r}; known: {', '.join(PRESETS)}")
        batches = comma_ints("batch", args.batch) if args.batch else [None]
        if len(batches) > 1:
            raise UsageError(f"--batch: a preset takes one batch size, got {args.batch!r}")
        batch = batches[0]
        return preset(args.suite, device, dtypes, impls, directions, batch)
    shape = {flag: getattr(args, flag) or default for flag, default in SHAPE_DEFAULTS.items()}
    ks, channels, heads = comma_ints("k", shape["k"], odd=True), comma_ints("channels", shape["channels"]), comma_ints("heads", shape["heads"])
    for c in channels:
        for h in heads:
            if c % h:
                raise UsageError(f"--channels: {c} is not divisible by --heads {h}")
    return grid(impls, ks, channels, heads, comma_ints("res", shape["res"]), comma_ints("batch", shape["batch"]), dtypes, [device], directions)


def _gflops(row: dict) -> float | None:
    """Achieved GFLOP/s: 2 x analytic MACs x (1 fwd, 3 fwd+bwd) / latency."""
    if not row.get("latency_ms"):
        return None
    passes = 3 if row["direction"] == "fwd+bwd" else 1
    return 2 * row["macs_analytic"] * passes / (row["latency_ms"] * 1e-3) / 1e9


def _cell(value: float | None, width: int, precision: int) -> str:
    return f"{value:{width}.{precision}f}" if value is not None else f"{'-':>{width}}"


def format_table(rows: list[dict]) -> str:
    """A short fixed-width table of the rows, units in the header."""
    header = (f"{'impl':<14} {'k':>3} {'C':>4} {'res':>4} {'B':>3} {'dtype':<8} {'dir':<7} {'status':<11} "
              f"{'median ms':>10} {'IQR ms':>8} {'peak MiB':>9} {'GMAC':>7} {'GFLOP/s':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = row.get("peak_mem_bytes")
        lines.append(
            f"{row['impl']:<14} {row['k']:>3} {row['channels']:>4} {row['res']:>4} {row['batch']:>3} {row['dtype']:<8} "
            f"{row['direction']:<7} {row['status']:<11} {_cell(row.get('latency_ms'), 10, 3)} "
            f"{_cell(row.get('latency_iqr_ms'), 8, 3)} {_cell(peak / 2**20 if peak is not None else None, 9, 1)} "
            f"{_cell(row['macs_analytic'] / 1e9, 7, 3)} {_cell(_gflops(row), 8, 2)}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    worker.load_plugins(worker.plugin_specs())
    settings = _check_settings(args)
    cases = build_cases(args)
    rows = run_cases(cases, args.out, resume=args.resume, suite=args.suite, progress=not args.quiet,
                     name=args.name, repeat=args.repeat, settings=settings)
    print(format_table(rows))
    print(f"{len(rows)} row(s) appended to {results_path(args.out, args.name or args.suite or 'adhoc')}")
    return 0
