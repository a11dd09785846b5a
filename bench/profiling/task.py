"""What the isolated worker runs to profile one case (worker task "profile").

The case's step is timed without a profiler first (bench.measure, the same timer as ``sasa-bench run``), then
run ``calls`` times under torch.profiler (CPU activity, and CUDA on a GPU; ``profile_memory``), each call in
a ``sasa-bench::step`` range; the events become stages (bench.profiling.attribute: the faster half of the steps); time inside a fused
kernel is split by ablation (bench.profiling.ablation); each stage gets its analytic MACs and achieved
GFLOP/s. The row states a residual where the stages do not add up to the profiled total within
TOLERANCE, or the profiled total is not within TOLERANCE of the un-profiled latency.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sasa_impls.regions import STAGES

from .. import measure, pipeline
from ..cases import analytic_costs
from ..schema import CONV, DIRECTION_PASSES, Case, Status, achieved_gflops
from . import counters as hw
from .ablation import ablate
from .attribute import OPAQUE, STEP, attribute
from .cuda import memory_snapshot, ncu_metrics

TOLERANCE = 0.15  # stages vs total, total vs un-profiled latency
PROFILE_TIME_S = 0.3  # profiled time to aim for (at least MIN_CALLS calls, at most MAX_CALLS)
MIN_CALLS, MAX_CALLS = 4, 50
FUSED_SHARE = 0.02  # opaque time above this share of the total is a fused kernel, split by ablation
CONV_STAGE = "conv"  # the conv baseline's one stage
# analytic MAC components (bench.cases.analytic_costs) of each stage
STAGE_MACS = {"projections": ("projections",), "logits": ("qk",), "aggregate": ("av",), CONV_STAGE: ("conv",)}


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """What `sasa-bench profile` asks for beyond the stages: output folders (None: not asked) and counters."""

    trace_dir: Optional[str] = None
    memory_snapshot_dir: Optional[str] = None
    counters: bool = False
    ncu: bool = False


def case_slug(case: Case) -> str:
    """A file name for the case's trace and snapshot."""
    text = (f"{case.impl}-k{case.k}-c{case.channels}-h{case.heads}-r{case.res}-b{case.batch}-{case.dtype}-{case.device}-"
            f"{case.direction}-{case.level}{'' if case.relative or case.impl == CONV else '-content'}-{case.impl_options}")
    return re.sub(r"[^A-Za-z0-9=.-]+", "_", text).strip("_-")


def profile_case(case: Case, timer: measure.TimerSettings, options: ProfileOptions = ProfileOptions(),
                 timeout_s: float = 600.0) -> dict:
    """The profile fields of one case, measured in this process (see the module docstring)."""
    fn = pipeline.step(pipeline.build(case))
    latency = measure.time_call(fn, case.device, timer)
    calls = int(min(MAX_CALLS, max(MIN_CALLS, PROFILE_TIME_S * 1e3 / max(latency.median_ms, 1e-3))))
    cuda = case.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(calls):
            with record_function(STEP):
                fn()
                if cuda:
                    torch.cuda.synchronize()
    found = attribute(prof.events(), case.device, case.impl == CONV)
    fields = {"trace": None, "memory_snapshot": None, "counters": None, "ablation_ms": None}
    if options.trace_dir:
        path = Path(options.trace_dir) / f"{case_slug(case)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        fields["trace"] = str(path)
    stages, ablation_ms = _stages(case, found)
    fields["ablation_ms"] = ablation_ms
    if options.counters and not cuda and not hw.unavailable():
        with hw.perf_stat(calls) as counted:
            for _ in range(calls):
                fn()
        fields["counters"] = {"source": "perf stat", **counted}
    if cuda and options.memory_snapshot_dir:
        path = Path(options.memory_snapshot_dir) / f"{case_slug(case)}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        fields["memory_snapshot"] = memory_snapshot(fn, path)
    if cuda and options.ncu:
        fields["counters"] = ncu_metrics(case, timeout_s)
    total = found.total_ms
    return {"status": Status.OK, "error": None, "profiler": f"torch.profiler ({', '.join(a.name for a in activities)})",
            "profile_total_ms": total, "unprofiled_ms": latency.median_ms, "profile_calls": found.calls, "stages": stages,
            "profile_residual": residual(stages, total, latency.median_ms), **fields}


def _stages(case: Case, found) -> tuple[dict, dict | None]:
    """The row's ``stages`` (and the ablation's variant times, where one ran) from the attribution."""
    ms = dict(found.ms)
    alloc = dict(found.alloc_bytes)
    methods = {name: " + ".join(sorted(m)) for name, m in found.methods.items()}
    ablation_ms = None
    if case.impl == CONV:  # one stage: the whole call
        ms = {CONV_STAGE: sum(ms.values())}
        alloc = {CONV_STAGE: sum(alloc.values())}
        methods = {CONV_STAGE: "profiler: the whole call"}
    opaque = ms.pop(OPAQUE, 0.0)
    opaque_alloc = alloc.pop(OPAQUE, 0)
    methods.pop(OPAQUE, None)
    if opaque > FUSED_SHARE * found.total_ms:
        split = ablate(case)
        ablation_ms = split.variants_ms
        for name, fraction in split.fractions.items():
            ms[name] = ms.get(name, 0.0) + fraction * opaque
            methods[name] = " + ".join(m for m in (methods.get(name), split.methods[name]) if m)
    elif opaque:
        ms["other"] = ms.get("other", 0.0) + opaque
        methods["other"] = " + ".join(m for m in (methods.get("other"), "profiler: unattributed ops") if m)
    if opaque_alloc:  # a fused kernel's own allocations (its outputs, saved tensors) are not split
        alloc["other"] = alloc.get("other", 0) + opaque_alloc
    costs = analytic_costs(case)
    components = costs["macs_components"] or {}
    passes = DIRECTION_PASSES[case.direction]
    relative = {"rel_per_key": ("rel_per_key",), "rel_factorized": ("rel_factorized",)}.get(costs["rel_accounting"] or "", ())
    total = found.total_ms
    stages = {}
    for name in (*STAGES, CONV_STAGE):
        if name not in ms:
            continue
        macs = sum(components.get(c, 0) for c in (relative if name == "relative" else STAGE_MACS.get(name, ()))) or None
        stages[name] = {"ms": ms[name], "share": ms[name] / total if total else None, "method": methods.get(name, ""),
                        "macs": macs * passes if macs else None,
                        "gflops": achieved_gflops(macs, ms[name], case.direction) if macs else None,
                        "alloc_bytes": alloc.get(name)}
    return stages, ablation_ms


def residual(stages: dict, total_ms: float, unprofiled_ms: float) -> str | None:
    """Where the stages miss the profiled total, or the profiled total the un-profiled latency, by more than
    TOLERANCE: one sentence saying by how much (None when both agree)."""
    problems = []
    summed = sum(s["ms"] for s in stages.values())
    if total_ms and abs(summed / total_ms - 1) > TOLERANCE:
        problems.append(f"the stages sum to {summed / total_ms:.0%} of profile_total_ms")
    if unprofiled_ms and abs(total_ms / unprofiled_ms - 1) > TOLERANCE:
        problems.append(f"profile_total_ms is {total_ms / unprofiled_ms:.0%} of the un-profiled latency "
                        "(profiler overhead per op, or timing noise)")
    return "; ".join(problems) or None
