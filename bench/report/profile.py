"""The profile rows of `sasa-bench profile` in reports: where the time goes, stage by stage.

Per machine, device, dtype and level: a stacked bar chart (one panel per implementation and direction, one bar
per k, each bar the stages' shares of the profiled step, its total time on top) and a table of ms, share and
GFLOP/s per stage, with how each stage was measured. The claim report gets :func:`claim_explanations`: the
measured k = 19 vs k = 3 ratio explained from the stages of the fastest implementation beside the conv.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot is imported)

from sasa_impls.regions import STAGES  # noqa: E402

from bench.schema import CONV, Status  # noqa: E402

from .figures import slug  # noqa: E402
from .load import as_number  # noqa: E402
from .tables import fmt, impl_order, markdown  # noqa: E402

CONV_STAGE = "conv"
STAGE_ORDER = (*STAGES, CONV_STAGE)
COLOURS = dict(zip(STAGE_ORDER, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#bbbbbb", "#222222")))
GROUP = ("machine", "device", "dtype", "level")


def ok_profiles(rows: list[dict]) -> list[dict]:
    """Profile rows that carry stages."""
    return [r for r in rows if r.get("status") == Status.OK and isinstance(r.get("stages"), dict) and r["stages"]]


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c) for c in GROUP), []).append(row)
    return dict(sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))))


def stage_bars(rows: list[dict], title: str, path: Path) -> str:
    """The "where the time goes" figure of one group: panels impl x direction, a bar per case (k, and the other
    shape variables when they vary), stacked stage shares; returns the file name."""
    impls = impl_order([r["series"] for r in rows])
    directions = sorted({r["direction"] for r in rows})
    fig, axes = plt.subplots(len(directions), len(impls), figsize=(2.6 * len(impls) + 1.5, 3.2 * len(directions)),
                             squeeze=False, sharey=True)
    for i, direction in enumerate(directions):
        for j, impl in enumerate(impls):
            ax = axes[i][j]
            cases = sorted((r for r in rows if r["series"] == impl and r["direction"] == direction),
                           key=lambda r: (r["k"], r["channels"], r["res"], r["batch"], r["heads"]))
            labels = [_bar_label(r, cases) for r in cases]
            if not cases:
                ax.text(0.5, 0.5, "no profile\n(not run or not ok)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            bottom = [0.0] * len(cases)
            for stage in STAGE_ORDER:
                shares = [100 * (as_number((r["stages"].get(stage) or {}).get("share")) or 0.0) for r in cases]
                if any(shares):
                    ax.bar(range(len(cases)), shares, bottom=bottom, color=COLOURS[stage], label=stage, width=0.7)
                    bottom = [b + s for b, s in zip(bottom, shares)]
            for x, r in enumerate(cases):
                ax.text(x, max(bottom[x], 100) + 2, f"{fmt(r['profile_total_ms'])} ms", ha="center", fontsize=6, rotation=90)
            ax.set_xticks(range(len(cases)), labels, fontsize=7)
            ax.set_ylim(0, 135)
            ax.set_title(f"{impl}, {direction}", fontsize=8)
            if j == 0:
                ax.set_ylabel("share of the profiled step (%)")
    handles = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles.keys()), loc="center right", fontsize=8, title="stage")
    fig.suptitle(f"Where the time goes: {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _bar_label(row: dict, cases: list[dict]) -> str:
    varying = [c for c in ("channels", "res", "batch", "heads") if len({r[c] for r in cases}) > 1]
    return "\n".join([f"k={row['k']}"] + [f"{c[0]}={row[c]}" for c in varying])


def stage_cell(stage: dict | None) -> str:
    """'1.2 ms, 34% (56 GFLOP/s)' for a stage, '' where the case has none."""
    if not stage:
        return ""
    share = as_number(stage.get("share"))
    text = f"{fmt(as_number(stage['ms']))} ms" + (f", {share:.0%}" if share is not None else "")
    gflops = as_number(stage.get("gflops"))
    return text + (f" ({fmt(gflops)} GFLOP/s)" if gflops else "")


def stage_table(rows: list[dict]) -> str:
    """One line per case: total and un-profiled ms, then ms, share and GFLOP/s per stage, and any residual."""
    present = [s for s in STAGE_ORDER if any(s in r["stages"] for r in rows)]
    ordered = sorted(rows, key=lambda r: (impl_order([x["series"] for x in rows]).index(r["series"]), r["direction"],
                                          r["k"], r["channels"], r["res"], r["batch"]))
    cells = [[r["series"], r["direction"], str(r["k"]), str(r["channels"]), str(r["res"]), str(r["batch"]),
              fmt(as_number(r["profile_total_ms"])), fmt(as_number(r["unprofiled_ms"]))]
             + [stage_cell(r["stages"].get(s)) for s in present] + [_text(r.get("profile_residual"))] for r in ordered]
    return markdown(["impl", "direction", "k", "channels", "res (px)", "batch", "profiled (ms/step)", "un-profiled (ms)",
                     *present, "residual"], cells)


def _text(value) -> str:
    return value if isinstance(value, str) else ""  # None, or NaN from a frame


def methods_list(rows: list[dict]) -> list[str]:
    """How each implementation's stages were measured (one line per implementation and distinct method set)."""
    lines = []
    for impl in impl_order([r["series"] for r in rows]):
        methods: dict[str, set[str]] = {}
        for r in rows:
            if r["series"] == impl:
                for name, stage in r["stages"].items():
                    methods.setdefault(name, set()).add(stage.get("method") or "")
        text = "; ".join(f"{name}: {' / '.join(sorted(m))}" for name, m in methods.items())
        lines.append(f"- **{impl}**: {text}")
    return lines


