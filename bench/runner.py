"""Run a list of cases, each isolated in subprocesses, and append one result row per case.

Rows go to ``<out_dir>/<machine>/<name or suite or "adhoc">.jsonl``, the folder of the machine that measured
them (bench.store: one atomic line per row, so an interrupted sweep loses nothing it finished). Cases are
measured by an executor: here, one after another (:func:`measure_locally`); bench/ray_executor.py hands
them to a Ray cluster. A case the implementation declares it cannot
run (``Impl.supports`` on the case's spec) is recorded ``unsupported`` without starting anything. Per
(impl, device, dtype, direction, relative, options) the correctness gate runs once per sweep, in a
subprocess too, before the first case that needs it. A case then runs two subprocesses, peak memory
first, then latency and fvcore's count; the time limit (``Settings.timeout_s``) applies to each.

Resume: a case is skipped when the file already has a row for it (same case key and repeat index)
from the same commit with a final status (ok, oom, unsupported, incorrect). Rows with ``error`` or
``timeout`` are retried, since they may come from a transient failure (a crash, a busy machine), and
rows of another commit are re-measured (the code changed).

Subprocesses come from a multiprocessing "forkserver" that has imported torch, sasa_impls and fvcore
once, so a case starts in milliseconds; nothing in that server has run a computation or touched CUDA.
Interrupts (Ctrl-C, SIGTERM) stop the current worker and the forkserver and end the sweep with
KeyboardInterrupt; a SIGKILLed runner takes its workers with it (bench.worker.die_with_parent).
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import types
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

import sasa_impls

from . import contention, store
from .cases import analytic_costs, attention_spec
from .env import environment, gpu_readings, machine_id, native_isa
from .measure import TimerSettings
from .plugins import load_plugins
from .progress import Progress
from .report.peaks import recorded_peak
from .schema import CONV, FINAL_STATUSES, Case, Row, Status, achieved_gflops, case_key


@dataclass(frozen=True)
class Settings:
    """How each case is timed (bench.measure.TimerSettings) and what its subprocesses may use."""

    warmup: int = 2
    reps: int = 5
    min_time_s: float = 0.5
    max_time_s: float = 5.0
    confidence: float = 0.05
    threads: int = torch.get_num_threads()
    timeout_s: float = 600.0
    memory_limit_bytes: int | None = None

    def timer(self) -> TimerSettings:
        """The timer's part of the settings."""
        return TimerSettings(self.warmup, self.reps, self.min_time_s, self.max_time_s, self.confidence, self.threads)


@functools.cache
def _forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.worker", "fvcore.nn"])
    return context


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context workers start in: a forkserver that has imported bench.worker once,
    started now if it is not running.

    The server imports the checkout this process imported, whatever the current directory: it starts with
    PYTHONSAFEPATH (no current directory on its sys.path) and PYTHONPATH led by that checkout. Python's
    forkserver ignores its parent's sys.path, so ``sasa-bench`` started in another checkout's folder (a git
    worktree of an older commit) timed that folder's code in its workers while its rows named this
    checkout's commit."""
    from multiprocessing import forkserver

    context = _forkserver()
    checkout = str(Path(sasa_impls.__file__).resolve().parent.parent)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
    paths = [checkout, *(p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p and p != checkout)]
    os.environ.update(PYTHONPATH=os.pathsep.join(paths), PYTHONSAFEPATH="1")
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return context


def stop_workers() -> None:
    """Stop the forkserver (its workers die with it: bench.worker.die_with_parent); the next case starts a new one."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is not None and hasattr(server, "_stop"):
        server._stop()


@contextlib.contextmanager
def bare_main() -> Iterator[None]:
    """Within: this process's ``__main__`` is an empty module, so a subprocess started here does not import it.
    multiprocessing has every new subprocess import its parent's main script: in a Ray worker that is Ray's
    worker script (half a second more per case, and ray loaded in the process being measured), in a user's
    script whatever it imports at the top."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def crash_result(exitcode: int | None, memory_limit_bytes: int | None = None) -> dict:
    """The status of a worker that ended without a result (``memory_limit_bytes``: its --memory-limit)."""
    if exitcode == -signal.SIGKILL:
        return {"status": Status.OOM, "error": "worker killed by SIGKILL (the kernel's out-of-memory killer?)"}
    if exitcode is not None and exitcode < 0:
        return {"status": Status.ERROR, "error": f"worker crashed: signal {signal.Signals(-exitcode).name}"}
    if memory_limit_bytes:  # e.g. a thread or library that could not get memory ended the process
        from .worker import limit_note

        return {"status": Status.OOM,
                "error": f"worker exited with status {exitcode} without a result{limit_note(memory_limit_bytes)}"}
    return {"status": Status.ERROR, "error": f"worker exited with status {exitcode} without a result"}


