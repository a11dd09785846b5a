"""Run a list of cases, each in its own subprocess, and append one result row per case.

Rows go to ``<out_dir>/<machine_id>/<name or suite or "adhoc">.jsonl`` (bench.store: one atomic line per
row, so an interrupted sweep loses nothing it finished). Per (impl, device, dtype, direction) the
correctness gate runs once per sweep, in a subprocess too, before the first case that needs it. A case
then runs two subprocesses, peak memory first, then latency and fvcore's count; the time limit
(``Settings.timeout_s``) applies to each subprocess.

Resume: a case is skipped when the file already has a row for it (same case key and repeat index)
from the same commit with a final status (ok, oom, unsupported, incorrect). Rows with ``error`` or
``timeout`` are retried, since they may come from a transient failure (a crash, a busy machine), and
rows of another commit are re-measured (the code changed).

Subprocesses come from a multiprocessing "forkserver" that has imported torch, sasa_impls and fvcore
once, so a case starts in milliseconds; nothing in that server has run a computation or touched CUDA.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sasa_impls

from . import store, worker
from .cases import CONV, Case, analytic_costs, case_key
from .env import environment, gpu_readings, machine_id

FINAL_STATUSES = ("ok", "oom", "unsupported", "incorrect")


@dataclass(frozen=True)
class Settings:
    """How each case is measured (see bench.measure.time_fn) and what its subprocess may use."""

    warmup: int = 2
    reps: int = 5
    min_time_s: float = 0.5
    threads: int = torch.get_num_threads()
    timeout_s: float = 600.0
    memory_limit_bytes: int | None = None


_CONTEXT = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["bench.worker", "fvcore.nn"])
    return _CONTEXT


def _crash_result(exitcode: int | None) -> dict:
    if exitcode == -signal.SIGKILL:
        return {"status": "oom", "error": "worker killed by SIGKILL (the kernel's out-of-memory killer?)"}
    if exitcode is not None and exitcode < 0:
        return {"status": "error", "error": f"worker crashed: signal {signal.Signals(-exitcode).name}"}
    return {"status": "error", "error": f"worker exited with status {exitcode} without a result"}


def run_isolated(task: dict, timeout_s: float) -> dict:
    """Run ``worker.child_main(task)`` in a new subprocess; its result, or a status for a timeout or crash."""
    context = _context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=worker.child_main, args=(task, writer), daemon=True)
    process.start()
    writer.close()
    try:
        if not reader.poll(timeout_s):
            return {"status": "timeout", "error": f"no result within {timeout_s:g} s (--timeout)"}
        try:
            return reader.recv()
        except EOFError:
            process.join(10)
            return _crash_result(process.exitcode)
    finally:
        reader.close()
        process.join(1)
        if process.is_alive():
            process.kill()
            process.join()


def finished_keys(path: Path, commit: str | None) -> set[tuple]:
    """(case key, repeat) of the rows in ``path`` that resume may skip (see the module docstring)."""
    if not path.exists():
        return set()
    return {
        (case_key(row), row.get("repeat", 0))
        for row in store.read_rows([path])
        if row.get("status") in FINAL_STATUSES and row.get("commit") == commit
    }


class Progress:
    """One line per case on stderr: position, ETA, the case, then its status and latency."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start, self.done = total, enabled, time.monotonic(), 0

    def begin(self, case: Case, repeat: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        eta = f"ETA {_duration(elapsed / self.done * (self.total - self.done))}" if self.done else "ETA ?"
        again = f" (repeat {repeat})" if repeat else ""
        print(f"[{self.done + 1}/{self.total} {_duration(elapsed)} {eta}] {case.label()}{again} ...", end="", file=sys.stderr, flush=True)

    def end(self, row: dict) -> None:
        self.done += 1
        if self.enabled:
            latency = f" {row['latency_ms']:.3g} ms" if row.get("latency_ms") is not None else ""
            detail = f" ({row['error']})" if row.get("error") else ""
            print(f" {row['status']}{latency}{detail}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _check(case: Case, gates: dict, settings: Settings, plugins: list[str]) -> dict:
    """Availability, then the cached correctness gate: {"status": "ok"} when the case may be measured."""
    if case.impl == CONV:
        return {"status": "ok"}
    impl = sasa_impls.get_impl(case.impl)
    available, reason = impl.available(torch.device(case.device), getattr(torch, case.dtype))
    if not available:
        return {"status": "unsupported", "error": reason}
    key = (case.impl, case.device, case.dtype, case.direction)
    if key not in gates:
        task = {"kind": "gate", "impl": case.impl, "device": case.device, "dtype": case.dtype,
                "direction": case.direction, "settings": asdict(settings), "plugins": plugins}
        gates[key] = run_isolated(task, settings.timeout_s)
    return gates[key]


def measure_one(case: Case, gates: dict, settings: Settings, plugins: list[str]) -> dict:
    """The measured fields of one case: the gate, then (if it passed) peak memory and latency, each in
    a subprocess of its own (see bench.worker.measure_memory for why apart)."""
    checked = _check(case, gates, settings, plugins)
    gate_fields = {k: checked[k] for k in ("gate_max_error", "gate_tolerance") if k in checked}
    if checked["status"] != "ok":
        return {**gate_fields, "status": checked["status"], "error": checked.get("error")}
    task = {"case": asdict(case), "settings": asdict(settings), "plugins": plugins}
    memory = run_isolated({**task, "kind": "memory"}, settings.timeout_s)
    if memory["status"] != "ok":
        return {**gate_fields, **memory}
    return {**gate_fields, **memory, **run_isolated({**task, "kind": "time"}, settings.timeout_s)}


def results_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Where a sweep called ``name`` on this machine appends its rows."""
    return Path(out_dir) / machine_id() / f"{name}.jsonl"


def run_cases(cases: list[Case], out_dir: str | os.PathLike = "results", resume: bool = True, suite: str | None = None,
              progress: bool = True, *, name: str | None = None, repeat: int = 1, settings: Settings = Settings()) -> list[dict]:
    """Measure every case (``repeat`` passes over the list: the spread between passes is the timing
    noise), each isolated in a subprocess; append each row as it finishes and return the rows written."""
    plugins = worker.plugin_specs()
    worker.load_plugins(plugins)
    env = environment()
    machine = machine_id()
    path = results_path(out_dir, name or suite or "adhoc")
    skip = finished_keys(path, env["commit"]) if resume else set()
    todo = [(case, r) for r in range(repeat) for case in cases if (case.key(), r) not in skip]
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    bar, gates, rows = Progress(len(todo), progress), {}, []
    if progress and len(todo) < len(cases) * repeat:
        print(f"resume: {len(cases) * repeat - len(todo)} finished case(s) in {path} skipped", file=sys.stderr)
    for case, r in todo:
        bar.begin(case, r)
        before = gpu_readings() if case.device.startswith("cuda") else {}
        measured = measure_one(case, gates, settings, plugins)
        after = gpu_readings() if case.device.startswith("cuda") else {}
        costs = analytic_costs(case)
        row = {
            **asdict(case), **env, **before, "status": None, "error": None, "latency_ms": None, "latency_iqr_ms": None,
            "reps": None, "peak_mem_bytes": None, "params": None, "flops_fvcore": None, "fvcore_uncounted": None,
            **costs, **measured,
            "borders": None if case.impl == CONV else sasa_impls.get_impl(case.impl).borders,
            "gpu_after": after or None, "threads": settings.threads, "repeat": r, "machine": machine,
            "run_id": run_id, "suite": suite, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store.append_row(path, row)
        rows.append(row)
        bar.end(row)
    return rows
