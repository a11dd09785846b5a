"""`sasa-bench env`: the machine fingerprint that every result row carries."""
from __future__ import annotations

import argparse
import json

from ..env import environment, machine_id


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="the machine fingerprint result rows carry")
    parser.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    fingerprint = {"machine": machine_id(), **environment()}
    if args.json:
        print(json.dumps(fingerprint, indent=2, default=str))
    else:
        for key, value in fingerprint.items():
            print(f"{key:<14} {value}")
    return 0
