"""The GPU measurement's targets (issue 23) judged from the GPU plan's rows and records: one short table,
each target met / missed / not measured with its number, printed last by scripts/gpu_benchmark.py.

Speed-ups use the latest ok row of each case, bf16 (``dtype``), at level op for the fused kernels against
their peers (flex with relative logits against the fused kernels with them; NATTEN, which has none, against
the fused kernels content-only) and at level layer for SASA2d against the conv.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import store
from .report.metrics import compulsory_bytes
from .schema import CONV, case_key

FUSED = ("triton", "native")  # the fused kernels the plan validates and the targets judge
RESNET_SHAPES = ((56, 64), (28, 128), (14, 256), (7, 512))  # (res, channels) of the resnet50-layers preset


def read_records(path: Path) -> list[dict]:
    """The plan's records in ``path`` (none when it does not exist)."""
    if not path.exists():
        return []
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def latest_ok_rows(path: Path) -> list[dict]:
    """The newest row of each case in ``path``, those with status ok."""
    if not path.exists():
        return []
    latest: dict = {}
    for row in store.read_rows([path], problems=[]):
        key = case_key(row)
        if key not in latest or (row.get("timestamp") or "") >= (latest[key].get("timestamp") or ""):
            latest[key] = row
    return [row for row in latest.values() if row["status"] == "ok"]


def _latency(rows: list[dict], **where) -> float | None:
    found = [row["latency_ms"] for row in rows if all(row.get(k) == v for k, v in where.items())]
    return min(found) if found else None


def _verdict(value: float | None, goal: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= goal if at_least else value <= goal) else "missed"


def validation_targets(records: list[dict]) -> list[tuple[str, str, str]]:
    """(target, value, verdict) of validation, repeated backward and compute-sanitizer."""
    table = []
    for impl in FUSED:
        checks = [r for r in records if r.get("check") == "validation" and r.get("impl") == impl]
        bad = [f"{r['dtype']} rel={r['relative']}" for r in checks if r["status"] != "ok"]
        dtypes = sorted({r["dtype"] for r in checks if r["status"] == "ok"})
        verdict = "not measured" if not checks else "missed" if bad else "met" if len(dtypes) == 3 else "part"
        table.append((f"{impl}: fwd + 5 gradients vs float64 (fp32, fp16, bf16)",
                      f"failed {', '.join(bad)}" if bad else f"ok: {', '.join(dtypes) or '-'}", verdict))
        repeats = [r for r in records if r.get("check") == "determinism" and r.get("impl") == impl]
        differ = [f"{r['dtype']} ({r['status']})" for r in repeats if r["status"] != "ok"]
        table.append((f"{impl}: repeated backward bitwise identical", f"not identical: {', '.join(differ)}" if differ else
                      f"{len(repeats)} dtype(s) identical", "not measured" if not repeats else "missed" if differ else "met"))
    sanitized = [r for r in records if str(r.get("check", "")).startswith("sanitizer-")]
    dirty = [r["check"][10:] for r in sanitized if r["status"] != "ok"]
    table.append(("compute-sanitizer clean on a small native case", f"not clean: {', '.join(dirty)}" if dirty else
                  ", ".join(r["check"][10:] for r in sanitized) or "-",
                  "not measured" if not sanitized else "missed" if dirty else "met"))
    return table


def speed_targets(rows: list[dict], dtype: str) -> list[tuple[str, str, str]]:
    """(target, value, verdict) of the fused kernels against flex / natten and of SASA2d k = 19 against conv k = 3."""
    table = []
    rows = [row for row in rows if row["dtype"] == dtype]
    for impl in FUSED:
        for direction, goal in (("fwd", 2.0), ("fwd+bwd", 1.5)):
            worst, where = None, ""
            for res, channels in RESNET_SHAPES:
                at = dict(k=7, res=res, channels=channels, direction=direction, level="op")
                speedups = [peer / own for peer, own in (
                    (_latency(rows, impl="flex", relative=True, **at), _latency(rows, impl=impl, relative=True, **at)),
                    (_latency(rows, impl="natten", relative=False, **at), _latency(rows, impl=impl, relative=False, **at)))
                    if peer and own]
                if speedups and (worst is None or min(speedups) < worst):
                    worst, where = min(speedups), f"{res}x{res}x{channels}"
            table.append((f"{impl} {direction} >= {goal}x the best of flex, natten (resnet50-layers)",
                          f"{worst:.2f}x at {where}" if worst else "-", _verdict(worst, goal, at_least=True)))
        for direction in ("fwd", "fwd+bwd"):
            layer = dict(res=28, channels=128, direction=direction, level="layer")
            sasa, conv = _latency(rows, impl=impl, k=19, **layer), _latency(rows, impl=CONV, k=3, **layer)
            ratio = sasa / conv if sasa and conv else None
            table.append((f"{impl} {direction} SASA2d k=19 <= 2x conv k=3 (C=128, 28x28)",
                          f"{ratio:.2f}x" if ratio else "-", _verdict(ratio, 2.0, at_least=False)))
            peaks = [max((row["peak_mem_bytes"] or 0 for row in rows if row["impl"] == impl and row["k"] == k and
                          all(row.get(f) == v for f, v in layer.items())), default=0) for k in (3, 19)]
            ratio = peaks[1] / peaks[0] if all(peaks) else None
            table.append((f"{impl} {direction} peak memory k=19 <= 1.3x k=3", f"{ratio:.2f}x" if ratio else "-",
                          _verdict(ratio, 1.3, at_least=False)))
    return table


def ceiling_targets(rows: list[dict], records: list[dict], dtype: str) -> list[tuple[str, str, str]]:
    """(target, value, "-") : each fused kernel's range of achieved fractions of the measured ceilings."""
    ceilings = [r for r in records if r.get("check") == "ceilings" and r.get("status") == "ok"]
    if not ceilings:
        return [("fraction of the measured matmul rate / copy bandwidth", "no ceilings measured", "not measured")]
    ceiling = ceilings[-1]
    table = [("ceilings measured", f"copy {ceiling['copy_gb_s']:.0f} GB/s, {ceiling['matmul_dtype']} matmul "
                                   f"{ceiling['matmul_tflop_s']:.3g} TFLOP/s", "-")]
    for impl in FUSED:
        own = [row for row in rows if row["impl"] == impl and row["dtype"] == dtype and row["level"] == "op"]
        flops = [row["gflops"] / (ceiling["matmul_tflop_s"] * 1e3) for row in own if row.get("gflops")]
        traffic = [compulsory_bytes(row) / (row["latency_ms"] * 1e-3) / (ceiling["copy_gb_s"] * 1e9)
                   for row in own if row.get("latency_ms") and compulsory_bytes(row)]
        value = (f"{100 * min(flops):.1f}-{100 * max(flops):.1f}% of matmul, {100 * min(traffic):.1f}-"
                 f"{100 * max(traffic):.1f}% of copy ({len(own)} op rows)") if flops and traffic else "-"
        table.append((f"{impl}: fraction of the ceilings", value, "-" if flops else "not measured"))
    return table


def print_targets(rows_path: Path, records_path: Path, dtype: str = "bfloat16") -> None:
    """The targets table from the rows and records written so far (this run's and earlier ones')."""
    rows, records = latest_ok_rows(rows_path), read_records(records_path)
    table = validation_targets(records) + speed_targets(rows, dtype) + ceiling_targets(rows, records, dtype)
    width = max(len(target) for target, _, _ in table)
    print(f"\ntargets ({dtype}; issue 23)")
    for target, value, verdict in table:
        print(f"  {target:<{width}}  {verdict:<12}  {value}")
