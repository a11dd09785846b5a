"""Two result sets side by side per case: latencies, their ratio and whether the change is beyond noise.

A side is a result file or folder, or a selector on a results folder: ``commit=abc123`` (prefix),
``machine=ID``, ``run=RUN_ID``, ``suite=NAME``, combined with commas (``commit=abc1,machine=h100``).
A change is *beyond noise* when the intervals [median - IQR, median + IQR] of the two sides do not
overlap and the ratio B / A differs from 1 by more than ``threshold``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from bench.schema import series
from bench.store import read_rows

from .load import CASE_COLUMNS, as_number, is_ok, rows_frame
from .tables import fmt, markdown

SELECTORS = {
    "commit": lambda row, value: str(row.get("commit") or "").startswith(value),
    "machine": lambda row, value: row.get("machine") == value,
    "run": lambda row, value: row.get("run_id") == value,
    "suite": lambda row, value: row.get("suite") == value,
}


def load_side(spec: str, results: str | os.PathLike, name: str, problems: list[str] | None = None) -> pd.DataFrame:
    """Rows of one side (latest per machine and case): a path, or selectors applied to ``results``; lines
    that are not rows go to ``problems`` (bench.store.read_rows)."""
    if Path(spec).exists():
        rows = list(read_rows([spec], problems))
    elif "=" in spec:
        selectors = parse_selectors(spec, name)
        rows = [r for r in read_rows([results], problems) if all(SELECTORS[key](r, value) for key, value in selectors.items())]
    else:
        raise ValueError(f"{name}: {spec!r} is neither a result file/folder nor a selector like commit=abc123 "
                         f"(keys: {', '.join(SELECTORS)})")
    if not rows:
        raise ValueError(f"{name}: no result rows in {spec!r}" + ("" if Path(spec).exists() else f" under {results}"))
    return rows_frame(rows)


def parse_selectors(spec: str, name: str) -> dict[str, str]:
    """'commit=abc,machine=x' -> {'commit': 'abc', 'machine': 'x'} (UsageError on unknown keys)."""
    selectors = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in SELECTORS or not value:
            raise ValueError(f"{name}: bad selector {part!r}; expected KEY=VALUE with KEY in {', '.join(SELECTORS)}")
        selectors[key] = value
    return selectors


def parse_fail_above(text: str) -> float:
    """The largest allowed slow-down as a ratio B / A: '0.1' or '10%' (fractions) and '1.1x' (a ratio) all give 1.1."""
    try:
        if text.endswith("x"):
            ratio = float(text[:-1])
        elif text.endswith("%"):
            ratio = 1 + float(text[:-1]) / 100
        else:
            ratio = 1 + float(text)
    except ValueError:
        raise ValueError(f"--fail-above: expected a fraction (0.1), a percentage (10%) or a ratio (1.1x), got {text!r}") from None
    if not ratio >= 1 or ratio == float("inf"):
        raise ValueError(f"--fail-above: a slow-down must be >= 0 (ratio >= 1x), got {text!r}")
    return ratio


def match_keys(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """Case columns, plus the machine when both sides hold the same machines (a commit-to-commit comparison)."""
    if set(a["machine"]) == set(b["machine"]):
        return ["machine", *CASE_COLUMNS]
    for name, side in (("A", a), ("B", b)):
        if side.duplicated(list(CASE_COLUMNS)).any():
            raise ValueError(f"{name}: holds several machines ({', '.join(sorted(map(str, set(side['machine']))))}) with the "
                             f"same cases; select one with machine=ID")
    return list(CASE_COLUMNS)


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold: float = 0.05) -> list[dict]:
    """One entry per case present on both sides: latencies, ratio B / A, and a mark when beyond noise."""
    keys = match_keys(a, b)
    b_rows = {tuple(r[k] for k in keys): r for r in b.to_dict("records")}
    entries = []
    for row_a in a.to_dict("records"):
        row_b = b_rows.get(tuple(row_a[k] for k in keys))
        if row_b is not None:
            entries.append({**{k: row_a[k] for k in keys}, **_change(row_a, row_b, threshold)})
    if not entries:
        raise ValueError("A, B: no case is present on both sides")
    return entries


def _change(a: dict, b: dict, threshold: float) -> dict:
    entry = {"a_ms": as_number(a.get("latency_ms")), "a_iqr_ms": as_number(a.get("latency_iqr_ms")) or 0.0,
             "b_ms": as_number(b.get("latency_ms")), "b_iqr_ms": as_number(b.get("latency_iqr_ms")) or 0.0,
             "a_status": a.get("status"), "b_status": b.get("status"), "ratio": None, "mark": "", "regression": False,
             "beyond_noise": False}
    if not (is_ok(a) and is_ok(b)):
        if is_ok(a) != is_ok(b):
            entry["mark"] = f"now {b.get('status')}"
            entry["regression"] = is_ok(a)
        return entry
    ratio = entry["b_ms"] / entry["a_ms"]
    disjoint = (entry["a_ms"] + entry["a_iqr_ms"] < entry["b_ms"] - entry["b_iqr_ms"]
                or entry["b_ms"] + entry["b_iqr_ms"] < entry["a_ms"] - entry["a_iqr_ms"])
    beyond = disjoint and abs(ratio - 1) > threshold
    entry.update(ratio=ratio, mark=("slower" if ratio > 1 else "faster") if beyond else "", beyond_noise=beyond)
    return entry


def interleaved_entries(pairs: list[tuple[dict, dict]], threshold: float = 0.05) -> list[dict]:
    """One entry per (A row, B row) measured interleaved (bench/interleave.py; B's row carries the ratio B / A
    and its 95% interval): beyond noise when the interval excludes 1 and the ratio differs from 1 by more
    than ``threshold``; the fields :func:`failures` and :func:`interleaved_markdown` read."""
    entries = []
    for a, b in pairs:
        ratio, low, high = (as_number(b.get(k)) for k in ("latency_ratio", "latency_ratio_low", "latency_ratio_high"))
        both = is_ok(a) and is_ok(b) and ratio is not None
        beyond = both and (low > 1 or high < 1) and abs(ratio - 1) > threshold
        mark = ("slower" if ratio > 1 else "faster") if beyond else (f"now {b.get('status')}" if is_ok(a) and not is_ok(b) else "")
        entries.append({**{k: a[k] for k in SHOWN if k in a and k != "series"}, "a_series": series(a), "b_series": series(b),
                        "a_ms": as_number(a.get("latency_ms")), "b_ms": as_number(b.get("latency_ms")),
                        "a_status": a.get("status"), "b_status": b.get("status"), "ratio": ratio if both else None,
                        "low": low if both else None, "high": high if both else None, "rounds": b.get("rounds"),
                        "mark": mark, "beyond_noise": beyond, "regression": is_ok(a) and not is_ok(b)})
    return entries


def interleaved_markdown(entries: list[dict]) -> str:
    """The interleaved comparison as a Markdown table, slowest change first."""
    keys = ("k", "channels", "heads", "res", "batch", "dtype", "device", "direction", "level")
    ordered = sorted(entries, key=lambda e: -(e["ratio"] or 0))
    rows = [[str(e[k]) for k in keys] + [
        fmt(e["a_ms"]) if e["a_status"] == "ok" else str(e["a_status"]), fmt(e["b_ms"]) if e["b_status"] == "ok" else str(e["b_status"]),
        f"{e['ratio']:.3f}" if e["ratio"] else "n/a", f"{e['low']:.3f}-{e['high']:.3f}" if e["ratio"] else "",
        str(e["rounds"] or ""), f"**{e['mark']}**" if e["mark"] else ""] for e in ordered]
    a, b = entries[0]["a_series"], entries[0]["b_series"]
    return markdown(list(keys) + [f"A: {a} (ms)", f"B: {b} (ms)", "B / A (×)", "95% interval", "rounds", "beyond noise"], rows)


def failures(entries: list[dict], limit: float) -> list[dict]:
    """Cases slowed down beyond noise by more than ``limit`` (a ratio), or that stopped running."""
    return [e for e in entries if e["regression"] or (e["beyond_noise"] and e["ratio"] > limit)]


# The case columns a comparison shows: the implementation variant (bench.schema.series) stands for impl,
# relative and impl_options.
SHOWN = ("machine", "series", "k", "channels", "heads", "res", "batch", "dtype", "device", "direction", "level")


def compare_markdown(entries: list[dict], a_label: str, b_label: str) -> str:
    """The comparison as a Markdown table, slowest change first."""
    keys = [k for k in SHOWN if k in entries[0] or k == "series"]
    ordered = sorted(entries, key=lambda e: -(e["ratio"] or 0))
    rows = [[series(e) if k == "series" else str(e[k]) for k in keys]
            + [_latency(e, "a"), _latency(e, "b"), f"{e['ratio']:.3f}" if e["ratio"] else "n/a",
               f"**{e['mark']}**" if e["mark"] else ""] for e in ordered]
    headers = ["impl" if k == "series" else k for k in keys] + [f"A: {a_label} (ms)", f"B: {b_label} (ms)", "B / A (×)", "beyond noise"]
    return markdown(headers, rows)


def _latency(entry: dict, side: str) -> str:
    if entry[f"{side}_ms"] is None or entry[f"{side}_status"] != "ok":
        return str(entry[f"{side}_status"])
    return f"{fmt(entry[f'{side}_ms'])} ± {fmt(entry[f'{side}_iqr_ms'])}"
