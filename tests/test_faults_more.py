"""Faults of issue 21: a build killed or left locked, a full disk, another run measuring at the same time, a
memory cap, and what a row records of other processes' load. Each was seen on a user's machine."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bench.runner
import bench.store
from bench import contention
from bench.cli import main, usable_cpus
from bench.runner import results_path, run_cases
from bench.schema import Case
from bench.store import read_rows
from sasa_impls.impls import _native_build

from helpers import FAST, REPO, alive, descendants

CASE = Case("conv", 3, 8, 2, 8, 1, "float32", "cpu", "fwd")
RUN = ["run", "--impl", "conv", "--k", "3", "--channels", "8", "--heads", "2", "--res", "8", "--direction", "fwd",
       "--quiet", "--min-time", "0", "--max-time", "0.1", "--threads", "1"]
needs_toolchain = pytest.mark.skipif(bool(_native_build.toolchain_problem("cpu")), reason="needs a C++ compiler and ninja")
TINY = "int sasa_tiny_answer() { return 42; }\n"


@pytest.fixture(autouse=True)
def machine_lock_of_our_own(tmp_path, monkeypatch):
    """Sweeps here hold a measuring lock of their own: one of the machine might be held by a real sweep."""
    monkeypatch.setattr(contention, "LOCK_FILE", tmp_path / "measuring.lock")


def _tiny(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A trivial extension source (compiles in a second) and its build folder, in a private torch cache;
    a name of its own per test (torch remembers the sources of every name it loaded in this process)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    name = f"sasa_tiny_{os.getpid()}_{tmp_path.name}"
    return name, tmp_path / "cache" / name


def _load_in_thread(name: str, source: str) -> threading.Thread:
    thread = threading.Thread(target=_native_build.load_extension, args=(name, [source], "compiling tiny"),
                              kwargs={"is_python_module": False}, daemon=True)
    thread.start()
    return thread


@needs_toolchain
def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_waited_for(tmp_path, monkeypatch, capfd):
    name, folder = _tiny(tmp_path, monkeypatch)
    source = str(tmp_path / "tiny.cpp")
    _native_build.load_extension(name, [source], "compiling tiny", is_python_module=False)
    assert "compiling tiny" in capfd.readouterr().err
    (folder / "lock").touch()  # what torch leaves when a build is killed: its FileBaton, waited on forever
    loading = _load_in_thread(name, source)
    loading.join(60)
    assert not loading.is_alive(), "the load hangs on a stale lock"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"removed {folder / 'lock'}, a build lock left by a killed build" in err
    assert not (folder / "lock").exists()
    with open(folder / "sasa.lock", "r+") as held:  # another live process building: wait for it, and say so
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        loading = _load_in_thread(name, source)
        time.sleep(1.0)
        assert loading.is_alive()
        assert f"waiting for process 4242, which is building or loading {name}" in capfd.readouterr().err
    loading.join(60)
    assert not loading.is_alive()


@needs_toolchain
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc to see the compiler processes")
def test_a_build_killed_midway_leaves_no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "slow.cpp"
    source.write_text("#include <torch/extension.h>\nint sasa_slow() { return 1; }\n")  # seconds of compiling
    script = ("import sys; from sasa_impls.impls._native_build import load_extension; "
              "load_extension('sasa_slow', [sys.argv[1]], 'compiling', is_python_module=False)")
    build = subprocess.Popen([sys.executable, "-c", script, str(source)], cwd=REPO, env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, compilers = time.monotonic() + 60, set()
    while time.monotonic() < deadline and not compilers:
        below = descendants(build.pid)
        compilers = {pid for pid in below if _comm(pid) in ("cc1plus", "cc1", "clang", "clang++")}
        time.sleep(0.05)
    assert compilers, "the compiler never started"
    below = descendants(build.pid)
    build.kill()
    build.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and [pid for pid in below if alive(pid)]:
        time.sleep(0.1)
    assert not [pid for pid in below if alive(pid)], "compilers outlived the killed build"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _disk_full_after(monkeypatch, folder: Path, writes: int) -> None:
    """os.write to files below ``folder`` fails with ENOSPC after ``writes`` successful calls (the first
    bytes of the failing call are written, as on a real full disk: a short write, then the error)."""
    real_write, calls = os.write, []

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):  # pipes, other files: as usual
            return real_write(fd, data)
        calls.append(fd)
        if len(calls) > writes:
            if len(calls) == writes + 1 and len(data) > 10:
                return real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(bench.store.os, "write", write)


def test_a_full_disk_keeps_every_row_whole_and_stops_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    path = results_path(out, "sweep")
    first = run_cases([CASE], out, name="sweep", progress=False, settings=FAST)
    before = path.read_bytes()
    _disk_full_after(monkeypatch, tmp_path, 2)  # the probes of `run` and run_cases pass; the next row does not fit
    assert main([*RUN, "--out", str(out), "--name", "sweep", "--k", "3,5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sasa-bench run: disk full: 0 row(s) of this sweep kept (no space left to write "
                   f"{path}), rerun with --resume"]
    assert path.read_bytes() == before  # no half row after the earlier one
    assert [r["run_id"] for r in read_rows([path])] == [first[0]["run_id"]]


def test_a_disk_full_from_the_start_fails_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a case was measured"))
    _disk_full_after(monkeypatch, tmp_path, 0)
    assert main([*RUN, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sasa-bench run: error: --out: cannot write {results_path(tmp_path, 'adhoc')}: disk full"]
    assert results_path(tmp_path, "adhoc").read_bytes() == b""


def test_a_second_run_on_the_machine_is_warned_about_and_rows_record_the_load(tmp_path, monkeypatch, capsys):
    with open(contention.LOCK_FILE, "w") as held:  # another sasa-bench run, measuring now
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        assert main([*RUN, "--out", str(tmp_path / "a")]) == 0
        err = capsys.readouterr().err
        assert "warning: another sasa-bench process (pid 4242) is measuring on this machine" in err
        assert err.count("\n") == 1 and "--allow-concurrent" in err
        assert main([*RUN, "--out", str(tmp_path / "b"), "--allow-concurrent"]) == 0
        assert "another sasa-bench process" not in capsys.readouterr().err
    row = next(read_rows([tmp_path / "a"]))
    assert 0.0 <= row["other_load"] <= 1.0 and row["contended"] == contention.contended(row["other_load"], 1)


def test_other_load_counts_other_processes_not_this_one():
    """A busy process beside the timed block shows as other load; this process's own busy threads do not."""
    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    before = contention.cpu_sample()
    spin(0.6)
    alone = contention.other_load(before, contention.cpu_sample())
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        before = contention.cpu_sample()
        time.sleep(0.6)
        loaded = contention.other_load(before, contention.cpu_sample())
    finally:
        busy.kill()
        busy.wait()
    cpus = os.cpu_count()
    assert loaded * cpus > 0.6 and loaded > alone  # the spinning process used most of one CPU
    assert contention.contended(loaded, threads=1, cpus=cpus) and not contention.contended(0.0, threads=1, cpus=cpus)


