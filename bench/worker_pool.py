"""Long-lived worker processes, one per implementation, for sweeps whose start-up is dear (CUDA, Triton).

The runner starts a fresh process per task (bench.runner.run_isolated): on a CPU that costs milliseconds,
on a GPU every task would pay the CUDA context, Triton's import and its compiled kernels again. Here each
implementation (``conv`` and plan-level work included, by name) gets one process that runs every task of
it in turn, with the same task format and outcome classification as the runner's workers
(bench.worker.run_task, its output captured into ``warnings``). A task that crashes its worker or runs past
its time ends that worker: the task gets the status (error, oom, timeout) and the next task of that
implementation starts a new one. Task kinds are the runner's (gate, memory, time) and ``call``, which runs
``module:function(**kwargs)`` (plan-level work such as the device's ceilings).

Peak memory in a long-lived process: exact on CUDA (the caching allocator's peak above what is allocated
before the call, bench.measure); on CPUs the RSS high-water mark of a used process is looser than the
runner's fresh one, so use the runner there for memory figures.
"""
from __future__ import annotations

import importlib
import signal
import time

from . import runner, worker
from .schema import Status


def _call(task: dict) -> dict:
    module, function = task["function"].split(":")
    return getattr(importlib.import_module(module), function)(**task.get("kwargs", {}))


def serve(conn) -> None:
    """Worker process: run each task received, send each result, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.die_with_parent()
    worker.TASKS.setdefault("call", _call)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        with worker.captured_output() as printed:
            result = worker.run_task(task)
        result["warnings"] = printed or None
        conn.send(result)


def task_owner(task: dict) -> str:
    """The worker a task goes to: its implementation (the case's or the gate's), else its ``owner``."""
    for part in ("case", "gate"):
        if part in task:
            return task[part]["impl"]
    return task.get("owner", "plan")


class WorkerPool:
    """One worker process per owner (:func:`task_owner`), started on first use, all stopped by ``close``.
    ``deadline`` (a time.monotonic() value) caps every task's time: past it a task is stopped as a timeout."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self.workers: dict[str, tuple] = {}
        self.started = 0  # processes started (restarts after a crash or a timeout included)

    def _worker(self, owner: str) -> tuple:
        if owner not in self.workers:
            context = runner.worker_context()
            parent, child = context.Pipe(duplex=True)
            process = context.Process(target=serve, args=(child,), daemon=True)
            with runner.bare_main():
                process.start()
            child.close()
            self.workers[owner] = (process, parent)
            self.started += 1
        return self.workers[owner]

    def _stop(self, owner: str) -> None:
        process, conn = self.workers.pop(owner)
        conn.close()
        process.join(0.5)
        if process.is_alive():
            process.kill()
            process.join()

    def run(self, task: dict, timeout_s: float) -> dict:
        """``task``'s result from its owner's worker; a crash or a timeout becomes the result's status
        (the signature of bench.runner.run_isolated, so the runner's case logic can use the pool)."""
        owner = task_owner(task)
        process, conn = self._worker(owner)
        limit = timeout_s if self.deadline is None else max(0.0, min(timeout_s, self.deadline - time.monotonic()))
        conn.send(task)
        if not conn.poll(limit):
            self._stop(owner)
            why = "the plan's time budget ran out" if limit < timeout_s else "--timeout"
            return {"status": Status.TIMEOUT, "error": f"no result within {limit:.0f} s ({why})"}
        try:
            return conn.recv()
        except EOFError:
            process.join(10)
            self._stop(owner)
            return runner.crash_result(process.exitcode, task.get("memory_limit_bytes"))

    def close(self) -> None:
        """Stop every worker."""
        for owner in list(self.workers):
            self._stop(owner)
