"""Sweeps on Ray (bench/ray_executor.py) against a real local Ray runtime (2 CPUs, no dashboard): the same cases
and statuses as the local runner, a crashing case and a killed Ray worker as error rows, resume, interrupts that
stop the cluster's work, and no Ray process left behind. Without Ray installed, only the one-line error runs."""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

import bench.ray_executor
import bench.runner
from bench.cli import main
from bench.env import environment
from bench.plugins import PLUGINS_ENV
from bench.ray_executor import ray_executor
from bench.runner import results_path, run_cases
from bench.schema import Case, Status, case_key
from bench.store import read_rows

from helpers import FAST, REPO, alive, descendants, like_a_terminal_job, planted
from test_faults import RUN
from test_harness import PLUGIN as HARNESS_PLUGIN

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (the distributed extra)")
needs_proc = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc to see Ray's processes")

# test_harness's planted implementations (t_wrong, t_crash, t_slow, ...), one that kills the Ray worker measuring
# it (the parent of the worker forkserver that started the measuring process; never anything but a Ray worker),
# and one that fails where ray is loaded in the measured process (as when it imports the Ray worker's script).
PLUGIN = HARNESS_PLUGIN + textwrap.dedent('''
    import signal
    import sys
    from pathlib import Path

    def parent(pid):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    def kill_ray_worker(q, k, v, rel_row, rel_col, kernel_size, scale):
        if q.shape[2] > 9:
            ray_worker = parent(os.getppid())
            if not Path(f"/proc/{ray_worker}/cmdline").read_bytes().startswith(b"ray::"):
                raise RuntimeError("not measured by a Ray worker")
            os.kill(ray_worker, signal.SIGKILL)
            time.sleep(30)  # this process dies with its forkserver, which dies with the Ray worker
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    def without_ray(q, k, v, rel_row, rel_col, kernel_size, scale):
        if "ray" in sys.modules:
            raise RuntimeError("ray is loaded in the measured process")
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    register(Impl(name="t_kill_ray", forward=kill_ray_worker, description="test-only"))
    register(Impl(name="t_without_ray", forward=without_ray, description="test-only"))
''')

SHAPE = dict(k=3, channels=16, heads=4, res=12, batch=1, dtype="float32", device="cpu")
CASES = [Case("unfold", direction="fwd", **SHAPE), Case("conv", direction="fwd", **SHAPE),
         Case("unfold", direction="fwd+bwd", **SHAPE),
         Case("t_without_ray", direction="fwd", **SHAPE),  # ok: nothing of Ray in the measured process
         Case("t_wrong", direction="fwd", **SHAPE),  # incorrect: gated, never timed
         Case("natten", direction="fwd", **SHAPE),  # unsupported: no relative logits (or not installed)
         Case("t_crash", direction="fwd", **SHAPE),  # its measuring subprocess aborts
         Case("t_kill_ray", direction="fwd", **SHAPE)]  # kills its Ray worker mid-case


def ray_processes() -> set[int]:
    """Ray's processes below this one (gcs_server, raylet, agents, workers) and everything below them."""
    found = set()
    for pid in descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        program = title.split(b"\0")[:3]  # ray's binaries, or python [-u] running one of ray's scripts
        if title.startswith(b"ray::") or any(b"/ray/" in arg for arg in program):
            found |= {pid} | descendants(pid)
    return found