def run_isolated(task: dict, timeout_s: float) -> dict:
    """Run ``worker.child_main(task)`` in a new subprocess; its result, or a status for a timeout or crash.
    The subprocess never outlives this call (an interrupt kills it before propagating)."""
    from . import worker

    context = worker_context()
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=worker.child_main, args=(task, writer), daemon=True)
    with bare_main():
        process.start()
    writer.close()
    try:
        if not reader.poll(timeout_s):
            return {"status": Status.TIMEOUT, "error": f"no result within {timeout_s:g} s (--timeout)"}
        try:
            return reader.recv()
        except EOFError:
            process.join(10)
            return crash_result(process.exitcode, task.get("memory_limit_bytes"))
    finally:
        reader.close()
        process.join(0.5)
        if process.is_alive():
            process.kill()
            process.join()


def results_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Where a sweep called ``name`` on this machine appends its rows."""
    return Path(out_dir) / machine_id() / f"{name}.jsonl"


def finished_keys(path: Path, commit: str | None, problems: list[str]) -> set[tuple]:
    """(case key, repeat) of the rows in ``path`` that resume may skip (see the module docstring)."""
    if not path.exists():
        return set()
    return {
        (case_key(row), row.get("repeat") or 0)
        for row in store.read_rows([path], problems)
        if row.get("status") in FINAL_STATUSES and row.get("commit") == commit
    }


def gate_key(case: Case) -> tuple:
    """Cases sharing a gate: the gate's verdict depends on these, not on the shape."""
    return case.impl, case.device, case.dtype, case.direction, case.relative, case.impl_options


def worker_task(kind: str, settings: Settings, plugins: list[str], **fields) -> dict:
    """A task for a worker (bench.worker.TASKS[kind]) with this sweep's threads, plugins and memory cap."""
    return {"kind": kind, "threads": settings.threads, "plugins": plugins,
            "memory_limit_bytes": settings.memory_limit_bytes, **fields}


# Runs one worker task in isolation and returns its result (or the status of its crash or timeout):
# :func:`run_isolated` (a fresh process per task) unless a caller passes another, e.g. bench.worker_pool's.
Isolate = Callable[[dict, float], dict]


def check_case(case: Case, settings: Settings, plugins: list[str], gates: dict, isolate: Isolate | None = None) -> dict:
    """Declared support and the (cached, per :func:`gate_key`) correctness gate of one case: the gate's
    fields, with status ok when the case may be timed, else its status and error."""
    if case.impl == CONV:
        return {"status": Status.OK}
    ok, why = sasa_impls.get_impl(case.impl).supports(attention_spec(case))
    if not ok:
        return {"status": Status.UNSUPPORTED, "error": f"{case.impl} {why}"}
    key = gate_key(case)
    if key not in gates:
        gate = dict(impl=case.impl, device=case.device, dtype=case.dtype, direction=case.direction,
                    relative=case.relative, options=case.impl_options)
        gates[key] = (isolate or run_isolated)(worker_task("gate", settings, plugins, gate=gate), settings.timeout_s)
    checked = gates[key]
    fields = {k: checked[k] for k in ("gate_max_error", "gate_tolerance", "warnings") if checked.get(k) is not None}
    return {**fields, "status": checked["status"], "error": checked.get("error")}


def measure_case(case: Case, settings: Settings, plugins: list[str], gates: dict, isolate: Isolate | None = None) -> dict:
    """The measured fields of one case on this machine: declared support, the (cached) gate, then peak
    memory and latency, each in a subprocess of its own (see bench.pipeline.measure_memory for why apart;
    ``isolate``: how a task is run, :func:`run_isolated` by default)."""
    isolate = isolate or run_isolated
    checked = check_case(case, settings, plugins, gates, isolate)
    if checked["status"] != Status.OK:
        return checked
    fields = {k: v for k, v in checked.items() if k not in ("status", "error")}
    memory = isolate(worker_task("memory", settings, plugins, case=asdict(case)), settings.timeout_s)
    if memory["status"] != Status.OK:
        return {**fields, **memory}
    timed = isolate(worker_task("time", settings, plugins, case=asdict(case), timer=asdict(settings.timer())),
                    settings.timeout_s)
    warnings = list(dict.fromkeys((fields.get("warnings") or []) + (memory.get("warnings") or []) + (timed.get("warnings") or [])))
    return {**fields, **memory, **timed, "warnings": warnings or None}


def measure_here(case: Case, settings: Settings, plugins: list[str], gates: dict,
                 measure: Callable[[Case, Settings, list[str], dict], dict] | None = None) -> dict:
    """:func:`measure_case` (or ``measure``, with its arguments: `sasa-bench profile`'s) with the readings of
    the machine that measured: its environment, its results folder name and host, and on CUDA the GPU's
    readings before and after."""
    cuda = case.device.startswith("cuda")
    before = gpu_readings() if cuda else {}
    measured = (measure or measure_case)(case, settings, plugins, gates)
    after = gpu_readings() if cuda else {}
    return {**_environment(), **before, **measured, "gpu_after": after or None, "machine": machine_id(),
            "node": socket.gethostname(), "native_isa": native_isa(case.impl, case.device)}


