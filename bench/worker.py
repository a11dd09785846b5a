"""What runs inside a case's own subprocess: the correctness gate, or one measurement of one case.

The runner starts :func:`child_main` in a fresh process per task, so an exception, a crash, running out
of memory or time only ends that process; the result (or the failure, classified as a row ``status``)
goes back through a pipe. What the measured libraries print while the task runs is captured and sent
back as the result's ``warnings`` instead of breaking the runner's progress line.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import tempfile
import warnings
from typing import Callable, Iterator

import torch

from . import interleave, measure, pipeline
from .plugins import load_plugins
from .schema import Case, Status

# Messages of allocation failures that torch raises as plain RuntimeErrors (CPU allocator, older CUDA).
OOM_MARKERS = ("can't allocate memory", "out of memory")
MAX_WARNINGS = 20  # distinct lines kept per task
PR_SET_PDEATHSIG = 1  # linux/prctl.h

TASKS: dict[str, Callable[[dict], dict]] = {
    "gate": lambda task: pipeline.gate(**task["gate"]),
    "memory": lambda task: pipeline.measure_memory(Case(**task["case"])),
    "time": lambda task: pipeline.measure_time(Case(**task["case"]), measure.TimerSettings(**task["timer"])),
    "interleave": lambda task: interleave.time_cases(task["cases"], task["interleave"]),
    "profile": lambda task: _profile(task),
    "model": lambda task: _model(task),
}


def _model(task: dict) -> dict:
    """`sasa-bench models`' task: one stage (check, memory, time) of one model (imported here, on use)."""
    from .commands.models import model_task

    return model_task(task)


def _profile(task: dict) -> dict:
    """`sasa-bench profile`'s task (imported here, on use: bench.profiling imports this module)."""
    from .profiling.task import ProfileOptions, profile_case

    return profile_case(Case(**task["case"]), measure.TimerSettings(**task["timer"]), ProfileOptions(**task["profile"]),
                        task["timeout_s"])


def message(error: BaseException) -> str:
    """One line saying what went wrong: the exception's type and the first line of its message."""
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def failure_status(error: BaseException) -> Status:
    """Row status of an exception: ``oom`` for allocation failures, ``unsupported`` for what an
    implementation declares it cannot do (NotImplementedError, e.g. a backward it lacks), else ``error``."""
    if isinstance(error, NotImplementedError):
        return Status.UNSUPPORTED
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return Status.OOM
    if isinstance(error, RuntimeError) and any(m in str(error).lower() for m in OOM_MARKERS):
        return Status.OOM
    return Status.ERROR


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes`` (RLIMIT_AS), so
    allocating more fails with an allocation error (tests use it to make a case run out of memory)."""
    current = measure.proc_status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, hard))


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent, the forkserver, exits; and let the
    forkserver exit when the runner goes away (even by SIGKILL) by closing this process's copy of the
    forkserver's "a client is alive" pipe (multiprocessing hands every child one, which would keep the
    forkserver, and so this worker, running). No worker outlives the runner. Elsewhere nothing happens."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        server._forkserver_alive_fd = None
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Within: Python warnings and anything written to stdout/stderr (fds 1 and 2, so C++ and compiler
    output too) are collected; on exit the list holds the distinct lines (at most MAX_WARNINGS)."""
    lines: list[str] = []
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            printed = sink.read().decode(errors="replace").splitlines()
            found = [f"{w.category.__name__}: {(str(w.message).strip().splitlines() or [''])[0]}" for w in caught] + printed
            lines.extend(list(dict.fromkeys(line.strip()[:300] for line in found if line.strip()))[:MAX_WARNINGS])


def before_the_limit(task: dict) -> None:
    """What the memory cap must not hit, done first: the CPU thread pool is started (a thread that cannot
    get its stack kills the process in OpenMP) and the native extension built and loaded (the compiler
    runs in other processes that the cap would starve)."""
    torch.ones(1 << 20).add_(1.0)  # big enough for ATen to run it on every thread
    impls = {spec["impl"]: spec["device"] for spec in (task.get("case"), task.get("gate"), *task.get("cases", ())) if spec}
    if "native" in impls:
        from sasa_impls.impls import _native_build

        (_native_build.cuda_extension if impls["native"].startswith("cuda") else _native_build.cpu_extension)()


def limit_note(limit_bytes: int | None) -> str:
    """How an out-of-memory message names the memory cap it ran under ("" when there was none)."""
    return f" (under --memory-limit {limit_bytes / 2**20:g} MiB)" if limit_bytes else ""


def run_task(task: dict) -> dict:
    """Set up this process for the task (threads, plugins, memory cap, no TF32: float32 means float32 for
    every implementation and the conv) and run it; failures become a status (an out-of-memory one names
    the memory cap)."""
    limit = task.get("memory_limit_bytes")
    try:
        torch.set_num_threads(task["threads"])
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        load_plugins(task["plugins"])
        if limit:
            before_the_limit(task)
            limit_address_space(limit)
        return TASKS[task["kind"]](task)
    except BaseException as error:  # every failure becomes the row's status; the sweep goes on
        status = failure_status(error)
        return {"status": status, "error": message(error) + (limit_note(limit) if status == Status.OOM else "")}


def child_main(task: dict, conn) -> None:
    """Subprocess entry: ignore the terminal's Ctrl-C (the runner decides what stops), die with the
    runner, run the task with its output captured, send the result; a runner that is gone gets nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    with captured_output() as printed:
        result = run_task(task)
    result["warnings"] = printed or None
    try:
        conn.send(result)
        conn.close()
    except OSError:  # BrokenPipeError: the runner stopped listening (interrupted); nothing to report to
        pass
