"""Interleaved ratios (bench/interleave.py): the bootstrap interval on synthetic rounds, the round schedule on
a fake clock, and `sasa-bench claim` / `sasa-bench compare --interleaved` measuring tiny cases for real."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from bench import cases as cases_module, interleave
from bench.cli import main
from bench.interleave import InterleaveSettings, ratio_interval, run_interleaved, time_rounds
from bench.report import claim as claim_module
from bench.schema import Case
from bench.store import read_rows

from helpers import FAST


def drifting_rounds(ratio: float, rounds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-round times of a case ``ratio`` times its baseline's, both under the same slow drift of the machine
    (a 3x slow-down over the rounds, wobbling) and 3% noise of their own."""
    drift = np.linspace(1.0, 3.0, rounds) * np.exp(np.cumsum(rng.normal(0, 0.05, rounds)))
    base = rng.uniform(0.5, 2.0) * drift
    return ratio * base * rng.lognormal(0, 0.03, rounds), base * rng.lognormal(0, 0.03, rounds)


def test_the_interval_covers_the_true_ratio_through_drift():
    """A 95% interval misses the true ratio in about 1 draw of 20, so coverage is judged over 200 draws
    (measured 93.7% over 1000): below 85% or above 99% of them is beyond chance (p < 1e-6) for a 95% interval.
    The same drift measured one pass after another (first every A round, then every B round) is way off."""
    rng = np.random.default_rng()
    covered, interleaved_errors, sequential_errors = 0, [], []
    for _ in range(200):
        true = rng.uniform(1.5, 4.0)
        numerator, denominator = drifting_rounds(true, 40, rng)
        median, low, high = ratio_interval(numerator, denominator)
        assert low <= median <= high
        assert high - low < 0.1 * median  # 3% noise per round: a tight interval despite the drift
        covered += low < true < high
        interleaved_errors.append(abs(median / true - 1))
        sequential_errors.append(abs(statistics.median(numerator[:20]) / statistics.median(denominator[20:]) / true - 1))
    assert 0.85 <= covered / 200 <= 0.99
    assert max(interleaved_errors) < 0.05 and statistics.median(sequential_errors) > 0.2
    # seeded: the same rounds give the same interval; more noise gives a wider one
    assert ratio_interval(numerator, denominator) == (median, low, high)
    noisy = numerator * rng.lognormal(0, 0.3, 40)
    _, noisy_low, noisy_high = ratio_interval(noisy, denominator)
    assert noisy_high - noisy_low > high - low


def test_rounds_of_several_processes_widen_the_interval_to_what_differs_between_them():
    """Two worker processes whose ratios differ by a few percent (what a second run in a new process meets):
    the interval drawn per process covers both processes' medians; rounds pooled as one process do not."""
    rng = np.random.default_rng()
    true = rng.uniform(1.5, 4.0)
    first, base_first = drifting_rounds(true, 20, rng)
    second, base_second = drifting_rounds(true * 1.05, 20, rng)
    numerator, denominator = np.concatenate([first, second]), np.concatenate([base_first, base_second])
    workers = [0] * 20 + [1] * 20
    medians = [statistics.median(first / base_first), statistics.median(second / base_second)]
    _, low, high = ratio_interval(numerator, denominator, workers=workers)
    assert low <= min(medians) and max(medians) <= high
    _, pooled_low, pooled_high = ratio_interval(numerator, denominator)
    assert pooled_high - pooled_low < high - low
    assert ratio_interval(numerator, denominator, workers=[0] * 40) == (_, pooled_low, pooled_high)


def test_ratio_interval_rejects_bad_rounds():
    with pytest.raises(ValueError, match="rounds"):
        ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="rounds"):
        InterleaveSettings(rounds=2)
    with pytest.raises(ValueError, match="rounds"):
        InterleaveSettings(rounds=5, workers=2)  # at least 3 rounds per worker process
    with pytest.raises(ValueError, match="workers"):
        InterleaveSettings(workers=0)
    with pytest.raises(ValueError, match="block"):
        InterleaveSettings(block_s=0)


