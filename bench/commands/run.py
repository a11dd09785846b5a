"""`sasa-bench run`: measure a preset (--suite) or an explicit grid, append rows under results/."""
from __future__ import annotations

import argparse
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import sasa_impls

from .. import store
from ..cases import PRESETS, RELATIVE_MODES, default_impls, grid, preset
from ..cli import UsageError, check_name, check_threads, comma_choices, comma_ints, comma_list, parse_device
from ..plugins import load_plugins
from ..ray_executor import cluster_device, ray_executor
from ..runner import Executor, Settings, measure_locally, results_path, run_cases
from ..schema import CONV, DIRECTIONS, DTYPES, LEVELS, series

# Shape flags of an explicit grid, with their defaults; a preset (--suite) defines these itself.
SHAPE_DEFAULTS = {"k": "7", "channels": "64", "heads": "8", "res": "32", "batch": "1"}
DEFAULT = Settings()


def add_case_flags(add: Callable[..., object]) -> None:
    """The flags that choose cases (a preset or a grid; read by :func:`build_cases`), for run and profile."""
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
    add("--level", default="layer", help="layer (SASA2d or the conv module) and/or op (the bare op on q, k, v) "
                                         "(default layer)")
    add("--relative", default="auto", help="auto (relative logits where the implementation has them), yes, no "
                                           "(content-only); comma-separated to measure several (default auto)")
    add("--impl-option", action="append", default=[], metavar="KEY=V1[,V2...]",
        help="an implementation option, e.g. block=4,8 (memory_blocks) or tile=4x8 (triton); each value is a "
             "case of the implementations that take KEY (`sasa-bench list` shows them); repeatable")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="measure implementations over a preset or a grid of shapes")
    add = parser.add_argument
    add_case_flags(add)
    add("--out", default="results", help="results folder (default results/); rows go to OUT/<machine>/<name>.jsonl")
    add("--name", help="result file name (default: the suite, or 'adhoc')")
    add("--resume", action="store_true", help="skip cases this commit already finished in the result file")
    add("--repeat", type=int, default=1, help="passes over the cases (default 1; 2+ shows the timing noise)")
    add("--timeout", type=float, default=DEFAULT.timeout_s, help=f"seconds per case and per correctness gate (default {DEFAULT.timeout_s:g})")
    add("--warmup", type=int, default=DEFAULT.warmup, help=f"untimed calls before timing (default {DEFAULT.warmup})")
    add("--reps", type=int, default=DEFAULT.reps, help=f"time at least this many calls' worth (default {DEFAULT.reps})")
    add("--min-time", type=float, default=DEFAULT.min_time_s, help=f"minimum timed seconds per case (default {DEFAULT.min_time_s:g})")
    add("--max-time", type=float, default=DEFAULT.max_time_s, help=f"timed seconds per case at most, confident or not (default {DEFAULT.max_time_s:g})")
    add("--confidence", type=float, default=DEFAULT.confidence,
        help=f"time until IQR / median is below this (default {DEFAULT.confidence:g}); rows record whether it was")
    add("--threads", type=int, default=DEFAULT.threads, help=f"CPU threads, recorded in the rows (default {DEFAULT.threads})")
    add("--memory-limit", type=float, help="cap each case's address space growth, in MiB (RLIMIT_AS)")
    add("--quiet", action="store_true", help="no progress lines")
    add("--allow-concurrent", action="store_true",
        help="another sasa-bench run measuring on this machine is intended: no warning (rows still record the load)")
    add("--executor", choices=("local", "ray"), default="local",
        help="local: one case after another on this machine (default); ray: each case a Ray task on a Ray "
             "cluster, one GPU or --threads CPUs each (needs pip install -e '.[distributed]')")
    add("--ray-address", help="with --executor ray: the Ray cluster to connect to (default $RAY_ADDRESS; "
                              "neither: a local Ray runtime for this sweep)")
    parser.set_defaults(run=run)