@functools.cache
def _environment() -> dict:
    return environment()


def make_row(case: Case, measured: dict, settings: Settings, repeat: int, run_id: str, suite: str | None,
             out_dir: str | os.PathLike = "results") -> dict:
    """The row of one case (bench.schema.Row): the case, its analytic costs, what was measured where, and the
    machine's peak that holds now (``out_dir``'s peak file)."""
    costs = analytic_costs(case)
    fields = {**costs, **measured, "threads": settings.threads, "repeat": repeat, "run_id": run_id, "suite": suite,
              **recorded_peak(out_dir, measured.get("machine"), case.device, case.dtype, settings.threads),
              "borders": None if case.impl == CONV else sasa_impls.get_impl(case.impl).borders,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fields["status"] = str(fields["status"])
    if fields["status"] == Status.OK:
        fields["gflops"] = achieved_gflops(costs["macs_analytic"], fields.get("latency_ms"), case.direction)
    return asdict(Row(**asdict(case), **fields))


@contextlib.contextmanager
def interrupts_stop_the_sweep() -> Iterator[None]:
    """Within: SIGTERM ends the sweep like Ctrl-C (KeyboardInterrupt), and either stops every worker."""
    def terminate(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminate) if _main_thread() else None
    try:
        yield
    except KeyboardInterrupt:
        stop_workers()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# An executor measures (case, repeat) pairs and yields (case, repeat, measured fields) as each finishes, in
# any order; ``started(case, repeat)`` is called when a case begins, where the executor knows it.
Executor = Callable[[list[tuple[Case, int]], Settings, list[str], Callable[[Case, int], None]], Iterator[tuple[Case, int, dict]]]


def measure_locally(todo: list[tuple[Case, int]], settings: Settings, plugins: list[str],
                    started: Callable[[Case, int], None],
                    measure: Callable[[Case, Settings, list[str], dict], dict] | None = None) -> Iterator[tuple[Case, int, dict]]:
    """The default executor: one case after another on this machine (each in its own subprocesses), by
    :func:`measure_case` or ``measure`` (bind it with functools.partial for another executor: profile's)."""
    gates: dict = {}
    for case, repeat in todo:
        started(case, repeat)
        yield case, repeat, measure_here(case, settings, plugins, gates, measure)


def _warn(text: str) -> None:
    print(f"sasa-bench: {text}", file=sys.stderr, flush=True)


def run_cases(cases: list[Case], out_dir: str | os.PathLike = "results", resume: bool = True, suite: str | None = None,
              progress: bool = True, *, name: str | None = None, repeat: int = 1, settings: Settings = Settings(),
              executor: Executor = measure_locally, allow_concurrent: bool = False) -> list[dict]:
    """Measure every case (``repeat`` passes over the list: the spread between passes is the timing
    noise), each isolated in subprocesses; append each row as it finishes, to the results file of the
    machine that measured it, and return the rows written. Another sweep measuring on this machine is
    warned about on stderr (bench.contention.measuring) unless ``allow_concurrent``; a full disk stops
    the sweep with DiskFull, every row written so far kept."""
    plugins = load_plugins()
    file_name = f"{name or suite or 'adhoc'}.jsonl"
    path = store.prepare(results_path(out_dir, file_name[:-6]))
    problems: list[str] = []
    commit = _environment()["commit"]
    skip = set().union(*(finished_keys(p, commit, problems) for p in Path(out_dir).glob(f"*/{file_name}"))) if resume else set()
    todo = [(case, r) for r in range(repeat) for case in cases if (case.key(), r) not in skip]
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    rows = []
    with contention.measuring(_warn, allow_concurrent), Progress(len(todo), enabled=progress) as bar, \
            interrupts_stop_the_sweep():
        for problem in problems:
            bar.note(f"unreadable row skipped by --resume: {problem}")
        if len(todo) < len(cases) * repeat:
            bar.note(f"resume: {len(cases) * repeat - len(todo)} finished case(s) in {out_dir}/*/{file_name} skipped")
        for case, r, measured in executor(todo, settings, plugins, bar.begin):
            row = make_row(case, measured, settings, r, run_id, suite, out_dir)
            try:
                store.append_row(Path(out_dir) / row["machine"] / file_name if row["machine"] else path, row)
            except store.DiskFull as error:
                raise store.DiskFull(f"disk full: {len(rows)} row(s) of this sweep kept ({error}), rerun with --resume") from None
            rows.append(row)
            bar.end(row)
    return rows