def profile_section(rows: list[dict], out_dir: str | os.PathLike) -> list[str]:
    """The report's "Profiles" sections (Markdown lines), figures written to ``out_dir``; [] without profile rows."""
    rows = ok_profiles(rows)
    if not rows:
        return []
    parts = ["## Profiles: where the time goes", "",
             "From `sasa-bench profile` (torch.profiler; README \"Profiling\"). Each stage's share is of the profiled "
             "step; `method` says how it was found: `regions` (named regions in the implementation), `aten op names` "
             "(unmarked ATen ops: the layer's 1x1 projections, reshapes and copies), `ablation` (fused kernels: timed "
             "variants of the op with a stage left out). GFLOP/s = 2 x the stage's analytic MACs (x3 for fwd+bwd) / its "
             "time. A residual says where the stages or the profiled total missed by more than 15%.", ""]
    for key, group in _groups(rows).items():
        machine, device, dtype, level = key
        title = f"{machine}, {device}, {dtype}" + (", bare op" if level == "op" else "")
        name = stage_bars(group, title, Path(out_dir) / f"{slug('profile', machine, device, dtype, level)}.png")
        parts += [f"### {title}", "", f"![where the time goes: {title}]({name})", "", stage_table(group), "",
                  "How the stages were measured:", "", *methods_list(group), ""]
    return parts


def claim_explanations(rows: list[dict], d: int = 128, attention_k: int = 19, conv_k: int = 3) -> list[str]:
    """Per machine/device/dtype/direction/res/batch with profiles of conv k = ``conv_k`` and attention k =
    ``attention_k`` (d channels, layer level): the measured ratio of the fastest attention implementation (by
    its un-profiled time) to the conv, explained by its stages (projections, softmax, the core's arithmetic at
    what fraction of peak, the rest)."""
    rows = [r for r in ok_profiles(rows) if r.get("level") == "layer" and as_number(r.get("channels")) == d]
    where = ("machine", "device", "dtype", "direction", "res", "batch")
    out = []
    for key in sorted({tuple(r[c] for c in where) for r in rows}, key=str):
        same = [r for r in rows if tuple(r[c] for c in where) == key]
        convs = [r for r in same if r["impl"] == CONV and r["k"] == conv_k]
        attention = [r for r in same if r["impl"] != CONV and r["k"] == attention_k]
        if not convs or not attention:
            continue
        conv, best = convs[-1], min(attention, key=lambda r: r["unprofiled_ms"])
        out.append(_explain(best, conv, key))
    return out


def _explain(row: dict, conv: dict, key: tuple) -> str:
    machine, device, dtype, direction, res, batch = key
    stages, total = row["stages"], as_number(row["profile_total_ms"])
    ratio = row["unprofiled_ms"] / conv["unprofiled_ms"]

    def part(*names: str) -> tuple[float, float]:
        ms = sum(as_number((stages.get(n) or {}).get("ms")) or 0.0 for n in names)
        return ms, ms / total if total else 0.0

    projections, softmax = part("projections"), part("softmax")
    core = part("logits", "relative", "aggregate")
    rest = part("layout", "other")
    macs = sum(as_number((stages.get(n) or {}).get("macs")) or 0.0 for n in ("logits", "relative", "aggregate"))
    core_gflops = 2 * macs / (core[0] * 1e6) if core[0] else None
    peak = as_number(row.get("peak_flops"))
    at_peak = f", {core_gflops * 1e9 / peak:.0%} of the machine's peak ({fmt(peak / 1e9)} GFLOP/s)" if core_gflops and peak else ""
    methods = sorted({(stages.get(n) or {}).get("method", "") for n in ("logits", "softmax")} - {""})
    return (f"{machine} ({device}, {dtype}, {direction}, {res}x{res}, batch {batch}): the fastest SASA2d k={row['k']}, "
            f"{row['series']}, takes {ratio:.2f} x the time of Conv2d k={conv['k']} ({fmt(row['unprofiled_ms'])} vs "
            f"{fmt(conv['unprofiled_ms'])} ms, un-profiled). Of its profiled {fmt(total)} ms: the 1x1 projections "
            f"{fmt(projections[0])} ms ({projections[1]:.0%}; {projections[0] / conv['unprofiled_ms']:.2f} x the whole conv), "
            f"the softmax {fmt(softmax[0])} ms ({softmax[1]:.0%}), the core's arithmetic (logits, relative, aggregate) "
            f"{fmt(core[0])} ms ({core[1]:.0%}) at {fmt(core_gflops)} GFLOP/s{at_peak}, layout and the rest "
            f"{fmt(rest[0])} ms ({rest[1]:.0%}). Measured by: {'; '.join(methods)}.")
