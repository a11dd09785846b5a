"""Interleaved ratios: the cases of a comparison timed in alternating short rounds in one worker process.

Why: on a shared or drifting machine a case's time moves between passes by more than the effects compared
(the same conv took 1.44 ms in one pass and 0.78 ms in the next, each pass with a tight IQR), so a ratio of
two cases measured one after another mixes that drift in. Here every case of a comparison passes the
runner's support check and correctness gate (bench.runner.check_case), its peak memory is measured in a
subprocess of its own (as the runner does), and then all of them are built once (bench.pipeline.build and
step) in a worker subprocess (bench.runner.run_isolated, task kind "interleave"). After warm-up calls,
each round times every case for a block of about ``block_s`` seconds of calls, in an order shuffled per
round (seeded); the ratio of a case to its baseline is the median over rounds of (case time / baseline
time in the same round), with a bootstrap interval: the median of ``resamples`` resamplings (seeded), its
2.5 and 97.5 percentiles for a 95% interval. The rounds are shared over ``workers`` fresh processes, one
after another, and each resampling draws processes before rounds: what differs between processes (heap
and page layout, thread placement; two one-process runs gave fwd+bwd medians 4% apart, outside each
other's intervals) is then inside the interval, as a second run in a new process will meet it.

What it removes: drift slower than a round (load from other processes that comes and goes over seconds,
a VM's host moving it, thermal or turbo changes over a run) affects both sides of a round alike and cancels
in its ratio. What it cannot remove: drift within a round (load that starts during one case's block and
ends before the other's: it widens the interval rather than biasing it), a frequency or turbo state that
favours one kernel (e.g. AVX-512 down-clocking that only the vectorized side triggers is part of its real
cost), caches warmed by the case before in the round (the shuffle spreads that over every order), and a
machine busy all the time (every round slower: the ratio still holds, the absolute latencies do not).
"""
from __future__ import annotations

import math
import random
import socket
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import measure, store
from .schema import Case, Status


@dataclass(frozen=True)
class InterleaveSettings:
    """How a comparison is timed: ``rounds`` rounds of a ``block_s`` block of calls per case after
    ``warmup`` calls, shared out over ``workers`` fresh worker processes (one after another); the interval
    from ``resamples`` bootstrap resamplings at ``level``, all seeded."""

    rounds: int = 30
    block_s: float = 0.05
    warmup: int = 2
    seed: int = 0
    resamples: int = 2000
    level: float = 0.95
    workers: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: expected at least 1 worker process, got {self.workers}")
        if self.rounds < 3 * self.workers:
            raise ValueError(f"rounds: expected at least 3 per worker process (a median and an interval need them), "
                             f"{3 * self.workers} for {self.workers}, got {self.rounds}")
        if not self.block_s > 0:
            raise ValueError(f"block: expected a positive number of seconds, got {self.block_s}")
        if not 0 < self.level < 1:
            raise ValueError(f"level: expected a probability between 0 and 1, got {self.level}")


def time_rounds(fns: Sequence[Callable[[], object]], settings: InterleaveSettings,
                sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Per-call seconds of each of ``fns`` in each round (``result[i][r]``): warm-up calls size each
    function's block (at least one call), then every round calls each block in a freshly shuffled order, the
    heap kept as bench.measure times (measure.keep_freed_memory). ``sync`` waits for queued work (CUDA) before a
    clock is read."""
    measure.keep_freed_memory()
    calls = []
    for fn in fns:
        start = time.perf_counter()
        for _ in range(max(1, settings.warmup)):
            fn()
        sync()
        per_call = (time.perf_counter() - start) / max(1, settings.warmup)
        calls.append(max(1, math.ceil(settings.block_s / per_call)) if per_call > 0 else 1)
    order, times = list(range(len(fns))), [[] for _ in fns]
    shuffle = random.Random(settings.seed).shuffle
    for _ in range(settings.rounds):
        shuffle(order)
        for index in order:
            start = time.perf_counter()
            for _ in range(calls[index]):
                fns[index]()
            sync()
            times[index].append((time.perf_counter() - start) / calls[index])
    return times


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], resamples: int = 2000,
                   level: float = 0.95, seed: int = 0, workers: Sequence[int] | None = None) -> tuple[float, float, float]:
    """(median, low, high) of the per-round ratios numerator[r] / denominator[r]: the median, and the
    ``level`` percentile interval of the medians of ``resamples`` bootstrap resamplings. ``workers[r]``
    names the process round r ran in: with several, each resampling first draws processes (with
    replacement), then rounds within each drawn process, so the interval also holds what differs between
    processes (heap and page layout, the threads' placement), which a second run in a new process meets."""
    if len(numerator) != len(denominator) or len(numerator) == 0:
        raise ValueError(f"rounds: expected two equally long non-empty series, got {len(numerator)} and {len(denominator)}")
    ratios = np.asarray(numerator, dtype=float) / np.asarray(denominator, dtype=float)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray(workers) == w) for w in dict.fromkeys(workers)] if workers is not None else []
    if len(groups) > 1:  # two levels: processes, then rounds within each (same count as the process ran)
        medians = np.empty(resamples)
        for i in range(resamples):
            drawn = [groups[g] for g in rng.integers(0, len(groups), size=len(groups))]
            medians[i] = np.median(np.concatenate([ratios[rng.choice(g, size=len(g))] for g in drawn]))
    else:
        medians = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(np.median(ratios)), float(low), float(high)


