"""The paper's cost claim: with d_in = d_out = 128, attention with k = 19 costs as much as a k = 3 conv.

Analytic MACs per pixel (bench/flops.py) under each accounting of the relative logits, the k at which
attention's MACs cross conv k = 3's for several widths, fvcore's counts of each module, parameters, and
the measured latency / memory ratios from result rows, each with a verdict in plain words.
"""
from __future__ import annotations

import math

import pandas as pd

from bench.flops import (ACCOUNTINGS, attention_macs_per_pixel, attention_params, attention_total_macs,
                         conv_macs_per_pixel, conv_params)

from bench.schema import CONV, Case

from .load import as_number, is_ok
from .profile import claim_explanations
from .plots import Line, LinePlot, Point
from .tables import fmt, markdown

D, ATTENTION_K, CONV_K, HEADS = 128, 19, 3, 8
WIDTHS = (32, 64, 128, 256, 512)
SAME_COST = 0.05  # |ratio - 1| within 5 %: "the same cost"
# code that fvcore's tracer (torch.jit.trace) cannot follow, recognised by where a failed trace stopped
# (a path fragment of a traceback frame; the first match names the reason)
ACCOUNTING_WORDS = {
    "content_only": "content only (no relative logits)",
    "rel_per_key": "relative logits added to every key (the paper's tables, unfold)",
    "rel_factorized": "relative logits factorized (k per row/column offset)",
}


def attention_total(d: int, kernel_size: float, accounting: str) -> float:
    """Attention MACs per pixel at width ``d`` (d_in = d_out) under ``accounting``; k may be fractional."""
    return attention_total_macs(attention_macs_per_pixel(d, d, kernel_size), accounting)


def crossing_k(d: int, accounting: str, conv_k: int = CONV_K) -> float:
    """The (real) kernel size at which attention's MACs per pixel equal conv ``conv_k``'s, by bisection."""
    target = conv_macs_per_pixel(d, d, conv_k)
    low, high = 0.0, 1.0
    while attention_total(d, high, accounting) < target:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if attention_total(d, mid, accounting) < target else (low, mid)
    return (low + high) / 2


def analytic(d: int = D) -> dict:
    """per_pixel_macs, totals (with ratio to conv), crossing k for WIDTHS, and params, all analytic."""
    conv = conv_macs_per_pixel(d, d, CONV_K)
    macs = {a: attention_total(d, ATTENTION_K, a) for a in ACCOUNTINGS}
    totals = {a: {"macs": total, "ratio_to_conv": total / conv} for a, total in macs.items()}
    return {
        "d": d, "attention_k": ATTENTION_K, "conv_k": CONV_K,
        "per_pixel_macs": {"conv_k3": conv, "attention_k19": attention_macs_per_pixel(d, d, ATTENTION_K)},
        "totals": totals,
        "crossing_k": {a: {str(w): round(crossing_k(w, a), 3) for w in WIDTHS} for a in ACCOUNTINGS},
        "params": {"attention_k19": attention_params(d, d, ATTENTION_K), "conv_k3": conv_params(d, d, CONV_K)},
    }


def fvcore_counts(d: int = D, res: int = 20) -> list[dict]:
    """fvcore's count of each implementation's SASA2d (d, d, k = 19) and of Conv2d k = 3, per pixel, on CPU.

    Each module is built by the measuring pipeline as the runner measures it (bench.pipeline.build):
    content-only peers (no relative logits) as ``SASA2d(..., relative=False)``. Beside the count: the
    analytic MACs under the implementation's own accounting and what fvcore did not count. A module fvcore
    cannot count has ``status`` "not available" or "not countable" and a ``reason`` in words.
    """
    import sasa_impls
    from bench.cases import NOT_TIMED_BY_DEFAULT, analytic_costs, attention_spec

    try:
        from bench.pipeline import build, count_flops
    except ImportError:
        return [{"impl": "all", "status": "not available", "reason": "fvcore is not installed, so nothing was counted"}]
    names = [name for name in sasa_impls.list_impls() if name not in NOT_TIMED_BY_DEFAULT] + [CONV]
    entries = []
    for name in names:
        relative = name != CONV and sasa_impls.get_impl(name).supports_rel
        k = CONV_K if name == CONV else ATTENTION_K
        case = Case(name, k, d, HEADS, res, 1, "float32", "cpu", "fwd", relative=relative)
        costs = analytic_costs(case)
        entry: dict = {"impl": name, "kernel_size": k, "accounting": costs["rel_accounting"] or "conv",
                       "analytic_per_pixel": costs["macs_analytic"] / (res * res)}
        if name != CONV:
            ok, why = sasa_impls.get_impl(name).supports(attention_spec(case))
            if not ok:
                entries.append({**entry, "status": "not available", "reason": f"not available on cpu: {name} {why}"})
                continue
        counted = count_flops(build(case))
        if counted["fvcore_error"]:
            entries.append({**entry, "status": "not countable", "reason": counted["fvcore_error"]})
            continue
        entries.append({**entry, "status": "ok", "fvcore_per_pixel": counted["flops_fvcore"] / (res * res),
                        "uncounted": dict(counted["fvcore_uncounted"])})
    return entries


