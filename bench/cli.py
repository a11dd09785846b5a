"""`sasa-bench` command line: one module per subcommand in ``bench/commands/``, listed in COMMANDS.

Each command module defines ``register(subparsers)``, adding its parser with ``set_defaults(run=fn)``;
``fn(args) -> int`` is the exit status. Bad input (a UsageError here, a ValueError or TypeError from the
library) surfaces as one line on stderr and exit status 2; an interrupt as one line and status 130.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# the subcommands, in the order `sasa-bench --help` lists them (module names under bench/commands/)
COMMANDS = ("list_impls", "env", "peak", "run", "report", "claim", "compare", "models")


class UsageError(ValueError):
    """Bad command-line input: reported as one line naming the argument, no traceback."""


def comma_list(flag: str, text: str) -> list[str]:
    """The non-empty items of a comma-separated option value."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{flag}: expected a comma-separated list, got {text!r}")
    return items


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
    except (ValueError, TypeError, FileNotFoundError) as error:  # UsageError and the API's argument errors
        text = " ".join(str(error).splitlines())
        print(f"sasa-bench {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sasa-bench {args.command}: interrupted; finished cases are kept (rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
