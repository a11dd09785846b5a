"""The GPU plan (scripts/gpu_benchmark.py, bench/gpu_plan.py, bench/gpu_phases.py) on the CPU, as the GPU machine would run it: the
code on PYTHONPATH and fvcore, natten, asv and ray impossible to import (a meta-path blocker in a
sitecustomize.py). ``--smoke`` runs every phase on tiny shapes; ``--budget 60 --smoke`` stops within the budget
saying what it measured and what it skipped; ``--dry-run`` prints each phase's estimate; bad arguments are one
line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import store
from bench.gpu_phases import PHASE_NAMES
from bench.gpu_plan import RECORDS, ROWS
from helpers import REPO

BLOCKED = ("fvcore", "natten", "asv", "ray")
BLOCKER = f"""
import sys
BLOCKED = {set(BLOCKED)!r}


class _Hide:
    # Wraps a finder: the blocked packages are not found, as if not installed.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
"""


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict:
    """The environment of a GPU-machine-like run: the repo and the blocker on PYTHONPATH."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-c", "import importlib.util as u; print([u.find_spec(n) for n in "
                           f"{list(BLOCKED)!r}])"], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "[None, None, None, None]", done.stdout + done.stderr
    return env


def plan(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_benchmark.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def outputs(out) -> tuple[list[dict], list[dict]]:
    """The rows and the records the plan wrote under ``out``."""
    (machine,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(store.read_rows([machine / f"{ROWS}.jsonl"])) if (machine / f"{ROWS}.jsonl").exists() else []
    records = [json.loads(line) for line in (machine / RECORDS).read_text().splitlines() if line.strip()]
    return rows, records


def test_smoke_runs_every_phase_without_the_optional_packages(blocked_env, tmp_path):
    done = plan(blocked_env, "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in BLOCKED:
        assert f"{name} is not installed:" in done.stdout
    rows, records = outputs(tmp_path)
    phases = {r["phase"]: r for r in records if r["check"] == "phase"}
    assert list(phases) == PHASE_NAMES and all(p["status"] == "done" for p in phases.values()), phases
    validated = [r for r in records if r["check"] == "validation"]
    assert {r["impl"] for r in validated} == {"triton", "native"}
    assert all(r["status"] == "ok" and r["gate_max_error"] < r["gate_tolerance"] for r in validated), validated
    assert {r["impl"] for r in records if r["check"] == "determinism" and r["status"] == "ok"} == {"triton", "native"}
    (ceilings,) = [r for r in records if r["check"] == "ceilings"]
    assert ceilings["copy_gb_s"] > 0 and ceilings["matmul_tflop_s"] > 0
    measured = {(r["impl"], r["level"], r["dtype"]) for r in rows if r["status"] == "ok"}
    for dtype in ("float16", "float32"):  # the bf16 phases measure fp16 in --smoke (the Triton interpreter)
        assert {("triton", "layer", dtype), ("native", "layer", dtype), ("conv", "layer", dtype),
                ("unfold", "op", dtype), ("triton", "op", dtype)} <= measured
    assert {r["fvcore_error"] is not None for r in rows if r["status"] == "ok"} == {True}  # no fvcore: not counted
    assert "targets (float16" in done.stdout and done.stdout.rstrip().splitlines()[-1].startswith("  ")


def test_a_budget_stops_the_plan_in_time_and_says_what_was_skipped(blocked_env, tmp_path):
    budget = 30
    start = time.monotonic()
    done = plan(blocked_env, "--smoke", "--budget", str(budget), "--out", str(tmp_path))
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < budget + 5, elapsed  # the interpreter's exit after the budget: a few seconds at most
    rows, records = outputs(tmp_path)
    phases = {r["phase"]: r for r in records if r["check"] == "phase"}
    assert list(phases) == PHASE_NAMES
    assert phases["environment"]["status"] == "done"
    assert any(p["status"] in ("skipped", "partial") for p in phases.values()), phases
    assert sum(p["measured"] for p in phases.values()) > 0 and sum(p["skipped"] for p in phases.values()) > 0
    assert "skipped" in done.stdout and f"of the {budget} s budget" in done.stdout
    case_phases = [p for name, p in phases.items() if name.startswith(("claim", "resnet"))]
    assert len(rows) == sum(p["measured"] for p in case_phases)  # every measured case kept its row


def test_dry_run_prints_each_phase_with_its_estimate(blocked_env):
    done = plan(blocked_env, "--dry-run", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for name in PHASE_NAMES:
        (line,) = [line for line in lines if line.startswith(name + " ")]
        items, estimate = line.split()[1:3]
        assert int(items) > 0 and float(estimate.rstrip("s")) > 0, line
    assert any(line.startswith("total ~") for line in lines)


@pytest.mark.parametrize("args, argument", [(["--budget", "0"], "--budget"), (["--phases", "claim,nope"], "--phases")])
def test_bad_arguments_are_one_line(blocked_env, args, argument):
    done = plan(blocked_env, "--dry-run", *args, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"gpu_benchmark.py: error: {argument}")


def test_tool_steps_classify_what_the_tools_say(tmp_path, monkeypatch):
    """The sanitizer and ncu steps (GPU only) with stand-in tools: compute-sanitizer's error exit code is a
    failed check (the plan exits 1), its log kept; ncu that profiled no kernel is an error with ncu's note."""
    from bench import gpu_phases, gpu_plan
    from bench.worker_pool import WorkerPool

    monkeypatch.setenv("PATH", os.environ["PATH"])  # the ncu step puts ncu's folder on PATH: restored after
    sanitizer, ncu = tmp_path / "compute-sanitizer", tmp_path / "ncu"
    sanitizer.write_text('#!/bin/sh\necho "========= ERROR SUMMARY: 1 error ($*)"\nexit 3\n')
    ncu.write_text("#!/bin/sh\nexit 0\n")
    for tool in (sanitizer, ncu):
        tool.chmod(0o755)
    plan = gpu_plan.Plan(tmp_path / "out", "cuda", False, gpu_plan.Clock(60), gpu_plan.COSTS_H200,
                         gpu_plan.runner.Settings(), WorkerPool(), ["native", "triton"])
    plan.folder.mkdir(parents=True)
    checked = gpu_phases._sanitizer(plan, str(sanitizer), "memcheck")
    assert checked["status"] == "incorrect" and "ERROR SUMMARY: 1 error" in checked["error"]
    assert "bench.profiling.cuda" in (plan.folder / checked["log"]).read_text()
    profiled = gpu_phases._ncu(plan, str(ncu), "native")
    assert profiled["status"] == "error" and "no kernel" in profiled["error"]
    assert len(plan.failures) == 2
