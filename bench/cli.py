"""`sasa-bench` command line: subcommands are discovered from ``bench/commands/``.

Each command module defines ``register(subparsers)``, adding its parser with ``set_defaults(run=fn)``;
``fn(args) -> int`` is the exit status. Bad input surfaces as one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


class UsageError(ValueError):
    """Bad command-line input: reported as one line naming the argument, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasa-bench", description="Benchmark stand-alone self-attention implementations.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{module.name}").register(subparsers)
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
        print(f"sasa-bench {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sasa-bench {args.command}: interrupted; finished cases are kept (rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