def test_memory_limit_rows_name_the_limit(tmp_path):
    """--memory-limit 1: every row says it ran out of memory under that cap; with 2 threads the thread pool
    (started before the cap) no longer kills the worker."""
    settings = dataclasses.replace(FAST, threads=min(2, usable_cpus()), memory_limit_bytes=2**20)
    rows = run_cases([CASE, Case("unfold", 3, 64, 2, 64, 1, "float32", "cpu", "fwd")], tmp_path, progress=False,
                     settings=settings)
    assert rows[1]["status"] == "oom" and rows[1]["error"].endswith("(under --memory-limit 1 MiB)")
    assert rows[0]["status"] == "ok" or rows[0]["error"].endswith("(under --memory-limit 1 MiB)")


def test_bad_field_values_and_unwritable_outputs_are_one_line(tmp_path, capsys):
    out = tmp_path / "results"
    run_cases([CASE], out, progress=False, settings=FAST)
    path = next(out.rglob("*.jsonl"))
    row = json.loads(path.read_text())
    with open(path, "a") as stream:
        stream.write(json.dumps({**row, "latency_ms": "fast"}) + "\n")
    assert main(["report", "--results", str(out), "--out", str(tmp_path / "reports")]) == 0
    err = capsys.readouterr().err
    assert f"{path}:2: latency_ms: expected a number, got 'fast'" in err and "Traceback" not in err
    taken = tmp_path / "a-folder"  # a path that cannot be written as a file, even by root (a read-only folder can)
    taken.mkdir()
    assert main(["compare", str(path), str(path), "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"sasa-bench compare: error: --out: cannot write {taken}: Is a directory"
    assert main(["claim", "--no-run", "--results", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "claim")]) == 2
    claim_err = capsys.readouterr().err.strip()
    assert main(["report", "--results", str(tmp_path / "nonexistent")]) == 2
    assert claim_err.replace("claim", "report") == capsys.readouterr().err.strip()


def _native_under_a_cap(conn) -> None:
    """Forked child: run a native gate task under a memory cap, recording the cap in force when the
    extension is first asked for."""
    import resource

    from bench import worker
    from sasa_impls.impls import native

    real, caps = _native_build.cpu_extension, []

    def recording(*args):
        caps.append(resource.getrlimit(resource.RLIMIT_AS)[0])
        return real(*args)

    _native_build.cpu_extension = native.cpu_extension = recording
    task = {"kind": "gate", "threads": 1, "plugins": [], "memory_limit_bytes": 2**30,
            "gate": {"impl": "native", "device": "cpu", "dtype": "float32", "direction": "fwd"}}
    result = worker.run_task(task)
    conn.send((caps[0], str(result["status"]), result.get("error")))


@needs_toolchain
def test_the_native_kernel_is_built_before_the_memory_cap_applies():
    import multiprocessing
    import resource

    reader, writer = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_native_under_a_cap, args=(writer,))
    child.start()
    assert reader.poll(300), "no result"
    cap, status, error = reader.recv()
    child.join()
    assert cap == resource.getrlimit(resource.RLIMIT_AS)[0]  # asked for before the cap, which is not this
    assert status == "ok", error