def latency_ratio(row: dict, conv: dict) -> dict:
    """The row's latency / the conv's: measured interleaved (bench/interleave.py: the median of per-round
    ratios with its 95% interval and rounds) where the row has it, else the quotient of the two medians
    (rows measured one after another: no interval)."""
    if not (is_ok(row) and is_ok(conv)):
        return {"latency_ratio": None, "latency_ratio_low": None, "latency_ratio_high": None, "rounds": None}
    if as_number(row.get("latency_ratio")) is not None:
        return {key: as_number(row.get(key)) for key in ("latency_ratio", "latency_ratio_low", "latency_ratio_high")} | {
            "rounds": int(as_number(row.get("rounds")) or 0) or None}
    return {"latency_ratio": as_number(row["latency_ms"]) / as_number(conv["latency_ms"]), "latency_ratio_low": None,
            "latency_ratio_high": None, "rounds": None}


def measured(frame: pd.DataFrame, d: int = D) -> list[dict]:
    """SASA2d k = 19 per implementation variant vs Conv2d k = 3 at the same machine/device/dtype/direction/res/batch
    (layer rows only: the claim is about layers), with where the rows come from (run, commit) and the ratio
    at every measured k (``ratios_by_k``: k -> [ratio, low, high])."""
    if frame.empty:
        return []
    rows = [r for r in frame.to_dict("records") if as_number(r.get("channels")) == d and r.get("level") == "layer"]
    where = ("machine", "device", "dtype", "direction", "res", "batch")
    convs = {tuple(r[c] for c in where): r for r in rows if r["impl"] == CONV and as_number(r["k"]) == CONV_K}
    out = []
    for row in rows:
        conv = convs.get(tuple(row[c] for c in where))
        if row["impl"] == CONV or as_number(row["k"]) != ATTENTION_K or conv is None:
            continue
        both = is_ok(row) and is_ok(conv)
        memory = as_number(row.get("peak_mem_bytes")), as_number(conv.get("peak_mem_bytes"))
        siblings = [r for r in rows if r["series"] == row["series"] and all(r[c] == row[c] for c in where)]
        by_k = {int(as_number(r["k"])): latency_ratio(r, conv) for r in sorted(siblings, key=lambda r: as_number(r["k"]))}
        out.append({
            **{c: row[c] for c in where}, "device_name": row.get("device_name"), "impl": row["series"],
            "status": row.get("status") if not is_ok(row) else ("conv " + str(conv.get("status")) if not is_ok(conv) else "ok"),
            "latency_ms": as_number(row.get("latency_ms")), "conv_latency_ms": as_number(conv.get("latency_ms")),
            **latency_ratio(row, conv),
            "peak_mem_bytes": memory[0], "conv_peak_mem_bytes": memory[1],
            "memory_ratio": memory[0] / memory[1] if both and memory[0] is not None and memory[1] else None,
            "run_id": row.get("run_id"), "conv_run_id": conv.get("run_id"), "commit": row.get("commit"),
            "contended": row.get("contended") is True or conv.get("contended") is True,
            "ratios_by_k": {k: [v["latency_ratio"], v["latency_ratio_low"], v["latency_ratio_high"]] for k, v in by_k.items()},
        })
    return sorted(out, key=lambda m: tuple(str(m[c]) for c in (*where, "impl")))


def _interval(entry: dict) -> str:
    """' (95% interval 2.21-2.40, 30 rounds)' for an interleaved ratio, '' otherwise."""
    loaded = "; measured contended: other processes loaded the machine, rerun on a quiet one" if entry.get("contended") else ""
    if entry.get("latency_ratio_low") is None:
        return f" ({loaded[2:]})" if loaded else ""
    return (f" (95% interval {entry['latency_ratio_low']:.2f}-{entry['latency_ratio_high']:.2f}, {entry['rounds']} rounds "
            f"interleaved{loaded})")


