"""`sasa-bench` command line: one module per subcommand in ``bench/commands/``, listed in COMMANDS.

Each command module defines ``register(subparsers)``, adding its parser with ``set_defaults(run=fn)``;
``fn(args) -> int`` is the exit status. Bad input (a UsageError here, a ValueError or TypeError from the
library) surfaces as one line on stderr and exit status 2; a full disk (bench.store.DiskFull) as one line
and status 1; an interrupt as one line and status 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .store import DiskFull

# the subcommands, in the order `sasa-bench --help` lists them (module names under bench/commands/)
COMMANDS = ("list_impls", "env", "peak", "run", "profile", "report", "claim", "compare", "models")


class UsageError(ValueError):
    """Bad command-line input: reported as one line naming the argument, no traceback."""


def comma_list(flag: str, text: str) -> list[str]:
    """The items of a comma-separated option value; an empty value or item ("", "3,,7") is refused."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise UsageError(f"--{flag}: expected a comma-separated list without empty items, got {text!r}")
    return items


def check_name(flag: str, text: str) -> str:
    """A file name given on the command line (--name): no path separator and no "." / "..", so what is
    written stays inside its folder."""
    if not text or text in (".", "..") or "/" in text or (os.altsep and os.altsep in text) or os.sep in text:
        raise UsageError(f"--{flag}: expected a plain file name (no path separators, not . or ..), got {text!r}")
    return text


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(flag: str, threads: int) -> int:
    """A thread count: at least 1 and at most the CPUs this process may use (more would time the OS
    scheduler's time slicing, not the implementation)."""
    if threads < 1:
        raise UsageError(f"--{flag}: expected a positive integer, got {threads}")
    if threads > usable_cpus():
        raise UsageError(f"--{flag}: {threads} threads but only {usable_cpus()} CPU(s) are usable here")
    return threads


def comma_ints(flag: str, text: str, odd: bool = False) -> list[int]:
    """Positive integers of a comma-separated option value (odd ones only when ``odd``)."""
    values = []
    for item in comma_list(flag, text):
        if not item.isdigit() or int(item) < 1:
            raise UsageError(f"--{flag}: expected positive integers, got {item!r}")
        if odd and int(item) % 2 == 0:
            raise UsageError(f"--{flag}: kernel sizes must be odd (the window is centred), got {item}")
        values.append(int(item))
    return values


def comma_choices(flag: str, text: str, allowed) -> list:
    """Items of a comma-separated option value, each one of ``allowed`` (ints when ``allowed`` holds ints)."""
    items = comma_list(flag, text)
    by_text = {str(a): a for a in allowed}
    for item in items:
        if item not in by_text:
            raise UsageError(f"--{flag}: unknown value {item!r}; expected one of {', '.join(by_text)}")
    return [by_text[item] for item in items]


def parse_device(text: str) -> str:
    """``--device``: cpu or cuda[:N], and present on this machine."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {text} is not available here (torch {torch.__version__}, no usable GPU)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device: {text} does not exist ({torch.cuda.device_count()} GPU(s) here)")
    return text


def write_output(flag: str, path: str | os.PathLike, text: str) -> None:
    """Write an output file a flag names; UsageError naming the flag when it cannot be written."""
    try:
        Path(path).write_text(text)
    except OSError as error:
        raise UsageError(f"--{flag}: cannot write {path}: {error.strerror or error}") from None


def add_interleave_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, rounds: int, workers: int = 2) -> None:
    """The flags of an interleaved measurement (bench/interleave.py): --rounds, --workers and --block."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    parser.add_argument("--workers", type=int, default=workers,
                        help="fresh worker processes the rounds are shared over, one after another; the interval then "
                             f"holds what differs between processes (default {workers})")
    parser.add_argument("--block", type=float, default=0.05, metavar="SECONDS",
                        help="seconds of calls of each case per round (default 0.05)")


def interleave_settings(args: argparse.Namespace):
    """The InterleaveSettings of :func:`add_interleave_flags`' flags (its errors name the flag)."""
    from .interleave import InterleaveSettings

    try:
        return InterleaveSettings(rounds=args.rounds, block_s=args.block, workers=args.workers)
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def report_problems(problems: list[str]) -> None:
    """One stderr line per result line that could not be read (bench.store.read_rows): never silently dropped."""
    for problem in problems:
        print(f"sasa-bench: warning: skipped a line that is not a result row: {problem}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasa-bench", description="Benchmark stand-alone self-attention implementations.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"bench.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except DiskFull as error:  # the sweep stopped; what it finished is on disk
        print(f"sasa-bench {args.command}: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as error:  # UsageError and the API's argument errors
        text = " ".join(str(error).splitlines())
        print(f"sasa-bench {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sasa-bench {args.command}: interrupted; finished cases are kept (rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
