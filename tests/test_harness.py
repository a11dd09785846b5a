"""The measurement harness: rows of a tiny sweep, failures isolated per case, the gate, resume, counters."""
from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bench import flops, measure
from bench.cases import PRESETS, analytic_costs, grid, preset
from bench.env import environment, machine_id
from bench.fvcore_count import analyse, count_flops
from bench.pipeline import TOLERANCE, gate
from bench.plugins import PLUGINS_ENV, load_plugins
from bench.runner import results_path, run_cases
from bench.schema import FIELDS, Case

import sasa_impls

from helpers import FAST, REPO, planted


# Test-only implementations, registered in the test process and in every worker through SASA_BENCH_PLUGINS.
# The gate's input is 9 x 11, so "slow" and "crash" pass the gate and misbehave only on the case itself.
PLUGIN = textwrap.dedent('''
    import os, time
    from sasa_impls.registry import Impl, register
    from sasa_impls.impls.reference import reference_attention

    def wrong(q, k, v, rel_row, rel_col, kernel_size, scale):
        return v  # ignores the attention entirely

    def broken(q, k, v, rel_row, rel_col, kernel_size, scale):
        raise RuntimeError("planted failure")

    def slow(q, k, v, rel_row, rel_col, kernel_size, scale):
        if q.shape[2] > 9:
            time.sleep(60)
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    def crash(q, k, v, rel_row, rel_col, kernel_size, scale):
        if q.shape[2] > 9:
            os.abort()
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    def nan_grad(q, k, v, rel_row, rel_col, kernel_size, scale):
        if q.requires_grad:
            q = q.clone()
            q.register_hook(lambda grad: grad * float("nan"))  # right forward, NaN gradient for q only
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    def chatty(q, k, v, rel_row, rel_col, kernel_size, scale):
        import sys, warnings
        warnings.warn("planted warning")
        print("planted print", file=sys.stderr)
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    for name, fn in (("t_wrong", wrong), ("t_broken", broken), ("t_slow", slow), ("t_crash", crash), ("t_nan", nan_grad),
                     ("t_chatty", chatty)):
        register(Impl(name=name, forward=fn, description="test-only"))
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The planted implementations' module; they leave the registry again after this file's tests."""
    with planted(tmp_path_factory.mktemp("plugin"), "planted_impls", PLUGIN) as path:
        yield path


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """unfold, im2col_einsum and conv at one small shape, fwd and fwd+bwd."""
    out = tmp_path_factory.mktemp("results")
    cases = grid(["unfold", "im2col_einsum", "conv"], [5], [32], [4], [24], [1], ["float32"], ["cpu"], ["fwd", "fwd+bwd"])
    rows = run_cases(cases, out, suite=None, progress=False, settings=FAST)
    return out, cases, rows


def test_tiny_sweep_writes_one_sane_row_per_case(tiny_sweep):
    out, cases, rows = tiny_sweep
    on_disk = [json.loads(line) for line in results_path(out, "adhoc").read_text().splitlines()]
    assert [r["run_id"] for r in on_disk] == [r["run_id"] for r in rows] and len(rows) == len(cases)
    env = environment()
    for case, row in zip(cases, on_disk):
        assert set(row) == set(FIELDS)  # the schema is the one list of row fields
        assert Case(**{k: row[k] for k in Case.__dataclass_fields__}) == case
        assert row["status"] == "ok" and row["error"] is None
        assert row["latency_ms"] > 0 and row["latency_iqr_ms"] >= 0 and row["reps"] >= 1
        assert isinstance(row["latency_confident"], bool) and "adaptive_autorange" in row["timer"]
        assert row["gflops"] == pytest.approx(2 * row["macs_analytic"] * (1 if case.direction == "fwd" else 3) / row["latency_ms"] / 1e6)
        assert row["threads"] == 1 and row["machine"] == machine_id() and row["commit"] == env["commit"]
        assert row["macs_analytic"] == analytic_costs(case)["macs_analytic"]
        pixels = 24 * 24
        if case.impl == "conv":
            assert row["params"] == flops.conv_params(32, 32, 5)
            assert row["macs_analytic"] == row["flops_fvcore"] == 25 * 32 * 32 * pixels
        else:
            assert row["params"] == flops.attention_params(32, 32, 5)
            assert row["gate_max_error"] < TOLERANCE["float32"]
            assert row["borders"] == "masked" and "aten::softmax" in row["fvcore_uncounted"]
            # fvcore with the mul handle sees the same work as the analytic count (+ the scale multiply)
            assert row["macs_analytic"] <= row["flops_fvcore"] < 1.05 * row["macs_analytic"]
    unfold_fwd = on_disk[0]
    per_key = flops.attention_total_macs(flops.attention_macs_per_pixel(32, 32, 5), "rel_per_key") * pixels
    assert unfold_fwd["macs_analytic"] == per_key
    # unfold materialises (q * k-neighbourhood): C x H x W x k^2 fp32 values at least
    assert unfold_fwd["peak_mem_bytes"] >= 32 * pixels * 25 * 4


@pytest.fixture(scope="module")
def failure_sweep(tmp_path_factory, plugin):
    """One sweep through every failure kind, then a good case: each is recorded and the sweep goes on."""
    out = tmp_path_factory.mktemp("failures")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLUGINS_ENV, plugin)
        settings = dataclasses.replace(FAST, reps=2, timeout_s=10, memory_limit_bytes=32 * 2**20)
        shape = dict(heads=4, batch=1, dtype="float32", device="cpu", direction="fwd")
        cases = [Case("t_broken", 3, 16, res=12, **shape), Case("t_wrong", 3, 16, res=12, **shape),
                 Case("unfold", 7, 64, res=64, **shape),  # ~50 MiB per k x k neighbourhood product: over the cap
                 Case("t_slow", 3, 16, res=12, **shape), Case("t_crash", 3, 16, res=12, **shape),
                 Case("unfold", 3, 16, res=12, **shape)]
        start = time.monotonic()
        rows = run_cases(cases, out, progress=False, settings=settings)
        return {row["impl"] + str(row["k"]): row for row in rows}, time.monotonic() - start


def test_raising_impl_is_an_error_row(failure_sweep):
    row = failure_sweep[0]["t_broken3"]
    assert row["status"] == "error" and "planted failure" in row["error"] and row["latency_ms"] is None


def test_wrong_impl_is_gated_and_not_timed(failure_sweep):
    row = failure_sweep[0]["t_wrong3"]
    assert row["status"] == "incorrect" and row["latency_ms"] is None
    assert row["gate_max_error"] > row["gate_tolerance"] == TOLERANCE["float32"]
    assert row["error"].startswith("output at 2x2x9x11x8 k=5 differs from the reference")


def test_gate_checks_gradients_and_fails_nan(plugin):
    load_plugins([plugin])
    assert gate("t_nan", "cpu", "float32", "fwd")["status"] == "ok"
    failed = gate("t_nan", "cpu", "float32", "fwd+bwd")
    assert failed["status"] == "incorrect" and failed["error"].startswith("grad_q ")
    assert gate("unfold", "cpu", "float64", "fwd+bwd")["gate_max_error"] < TOLERANCE["float64"]


def test_case_over_the_memory_cap_is_oom(failure_sweep):
    row = failure_sweep[0]["unfold7"]
    assert row["status"] == "oom" and "allocate" in row["error"]


def test_case_over_the_time_limit_is_timeout(failure_sweep):
    rows, elapsed = failure_sweep
    assert rows["t_slow3"]["status"] == "timeout" and "10 s" in rows["t_slow3"]["error"]
    assert elapsed < 60  # the sleeping worker was abandoned, not waited for


def test_crashing_worker_is_an_error_and_the_sweep_goes_on(failure_sweep):
    rows = failure_sweep[0]
    assert rows["t_crash3"]["status"] == "error" and "SIGABRT" in rows["t_crash3"]["error"]
    assert rows["unfold3"]["status"] == "ok" and rows["unfold3"]["latency_ms"] > 0


def test_resume_skips_finished_cases_and_retries_errors(tmp_path, plugin, monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, plugin)
    shape = dict(k=3, channels=16, heads=4, res=8, batch=1, dtype="float32", device="cpu", direction="fwd")
    done, failing, new = Case("conv", **shape), Case("t_broken", **shape), Case("unfold", **shape)
    first = run_cases([done, failing], tmp_path, progress=False, settings=FAST)
    assert [r["status"] for r in first] == ["ok", "error"]
    resumed = run_cases([done, failing, new], tmp_path, progress=False, settings=FAST)
    assert [(r["impl"], r["status"]) for r in resumed] == [("t_broken", "error"), ("unfold", "ok")]
    second_pass = run_cases([done], tmp_path, progress=False, repeat=2, settings=FAST)
    assert [(r["impl"], r["repeat"]) for r in second_pass] == [("conv", 1)]
    assert len(results_path(tmp_path, "adhoc").read_text().splitlines()) == 5


def test_timer_measures_what_the_call_takes():
    settings = measure.TimerSettings(warmup=1, reps=4, min_time_s=0.0, max_time_s=1.0, confidence=0.5)
    timing = measure.time_call(lambda: time.sleep(0.005), "cpu", settings)
    assert timing.reps >= 4 and 5.0 <= timing.median_ms < 50 and timing.iqr_ms >= 0 and timing.confident
    longer = measure.time_call(lambda: time.sleep(0.001), "cpu", measure.TimerSettings(warmup=1, reps=1, min_time_s=0.1))
    assert longer.reps >= 50  # timed until the minimum time


def test_noisy_calls_get_more_repetitions_and_are_flagged():
    """adaptive_autorange keeps measuring while the spread is large, up to the time budget, then says so."""
    draw = random.Random(0).uniform
    settings = measure.TimerSettings(warmup=1, reps=1, min_time_s=0.0, max_time_s=0.6, confidence=0.01)
    noisy = measure.time_call(lambda: time.sleep(draw(0.001, 0.010)), "cpu", settings)
    steady = measure.time_call(lambda: time.sleep(0.002), "cpu", dataclasses.replace(settings, confidence=0.5))
    assert not noisy.confident and steady.confident
    assert noisy.reps > steady.reps


def test_peak_memory_sees_a_temporary_allocation():
    size = 48 * 2**20
    assert measure.peak_memory_bytes(lambda: torch.ones(size // 4), "cpu") >= 0.95 * size
    assert measure.peak_memory_bytes(lambda: torch.ones(16), "cpu") < 2**20


# In a fresh process, after each measuring function: the fewest page faults of a 16 MiB allocation (freed at once)
# made 5 times, the first not counted (it may grow the heap; glibc sometimes places the next one beyond it too).
HEAP_PROBE = textwrap.dedent("""
    import json, resource, torch
    from bench import interleave, measure

    def faults_of_a_repeated_allocation():
        faults = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(2**22).normal_()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(faults[1:])

    settings = measure.TimerSettings(warmup=1, reps=1, min_time_s=0.01, max_time_s=0.05)
    found = {}
    measure.peak_memory_bytes(lambda: torch.ones(16), "cpu")
    found["peak memory"] = faults_of_a_repeated_allocation()
    measure.time_call(lambda: None, "cpu", settings)
    found["timed"] = faults_of_a_repeated_allocation()
    measure.peak_memory_bytes(lambda: torch.ones(16), "cpu")
    found["peak memory again"] = faults_of_a_repeated_allocation()
    interleave.time_rounds([lambda: None], interleave.InterleaveSettings(rounds=3, block_s=0.001, workers=1))
    found["interleaved"] = faults_of_a_repeated_allocation()
    print(json.dumps(found))
""")


def test_timing_keeps_freed_memory_and_memory_measurement_returns_it():
    """Timed calls reuse the memory earlier calls freed (no page faults), where the peak-memory measurement gives
    freed memory back (a 16 MiB block faults in again, 4096 pages); each timer runs after a memory measurement,
    so each must set the heap itself."""
    found = json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True,
                                      check=True, cwd=REPO).stdout)
    pages = 2**24 // 4096
    assert found["timed"] < 0.05 * pages and found["interleaved"] < 0.05 * pages, found
    assert found["peak memory"] > 0.9 * pages and found["peak memory again"] > 0.9 * pages, found


def test_fvcore_counts_conv_exactly_and_lists_what_it_skips():
    x = torch.randn(2, 8, 10, 10)
    total, uncounted = count_flops(torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), (x,))
    assert total == 2 * 100 * 9 * 8 * 16 and uncounted == {}
    layer = sasa_impls.SASA2d(8, 16, 3, heads=2, impl="im2col_einsum")
    counted = analyse(layer, (x,))
    analytic = flops.attention_total_macs(flops.attention_macs_per_pixel(8, 16, 3), "rel_factorized") * 200
    assert analytic <= counted.total < 1.05 * analytic and {"conv", "einsum"} <= set(counted.by_op)
    assert counted.uncounted.get("aten::softmax") == 1


def test_presets_are_valid_grids():
    for name in PRESETS:
        cases = preset(name, impls=["unfold", "conv"])
        assert cases and all(c.k % 2 == 1 and c.channels % c.heads == 0 for c in cases)
        assert len(set(cases)) == len(cases)
    layers = {(c.res, c.channels) for c in preset("resnet50-layers", impls=["unfold"])}
    assert layers == {(56, 64), (28, 128), (14, 256), (7, 512)}
    claim = preset("claim", impls=["unfold", "conv"])
    assert {c.k for c in claim} >= {3, 19} and {c.channels for c in claim} == {128}
    assert "reference" not in {c.impl for c in preset("quick")} and "conv" in {c.impl for c in preset("quick")}
    with pytest.raises(ValueError, match="suite"):
        preset("nope")


def test_environment_and_machine_id():
    env = environment()
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["cpu"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", machine_id())


def test_workers_import_this_checkout_whatever_the_current_directory(tmp_path, monkeypatch):
    """A folder holding other copies of the packages (another checkout, a git worktree of an older commit) is
    the current directory: the workers still import the code this process imported, whose commit rows name."""
    from pathlib import Path

    import bench
    from bench import runner

    for package in ("bench", "sasa_impls"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("DECOY = True  # importable: a failed import would hide the bug\n")
    monkeypatch.chdir(tmp_path)
    runner.stop_workers()  # the next worker starts a new forkserver, here
    try:
        with runner.bare_main():
            pool = runner.worker_context().Pool(1)
            try:
                imported = pool.apply(eval, ("[__import__(p).__file__ for p in ('bench', 'sasa_impls')]",))
            finally:
                pool.terminate()
    finally:
        runner.stop_workers()
    assert [Path(p).resolve() for p in imported] == [Path(bench.__file__).resolve(), Path(sasa_impls.__file__).resolve()]