def verdicts(numbers: dict) -> dict[str, list[str]]:
    """Plain-words verdicts: one per accounting, one per measured device/dtype/direction/shape."""
    conv = numbers["per_pixel_macs"]["conv_k3"]
    by_accounting = []
    for accounting, total in numbers["totals"].items():
        ratio = total["ratio_to_conv"]
        holds = abs(ratio - 1) <= SAME_COST
        by_accounting.append(
            f"{ACCOUNTING_WORDS[accounting]}: attention k={ATTENTION_K} needs {total['macs']:,} MACs/pixel, "
            f"{ratio:.3f} x conv k={CONV_K}'s {conv:,}; the claim {'holds' if holds else 'does not hold'}"
            f" ({'within' if holds else 'beyond'} {SAME_COST:.0%}); equal cost at k = "
            f"{numbers['crossing_k'][accounting][str(numbers['d'])]:.1f}.")
    groups: dict[tuple, list[dict]] = {}
    for m in numbers["measured"]:
        groups.setdefault(tuple(m[c] for c in ("machine", "device_name", "dtype", "direction", "res", "batch")), []).append(m)
    by_device = []
    for (machine, device, dtype, direction, res, batch), entries in groups.items():
        timed = [m for m in entries if m["latency_ratio"] is not None]
        failed = ", ".join(f"{m['impl']} {m['status']}" for m in entries if m["latency_ratio"] is None)
        head = f"{device} ({machine}), {dtype}, {direction}, {res}x{res}, batch {batch}: "
        if not timed:
            by_device.append(head + f"no SASA2d k={ATTENTION_K} implementation was measured ({failed}).")
            continue
        best = min(timed, key=lambda m: m["latency_ratio"])
        ratio = best["latency_ratio"]
        memory = f"{best['memory_ratio']:.2f} x its peak memory" if best["memory_ratio"] is not None else "memory not measured"
        same = ratio <= 1 + SAME_COST
        by_device.append(
            head + f"the fastest SASA2d k={ATTENTION_K} ({best['impl']}) takes {ratio:.2f} x the time of Conv2d k={CONV_K}"
            f"{_interval(best)} and {memory}; in measured time the claim {'holds' if same else 'does not hold'}"
            + (f" (not timed: {failed})." if failed else "."))
    return {"accountings": by_accounting, "devices": by_device}


def summary(numbers: dict) -> str:
    """One sentence naming the accountings under which the claim holds and those under which it does not."""
    ratios = {a: t["ratio_to_conv"] for a, t in numbers["totals"].items()}
    holds = [f"{ACCOUNTING_WORDS[a]} ({r:.3f} x)" for a, r in ratios.items() if abs(r - 1) <= SAME_COST]
    fails = [f"{ACCOUNTING_WORDS[a]} ({r:.3f} x)" for a, r in ratios.items() if abs(r - 1) > SAME_COST]
    return (f"**In short:** the claim holds under {' and '.join(holds) or 'no accounting'}; "
            f"it does not hold under {' and '.join(fails) or 'any other'}.")


def claim_data(frame: pd.DataFrame) -> dict:
    """Everything ``sasa-bench claim`` reports, as a JSON-ready dict."""
    numbers = analytic()
    numbers["fvcore"] = fvcore_counts()
    numbers["measured"] = measured(frame)
    numbers["verdicts"] = verdicts(numbers)
    numbers["profile"] = claim_explanations(frame.attrs.get("profiles") or [], D, ATTENTION_K, CONV_K)
    return numbers


def claim_figures(numbers: dict) -> list[LinePlot]:
    """Crossing k vs width per accounting, and MACs per pixel vs k at d = 128 with the conv k = 3 line."""
    d = numbers["d"]
    crossing = LinePlot(
        name="claim_crossing_k", title=f"k at which attention costs as much as conv k={CONV_K} (d_in = d_out = d)",
        x_label="channels d (d_in = d_out)", y_label="crossing kernel size k (MACs/pixel equal)",
        lines=[Line(a, [Point(float(w), k) for w, k in ((int(w), k) for w, k in per_d.items())])
               for a, per_d in numbers["crossing_k"].items()],
        log_x=True, log_y=False, references=[(f"paper: k={ATTENTION_K}", float(ATTENTION_K))])
    ks = range(1, 32, 2)
    per_k = LinePlot(
        name="claim_macs_vs_k", title=f"MACs per pixel at d = {d}: attention vs conv k={CONV_K}",
        x_label="kernel size k", y_label="MACs per output pixel (MAC)",
        lines=[Line(a, [Point(float(k), float(attention_total(d, k, a))) for k in ks]) for a in ACCOUNTINGS],
        log_y=False, references=[(f"conv k={CONV_K}: {numbers['per_pixel_macs']['conv_k3']:,}", float(numbers["per_pixel_macs"]["conv_k3"]))],
        marks=[(f"k={ATTENTION_K}", float(ATTENTION_K))])
    return [crossing, per_k]