def test_the_build_name_follows_torch_python_and_flags(monkeypatch):
    import torch

    base = _native_build.environment_tag("src", _native_build.cpu_build_options())
    assert _native_build.environment_tag("src", _native_build.cpu_build_options("no_exp")) != base  # defines are flags
    assert _native_build.environment_tag("src2", _native_build.cpu_build_options()) != base
    for module, attribute, value in ((torch, "__version__", "0.0.1"), (torch.version, "git_version", "deadbeef"),
                                     (sys, "version", "3.0.0 (other build)")):
        with monkeypatch.context() as changed:
            changed.setattr(module, attribute, value)
            assert _native_build.environment_tag("src", _native_build.cpu_build_options()) != base, attribute
    monkeypatch.setenv("CXX", "clang++")
    assert _native_build.environment_tag("src", _native_build.cpu_build_options()) != base


@needs_toolchain
def test_a_rebuild_is_announced_too(tmp_path, monkeypatch, capfd):
    name, folder = _tiny(tmp_path, monkeypatch)
    source = tmp_path / "tiny.cpp"
    _native_build.load_extension(name, [str(source)], "compiling tiny", is_python_module=False)
    assert capfd.readouterr().err.count("compiling tiny") == 1 and _native_build._built(name)
    source.write_text(TINY + "int sasa_tiny_other() { return 7; }\n")  # what ninja rebuilds for (a header, a flag)
    assert not _native_build._built(name)
    _native_build.load_extension(name, [str(source)], "compiling tiny", is_python_module=False)
    assert capfd.readouterr().err.count("compiling tiny") == 1
