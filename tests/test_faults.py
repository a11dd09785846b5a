"""Faults a user meets: output paths that cannot be written, result files a crash left half-written, lines
that are not rows, and interrupts (Ctrl-C, SIGTERM, SIGKILL) of a sweep. Nothing measured is lost, errors
are one line, and no worker outlives the runner."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bench.runner
from bench.cli import main
from bench.plugins import PLUGINS_ENV
from bench.runner import results_path, run_cases
from bench.schema import Case
from bench.store import append_row, prepare, read_rows

from helpers import FAST, REPO, alive, descendants, like_a_terminal_job

CASE = Case("conv", 3, 8, 2, 8, 1, "float32", "cpu", "fwd")
RUN = ["run", "--impl", "conv", "--k", "3", "--channels", "8", "--heads", "2", "--res", "8", "--direction", "fwd", "--quiet"]


def no_measuring(monkeypatch):
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a case was measured"))


def test_out_that_is_a_file_fails_before_measuring(tmp_path, capsys, monkeypatch):
    no_measuring(monkeypatch)
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert main([*RUN, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"sasa-bench run: error: --out: {target} is a file, not a folder: cannot write "
                                f"{results_path(target, 'adhoc')}"]


def test_results_file_that_is_a_folder_fails_before_measuring(tmp_path, capsys, monkeypatch):
    no_measuring(monkeypatch)
    results_path(tmp_path, "mine").mkdir(parents=True)
    assert main([*RUN, "--out", str(tmp_path), "--name", "mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder, not a results file" in err
    with pytest.raises(ValueError, match="is a folder"):  # the library says the same, before measuring
        run_cases([CASE], tmp_path, name="mine", progress=False, settings=FAST)


def test_append_after_a_half_written_line_keeps_every_row(tmp_path):
    path = tmp_path / "m" / "sweep.jsonl"
    row = {"impl": "conv", "k": 3, "channels": 8, "heads": 2, "res": 8, "batch": 1, "dtype": "float32",
           "device": "cpu", "direction": "fwd", "status": "ok"}
    append_row(path, row)
    with open(path, "a") as stream:
        stream.write('{"impl": "unfold", "k": 5, "chan')  # a run killed mid-write
    append_row(path, {**row, "k": 7})
    problems: list[str] = []
    rows = list(read_rows([path], problems))
    assert [r["k"] for r in rows] == [3, 7]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: ")
    with pytest.raises(ValueError, match=rf"unreadable result row {path}:2: "):
        list(read_rows([path]))  # without a list to report into, a bad line is an error, never dropped


def test_runner_appends_after_a_crashed_line(tmp_path):
    path = prepare(results_path(tmp_path, "adhoc"))
    path.write_text('{"impl": "conv", "k"')
    rows = run_cases([CASE], tmp_path, progress=False, settings=FAST)
    problems: list[str] = []
    on_disk = list(read_rows([path], problems))
    assert [r["run_id"] for r in on_disk] == [rows[0]["run_id"]] and len(problems) == 1


def test_report_says_which_lines_are_not_rows(tmp_path, capsys):
    results = tmp_path / "results"
    run_cases([CASE], results, progress=False, settings=FAST)
    path = next(results.rglob("*.jsonl"))
    with open(path, "a") as stream:
        stream.write("[1, 2, 3]\n\"text\"\n")
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "reports")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:2: expected a JSON object, got list" in err and f"{path}:3: expected a JSON object, got str" in err
    assert main(["compare", str(path), str(path)]) == 0
    assert f"{path}:2: expected a JSON object" in capsys.readouterr().err


PLUGIN = textwrap.dedent('''
    import time
    from sasa_impls.registry import Impl, register
    from sasa_impls.impls.reference import reference_attention

    def slow(q, k, v, rel_row, rel_col, kernel_size, scale):
        if q.shape[2] > 9:  # the gate's 9 x 11 input passes quickly; the case itself hangs
            time.sleep(120)
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    register(Impl(name="t_hang", forward=slow, description="test-only"))
''')


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc to see the worker processes")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_an_interrupted_sweep_ends_quietly_and_leaves_no_process(tmp_path, how):
    plugin = tmp_path / "hang.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench.cli", "run", "--impl", "conv,t_hang", "--k", "3", "--channels", "8",
            "--heads", "2", "--res", "12", "--direction", "fwd", "--min-time", "0", "--max-time", "0.1", "--out", str(out)]
    runner = subprocess.Popen(argv, cwd=REPO, env={**os.environ, PLUGINS_ENV: str(plugin)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=like_a_terminal_job)
    deadline, workers = time.monotonic() + 120, set()
    while time.monotonic() < deadline and runner.poll() is None:
        workers = descendants(runner.pid)
        rows = list(out.rglob("adhoc.jsonl"))
        if len(workers) >= 2 and rows and rows[0].read_text().count("\n") == 1:  # conv done, t_hang measuring
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "the hanging case never started"
    time.sleep(1.0)
    workers = descendants(runner.pid)
    if how == "ctrl-c":
        os.killpg(runner.pid, signal.SIGINT)  # a terminal sends it to the whole foreground group
    else:
        runner.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    out_text, err_text = runner.communicate(timeout=60)
    time.sleep(2.0)  # SIGKILL: the forkserver notices its runner is gone, and its workers die with it
    assert not [pid for pid in workers if alive(pid)], f"left running after {how}"
    assert "Traceback" not in err_text and "Error" not in err_text
    if how == "sigkill":
        assert runner.returncode == -signal.SIGKILL
    else:
        assert runner.returncode == 130
        assert err_text.strip().splitlines()[-1] == "sasa-bench run: interrupted; finished cases are kept (rerun with --resume)"
    rows = [json.loads(line) for line in next(out.rglob("adhoc.jsonl")).read_text().splitlines()]
    assert [(r["impl"], r["status"]) for r in rows] == [("conv", "ok")]  # the finished case is kept