def still_alive(pids: set[int], within_s: float = 20.0) -> list[str]:
    """Those of ``pids`` still running after waiting up to ``within_s`` for them to end, with their command lines."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.25)
    return [f"{pid}: {_title(pid)[:100].decode(errors='replace')}" for pid in pids if alive(pid)]


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray runtime in this process (2 CPUs, no dashboard): the executor uses a runtime it finds
    initialized, and the command can connect to it. Afterwards no Ray process is left."""
    ray = pytest.importorskip("ray")
    sigterm = signal.getsignal(signal.SIGTERM)
    bench.ray_executor.start_local_runtime(cpus=2, gpus=0)
    signal.signal(signal.SIGTERM, sigterm)  # ray.init made SIGTERM exit this process
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        started = ray_processes() if Path("/proc").is_dir() else set()
        ray.shutdown()
        assert not still_alive(started), "Ray processes left running after ray.shutdown()"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The planted implementations' file; they leave the registry again after this file's tests."""
    with planted(tmp_path_factory.mktemp("plugin"), "planted_ray", PLUGIN) as path:
        yield path


@pytest.fixture(scope="module")
def sweeps(cluster, plugin, tmp_path_factory):
    """CASES through the local runner and through Ray: (local rows, Ray rows, the Ray sweep's results folder)."""
    local_out, ray_out = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLUGINS_ENV, plugin)
        local = run_cases(CASES, local_out, progress=False, settings=FAST)
        on_ray = run_cases(CASES, ray_out, progress=False, settings=FAST, executor=ray_executor())
    return {r["impl"] + r["direction"]: r for r in local}, {r["impl"] + r["direction"]: r for r in on_ray}, ray_out


@needs_ray
def test_ray_gives_the_local_runners_cases_and_statuses(sweeps):
    local, on_ray, _ = sweeps
    assert {case_key(r): r["status"] for r in on_ray.values()} == {case_key(r): r["status"] for r in local.values()}
    assert {r["status"] for r in on_ray.values()} == {"ok", "incorrect", "unsupported", "error"}
    assert on_ray["t_without_rayfwd"]["status"] == "ok"  # the measured process did not import the Ray worker's script
    for name, row in on_ray.items():
        if name != "t_kill_rayfwd":  # measured to the end: the same fields, and the node says where
            assert {k for k, v in row.items() if v is not None} ^ {k for k, v in local[name].items() if v is not None} <= {"warnings"}
            assert row["node"] == socket.gethostname() and row["machine"] == local[name]["machine"]
            assert row["commit"] == local[name]["commit"]
        if row["status"] == "ok":
            assert row["latency_ms"] > 0 and row["peak_mem_bytes"] is not None and row["flops_fvcore"] > 0


@needs_ray
def test_rows_are_written_once_each_in_the_measuring_machines_folder(sweeps):
    _, on_ray, out = sweeps
    on_disk = list(read_rows([out]))
    assert collections.Counter(case_key(r) for r in on_disk) == collections.Counter(c.key() for c in CASES)
    assert {r["run_id"] for r in on_disk} == {r["run_id"] for r in on_ray.values()}
    for row in on_disk:
        assert Path(row["source"]) == results_path(out, "adhoc")  # the machine that measured is this one


@needs_ray
def test_a_crashing_case_is_an_error_row_and_the_sweep_finishes(sweeps):
    local, on_ray, _ = sweeps
    assert on_ray["t_crashfwd"]["status"] == "error" and "SIGABRT" in on_ray["t_crashfwd"]["error"]
    assert on_ray["t_crashfwd"]["error"] == local["t_crashfwd"]["error"]
    assert len(on_ray) == len(CASES)


@needs_ray
def test_a_killed_ray_worker_is_an_error_row_with_the_reason(sweeps):
    local, on_ray, _ = sweeps
    killed = on_ray["t_kill_rayfwd"]
    assert killed["status"] == "error" and killed["latency_ms"] is None and killed["node"] is None
    assert killed["error"].startswith("Ray: WorkerCrashedError: The worker died unexpectedly")
    assert "not measured by a Ray worker" in local["t_kill_rayfwd"]["error"]  # the local runner was never killed
    assert on_ray["unfoldfwd+bwd"]["status"] == on_ray["convfwd"]["status"] == "ok"  # the sweep went on


