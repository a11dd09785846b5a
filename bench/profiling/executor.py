"""The runner's executor for `sasa-bench profile`: each case gated like `run` (bench.runner.check_case), then
profiled in an isolated worker of its own (task "profile": bench.profiling.task), so a crash, an OOM or a
timeout is that row's status and the sweep goes on."""
from __future__ import annotations

import functools
from dataclasses import asdict

from .. import runner
from ..schema import Case, Status
from .task import ProfileOptions

PROFILER = "torch.profiler"  # every profile row names it (failed ones too): how readers tell profile rows apart


def profile_case(case: Case, settings: runner.Settings, plugins: list[str], gates: dict,
                 options: ProfileOptions = ProfileOptions()) -> dict:
    """The profile fields of one case: declared support, the cached gate, then the profile in a subprocess."""
    checked = runner.check_case(case, settings, plugins, gates)
    if checked["status"] != Status.OK:
        return {**checked, "profiler": PROFILER}
    task = runner.worker_task("profile", settings, plugins, case=asdict(case), timer=asdict(settings.timer()),
                        profile=asdict(options), timeout_s=settings.timeout_s)
    profiled = runner.run_isolated(task, settings.timeout_s)
    warnings = list(dict.fromkeys((checked.get("warnings") or []) + (profiled.get("warnings") or [])))
    fields = {k: v for k, v in checked.items() if k not in ("status", "error", "warnings")}
    return {**fields, "profiler": PROFILER, **profiled, "warnings": warnings or None}


def profile_executor(options: ProfileOptions) -> runner.Executor:
    """An executor (bench.runner.Executor) profiling one case after another on this machine."""
    return functools.partial(runner.measure_locally, measure=functools.partial(profile_case, options=options))