def check_settings(args: argparse.Namespace) -> Settings:
    """The measurement settings the flags ask for; UsageError naming the flag for bad input."""
    for flag, value, low in (("repeat", args.repeat, 1), ("reps", args.reps, 1), ("warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"--{flag}: expected an integer >= {low}, got {value}")
    check_threads("threads", args.threads)
    for flag, value in (("timeout", args.timeout), ("memory-limit", args.memory_limit), ("max-time", args.max_time),
                        ("confidence", args.confidence)):
        if value is not None and not value > 0:
            raise UsageError(f"--{flag}: expected a positive number, got {value}")
    if not args.min_time >= 0:
        raise UsageError(f"--min-time: expected a number >= 0, got {args.min_time}")
    if args.min_time > args.max_time:
        raise UsageError(f"--min-time: {args.min_time:g} s is more than --max-time {args.max_time:g} s")
    limit = int(args.memory_limit * 2**20) if args.memory_limit else None
    return Settings(warmup=args.warmup, reps=args.reps, min_time_s=args.min_time, max_time_s=args.max_time,
                    confidence=args.confidence, threads=args.threads, timeout_s=args.timeout, memory_limit_bytes=limit)


def impl_options(texts: list[str], impls: list[str]) -> dict[str, list[str]]:
    """--impl-option KEY=V1,V2 flags as {KEY: [V1, V2]}, each value checked by an implementation taking KEY."""
    options: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--impl-option: expected KEY=VALUE[,VALUE...], got {text!r}")
        takers = [name for name in impls if name != CONV and key in sasa_impls.get_impl(name).options]
        if not takers:
            offered = {f"{name}: {', '.join(sasa_impls.get_impl(name).options)}" for name in impls
                       if name != CONV and sasa_impls.get_impl(name).options}
            raise UsageError(f"--impl-option: no selected implementation takes {key!r} "
                             f"({'; '.join(sorted(offered)) or 'none of them takes options'})")
        options[key] = comma_list("impl-option", values)
        for name in takers:
            for value in options[key]:
                try:
                    sasa_impls.get_impl(name).parse_options({key: value})
                except ValueError as error:
                    raise UsageError(f"--impl-option: {error}") from None
    return options


def build_cases(args: argparse.Namespace) -> list:
    """The cases the flags ask for; UsageError naming the flag for bad input."""
    device = cluster_device(args.device) if args.executor == "ray" else parse_device(args.device)
    dtypes = comma_choices("dtype", args.dtype, DTYPES)
    directions = comma_choices("direction", args.direction, DIRECTIONS)
    impls = (comma_choices("impl", args.impl, sasa_impls.list_impls() + [CONV]) if args.impl is not None
             else default_impls(device, dtypes[0]))
    more = {"levels": comma_choices("level", args.level, LEVELS), "relative": comma_choices("relative", args.relative, RELATIVE_MODES),
            "options": impl_options(args.impl_option, impls)}
    if args.suite:
        given = [f"--{flag}" for flag in SHAPE_DEFAULTS if getattr(args, flag) is not None and flag != "batch"]
        if given:
            raise UsageError(f"{given[0]}: the preset {args.suite!r} sets the shapes; drop it or use no --suite")
        if args.suite not in PRESETS:
            raise UsageError(f"--suite: unknown preset {args.suite!r}; known: {', '.join(PRESETS)}")
        batches = comma_ints("batch", args.batch) if args.batch else [None]
        if len(batches) > 1:
            raise UsageError(f"--batch: a preset takes one batch size, got {args.batch!r}")
        return preset(args.suite, device, dtypes, impls, directions, batches[0], **more)
    shape = {flag: getattr(args, flag) or default for flag, default in SHAPE_DEFAULTS.items()}
    ks, channels, heads = comma_ints("k", shape["k"], odd=True), comma_ints("channels", shape["channels"]), comma_ints("heads", shape["heads"])
    for c in channels:
        for h in heads:
            if c % h:
                raise UsageError(f"--channels: {c} is not divisible by --heads {h}")
    return grid(impls, ks, channels, heads, comma_ints("res", shape["res"]), comma_ints("batch", shape["batch"]), dtypes,
                [device], directions, **more)


def choose_executor(args: argparse.Namespace) -> Executor:
    """The executor --executor names; UsageError when Ray is asked for and not installed."""
    if args.executor == "local":
        if args.ray_address:
            raise UsageError("--ray-address: only with --executor ray")
        return measure_locally
    try:
        return ray_executor(args.ray_address)
    except ImportError as error:
        raise UsageError(f"--executor ray: {error}") from None


def _cell(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}g}"


def summary_table(rows: list[dict]) -> Table:
    """The rows as a terminal table, units in the header."""
    table = Table(show_edge=False, header_style="bold")
    for header in ("impl", "k", "C", "res", "B", "dtype", "dir", "level", "status", "median ms", "IQR ms", "peak MiB", "GMAC", "GFLOP/s"):
        table.add_column(header, justify="left" if header in ("impl", "dtype", "dir", "level", "status") else "right")
    for row in rows:
        table.add_row(escape(series(row)), str(row["k"]),
                      str(row["channels"]), str(row["res"]), str(row["batch"]), row["dtype"], row["direction"], row["level"],
                      row["status"] + ("" if row.get("latency_confident") in (None, True) else " (noisy)"),
                      _cell(row.get("latency_ms")), _cell(row.get("latency_iqr_ms")), _cell(row.get("peak_mem_bytes"), 2**-20),
                      _cell(row["macs_analytic"], 1e-9), _cell(row.get("gflops")))
    return table


def run(args: argparse.Namespace) -> int:
    load_plugins()
    settings = check_settings(args)
    if args.name is not None:
        check_name("name", args.name)
    executor = choose_executor(args)
    cases = build_cases(args)
    path = results_path(args.out, args.name or args.suite or "adhoc")
    try:
        store.prepare(path)
    except ValueError as error:
        raise UsageError(f"--out: {error}") from None
    rows = run_cases(cases, args.out, resume=args.resume, suite=args.suite, progress=not args.quiet,
                     name=args.name, repeat=args.repeat, settings=settings, executor=executor,
                     allow_concurrent=args.allow_concurrent)
    Console(width=250).print(summary_table(rows))
    print(f"{len(rows)} row(s) appended to {path}")
    return 0
