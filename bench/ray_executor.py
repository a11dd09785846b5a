"""The Ray executor: each (case, repeat) of a sweep is one Ray task, measured on whichever node Ray picks.

``sasa-bench run --executor ray [--ray-address ADDRESS]`` hands its cases to Ray instead of measuring them one
after another here (bench.runner.measure_locally); the runner stays the driver: it alone makes the rows and
appends them, in the order the tasks finish, with the same progress, resume, repeat and interrupt handling.

- **Same measurement.** A task runs :func:`bench.runner.measure_here` on its node: the same correctness
  gate, the same isolated worker subprocesses, the same timer and the same row fields, with the node's
  environment, results folder (``machine``: that node's GPU or CPU) and host name (``node``); nothing of Ray
  is loaded in the measured processes. Each Ray worker process keeps its gate verdicts for the sweep, so a
  node gates each (impl, device, dtype, direction, relative, options) once per worker process, not per case.
- **Honest resources.** A CUDA case takes one whole GPU (Ray sets CUDA_VISIBLE_DEVICES for the task, and
  the case runs there as ``cuda``); a CPU case takes ``Settings.threads`` CPUs, so two cases never share
  cores of a node. Ray workers are reused for GPU tasks too (``max_calls=0``): the Ray worker itself never
  touches CUDA (the measuring happens in its subprocesses), and reuse keeps its worker forkserver warm.
  Ray runs its workers at nice 15; the local runtime runs them at the normal priority the local runner's
  subprocesses have (on a cluster, start the nodes with ``RAY_worker_niceness=0`` for the same).
- **Where Ray runs.** With no address (and no ``RAY_ADDRESS``), a local Ray runtime is started for the sweep
  (every CPU and GPU of this machine, no dashboard, quiet) and shut down when it ends, however it ends. With
  an address, the driver connects, ships this working tree's ``bench`` and ``sasa_impls`` to the cluster
  (its nodes need the dependencies: torch, fvcore, ...) and only disconnects at the end; the rows then carry
  the driver's commit and dirty flag, since that is the code that measured. In a process where Ray is
  already initialized (a notebook, a Ray job), that runtime is used as it is and left running.
- **Failures.** A task whose Ray worker or node dies becomes that case's ``error`` row with Ray's reason
  (``oom`` when Ray's memory monitor killed it); tasks are never retried (``--resume`` retries errors).
  An interrupt (Ctrl-C, SIGTERM) cancels every outstanding task, stops a runtime it started and propagates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import uuid
from typing import Callable, Iterator

import bench
import sasa_impls

from . import runner
from .env import environment
from .plugins import load_plugins
from .runner import Executor, Settings
from .schema import Case, Status

INSTALL_HINT = "pip install -e '.[distributed]' (or pip install 'ray>=2.9')"
# The local runtime's object store: rows are small (Ray passes them inline), so the minimum will do.
LOCAL_OBJECT_STORE_BYTES = 100 * 2**20
RAY_RESOURCE = {"num_cpus": "CPU", "num_gpus": "GPU"}
QUIET = dict(log_to_driver=False, logging_level="ERROR")  # workers' output stays in Ray's logs

# In each Ray worker process: the gate verdicts per (sweep, CUDA_VISIBLE_DEVICES), and the devices the
# worker forkserver was started with (its subprocesses inherit its environment, not the task's).
_gates: dict[tuple, dict] = {}
_forkserver_devices: list[str | None] = []


def cluster_device(text: str) -> str:
    """``--device`` for a sweep on Ray: cpu or cuda, whether or not the driver has a GPU (Ray picks each
    case's GPU on the node it runs on, so a GPU index means nothing there); ValueError naming the flag."""
    if text not in ("cpu", "cuda"):
        raise ValueError(f"--device: with --executor ray, expected cpu or cuda (Ray gives each case a GPU of "
                         f"its choice), got {text!r}")
    return text


def task_resources(case: Case, settings: Settings) -> dict:
    """What one case's task holds while it runs: a whole GPU for a CUDA case, its threads in CPUs otherwise."""
    if case.device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": settings.threads}


def measure_on_node(case: Case, settings: Settings, plugins: list[str], code: dict, sweep: str) -> dict:
    """The Ray task: :func:`bench.runner.measure_here` on this node, a CUDA case on the GPU Ray gave the
    task, the gate cached per worker process and sweep; ``code`` (commit, dirty) overrides the node's."""
    load_plugins(plugins)
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if _forkserver_devices != [devices]:  # another GPU than before: new subprocesses must see the new one
        runner.stop_workers()
        _forkserver_devices[:] = [devices]
    here = dataclasses.replace(case, device="cuda") if case.device.startswith("cuda") else case
    measured = runner.measure_here(here, settings, plugins, _gates.setdefault((sweep, devices), {}))
    return {**measured, **code}


def ray_executor(address: str | None = None) -> Executor:
    """An executor (bench.runner.Executor) measuring on a Ray cluster at ``address`` (default: ``RAY_ADDRESS``,
    else a local runtime for the sweep); ImportError saying how to install Ray when it is missing."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"Ray is not installed: {INSTALL_HINT}") from None

    def execute(todo: list[tuple[Case, int]], settings: Settings, plugins: list[str],
                started: Callable[[Case, int], None]) -> Iterator[tuple[Case, int, dict]]:
        # ``started`` is never called: Ray does not tell the driver when a task starts (the progress bar's
        # ETA then uses the throughput so far)
        if not todo:  # everything was resumed: no cluster needed
            return
        with _runtime(ray, address or os.environ.get("RAY_ADDRESS")) as code:
            _check_feasible(ray, todo, settings)
            task = ray.remote(max_calls=0, max_retries=0)(measure_on_node)
            sweep = uuid.uuid4().hex
            pending = {task.options(**task_resources(case, settings)).remote(case, settings, plugins, code, sweep):
                       (case, repeat) for case, repeat in todo}
            try:
                while pending:
                    [ref], _ = ray.wait(list(pending), num_returns=1)
                    case, repeat = pending.pop(ref)
                    yield case, repeat, _outcome(ray, ref)
            finally:  # interrupted (or the runner failed): stop the cluster's work on this sweep
                for ref in pending:
                    ray.cancel(ref, force=True)

    return execute


@contextlib.contextmanager
def _runtime(ray, address: str | None) -> Iterator[dict]:
    """Within: Ray is initialized (see the module docstring); yields the ``code`` fields the tasks report."""
    if ray.is_initialized():  # the caller's runtime: used as it is, never shut down here
        if address:
            raise ValueError(f"Ray is already initialized in this process: give no address to use it, or shut it "
                             f"down to connect to {address}")
        yield {}
        return
    sigterm = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    try:
        try:
            code = _init(ray, address)
        except SystemExit as exit:  # ray.init's own SIGTERM handler (sys.exit) was in place: still an interrupt
            if exit.code != signal.SIGTERM:
                raise
            raise KeyboardInterrupt from None
        finally:  # the runner's handler again: SIGTERM ends the sweep like Ctrl-C
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        yield code
    finally:
        ray.shutdown()  # a local runtime stops; a cluster only loses this driver


def _init(ray, address: str | None) -> dict:
    """Connect to the cluster at ``address``, shipping this tree's code, or start a local runtime; the
    ``code`` fields (commit, dirty) the tasks report: the driver's when its code was shipped."""
    from .worker import message

    if not address:
        start_local_runtime()
        return {}

    _check_reachable(address)
    env = environment()
    try:
        ray.init(address=address, runtime_env={"py_modules": [bench, sasa_impls], "excludes": ["__pycache__"]}, **QUIET)
    except ConnectionError as error:
        raise ValueError(f"Ray cluster at {address}: {message(error)}") from None
    return {"commit": env["commit"], "dirty": env["dirty"]}


def _check_reachable(address: str) -> None:
    """ValueError when nothing answers at ``address`` (HOST:PORT or ray://HOST:PORT): ray.init would retry for
    minutes, deaf to Ctrl-C. Other forms ("auto") are Ray's to resolve."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ValueError(f"Ray cluster at {address}: nothing answers ({error.strerror or error})") from None


def start_local_runtime(cpus: int | None = None, gpus: int | None = None) -> None:
    """Start a local Ray runtime in this process as the executor does for a sweep: ``cpus`` CPUs and ``gpus``
    GPUs (default: all of this machine's), no dashboard, quiet, its workers at normal priority. An executor
    used while it runs uses it, and leaves it running; ``ray.shutdown()`` stops it."""
    import ray

    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _system_config={"worker_niceness": 0}, **QUIET)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _check_feasible(ray, todo: list[tuple[Case, int]], settings: Settings) -> None:
    """ValueError before anything runs when no node of the cluster can hold a case's resources (Ray would
    otherwise wait for such a node forever)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for case, _ in todo:
        need = {RAY_RESOURCE[name]: amount for name, amount in task_resources(case, settings).items() if amount}
        if not any(all(node.get(name, 0) >= amount for name, amount in need.items()) for node in nodes):
            shapes = sorted({f"{node.get('CPU', 0):g} CPU + {node.get('GPU', 0):g} GPU" for node in nodes})
            raise ValueError(f"no node of the Ray cluster has {' + '.join(f'{v:g} {k}' for k, v in need.items())} for "
                             f"{case.label()} (its nodes: {', '.join(shapes) or 'none'}); a CPU case takes --threads CPUs, "
                             "a CUDA case one GPU")


def _outcome(ray, ref) -> dict:
    """The measured fields of a finished task, or of its failure: ``error`` with Ray's reason, ``oom`` when
    Ray's memory monitor killed the worker."""
    from .worker import message

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:  # the task raised (e.g. a plugin that does not load there)
        return {"status": Status.ERROR, "error": f"the Ray task raised {message(error.cause)}"}
    except ray.exceptions.RayError as error:  # its worker or node died, or it was cancelled
        status = Status.OOM if isinstance(error, ray.exceptions.OutOfMemoryError) else Status.ERROR
        return {"status": status, "error": f"Ray: {message(error)}"}