def claim_markdown(numbers: dict, figure_files: list[str]) -> str:
    """reports/claim.md."""
    d, comps, conv = numbers["d"], numbers["per_pixel_macs"]["attention_k19"], numbers["per_pixel_macs"]["conv_k3"]
    parts = [
        f"# The k = {ATTENTION_K} vs k = {CONV_K} cost claim", "",
        f"The paper: with d_in = d_out = {d}, a k = {CONV_K} convolution costs the same FLOPs as attention with "
        f"k = {ATTENTION_K}. MACs per output pixel (analytic, bench/flops.py; FLOPs = 2 x MACs):", "",
        markdown(["component", "MACs/pixel"], [[f"attention k={ATTENTION_K}: {name}", f"{v:,}"] for name, v in comps.items()]
                 + [[f"conv k={CONV_K}: {CONV_K}² d²", f"{conv:,}"]]), "",
        "## Totals under three accountings of the relative logits", "",
        markdown(["accounting", "attention MACs/pixel", "ratio to conv k=3 (×)"],
                 [[ACCOUNTING_WORDS[a], f"{t['macs']:,}", f"{t['ratio_to_conv']:.3f}"] for a, t in numbers["totals"].items()]), "",
        *[f"- {v}" for v in numbers["verdicts"]["accountings"]], "",
        summary(numbers), "",
        "## Crossing k per width", "",
        markdown(["accounting"] + [f"d={w} (k)" for w in WIDTHS],
                 [[a] + [f"{k:.1f}" for k in per_d.values()] for a, per_d in numbers["crossing_k"].items()]), "",
        *[f"![{name}]({name})" + "\n" for name in figure_files],
        "## Parameters", "",
        markdown(["layer", "parameters"], [[f"SASA2d({d}, {d}, k={ATTENTION_K}): 3 d² + k d", f"{numbers['params']['attention_k19']:,}"],
                                          [f"Conv2d({d}, {d}, k={CONV_K}): k² d²", f"{numbers['params']['conv_k3']:,}"]]), "",
        "## fvcore's count beside the analytic one", "",
        "fvcore counts one MAC as one flop, per pixel on a 20 x 20 input. It counts the ops each module really "
        "traces (padding, masked or per-key work included) and skips the ops listed, so it differs from the analytic count. "
        "Each module is the layer its implementation is measured as (content-only peers without relative embeddings); "
        "where fvcore cannot count one, the cell says why.", "",
        markdown(["module", "accounting", "analytic (MAC/pixel)", "fvcore (MAC/pixel)", "not counted by fvcore"],
                 [[e["impl"], e.get("accounting", ""), fmt(e.get("analytic_per_pixel")),
                   fmt(e.get("fvcore_per_pixel")) if e["status"] == "ok" else e["reason"],
                   ", ".join(f"{k} x{v}" for k, v in sorted(e.get("uncounted", {}).items())) or "-"] for e in numbers["fvcore"]]), "",
        f"## Measured: SASA2d k = {ATTENTION_K} vs Conv2d k = {CONV_K}", "",
    ]
    if numbers["measured"]:
        parts += [markdown(
            ["machine", "device", "dtype", "direction", "res (px)", "batch", "impl", "latency (ms)", "conv latency (ms)",
             "latency ratio (×)", "95% interval", "memory ratio (×)", "run", "commit"],
            [[m["machine"], m["device_name"], m["dtype"], m["direction"], m["res"], m["batch"], m["impl"],
              fmt(m["latency_ms"]) if m["status"] == "ok" else f"**{m['status']}**", fmt(m["conv_latency_ms"]),
              _ratio(m["latency_ratio"]), _range(m["latency_ratio_low"], m["latency_ratio_high"]), _ratio(m["memory_ratio"]),
              m["run_id"] if m["run_id"] == m["conv_run_id"] else f"{m['run_id']} (conv: {m['conv_run_id']})",
              str(m["commit"] or "")[:10]] for m in numbers["measured"]]), "",
            "A ratio with an interval was measured interleaved with the conv in one worker (bench/interleave.py: the "
            "median of per-round ratios, bootstrap 95% interval over rounds); one without it divides two medians "
            "measured one after another, and moves with the machine's drift between them.", ""]
        parts += [f"- {v}" for v in numbers["verdicts"]["devices"]]
    else:
        parts += ["No measurements with channels = 128, attention k = 19 and conv k = 3 at the same shape yet."]
    if numbers.get("profile"):
        parts += ["", "## Where the ratio comes from (`sasa-bench profile`)", "", *[f"- {v}" for v in numbers["profile"]]]
    return "\n".join(parts).rstrip() + "\n"


def _range(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"
