"""Reports, the k=19 vs k=3 claim and compare, on the fixture rows in tests/fixtures/results/."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from bench.cli import main
from bench.fvcore_count import trace_failure
from bench.report import claim as claim_module
from bench.report.figures import roofline, sweep_figures
from bench.report.load import load, rows_frame
from bench.report.plots import Line, LinePlot, Point, render
from bench.report.tables import NOISY_MARK, TABLES, group_table
from bench.store import append_row, read_rows

from helpers import one_space

FIXTURES = Path(__file__).parent / "fixtures" / "results"
D = 128


@pytest.fixture(scope="module")
def frame():
    return load([FIXTURES])


def group(frame, machine, direction="fwd"):
    return frame[(frame.machine == machine) & (frame.direction == direction)]


def test_latest_run_per_machine_and_case_wins(frame):
    rows = list(read_rows([FIXTURES]))
    unfold_k7 = [r for r in rows if (r["machine"], r["impl"], r["k"], r["res"], r["channels"]) == ("ci-cpu", "unfold", 7, 32, 64)]
    assert len(unfold_k7) == 2 and len(frame) == len(rows) - 1
    newest = max(unfold_k7, key=lambda r: r["timestamp"])
    kept = frame[(frame.machine == "ci-cpu") & (frame.impl == "unfold") & (frame.k == 7) & (frame.res == 32)]
    assert kept["latency_ms"].tolist() == [newest["latency_ms"]]


def test_gflops_and_peak_fraction_follow_the_convention(frame):
    row = frame[(frame.machine == "h100-sxm") & (frame.impl == "triton") & (frame.k == 19) & (frame.direction == "fwd+bwd")
                & (frame.channels == D) & (frame.res == 56)].iloc[0]
    expected = 2 * row.macs_analytic * 3 / (row.latency_ms * 1e-3) / 1e9
    assert row.gflops == pytest.approx(expected)
    table = group_table(group(frame, "h100-sxm", "fwd+bwd"), TABLES["peak_fraction"])
    assert f"{100 * expected * 1e9 / 989e12:.3g}" in table  # H100 SXM bf16 dense peak
    assert group_table(group(frame, "ci-cpu"), TABLES["peak_fraction"]) is None  # no CPU peak measured there


def test_cpu_fraction_of_peak_falls_back_to_the_measured_peak_file(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURES, results)
    assert main(["peak", "--out", str(results), "--size", "64,256", "--threads", "1"]) == 0
    assert "GFLOP/s" in capsys.readouterr().out
    peaks = json.loads(next(results.rglob("peak.json")).read_text())
    entry = peaks["float32"]["1"]
    gflops, by_size = entry["gflops"], entry["by_size"]
    assert set(by_size) == {"64", "256"} and entry["matmul_gflops"] == max(by_size.values()) > 0  # the best size counts
    assert entry["kind"] == "fma" and gflops == entry["fma_gflops"] > 0  # the peak: the physical FMA rate
    machine = next(results.rglob("peak.json")).parent.name
    for row in read_rows([FIXTURES / "ci-cpu"]):  # the fixture's CPU rows as this machine's, one thread
        append_row(results / machine / "mine.jsonl", {**row, "machine": machine, "threads": 1})
    frame = load([results])
    mine = frame[(frame.machine == machine) & (frame.status == "ok")]
    assert len(mine) and (mine.peak_flops == gflops * 1e9).all()
    table = group_table(mine[mine.direction == "fwd"], TABLES["peak_fraction"])
    row = mine[mine.direction == "fwd"].iloc[0]
    assert f"{100 * row.gflops / gflops:.3g}" in table and "use the machine's peak.json" in table  # the rows record none
    other = frame[frame.machine == "ci-cpu"]
    assert other.peak_flops.isna().all()  # ci-cpu has no peak file


def test_tables_show_status_words_and_speedups(frame):
    cpu = group(frame, "ci-cpu")
    latency = one_space(group_table(cpu, TABLES["latency"]))
    assert "**timeout**" in latency and "**incorrect**" in latency and "unfold (ms)" in latency
    speedup = one_space(group_table(cpu, TABLES["speedup"]))
    rows = cpu.set_index(["impl", "k", "channels", "res"])
    expected = rows.loc[("unfold", 19, 64, 32), "latency_ms"] / rows.loc[("memory_blocks", 19, 64, 32), "latency_ms"]
    line = next(l for l in speedup.splitlines() if l.startswith("| 19 | 64 |"))
    assert f"{expected:.2f}×" in line and "**timeout**" in line


def test_figures_have_axes_units_and_failed_points(frame):
    cpu = group(frame, "ci-cpu")
    specs = {s.name: s for s in sweep_figures(cpu, "cpu", "ci-cpu")}
    latency_k = next(s for n, s in specs.items() if "latency_vs_k_channels64" in n)
    assert (latency_k.x_label, latency_k.y_label) == ("kernel size k", "latency (ms)")
    einsum = next(l for l in latency_k.lines if l.label == "im2col_einsum")
    assert [(p.x, p.status) for p in einsum.points if p.y is None] == [(19.0, "timeout")]
    fig = render(latency_k)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "kernel size k" and ax.get_ylabel() == "latency (ms)" and ax.get_yscale() == "log"
    assert {"timeout", "incorrect"} <= {t.get_text() for t in ax.texts}
    plt.close(fig)
    macs = next(s for n, s in specs.items() if "macs_vs_k_channels64" in n)
    assert macs.references == [("conv k=3", pytest.approx(9 * 64 * 64 * 32 * 32 * 1e-9))]
    assert any(s.x_label.startswith("resolution") for s in specs.values())
    assert roofline(cpu, "cpu", "ci-cpu") is None
    roof = roofline(group(frame, "h100-sxm"), "gpu", "h100")
    assert roof.peak_flops == 989e12 and "triton" in roof.points


def drawn(spec: LinePlot):
    """The rendered figure (drawn, so tick labels exist) and its axes."""
    fig = render(spec)
    fig.canvas.draw()
    return fig, fig.axes[0]


def display_y(line) -> np.ndarray:
    """Display y of every point of a matplotlib line, whatever coordinates it was drawn in."""
    xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
    return line.get_transform().transform(xy)[:, 1]


def assert_failures_above_every_curve(spec: LinePlot) -> None:
    fig, ax = drawn(spec)
    labels = {line.label for line in spec.lines}
    curves = [l for l in ax.lines if l.get_label() in labels and len(l.get_xdata())]
    top = max([display_y(c).max() for c in curves] + [ax.transData.transform((0, v))[1] for _, v in spec.references])
    markers = [l for l in ax.lines if l.get_marker() == "x"]
    failed = [p for line in spec.lines for p in line.points if p.y is None]
    assert len(markers) == len(failed) > 0
    for marker in markers:
        assert top < display_y(marker).min() and display_y(marker).max() <= ax.bbox.y1, (top, display_y(marker))
    assert {p.status for p in failed} <= {t.get_text() for t in ax.texts}
    plt.close(fig)


@pytest.mark.parametrize("log_y", [True, False])
def test_failed_cases_sit_above_every_curve(log_y):
    rng = np.random.default_rng()
    xs = [3.0, 7.0, 11.0, 15.0, 19.0]
    lines = []
    for index, failing in enumerate(([], [19.0], [11.0, 19.0], [3.0])):
        values = np.sort(rng.uniform(1, 1000, len(xs)))
        points = [Point(x, None, "oom") if x in failing else Point(x, float(v)) for x, v in zip(xs, values)]
        lines.append(Line(f"impl{index}", points))
    assert_failures_above_every_curve(LinePlot("f", "t", "k", "latency (ms)", lines, log_y=log_y,
                                               references=[("conv", float(rng.uniform(1, 1000)))]))


def test_fixture_plots_put_failures_above_the_curves(frame):
    specs = sweep_figures(group(frame, "ci-cpu"), "cpu", "ci-cpu")
    with_failures = [s for s in specs if any(p.y is None for line in s.lines for p in line.points)]
    assert {s.name.split("_vs_")[0] for s in with_failures} >= {"ci-cpu_latency", "ci-cpu_memory"}
    for spec in with_failures:
        assert_failures_above_every_curve(spec)


def test_coinciding_curves_stay_distinguishable(frame):
    rng = np.random.default_rng()
    values = rng.uniform(1, 100, 5)
    names = ["unfold", "im2col_einsum", "memory_blocks", "natten"]
    points = [Point(float(x), float(v)) for x, v in zip(range(5), values)]
    spec = LinePlot("s", "t", "k", "peak memory (MiB)", [Line(name, points) for name in names])
    fig, ax = drawn(spec)
    curves = [l for l in ax.lines if l.get_label() in names]
    assert len({c.get_marker() for c in curves}) == len({c.get_linestyle() for c in curves}) == len(names)
    assert all(c.get_markerfacecolor() == "none" for c in curves)  # hollow: a marker under another stays visible
    plt.close(fig)
    memory = next(s for s in sweep_figures(group(frame, "ci-cpu"), "cpu", "ci-cpu") if "memory_vs_k_channels64" in s.name)
    fig, ax = drawn(memory)
    styles = {l.get_label(): (l.get_marker(), l.get_linestyle())
              for l in ax.lines if l.get_label() in ("unfold", "im2col_einsum")}
    assert len(set(styles.values())) == 2 and all(a != b for a, b in zip(*styles.values()))
    plt.close(fig)


@pytest.mark.parametrize("low, high, log_x", [(20.0, 90.0, False), (3.0, 700.0, True), (0.02, 5000.0, True)])
def test_log_axis_ticks_read_as_plain_numbers(low, high, log_x):
    rng = np.random.default_rng()
    ys = np.concatenate([[low, high], rng.uniform(low, high, 14)])
    xs = [2.0**i for i in range(16)] if log_x else [float(i) for i in range(16)]
    spec = LinePlot("t", "t", "x", "y", [Line("a", [Point(x, float(y)) for x, y in zip(xs, ys)])], log_x=log_x, log_y=True)
    fig, ax = drawn(spec)
    log_axes = (ax.xaxis, ax.yaxis) if log_x else (ax.yaxis,)
    texts = [t.get_text() for axis in log_axes for minor in (False, True) for t in axis.get_ticklabels(minor=minor)]
    shown = [t for t in texts if t]
    assert not [t for t in texts if "\\times" in t or "^" in t or "$" in t]
    assert len([t for t in ax.yaxis.get_ticklabels(minor=True) + ax.yaxis.get_ticklabels() if t.get_text()]) >= 2
    assert all(float(t.replace(",", "")) > 0 for t in shown)
    plt.close(fig)


def test_noisy_latencies_are_marked_and_counted(frame):
    rows = list(read_rows([FIXTURES / "ci-cpu"]))
    case = ("memory_blocks", 7, 16, 64)
    for row in rows:
        if (row["impl"], row["k"], row["res"], row["channels"]) == case:
            row["latency_iqr_ms"] = 0.25 * row["latency_ms"]
    table = one_space(group_table(group(rows_frame(rows), "ci-cpu"), TABLES["latency"]))
    timed = [r for r in group(rows_frame(rows), "ci-cpu").to_dict("records") if r["status"] == "ok"]
    # the fixture's unfold k=7 at 32 px has an older row of the same commit 3x slower: both are outliers
    noisy = [r for r in timed if r["latency_iqr_ms"] > 0.1 * r["latency_ms"] or r["outlier"]]
    cells = [c for line in table.splitlines() if line.startswith("|") for c in line.split("|")]
    assert len(noisy) == 2 and sum(c.strip().endswith(NOISY_MARK) for c in cells) == len(noisy)
    line = next(l for l in table.splitlines() if l.startswith("| 7 | 64 | 8 | 16 |"))
    headers = next(l for l in table.splitlines() if l.startswith("| k |")).split("|")
    assert line.split("|")[headers.index(" memory_blocks (ms) ")].strip().endswith(NOISY_MARK)
    assert f"{len(noisy)} of {len(timed)} latencies are noisy" in table and "(1 wide IQR, 1 outlier)" in table
    quiet = one_space(group_table(group(frame, "ci-cpu"), TABLES["latency"]))
    marked = [line for line in quiet.splitlines() if line.startswith("|") and NOISY_MARK in line]
    assert len(marked) == 1 and marked[0].startswith("| 7 | 64 | 8 | 32 |")
    assert "1 of " in quiet and "(1 outlier)" in quiet


def test_report_writes_index_tables_and_plots(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURES, results)
    (results / "ci-cpu" / "models.json").write_text(json.dumps([{"model": "resnet26-attn", "params": 10.3e6, "gflops": 4.7}]))
    out = tmp_path / "reports"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    readme = one_space((out / "README.md").read_text())
    for text in ("## Machines", "| ci-cpu | cpu |", "NVIDIA H100 80GB HBM3", "a715cfd8ad", "2026-11-24",
                 "## h100-sxm: NVIDIA H100 80GB HBM3, bfloat16, fwd+bwd", "**Peak memory** (MiB)",
                 "Fraction of peak FLOP/s (GPU: published", "**oom**", "## Models: ci-cpu", "resnet26-attn",
                 "marked (noisy): IQR above 10% of the median, more than 2x off", "Rows from run ci-cpu-2026-11-24 (commit a715cfd8ad"):
        assert text in readme, text
    images = re.findall(r"\]\(([^)]+\.png)\)", readme)
    assert any("roofline" in i for i in images) and any("latency_vs_res" in i for i in images)
    for image in images:
        data = (out / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)


def test_report_on_no_rows_is_a_usage_error(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--results: no result rows" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "missing")]) == 2


def run_claim_json(capsys, *args) -> dict:
    assert main(["claim", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_claim_json_matches_the_design_formulas(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(claim_module, "fvcore_counts", lambda: [])
    numbers = run_claim_json(capsys, "--no-run", "--results", str(FIXTURES), "--out", str(tmp_path))
    k2 = 19 * 19
    assert numbers["per_pixel_macs"] == {
        "conv_k3": 9 * D * D,
        "attention_k19": {"projections": 3 * D * D, "qk": k2 * D, "av": k2 * D, "rel_per_key": k2 * D, "rel_factorized": 19 * D},
    }
    totals = numbers["totals"]
    assert totals["content_only"]["macs"] == 141568 and totals["rel_per_key"]["macs"] == 141568 + 46208
    assert totals["rel_factorized"]["macs"] == 141568 + 2432
    assert totals["rel_per_key"]["ratio_to_conv"] == pytest.approx(187776 / 147456)
    crossing = numbers["crossing_k"]
    for d in (32, 128, 512):  # 3d^2 + 2k^2 d = 9d^2; 3k^2 d = 6d^2; 2k^2 d + k d = 6d^2
        assert crossing["content_only"][str(d)] == pytest.approx(math.sqrt(3 * d), abs=1e-3)
        assert crossing["rel_per_key"][str(d)] == pytest.approx(math.sqrt(2 * d), abs=1e-3)
        assert crossing["rel_factorized"][str(d)] == pytest.approx((math.sqrt(1 + 48 * d) - 1) / 4, abs=1e-3)
    assert numbers["params"] == {"attention_k19": 3 * D * D + 19 * D, "conv_k3": 9 * D * D}
    holds = [v for v in numbers["verdicts"]["accountings"] if "claim holds" in v]
    assert len(holds) == 2 and not any("every key" in v for v in holds)
    rows = {(r["machine"], r["impl"], r["k"], r["direction"], r["channels"], r["res"]): r for r in read_rows([FIXTURES])}
    triton = next(m for m in numbers["measured"] if (m["machine"], m["impl"], m["direction"]) == ("h100-sxm", "triton", "fwd"))
    attn, conv = rows[("h100-sxm", "triton", 19, "fwd", D, 56)], rows[("h100-sxm", "conv", 3, "fwd", D, 56)]
    assert triton["latency_ratio"] == pytest.approx(attn["latency_ms"] / conv["latency_ms"])
    assert triton["memory_ratio"] == pytest.approx(attn["peak_mem_bytes"] / conv["peak_mem_bytes"])
    assert {m["machine"] for m in numbers["measured"]} == {"ci-cpu", "h100-sxm"}
    claim_md = (tmp_path / "claim.md").read_text()
    assert "**In short:** the claim holds under content only" in claim_md and "1.273" in claim_md
    assert (tmp_path / "claim_crossing_k.png").stat().st_size > 10_000


def test_claim_runs_the_claim_preset_when_nothing_was_measured(tmp_path, capsys, monkeypatch):
    import bench.interleave

    calls = []

    def fake_run_interleaved(pairs, out_dir, name, settings, interleave, suite=None, **kw):
        calls.append((pairs, out_dir, name, suite))
        rows = list(read_rows([FIXTURES / "ci-cpu" / "claim.jsonl"]))
        for row in rows:
            append_row(Path(out_dir) / "this-machine" / "claim.jsonl", row)
        return rows

    monkeypatch.setattr(bench.interleave, "run_interleaved", fake_run_interleaved)
    monkeypatch.setattr(claim_module, "fvcore_counts", lambda: [])
    numbers = run_claim_json(capsys, "--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"))
    (pairs, out_dir, name, suite), = calls
    assert suite == name == "claim" and out_dir == str(tmp_path / "results")
    assert {c.k for c, _ in pairs} == {3, 7, 11, 15, 19} and {c.channels for pair in pairs for c in pair} == {D}
    assert {(base.impl, base.k) for _, base in pairs} == {("conv", 3)} and all(c.impl != "conv" for c, _ in pairs)
    assert all((c.direction, c.dtype, c.res) == (base.direction, base.dtype, base.res) for c, base in pairs)
    assert sorted(m["impl"] for m in numbers["measured"]) == ["im2col_einsum", "memory_blocks", "unfold"]
    assert len(list(read_rows([tmp_path / "results"]))) == 4  # the rows it measured are in the store


@pytest.fixture(scope="module")
def fvcore_entries() -> dict[str, dict]:
    pytest.importorskip("fvcore")
    return {e["impl"]: e for e in claim_module.fvcore_counts(res=19)}


def test_fvcore_counts_beside_the_analytic_ones(fvcore_entries):
    entries = fvcore_entries
    assert entries["conv"]["fvcore_per_pixel"] == 9 * D * D == entries["conv"]["analytic_per_pixel"]
    unfold = entries["unfold"]
    assert unfold["status"] == "ok" and unfold["accounting"] == "rel_per_key" and unfold["analytic_per_pixel"] == 187776
    # fvcore sees the q.k, a.v and per-key relative products (handles for mul) but not the softmax
    assert unfold["fvcore_per_pixel"] >= 0.9 * unfold["analytic_per_pixel"] and "aten::softmax" in unfold["uncounted"]


EXCEPTION_TEXT = re.compile(r"\b[A-Z]\w*(Error|Exception|Warning)\b|Error:|Traceback")


def test_claim_cells_hold_counts_or_reasons_in_words(frame, fvcore_entries, monkeypatch):
    monkeypatch.setattr(claim_module, "fvcore_counts", lambda: list(fvcore_entries.values()))
    text = claim_module.claim_markdown(claim_module.claim_data(frame), [])
    cells = [c.strip() for line in text.splitlines() if line.startswith("|") for c in line.strip("|").split("|")]
    assert not [c for c in cells if EXCEPTION_TEXT.search(c)] and not EXCEPTION_TEXT.search(text)
    for name, entry in fvcore_entries.items():
        assert entry["status"] == "ok" or entry["reason"].startswith(("not countable: ", "not available on cpu: ")), name
    import sasa_impls
    import torch
    if sasa_impls.get_impl("natten").available("cpu", torch.float32)[0]:
        natten = fvcore_entries["natten"]  # built as the content-only layer it is, so what remains is fvcore's limit
        assert natten["accounting"] == "content_only" and natten["analytic_per_pixel"] == 141568
        assert (natten["status"] == "ok" and natten["fvcore_per_pixel"] > 0) or "cannot follow NATTEN" in natten["reason"]
        row = next(l for l in one_space(text).splitlines() if l.startswith("| natten"))
        assert "141,568" in row and "relative-position" not in row
    if fvcore_entries["flex"]["status"] != "not available":
        assert "cannot follow FlexAttention" in fvcore_entries["flex"]["reason"]


def raised_in(path: str) -> Exception:
    """An exception whose traceback ends in a function defined in the file ``path``."""
    namespace: dict = {}
    exec(compile("def fail():\n    raise ValueError('impl: the raw message')\n", path, "exec"), namespace)
    try:
        namespace["fail"]()
    except ValueError as error:
        return error
    raise AssertionError("fail() did not raise")


@pytest.mark.parametrize("path, words", [
    ("/env/site-packages/natten/utils/checks.py", "cannot follow NATTEN"),
    ("/env/site-packages/torch/_dynamo/eval_frame.py", "cannot follow compiled code (torch.compile)"),
    ("/env/site-packages/torch/nn/attention/flex_attention.py", "cannot follow FlexAttention"),
    ("/somewhere/else.py", "could not trace this module"),
])
def test_trace_failures_are_told_in_words(path, words):
    reason = trace_failure(raised_in(path))
    assert reason.startswith("not countable: ") and words in reason
    assert "raw message" not in reason and not EXCEPTION_TEXT.search(reason)


# --- compare -----------------------------------------------------------------------------------------

def write_side(folder: Path, commit: str, slow: dict[tuple, float] = {}, status: dict[tuple, str] = {}, iqr: dict[tuple, float] = {}) -> None:
    """The ci-cpu fixture rows as another run: latency x slow[case], status replaced, IQR as a fraction."""
    for row in read_rows([FIXTURES / "ci-cpu"]):
        key = (row["impl"], row["k"], row["res"], row["channels"])
        row = {**row, "commit": commit, "timestamp": f"2026-11-25T0{len(commit) % 10}:00:00Z"}
        if row["status"] == "ok":
            row["latency_ms"] *= slow.get(key, 1.0)
            if key in iqr:
                row["latency_iqr_ms"] = iqr[key] * row["latency_ms"]
        if key in status:
            row.update(status=status[key], latency_ms=None, latency_iqr_ms=None)
        append_row(folder / "ci-cpu" / f"{commit}.jsonl", row)


PLANTED = ("unfold", 19, 32, 64)
NOISY = ("memory_blocks", 7, 16, 64)


@pytest.fixture()
def sides(tmp_path):
    """Commits 'aaaa' and 'bbbb' in one folder: B has a 30 % slow-down on one case; a noisy case moved 8 %
    inside its 10 % IQR; every other case moved 2 % (inside the 5 % threshold)."""
    results = tmp_path / "results"
    write_side(results, "aaaa", iqr={NOISY: 0.10})
    others = {(r["impl"], r["k"], r["res"], r["channels"]): 1.02 for r in read_rows([FIXTURES / "ci-cpu"])}
    write_side(results, "bbbb", slow={**others, PLANTED: 1.3, NOISY: 1.08}, iqr={NOISY: 0.10})
    return results


def compare(capsys, *args) -> tuple[int, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, one_space(captured.out + captured.err)


def test_compare_flags_the_planted_slowdown_and_not_noise(sides, capsys):
    code, out = compare(capsys, "commit=aaaa", "commit=bbbb", "--results", str(sides))
    assert code == 0
    flagged = [l for l in out.splitlines() if "**slower**" in l or "**faster**" in l]
    assert len(flagged) == 1 and flagged[0].startswith("| ci-cpu | unfold | 19 | 64 |") and "| 1.300 |" in flagged[0]
    noisy = next(l for l in out.splitlines() if l.startswith("| ci-cpu | memory_blocks | 7 | 64 | 8 | 16 |"))
    assert "| 1.080 |" in noisy and "**" not in noisy
    assert "1 changed beyond noise" in out


@pytest.mark.parametrize("limit, code", [("0.2", 1), ("20%", 1), ("1.25x", 1), ("0.5", 0), ("1.5x", 0)])
def test_compare_fail_above(sides, capsys, limit, code):
    result, out = compare(capsys, "commit=aaaa", "commit=bbbb", "--results", str(sides), "--fail-above", limit)
    assert result == code and ("FAIL: unfold k=19" in out) == (code == 1)


def test_compare_fails_when_a_case_stops_running(tmp_path, capsys):
    write_side(tmp_path / "a", "aaaa")
    write_side(tmp_path / "b", "bbbb", status={("triton", 7, 32, 64): "oom", ("unfold", 3, 32, 64): "oom"})
    code, out = compare(capsys, str(tmp_path / "a"), str(tmp_path / "b"), "--fail-above", "0.5")
    assert code == 1 and "**now oom**" in out and "FAIL: unfold k=3" in out


@pytest.mark.parametrize("args, message", [
    (["nowhere", "commit=abc"], "A: 'nowhere' is neither"),
    (["commit=aaaa", "colour=red"], "B: bad selector 'colour=red'"),
    (["commit=zzzz", "commit=aaaa"], "A: no result rows"),
    (["commit=aaaa", "commit=bbbb", "--fail-above", "-0.1"], "--fail-above: a slow-down must be >= 0"),
    (["commit=aaaa", "commit=bbbb", "--fail-above", "fast"], "--fail-above: expected a fraction"),
])
def test_compare_bad_input(sides, capsys, args, message):
    code, out = compare(capsys, *args, "--results", str(sides))
    assert code == 2 and message in out


def test_compare_across_machines(tmp_path, capsys):
    for machine, slow in (("old-cpu", 1.0), ("new-cpu", 1.3)):
        for row in read_rows([FIXTURES / "ci-cpu"]):
            if row["status"] == "ok":
                row["latency_ms"] *= slow
            append_row(tmp_path / machine / "rows.jsonl", {**row, "machine": machine})
    code, out = compare(capsys, str(tmp_path / "old-cpu"), str(tmp_path / "new-cpu"))
    timed = sum(r["status"] == "ok" for r in read_rows([FIXTURES / "ci-cpu"])) - 1  # one superseded older run
    assert code == 0 and out.count("**slower**") == timed and "| machine |" not in out
    code, out = compare(capsys, str(tmp_path), str(tmp_path / "new-cpu"))
    assert code == 2 and "A: holds several machines (new-cpu, old-cpu)" in out


def crafted_runs(rng: np.random.Generator) -> tuple[list[dict], dict]:
    """The fixture's ci-cpu k-sweep rows as run A (every case, fresh random latencies), plus a newer run B of
    another commit holding one of A's cases and one case A lacks; one case of A measured three times (its
    newest pass 60x off the others) and one row measured contended."""
    template = [r for r in read_rows([FIXTURES / "ci-cpu" / "k-sweep.jsonl"]) if r["run_id"] == "ci-cpu-2026-11-24"]
    run_a = [dict(r, latency_ms=float(rng.uniform(1, 10)), latency_iqr_ms=0.0, gflops=None, timestamp="2026-11-24T12:00:00Z")
             for r in template]
    shared, outlier, contended = run_a[0], run_a[1], run_a[2]
    contended["contended"] = True
    passes = [dict(outlier, repeat=i, latency_ms=1.7 * (1 + 0.01 * i), timestamp=f"2026-11-24T11:0{i}:00Z") for i in (1, 2)]
    outlier.update(latency_ms=104.0, repeat=0, timestamp="2026-11-24T12:30:00Z")
    newer = dict(shared, run_id="run-b", commit="b" * 40, latency_ms=shared["latency_ms"] * 3, timestamp="2026-11-25T09:00:00Z")
    lacking = dict(newer, k=9, latency_ms=float(rng.uniform(1, 10)))
    return run_a + passes + [newer, lacking], {"shared": shared, "outlier": outlier, "contended": contended, "lacking": lacking}


def cell(table: str, row: dict) -> str:
    headers = next(l for l in table.splitlines() if l.startswith("| k |")).split("|")
    line = next(l for l in table.splitlines() if l.startswith(f"| {row['k']} | {row['channels']} | {row['heads']} | {row['res']} |"))
    return line.split("|")[headers.index(f" {row['impl']} (ms) ")].strip()


def test_a_table_compares_one_run_and_marks_what_comes_from_another():
    rows, picked = crafted_runs(np.random.default_rng())
    frame = rows_frame(rows)
    table = one_space(group_table(group(frame, "ci-cpu"), TABLES["latency"]))
    # the newer run B holds only two cases: run A (most cases) is the table's; B fills only the case A lacks
    assert cell(table, picked["shared"]).startswith(f"{picked['shared']['latency_ms']:.3g}")
    assert cell(table, picked["shared"]).count("†") == 0 and cell(table, picked["lacking"]).endswith("†")
    assert sum("†" in line for line in table.splitlines() if line.startswith("| ")) == 1
    assert "Rows from run ci-cpu-2026-11-24 (commit a715cfd8ad, 2026-11-24)" in table
    assert "† cells from other runs: run-b (commit bbbbbbbbbb, 2026-11-25)" in table
    figures = sweep_figures(group(frame, "ci-cpu"), "t", "p")
    title = next(f.title for f in figures if f.name.startswith("p_latency_vs_k"))
    assert "run ci-cpu-2026-11-24, commit a715cfd8ad, bbbbbbbbbb; † 1 points from other runs" in title
    marks = [p for f in figures if f.name.startswith("p_latency_vs_k") for line in f.lines for p in line.points if p.mark]
    assert [(p.x, p.mark) for p in marks] == [(9.0, "†")]


def test_outliers_among_a_cases_rows_and_contended_rows_are_noisy():
    rows, picked = crafted_runs(np.random.default_rng())
    frame = rows_frame(rows)
    table = one_space(group_table(group(frame, "ci-cpu"), TABLES["latency"]))
    assert cell(table, picked["outlier"]) == f"104 ± 0 {NOISY_MARK}"  # 1.7 ms in its two other passes
    assert cell(table, picked["contended"]).endswith(NOISY_MARK)
    timed = sum(r["status"] == "ok" for r in group(frame, "ci-cpu").to_dict("records"))
    assert f"2 of {timed} latencies are noisy (1 outlier, 1 contended)" in table
    # the shared case: 3x apart between runs of different commits is a code change, not noise
    assert not cell(table, picked["shared"]).endswith(NOISY_MARK)
    every = rows_frame(rows, latest=False)
    flagged = every[every.outlier]
    assert flagged["latency_ms"].tolist() == [104.0]


def test_fraction_of_peak_uses_the_peak_on_the_row():
    rng = np.random.default_rng()
    rows = [r for r in read_rows([FIXTURES / "ci-cpu" / "k-sweep.jsonl"]) if r["run_id"] == "ci-cpu-2026-11-24"]
    peak = float(rng.uniform(50, 500))
    for row in rows[:3]:
        row.update(peak_gflops=peak, peak_kind="native sgemm")
    fallback = float(rng.uniform(50, 500)) * 1e9
    frame = rows_frame(rows, measured={("ci-cpu", "float32", rows[5]["threads"]): fallback})
    by_key = {(r["impl"], r["k"], r["res"], r["channels"]): r for r in frame.to_dict("records")}
    first, other = by_key[tuple(rows[0][c] for c in ("impl", "k", "res", "channels"))], by_key[tuple(rows[5][c] for c in ("impl", "k", "res", "channels"))]
    assert first["peak_flops"] == peak * 1e9 and first["peak_source"] == "row (native sgemm)"
    assert other["peak_flops"] == fallback and other["peak_source"] == "peak.json"
    table = group_table(group(frame, "ci-cpu"), TABLES["peak_fraction"])
    assert f"{100 * first['gflops'] / peak:.3g}" in table
    assert "3 cells use the peak recorded on their row; " in one_space(table) and "use the machine's peak.json" in table


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC Processor
flags\t\t: fpu sse sse2 sse4_2 avx avx2 fma bmi2
"""
ZEN5 = ZEN3.replace("cpu family\t: 25", "cpu family\t: 26").replace("model\t\t: 1", "model\t\t: 2").replace("bmi2", "bmi2 avx512f avx512bw")
SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_tile
"""


def test_machine_ids_tell_microarchitectures_apart(monkeypatch):
    from bench import env
    from bench.schema import normalize

    assert env.cpu_machine_id(ZEN3, 2) == "amd-epyc-f25m1-avx2-2c"
    assert env.cpu_machine_id(ZEN5, 2) == "amd-epyc-f26m2-avx512-2c"
    assert env.cpu_machine_id(SAPPHIRE, 8) == "intel-xeon-platinum-8481c-f6m143-avx512-8c"
    assert env.cpu_identity(ZEN5) == {"cpu_vendor": "amd", "cpu_family": 26, "cpu_model_id": 2, "cpu_isa": "avx512"}
    assert env.cpu_identity("") == {"cpu_vendor": None, "cpu_family": None, "cpu_model_id": None, "cpu_isa": None}
    monkeypatch.setenv("SASA_BENCH_MACHINE", "Lab Box 1")
    assert env.machine_id() == "lab-box-1"
    # rows written before the identity was recorded keep their folder and get None
    old = next(read_rows([FIXTURES / "ci-cpu" / "k-sweep.jsonl"]))
    row = normalize({k: v for k, v in old.items() if not k.startswith("cpu_") and k != "native_isa"})
    assert row["machine"] == "ci-cpu" and row["cpu_isa"] is row["native_isa"] is row["cpu_family"] is None
