"""GPU plan: the most valuable GPU measurements first, within a time budget (bench/gpu_plan.py).

Phases, in this order, each with an estimated time (``--dry-run`` prints them): the environment and the
device's ceilings (device-to-device copy, bf16 matmul); the native CUDA extension's build (nvcc, sm_90);
validation of triton and native against the float64 reference (bf16/fp32/fp16, output and five gradients,
outputs poisoned, repeated backward bitwise); the claim cases and the resnet50-layers bare op in bf16;
compute-sanitizer and one ncu profile; the same cases in fp32. A phase that does not fit the time left is
skipped with one line; the run stops at the budget keeping every row written. Case rows go to
<out>/<machine>/gpu_benchmark.jsonl (resumed: a second call measures what the first did not), the rest to
<out>/<machine>/gpu_plan.ndjson; a targets table closes the run. Runs with the code on PYTHONPATH, no install,
without fvcore, natten, asv or ray (each missing one says what is skipped).

    python scripts/gpu_benchmark.py --out .carry/results                # GPU machine, default budget
    python scripts/gpu_benchmark.py --dry-run                            # the plan and its estimates
    python scripts/gpu_benchmark.py --smoke --out /tmp/gb --budget 60    # CPU: interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here: imports included

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: triton.jit reads it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.gpu_phases import PHASE_NAMES, PHASES  # noqa: E402
from bench.gpu_plan import run_plan  # noqa: E402

# One device command runs at most 10 minutes; the plan fits 8 with its start-up and exit.
DEFAULT_BUDGET_S = 450.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="results folder: rows and records go to <out>/<machine>/")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--phases", default=",".join(PHASE_NAMES),
                        help=f"comma-separated phases to run, in the plan's order (default all: {','.join(PHASE_NAMES)})")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: the whole plan path")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with each phase's estimated time; run nothing")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget: expected a positive number of seconds, got {args.budget:g}")
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in phases if name not in PHASE_NAMES]
    if unknown or not phases:
        parser.error(f"--phases: unknown phase(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(PHASE_NAMES)}")
    if not (args.smoke or args.dry_run or torch.cuda.is_available()):
        parser.error("no CUDA device here: only --smoke and --dry-run run on a CPU")
    chosen = [phase for phase in PHASES if phase.name in phases]
    return run_plan(args.out, args.budget, args.smoke, chosen, dry_run=args.dry_run, started=STARTED)


if __name__ == "__main__":
    sys.exit(main())