def time_cases(cases: list[dict], settings: dict) -> dict:
    """Worker side (task kind "interleave"): build every case once here, then :func:`time_rounds` over
    those that built; per case its per-call times in ms (``times_ms``) and the load other processes put on
    the machine meanwhile (bench.contention: ``other_load``, ``contended``), or the status of its failure
    (the others are still timed)."""
    import torch

    from . import contention, pipeline
    from .worker import failure_status, message

    results: list[dict] = [{} for _ in cases]
    fns, built = [], []
    for index, fields in enumerate(cases):
        case = Case(**fields)
        try:
            fns.append(pipeline.step(pipeline.build(case)))
            built.append(index)
        except Exception as error:  # this case's status; the comparison goes on without it
            results[index] = {"status": failure_status(error), "error": message(error)}
    cuda = any(str(Case(**c).device).startswith("cuda") for c in cases)
    before = contention.cpu_sample()
    try:
        times = time_rounds(fns, InterleaveSettings(**settings), torch.cuda.synchronize if cuda else (lambda: None))
    except Exception as error:  # a failure while timing ends every case's measurement
        return {"status": failure_status(error), "error": message(error)}
    load = None if cuda else contention.other_load(before, contention.cpu_sample())
    for index, seconds in zip(built, times):
        results[index] = {"status": Status.OK, "times_ms": [s * 1e3 for s in seconds], "other_load": load,
                          "contended": contention.contended(load, torch.get_num_threads())}
    return {"status": Status.OK, "cases": results}