@needs_ray
def test_resume_skips_what_is_done_and_retries_errors(sweeps, plugin, tmp_path, monkeypatch):
    shutil.copytree(sweeps[2], tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv(PLUGINS_ENV, plugin)
    new = Case("im2col_einsum", direction="fwd", **SHAPE)
    resumed = run_cases([*CASES, new], tmp_path, progress=False, settings=FAST, executor=ray_executor())
    assert sorted(r["impl"] for r in resumed) == ["im2col_einsum", "t_crash", "t_kill_ray"]
    assert len(list(read_rows([tmp_path]))) == len(CASES) + 3


@needs_ray
def test_a_case_no_node_can_hold_fails_before_anything_runs(cluster, tmp_path):
    case = CASES[0]
    for settings, cases, need in ((replace(FAST, threads=3), [case], "3 CPU"), (FAST, [replace(case, device="cuda")], "1 GPU + 1 CPU")):
        with pytest.raises(ValueError, match=re.escape(f"no node of the Ray cluster has {need} for ")):
            run_cases(cases, tmp_path, progress=False, settings=settings, executor=ray_executor())
    assert not list(read_rows([tmp_path]))


@needs_ray
def test_sigterm_while_ray_starts_is_an_interrupt_too(tmp_path, monkeypatch):
    import ray

    def init(**kwargs):  # what ray.init does first: SIGTERM exits the process; then a SIGTERM arrives
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # this file's cluster stays up
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_cases(CASES[:1], tmp_path, progress=False, settings=FAST, executor=ray_executor())
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_ray_task_gates_once_per_worker_and_sweep_and_uses_the_gpu_ray_gave_it(monkeypatch):
    """The task body alone (no Ray): the gate is cached per sweep and visible GPU; a new GPU restarts the
    worker forkserver (its subprocesses inherit its CUDA_VISIBLE_DEVICES); a CUDA case runs as ``cuda``."""
    tasks, restarts = [], []
    monkeypatch.setattr(bench.runner, "run_isolated", lambda task, timeout_s: tasks.append(task) or {"status": Status.OK})
    monkeypatch.setattr(bench.runner, "stop_workers", lambda: restarts.append(os.environ["CUDA_VISIBLE_DEVICES"]))
    monkeypatch.setattr(bench.ray_executor, "_gates", {})
    monkeypatch.setattr(bench.ray_executor, "_forkserver_devices", [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    small, big = Case("unfold", direction="fwd", **{**SHAPE, "device": "cuda:1"}), Case("unfold", direction="fwd", **{**SHAPE, "device": "cuda:1", "res": 20})
    driver = {"commit": "c0ffee", "dirty": True}
    for case in (small, big):
        measured = bench.ray_executor.measure_on_node(case, FAST, [], driver, "sweep-1")
    assert [t["kind"] for t in tasks] == ["gate", "memory", "time", "memory", "time"]
    assert {t["gate"]["device"] if t["kind"] == "gate" else t["case"]["device"] for t in tasks} == {"cuda"}
    assert measured["commit"] == "c0ffee" and measured["dirty"] is True and measured["node"] == socket.gethostname()
    bench.ray_executor.measure_on_node(small, FAST, [], driver, "sweep-2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    bench.ray_executor.measure_on_node(small, FAST, [], driver, "sweep-2")
    assert [t["kind"] for t in tasks].count("gate") == 3 and restarts == ["3", "5"]


@pytest.mark.parametrize("argv, message", [
    (["--executor", "ray"], "--executor ray: Ray is not installed: pip install -e '.[distributed]' (or pip install 'ray>=2.9')"),
    (["--ray-address", "auto"], "--ray-address: only with --executor ray"),
])
def test_executor_flags_fail_in_one_line_before_measuring(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError: Ray is not installed
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a case was measured"))
    assert main([*RUN, *argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"sasa-bench run: error: {message}"]
    assert not list(tmp_path.rglob("*.jsonl"))


@needs_ray
def test_a_runtime_this_process_started_is_used_and_never_shut_down(cluster, tmp_path):
    import ray

    with pytest.raises(ValueError, match="Ray is already initialized in this process: give no address"):
        run_cases(CASES[:1], tmp_path, progress=False, settings=FAST, executor=ray_executor("127.0.0.1:1"))
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster


@needs_ray
@pytest.mark.parametrize("argv, message", [
    (["--ray-address", "127.0.0.1:1"], "Ray cluster at 127.0.0.1:1: nothing answers (Connection refused)"),
    (["--device", "cuda:1"], "--device: with --executor ray, expected cpu or cuda (Ray gives each case a GPU of its "
                             "choice), got 'cuda:1'"),
])
def test_ray_sweeps_that_cannot_start_fail_in_one_line(argv, message, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # this file's cluster stays up
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a case was measured"))
    assert main([*RUN, "--executor", "ray", *argv, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"sasa-bench run: error: {message}"]


def interrupted_sweep(tmp_path: Path, plugin: str, signum: int, *extra: str) -> tuple[subprocess.Popen, str, set[int], set[int]]:
    """`sasa-bench run --executor ray` of conv and t_slow (hangs on the case, not the gate), sent ``signum``
    once conv's row is written and t_slow is being measured: (the command, its stderr, its processes, the
    processes measuring t_slow: its Ray worker and everything below it)."""
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench.cli", "run", "--executor", "ray", *extra, "--impl", "conv,t_slow", "--k", "3",
            "--channels", "8", "--heads", "2", "--res", "12", "--direction", "fwd", "--threads", "1", "--min-time", "0",
            "--max-time", "0.1", "--out", str(out)]
    command = subprocess.Popen(argv, cwd=REPO, env={**os.environ, PLUGINS_ENV: plugin}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=like_a_terminal_job)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and command.poll() is None:
        time.sleep(0.5)
        if [line for f in out.rglob("adhoc.jsonl") for line in f.read_text().splitlines()]:
            break
    time.sleep(2.0)  # conv's Ray worker is idle again; t_slow's hangs in its measuring process
    measuring = {pid for worker in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if _title(worker).startswith(b"ray::measure_on_node") for pid in {worker} | descendants(worker)}
    assert len(measuring) >= 3, "t_slow is not being measured (its Ray worker, forkserver and measuring process)"
    mine = descendants(command.pid)
    os.killpg(command.pid, signum) if signum == signal.SIGINT else command.send_signal(signum)  # Ctrl-C: the whole group
    _, err = command.communicate(timeout=90)
    return command, err, mine, measuring


def _title(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for f in (tmp_path / "results").rglob("adhoc.jsonl") for line in f.read_text().splitlines()]


@needs_ray
@needs_proc
def test_ctrl_c_stops_the_commands_own_ray_runtime_and_keeps_finished_rows(plugin, tmp_path):
    command, err, mine, measuring = interrupted_sweep(tmp_path, plugin, signal.SIGINT)
    assert command.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "sasa-bench run: interrupted; finished cases are kept (rerun with --resume)"
    assert [(r["impl"], r["status"]) for r in _rows(tmp_path)] == [("conv", "ok")]
    assert measuring <= mine and not still_alive(mine), "Ray processes left running after Ctrl-C"


@needs_ray
@needs_proc
def test_sigterm_on_a_running_cluster_cancels_the_sweep_and_leaves_the_cluster_up(cluster, plugin, tmp_path):
    import ray

    command, err, _, measuring = interrupted_sweep(tmp_path, plugin, signal.SIGTERM, "--ray-address", cluster)
    assert command.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "sasa-bench run: interrupted; finished cases are kept (rerun with --resume)"
    [row] = _rows(tmp_path)
    assert (row["impl"], row["status"], row["commit"]) == ("conv", "ok", environment()["commit"])
    assert not still_alive(measuring), "the cancelled case is still being measured"
    assert ray.cluster_resources().get("CPU") == 2  # disconnected only: the cluster is still there
