"""`sasa-bench list`: the implementations, their semantics, and whether each runs here."""
from __future__ import annotations

import argparse

import torch

import sasa_impls

from ..schema import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="implementations and whether each is available here")
    parser.add_argument("--device", default=None, help="device to check (default: cpu, and cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype to check (default float32)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtype = getattr(torch, args.dtype)
    print(f"{'impl':<16} {'borders':<8} {'rel':<4} {'device':<7} {'available':<10} description / reason")
    for name in sasa_impls.list_impls():
        impl = sasa_impls.get_impl(name)
        for device in devices:
            try:
                ok, reason = impl.available(torch.device(device), dtype)
            except RuntimeError as error:  # e.g. a malformed device string
                raise ValueError(f"--device: {error}") from None
            rel = "yes" if impl.supports_rel else "no"
            print(f"{name:<16} {impl.borders:<8} {rel:<4} {device:<7} {('yes' if ok else 'no'):<10} {impl.description if ok else reason}")
        for option, spec in impl.options.items():
            print(f"{'':<48} option {option}: {spec.doc} (--impl-option {option}=...)")
    print(f"{'conv':<16} {'-':<8} {'-':<4} {'any':<7} {'yes':<10} nn.Conv2d k x k, no bias (the baseline)")
    return 0