def _spread(times_ms: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return statistics.median(times_ms), q3 - q1


def timed_fields(times_ms: list[float], base_ms: list[float] | None, baseline: Case | None,
                 settings: InterleaveSettings, confidence: float, workers: Sequence[int] | None = None) -> dict:
    """The row fields of one case timed interleaved: the median and IQR over rounds, and, beside a
    baseline, the ratio with its interval (:func:`ratio_interval`; ``workers``: each round's process)."""
    median, iqr = _spread(times_ms)
    fields = {"status": Status.OK, "error": None, "latency_ms": median, "latency_iqr_ms": iqr, "rounds": len(times_ms),
              "reps": None, "latency_confident": iqr <= confidence * median,
              "timer": f"interleaved rounds of {settings.block_s:g} s blocks (bench/interleave.py)"}
    if base_ms is not None and baseline is not None:
        ratio, low, high = ratio_interval(times_ms, base_ms, settings.resamples, settings.level, settings.seed, workers)
        fields |= {"ratio_baseline": baseline.label(), "latency_ratio": ratio, "latency_ratio_low": low,
                   "latency_ratio_high": high}
    return fields


def measure_interleaved(pairs: Sequence[tuple[Case, Case | None]], settings, interleave: InterleaveSettings,
                        note: Callable[[str], None] | None = None) -> dict[Case, dict]:
    """The measured fields of every case of ``pairs`` ((case, baseline or None)) and of each baseline:
    support and gate per case (cached, as in the runner), peak memory in a subprocess per case, then one
    "interleave" worker timing every case that passed (see the module docstring).
    ``settings``: bench.runner.Settings (threads, timeout, memory limit, confidence)."""
    from .plugins import load_plugins
    from .runner import worker_task, check_case, run_isolated

    note = note or (lambda text: print(text, file=sys.stderr))
    plugins = load_plugins()
    cases = list(dict.fromkeys([c for pair in pairs for c in pair if c is not None]))
    gates: dict = {}
    measured: dict[Case, dict] = {}
    for number, case in enumerate(cases, 1):
        note(f"[{number}/{len(cases)}] gate and memory: {case.label()}")
        checked = check_case(case, settings, plugins, gates)
        fields = {k: v for k, v in checked.items() if k not in ("status", "error")}
        if checked["status"] == Status.OK:
            checked = run_isolated(worker_task("memory", settings, plugins, case=asdict(case)), settings.timeout_s)
            fields |= {k: v for k, v in checked.items() if k != "warnings"}
        measured[case] = {**fields, "status": checked["status"], "error": checked.get("error")}
    timed = [c for c in cases if measured[c]["status"] == Status.OK]
    if not timed:
        return measured
    note(f"timing {len(timed)} cases interleaved: {interleave.rounds} rounds of {interleave.block_s:g} s blocks in "
         f"{interleave.workers} worker process(es) (about {len(timed) * interleave.rounds * interleave.block_s:.0f} s)")
    shares = [interleave.rounds // interleave.workers + (w < interleave.rounds % interleave.workers)
              for w in range(interleave.workers)]
    entries: dict[Case, list[dict]] = {case: [] for case in timed}
    warnings: list[str] = []
    for worker, rounds in enumerate(shares):  # fresh processes, one after another: what differs between them counts
        part = replace(interleave, rounds=rounds, workers=1, seed=interleave.seed + worker)
        task = worker_task("interleave", settings, plugins, cases=[asdict(c) for c in timed], interleave=asdict(part))
        result = run_isolated(task, settings.timeout_s)
        warnings += result.get("warnings") or []
        per_case = result.get("cases") or [{"status": result["status"], "error": result.get("error")}] * len(timed)
        for case, entry in zip(timed, per_case):
            entries[case].append(entry)
    times = {case: [t for e in got for t in (e.get("times_ms") or [])] for case, got in entries.items()}
    workers = {case: [w for w, e in enumerate(got) for _ in (e.get("times_ms") or [])] for case, got in entries.items()}
    baselines = {case: base for case, base in pairs}
    for case, got in entries.items():
        failed = next((e for e in got if e["status"] != Status.OK), None)
        if failed is not None:
            measured[case] |= {"status": failed["status"], "error": failed.get("error")}
            continue
        base = baselines.get(case)
        paired = base is not None and workers.get(base) == workers[case]
        measured[case] |= timed_fields(times[case], times[base] if paired else None, base if paired else None,
                                       interleave, settings.confidence, workers[case])
        loads = [e["other_load"] for e in got if e.get("other_load") is not None]
        measured[case] |= {"other_load": max(loads) if loads else None, "contended": any(e.get("contended") for e in got)}
        measured[case]["warnings"] = list(dict.fromkeys((measured[case].get("warnings") or []) + warnings)) or None
    return measured


def run_interleaved(pairs: Sequence[tuple[Case, Case | None]], out_dir: str | Path | None, name: str, settings,
                    interleave: InterleaveSettings = InterleaveSettings(), suite: str | None = None) -> list[dict]:
    """Measure ``pairs`` interleaved (:func:`measure_interleaved`) and return one result row per case
    (bench.runner.make_row), appended to ``<out_dir>/<machine>/<name>.jsonl`` unless ``out_dir`` is None."""
    from .env import environment, machine_id, native_isa
    from .runner import make_row, results_path

    measured = measure_interleaved(pairs, settings, interleave)
    where = {**environment(), "machine": machine_id(), "node": socket.gethostname()}
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    rows = []
    path = store.prepare(results_path(out_dir, name)) if out_dir is not None else None
    for case, fields in measured.items():
        row = make_row(case, {**where, **fields, "native_isa": native_isa(case.impl, case.device)}, settings, 0, run_id, suite,
                       out_dir if out_dir is not None else "results")
        if path is not None:
            store.append_row(path, row)
        rows.append(row)
    return rows
