"""The engine of the time-boxed GPU plan (scripts/gpu_benchmark.py; its phases: bench/gpu_phases.py): phases
in the order of their value, each step with an estimated time, run within a budget of seconds.

A GPU machine comes for a few minutes (one command at most 10), so the plan measures the most valuable
things first and stops at the budget keeping everything written. A phase whose first step does not fit the
time left is skipped with one line; a phase runs step by step (case by case) while the next step's estimate
fits; a task still running at the budget is stopped (its row or record says so). Case rows go through the
runner (bench.runner.run_cases: the gate, memory, time, one row per case, resume) with the cases of each
implementation in one long-lived worker (bench.worker_pool); everything else (ceilings, validation, tools,
each phase's real time and what was skipped) is appended as records to ``<out>/<machine>/gpu_plan.ndjson``.

Estimates are seconds on the H200 machine (COSTS_H200); no GPU has run the plan yet, so they are leads
from what was measured elsewhere (each constant says from what), and each phase's record keeps its real
time for the next estimate. ``--smoke`` uses COSTS_SMOKE (this project's 2-core CPU).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import sasa_impls

from . import pipeline, runner, store
from .cases import default_impls
from .env import environment, machine_id
from .gpu_targets import print_targets
from .schema import CONV, Case
from .worker_pool import WorkerPool

RECORDS = "gpu_plan.ndjson"  # JSON Lines, not *.jsonl: the reports read every *.jsonl as result rows
ROWS = "gpu_benchmark"  # <out>/<machine>/gpu_benchmark.jsonl

@dataclass(frozen=True)
class Costs:
    """Estimated seconds of each kind of step (see the module docstring)."""

    worker_start: float  # a worker's first task: process, imports, CUDA context
    case: float  # a measured case: inputs, one memory call, warm-up, do_bench over min_time_s
    gate: float  # the runner's gate of a case key (one small shape, reference on the CPU)
    validation_shape: float  # one validation shape, fwd+bwd, reference included (compiles apart)
    triton_kernel: float  # one Triton kernel compiled (the forward is one, fwd+bwd three)
    flex_compile: dict  # torch.compile of flex per new (shape, dtype): by direction
    build: float  # the native extension's build (sm_90 nvcc + the binding)
    ceilings: float
    sanitizer: float  # one compute-sanitizer tool over one small python run
    ncu: float  # ncu over one fused kernel's step


# H200 machine (16 cores). worker_start: CUDA context + torch/triton import, a few seconds. case: 5 warm-up
# calls + 0.25 s of do_bench + a peak-memory call. triton_kernel: sm_90 compiles here took 3.9 - 6.5 s per
# three kernels (tests/test_triton.py's compile_for, 2 cores shared with other work), so ~1 s each on an
# unloaded core. flex (and natten's Flex backend): torch.compile of flex_attention per shape, ~10 s forward
# and ~20 s with its backward on a fast host (a lead: not measured here, where flex has no CUDA).
# build: nvcc -O3 -lineinfo for sm_90 of csrc/cuda/sasa_cuda.cu took 10.9 s (user) here and g++ -O3 of the
# binding 23.4 s; torch's ninja runs both at once: ~25 s, x1.5 for another CPU and the link, + imports.
# sanitizer: a python start under the tool (torch's modules instrumented), ~45 s per tool; ncu: one step of
# one fused kernel (3 - 5 kernels, a few metric passes each) after a python start, ~30 s.
COSTS_H200 = Costs(worker_start=6.0, case=1.5, gate=2.0, validation_shape=1.0, triton_kernel=1.0,
                   flex_compile={"fwd": 10.0, "fwd+bwd": 20.0}, build=45.0, ceilings=10.0, sanitizer=45.0, ncu=30.0)
# This project's 2-core CPU, Triton interpreter, tiny shapes; the native CPU build ~90 s (a few when cached).
COSTS_SMOKE = Costs(worker_start=3.0, case=1.0, gate=1.5, validation_shape=1.0, triton_kernel=0.0,
                    flex_compile={"fwd": 0.0, "fwd+bwd": 0.0}, build=90.0, ceilings=3.0, sanitizer=0.0, ncu=0.0)


class Clock:
    """Seconds left of the budget (from the plan's start)."""

    def __init__(self, budget_s: float, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Step:
    """One unit of a phase: ``run()`` returns its record, or None (a case phase's cases write rows)."""

    label: str
    estimate_s: float
    run: Callable[[], dict | None]
    skipped: Callable[[], None] | None = None  # called when the budget leaves the step out


@dataclass
class Phase:
    """A named group of steps (``steps(plan)`` builds them when the phase starts), or of cases."""

    name: str
    what: str
    steps: Callable[["Plan"], list[Step]] | None = None
    cases: Callable[["Plan"], list[Case]] | None = None


@dataclass
class Plan:
    """What a run of the plan works with: the device, the output folder, the worker pool and the clock."""

    out: Path
    device: str
    smoke: bool
    clock: Clock
    costs: Costs
    settings: runner.Settings
    pool: WorkerPool
    impls: list[str]
    dry_run: bool = False  # estimating for the GPU machine: its implementations and tools assumed there
    failures: list[str] = field(default_factory=list)
    compiled: set = field(default_factory=set)  # what the estimates count as compiled already
    started: set = field(default_factory=set)  # worker owners the estimates count as started

    @property
    def folder(self) -> Path:
        return self.out / machine_id()

    def record(self, record: dict) -> dict:
        """Append ``record`` (a dict) to the plan's records, with the commit and a timestamp."""
        stamped = {**record, "commit": env_fields()["commit"], "machine": machine_id(),
                   "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        store.append_row(self.folder / RECORDS, stamped)
        return stamped

    def task(self, kind: str, timeout_s: float, **fields) -> dict:
        """A worker task (bench.worker_pool) of ``kind`` with ``fields``, run in its owner's worker; its result."""
        return self.pool.run({"kind": kind, "threads": self.settings.threads, "plugins": [], "memory_limit_bytes": None,
                              **fields}, timeout_s)

    def call(self, owner: str, function: str, timeout_s: float, **kwargs) -> dict:
        """``function`` ("module:name") run with ``kwargs`` in ``owner``'s worker; its result dict."""
        return self.task("call", timeout_s, owner=owner, function=function, kwargs=kwargs)

    def worker_cost(self, owner: str) -> float:
        """Start-up seconds of ``owner``'s worker if the estimates have not started it yet (counted now)."""
        if owner in self.started:
            return 0.0
        self.started.add(owner)
        return self.costs.worker_start

    def compile_cost(self, impl: str, dtype: str, head_dim: int, kernel_size: int, relative: bool, direction: str,
                     res: int | None = None) -> float:
        """Compile seconds of a first use (Triton: per kernel specialization; flex and natten: per shape)."""
        backward = direction == "fwd+bwd"
        if impl == "triton":
            keys = [("triton", dtype, head_dim, kernel_size, relative, kind) for kind in (("fwd", "bwd") if backward else ("fwd",))]
            cost = sum(self.costs.triton_kernel * (2 if key[-1] == "bwd" else 1) for key in keys if key not in self.compiled)
            self.compiled.update(keys)
            return cost
        if impl in ("flex", "natten"):
            key = (impl, dtype, head_dim, kernel_size, relative, direction, res)
            if key in self.compiled:
                return 0.0
            self.compiled.add(key)
            return self.costs.flex_compile[direction]
        return 0.0

    def case_cost(self, case: Case, gates: set) -> float:
        """Estimated seconds of ``case`` (its gate the first time its key comes, compiles, worker start)."""
        cost = self.worker_cost(case.impl) + self.costs.case
        if case.impl != CONV:
            head_dim = case.channels // case.heads
            key = (case.impl, case.dtype, case.direction, case.relative, case.impl_options)
            if key not in gates:
                gates.add(key)
                *_, gate_head_dim, gate_k = pipeline.GATE_SHAPES[0]
                cost += self.costs.gate + self.compile_cost(case.impl, case.dtype, gate_head_dim, gate_k, case.relative,
                                                            case.direction)
            cost += self.compile_cost(case.impl, case.dtype, head_dim, case.k, case.relative, case.direction, case.res)
        return cost


_ENV: dict = {}


def env_fields() -> dict:
    """This process's environment (bench.env), read once."""
    if not _ENV:
        _ENV.update(environment())
    return _ENV


def phase_dtype(plan: Plan, dtype: str) -> str:
    """The dtype a phase measures for ``dtype``: --smoke measures float16 for bf16 (the Triton interpreter
    gets bf16 dots wrong)."""
    return "float16" if plan.smoke and dtype == "bfloat16" else dtype


def budget_executor(plan: Plan, estimates: dict, skipped: list) -> Callable:
    """An executor for bench.runner.run_cases: each case in its implementation's worker (the pool), while its
    estimate fits the time left; the cases after the first that does not fit are skipped (``skipped``)."""
    measure = functools.partial(runner.measure_case, isolate=plan.pool.run)

    def execute(todo, settings, plugins, started) -> Iterator:
        gates: dict = {}
        for index, (case, repeat) in enumerate(todo):
            if estimates[case.key()] > plan.clock.left():
                skipped.extend(c for c, _ in todo[index:])
                return
            started(case, repeat)
            measured = runner.measure_here(case, settings, plugins, gates, measure)
            yield case, repeat, measured
    return execute


def run_phase(plan: Plan, phase: Phase) -> dict:
    """Run ``phase`` within the time left; its record (measured and skipped steps or cases, seconds)."""
    start = time.monotonic()
    print(f"[{phase.name}] {phase.what}", flush=True)
    if phase.cases is not None:
        cases = phase.cases(plan)
        gates: set = set()
        estimates = {case.key(): plan.case_cost(case, gates) for case in cases}
        if cases and estimates[cases[0].key()] > plan.clock.left():
            print(f"  skipped: its first case needs ~{estimates[cases[0].key()]:.0f} s, "
                  f"{max(0.0, plan.clock.left()):.0f} s left", flush=True)
            return plan.record({"check": "phase", "phase": phase.name, "status": "skipped", "measured": 0,
                                "skipped": len(cases), "seconds": 0.0})
        print(f"  {len(cases)} cases, ~{sum(estimates.values()):.0f} s estimated", flush=True)
        skipped: list = []
        rows = runner.run_cases(cases, plan.out, name=ROWS, settings=plan.settings,
                                executor=budget_executor(plan, estimates, skipped))
        measured, left_out = len(rows), len(skipped)
    else:
        steps = phase.steps(plan)
        if steps and steps[0].estimate_s > plan.clock.left():
            print(f"  skipped: its first step needs ~{steps[0].estimate_s:.0f} s, "
                  f"{max(0.0, plan.clock.left()):.0f} s left", flush=True)
            for step in steps:
                if step.skipped:
                    step.skipped()
            return plan.record({"check": "phase", "phase": phase.name, "status": "skipped", "measured": 0,
                                "skipped": len(steps), "seconds": 0.0})
        print(f"  {len(steps)} steps, ~{sum(s.estimate_s for s in steps):.0f} s estimated", flush=True)
        measured, left_out = 0, 0
        for index, step in enumerate(steps):
            if step.estimate_s > plan.clock.left():
                left_out = len(steps) - index
                for later in steps[index:]:
                    if later.skipped:
                        later.skipped()
                break
            record = step.run()
            if record is not None:
                plan.record({"phase": phase.name, "step": step.label, **record})
            measured += 1
    seconds = time.monotonic() - start
    if left_out:
        print(f"  stopped at the budget: {measured} done, {left_out} skipped", flush=True)
    return plan.record({"check": "phase", "phase": phase.name, "status": "partial" if left_out else "done",
                        "measured": measured, "skipped": left_out, "seconds": seconds})


def estimate_plan(plan: Plan, phases: list[Phase]) -> list[tuple[Phase, int, float]]:
    """(phase, number of steps or cases, estimated seconds) of each phase, in order, without running anything."""
    estimates = []
    for phase in phases:
        if phase.cases is not None:
            gates: set = set()
            cases = phase.cases(plan)
            estimates.append((phase, len(cases), sum(plan.case_cost(case, gates) for case in cases)))
        else:
            steps = phase.steps(plan)
            estimates.append((phase, len(steps), sum(step.estimate_s for step in steps)))
    return estimates


def print_estimates(estimates: list[tuple[Phase, int, float]], budget_s: float, costs: Costs) -> None:
    """The dry run's table: each phase's estimate, the running total, and whether it fits the budget."""
    total = 0.0
    print(f"{'phase':<15} {'items':>5} {'estimate':>9} {'total':>7}  fits {budget_s:.0f} s   what")
    for phase, count, seconds in estimates:
        total += seconds
        fits = "yes" if total <= budget_s else "part" if total - seconds < budget_s else "no"
        print(f"{phase.name:<15} {count:>5} {seconds:>8.0f}s {total:>6.0f}s  {fits:<9} {phase.what}")
    print(f"total ~{total:.0f} s (~{total / 60:.1f} min) by the estimates of {'COSTS_SMOKE' if costs is COSTS_SMOKE else 'COSTS_H200'} "
          "(bench/gpu_plan.py); each phase's real time goes to the records")


def plan_impls(device: str, smoke: bool, dry_run: bool) -> list[str]:
    """The implementations measured: every registered one available on the device, but the reference (the
    dry run assumes the GPU machine: every registered one); --smoke leaves out flex (its CPU torch.compile
    takes minutes) and natten."""
    names = [name for name in sasa_impls.list_impls() if name != "reference"]
    if dry_run:
        return names
    available = [name for name in default_impls(device, "float32") if name != CONV]
    return [name for name in available if not (smoke and name in ("flex", "natten"))]


def run_plan(out: str | os.PathLike, budget_s: float, smoke: bool, phases: list[Phase], dry_run: bool = False,
             started: float | None = None) -> int:
    """Run (or, ``dry_run``, estimate) the plan's ``phases`` within ``budget_s`` seconds from ``started`` (a
    time.monotonic() value; default now); 1 when a validation failed."""
    device = "cpu" if smoke else "cuda"
    clock = Clock(budget_s, started)
    clock.deadline -= 3.0 if smoke else 10.0  # kept for the last rows, the targets table and the workers' exit
    pool = WorkerPool(deadline=clock.deadline)
    timeout = 120.0 if smoke else 300.0
    settings = (runner.Settings(warmup=0, reps=1, min_time_s=0.0, max_time_s=0.1, timeout_s=timeout) if smoke
                else runner.Settings(warmup=5, reps=20, min_time_s=0.25, max_time_s=2.0, timeout_s=timeout))
    plan = Plan(Path(out), device, smoke, clock, COSTS_SMOKE if smoke else COSTS_H200, settings, pool,
                plan_impls(device, smoke, dry_run), dry_run)
    if dry_run:
        print(f"plan for {'--smoke on this CPU' if smoke else 'the H200 machine'}, budget {budget_s:.0f} s; "
              f"implementations: {', '.join(plan.impls)}")
        print_estimates(estimate_plan(plan, phases), budget_s, plan.costs)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"GPU plan on {device}, budget {budget_s:.0f} s, rows in {plan.folder}/{ROWS}.jsonl, records in "
          f"{plan.folder}/{RECORDS}; implementations: {', '.join(plan.impls)}", flush=True)
    phase_records = []
    try:
        for phase in phases:
            phase_records.append(run_phase(plan, phase))
    finally:
        pool.close()
    print_summary(phase_records, clock)
    print_targets(plan.folder / f"{ROWS}.jsonl", plan.folder / RECORDS, phase_dtype(plan, "bfloat16"))
    for failure in plan.failures:
        print(f"FAILED: {failure}")
    return 1 if plan.failures else 0


def print_summary(records: list[dict], clock: Clock) -> None:
    """What each phase measured and skipped, and the time used of the budget."""
    print(f"\n{'phase':<15} {'status':<8} {'done':>5} {'skipped':>7} {'seconds':>8}")
    for record in records:
        print(f"{record['phase']:<15} {record['status']:<8} {record['measured']:>5} {record['skipped']:>7} "
              f"{record['seconds']:>8.1f}")
    print(f"used {clock.elapsed():.0f} s of the {clock.budget_s:.0f} s budget")