def test_rounds_time_each_block_in_a_shuffled_order(monkeypatch):
    """A fake clock advanced by each call's cost: per-call times come out exactly, every round calls every
    function for its block, and the order changes between rounds."""
    now, order = [0.0], []
    monkeypatch.setattr(interleave.time, "perf_counter", lambda: now[0])
    costs = np.random.default_rng().uniform(1e-4, 5e-3, 4)

    def call(index):
        def fn():
            now[0] += costs[index]
            order.append(index)
        return fn

    settings = InterleaveSettings(rounds=12, block_s=0.01, warmup=2, seed=int(np.random.default_rng().integers(1 << 30)))
    times = time_rounds([call(i) for i in range(4)], settings)
    assert [len(t) for t in times] == [12] * 4
    for index, per_round in enumerate(times):
        assert per_round == pytest.approx([costs[index]] * 12)
    timed, blocks = order[8:], []  # after 2 warm-up calls each
    per_block = [int(np.ceil(0.01 / cost)) for cost in costs]  # each block lasts about block_s
    while timed:
        blocks.append(timed[0])
        assert timed[:per_block[timed[0]]] == [timed[0]] * per_block[timed[0]]
        timed = timed[per_block[timed[0]]:]
    rounds = [tuple(blocks[r * 4:(r + 1) * 4]) for r in range(12)]
    assert len(blocks) == 12 * 4 and all(sorted(r) == [0, 1, 2, 3] for r in rounds) and len(set(rounds)) > 1


def tiny(impl: str, k: int, direction: str = "fwd") -> Case:
    return Case(impl, k, 16, 2, 10, 1, "float32", "cpu", direction)


def test_run_interleaved_writes_rows_with_the_ratio(tmp_path):
    conv, attention = tiny("conv", 3), tiny("unfold", 5)
    broken = tiny("unfold", 4)  # even k: not a valid window, fails in its own row; the others are still timed
    rows = run_interleaved([(attention, conv), (broken, conv)], tmp_path, "pair", FAST, InterleaveSettings(rounds=6, block_s=0.002))
    by_impl = {(r["impl"], r["k"]): r for r in rows}
    ok = by_impl["unfold", 5]
    assert ok["status"] == "ok" and ok["rounds"] == 6 and ok["ratio_baseline"] == conv.label()
    assert ok["latency_ratio_low"] <= ok["latency_ratio"] <= ok["latency_ratio_high"] and ok["peak_mem_bytes"] > 0
    assert 0 <= ok["other_load"] <= 1 and isinstance(ok["contended"], bool)  # the other processes' load while timed
    assert by_impl["conv", 3]["latency_ratio"] is None and by_impl["conv", 3]["latency_ms"] > 0
    assert by_impl["unfold", 4]["status"] != "ok" and by_impl["unfold", 4]["error"]
    stored = list(read_rows([tmp_path]))
    assert len(stored) == 3 and len({r["run_id"] for r in stored}) == 1 and all(r["cpu_isa"] == rows[0]["cpu_isa"] for r in stored)


@pytest.fixture()
def tiny_claim(monkeypatch):
    """The claim preset shrunk to 12 x 12 (channels stay 128: the claim's width), fvcore's counts left out."""
    monkeypatch.setitem(cases_module.PRESETS, "claim", cases_module.Shapes(ks=(3, 19), channels=(128,), heads=8, res=(12,)))
    monkeypatch.setattr(claim_module, "fvcore_counts", lambda: [])


def test_claim_measures_the_given_implementations_interleaved(tmp_path, capsys, tiny_claim):
    results = tmp_path / "results"
    assert main(["claim", "--json", "--impl", "unfold", "--rounds", "6", "--workers", "2", "--block", "0.002", "--results", str(results),
                 "--out", str(tmp_path / "out")]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert sorted((m["impl"], m["direction"]) for m in numbers["measured"]) == [("unfold", "fwd"), ("unfold", "fwd+bwd")]
    for entry in numbers["measured"]:
        assert entry["rounds"] == 6 and entry["latency_ratio_low"] <= entry["latency_ratio"] <= entry["latency_ratio_high"]
        assert sorted(entry["ratios_by_k"]) == ["19", "3"] and entry["run_id"] == entry["conv_run_id"]
        assert isinstance(entry["contended"], bool)
    stored = list(read_rows([results]))
    assert sorted({(r["impl"], r["k"]) for r in stored}) == [("conv", 3), ("unfold", 3), ("unfold", 19)]
    assert all(r["suite"] == "claim" for r in stored) and len(stored) == 6
    assert "95% interval" in (tmp_path / "out" / "claim.md").read_text()
    assert main(["claim", "--impl", "nope", "--results", str(results)]) == 2
    assert "--impl" in capsys.readouterr().err


def test_compare_interleaved_of_a_variant_with_itself_is_one(monkeypatch, capsys):
    monkeypatch.setitem(cases_module.PRESETS, "quick", cases_module.Shapes(ks=(3,), channels=(16,), heads=2, res=(10,)))
    code = main(["compare", "--interleaved", "unfold", "unfold", "--direction", "fwd", "--rounds", "3", "--workers", "1", "--block", "0.002",
                 "--fail-above", "1%"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("|") and "fwd" in l)
    assert code == 0 and " 1.000 |" in line and "1.000-1.000" in line and "0 changed beyond noise" in out
    assert main(["compare", "--interleaved", "unfold", "nope", "x", "x"][:4]) == 2
    assert "B: with --interleaved" in capsys.readouterr().err
