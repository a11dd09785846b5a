"""The `sasa-bench` commands list, env and run; bad input gives one line and exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bench.runner
from bench.cli import main

from helpers import REPO, bad_flags



def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, flag", bad_flags("""
    --k 4
    --k 3,x
    --impl unfold,nope
    --channels 60 --heads 8
    --dtype float8
    --direction bwd
    --device tpu
    --device cuda:99
    --suite nope
    --res: --suite quick --res 64
    --reps 0
    --timeout -1
    --impl ''
    --k 3,,7
    --dtype float32,
    --threads 999
    --min-time 10 --max-time 1
    --name ../../evil
    --name sub/evil
    --name ..
"""))
def test_bad_run_input_is_one_line_naming_the_flag(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a case was measured"))
    assert main(["run", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
    assert not any(tmp_path.rglob("*"))  # nothing was measured or written, inside --out or beside it


def test_bad_input_in_a_real_process_has_no_traceback():
    done = cli("run", "--k", "4")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["sasa-bench run: error: --k: kernel sizes must be odd (the window is centred), got 4"]


def test_list_and_env(capsys):
    assert main(["list", "--device", "cpu"]) == 0
    listing = capsys.readouterr().out
    assert "unfold" in listing and "conv" in listing and "reference" in listing
    assert main(["env", "--json"]) == 0
    fingerprint = json.loads(capsys.readouterr().out)
    assert {"machine", "commit", "dirty", "torch", "cpu", "threads", "gpu"} <= set(fingerprint)


def test_run_writes_rows_and_prints_a_table(tmp_path):
    done = cli("run", "--impl", "unfold,conv", "--k", "3", "--channels", "8", "--heads", "2", "--res", "8",
               "--direction", "fwd", "--reps", "2", "--min-time", "0", "--threads", "1", "--out", str(tmp_path), "--name", "t")
    assert done.returncode == 0, done.stderr
    assert "median ms" in done.stdout and "[2/2" in done.stderr and "ETA" in done.stderr
    rows = [json.loads(line) for f in tmp_path.rglob("t.jsonl") for line in f.read_text().splitlines()]
    assert [(r["impl"], r["status"]) for r in rows] == [("unfold", "ok"), ("conv", "ok")]
    again = cli("run", "--impl", "unfold,conv", "--k", "3", "--channels", "8", "--heads", "2", "--res", "8",
                "--direction", "fwd", "--threads", "1", "--out", str(tmp_path), "--name", "t", "--resume")
    assert again.returncode == 0 and "2 finished case(s)" in again.stderr and "0 row(s) appended" in again.stdout


@pytest.mark.parametrize("argv, flag", [(["--threads", "0"], "--threads"), (["--threads", "999"], "--threads"),
                                        (["--size", "0"], "--size"), (["--size", "512,,1024"], "--size"),
                                        (["--dtype", "float8"], "--dtype")])
def test_bad_peak_input_is_one_line(argv, flag, capsys, tmp_path):
    assert main(["peak", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and not any(tmp_path.iterdir())
