"""The one measuring pipeline and what it adds: the torch-free row schema, levels, content-only cases,
implementation options, declared capabilities recorded without a subprocess, captured warnings."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import bench.runner
from bench import flops, pipeline
from bench.cases import grid
from bench.cli import main
from bench.plugins import PLUGINS_ENV
from bench.runner import results_path, run_cases
from bench.schema import CASE_FIELDS, FIELDS, Case, case_key, normalize

import sasa_impls
from sasa_impls import registry

from helpers import FAST, planted

SHAPE = dict(k=3, channels=16, heads=2, res=8, batch=1, dtype="float32", device="cpu")


def test_the_schema_imports_without_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, bench.schema, bench.store; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_old_rows_are_normalized_to_the_schema():
    """Rows written before level, relative and impl_options existed match the cases they measured."""
    old = {"impl": "natten", "k": 5, "channels": 64, "heads": 8, "res": 32, "batch": 1, "dtype": "float32",
           "device": "cpu", "direction": "fwd", "status": "ok", "latency_ms": 2.0, "macs_analytic": 10**9,
           "rel_accounting": "content_only"}
    row = normalize(old)
    assert set(FIELDS) <= set(row) and row["gflops"] == pytest.approx(1000.0)
    assert case_key(row) == Case("natten", 5, 64, 8, 32, 1, "float32", "cpu", "fwd", "layer", False, "").key()
    assert normalize({**old, "impl": "unfold", "rel_accounting": "rel_per_key"})["relative"] is True
    for bad, why in (([1, 2], "expected a JSON object"), ({"impl": "unfold"}, "not a result row: no k")):
        with pytest.raises(ValueError, match=why):
            normalize(bad)


def test_op_level_measures_the_bare_op(tmp_path):
    cases = grid(["unfold", "conv"], [3], [16], [2], [8], [1], ["float32"], ["cpu"], ["fwd", "fwd+bwd"], levels=["op"])
    rows = run_cases(cases, tmp_path, progress=False, settings=FAST)
    assert [(r["impl"], r["level"], r["status"]) for r in rows] == [("unfold", "op", "ok"), ("conv", "op", "ok")] * 2
    per_pixel = flops.attention_macs_per_pixel(16, 16, 3)
    unfold, conv = rows[0], rows[1]
    assert unfold["macs_analytic"] == (per_pixel["qk"] + per_pixel["av"] + per_pixel["rel_per_key"]) * 64  # no projections
    assert unfold["params"] is None and unfold["params_analytic"] is None and unfold["gate_max_error"] < 1e-4
    assert unfold["flops_fvcore"] >= unfold["macs_analytic"]  # fvcore traced the op itself
    assert conv["macs_analytic"] == conv["flops_fvcore"] == 9 * 16 * 16 * 64


def test_declared_limits_are_unsupported_without_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.runner, "run_isolated", lambda *a, **k: pytest.fail("a subprocess was started"))
    cases = [Case("flex", direction="fwd+bwd", **SHAPE),  # no backward on CPU
             Case("natten", **{**SHAPE, "k": 9}, direction="fwd", relative=False),  # clamped windows: k <= 8
             Case("natten", **SHAPE, direction="fwd", relative=True)]  # no relative logits
    rows = run_cases(cases, tmp_path, progress=False, settings=FAST)
    assert [r["status"] for r in rows] == ["unsupported"] * 3
    assert "no backward on CPU" in rows[0]["error"] and "kernel_size <= H and W" in rows[1]["error"]
    assert "no relative-position term" in rows[2]["error"]


def test_options_and_content_only_become_cases_rows_and_series(tmp_path, capsys):
    argv = ["run", "--impl", "memory_blocks,unfold", "--k", "3", "--channels", "16", "--heads", "2", "--res", "8",
            "--direction", "fwd", "--relative", "auto,no", "--impl-option", "block=2,4", "--min-time", "0",
            "--max-time", "0.2", "--confidence", "0.5", "--threads", "1", "--out", str(tmp_path), "--name", "opts", "--quiet"]
    assert main(argv) == 0
    assert "memory_blocks (content-only) [block=4]" in capsys.readouterr().out
    rows = [json.loads(line) for line in results_path(tmp_path, "opts").read_text().splitlines()]
    got = {(r["impl"], r["relative"], r["impl_options"]) for r in rows}
    assert got == {("memory_blocks", rel, f"block={b}") for rel in (True, False) for b in (2, 4)} | {("unfold", True, ""), ("unfold", False, "")}
    assert all(r["status"] == "ok" for r in rows)
    assert {r["rel_accounting"] for r in rows if not r["relative"]} == {"content_only"}
    assert main([*argv, "--resume"]) == 0  # the options are part of the case: everything is found again
    assert "0 row(s) appended" in capsys.readouterr().out


@pytest.mark.parametrize("option, message", [
    ("block=0", "--impl-option: options: block='0' for 'memory_blocks': expected an int >= 1"),
    ("tile=4x8", "--impl-option: no selected implementation takes 'tile' (memory_blocks: block)"),
    ("block", "--impl-option: expected KEY=VALUE"),
])
def test_bad_impl_options_are_one_line(tmp_path, capsys, option, message):
    assert main(["run", "--impl", "memory_blocks,unfold", "--impl-option", option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sasa-bench run: error: {message}")
    assert not any(tmp_path.iterdir())


PLUGIN = textwrap.dedent('''
    import sys, warnings
    from sasa_impls.registry import Impl, register
    from sasa_impls.impls.reference import reference_attention

    def chatty(q, k, v, rel_row, rel_col, kernel_size, scale):
        warnings.warn("planted warning")
        print("planted print", file=sys.stderr)
        return reference_attention(q, k, v, rel_row, rel_col, kernel_size, scale)

    register(Impl(name="t_chatty_p", forward=chatty, description="test-only"))
''')


def test_what_measured_code_prints_is_kept_in_rows_and_summarised_once(tmp_path, monkeypatch, capsys):
    with planted(tmp_path, "chatty", PLUGIN) as plugin:
        monkeypatch.setenv(PLUGINS_ENV, plugin)
        rows = run_cases([Case("t_chatty_p", **SHAPE, direction="fwd")], tmp_path, settings=FAST, repeat=2)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {"UserWarning: planted warning", "planted print"} <= set(rows[0]["warnings"])
    err = capsys.readouterr().err
    assert err.count("planted print") == 1 and "2 x planted print" in err  # summarised once, with its count


def test_layer_subjects_are_checked_against_a_float64_twin(monkeypatch):
    """The same check serves layers (and models): a wrong implementation inside SASA2d is caught."""
    case = Case("unfold", 5, 16, 2, 9, 2, "float32", "cpu", "fwd+bwd")
    subject = pipeline.build(case)
    errors = pipeline.errors_against_reference(subject)
    assert {"output", "grad_input", "grad_query.weight", "grad_rel.rel_row"} <= set(errors)
    assert max(errors.values()) < pipeline.TOLERANCE["float32"]
    def values_only(q, k, v, rel_row, rel_col, *rest):  # every input used (gradients exist), the attention ignored
        return v + 0 * (q + k) + 0 * (rel_row.sum() + rel_col.sum())

    values_only = registry.Impl(name="t_values", forward=values_only, description="test-only")
    monkeypatch.setitem(registry._REGISTRY, "t_values", values_only)
    subject.module.impl = "t_values"  # ignores the attention; the float64 twin runs the reference
    assert pipeline.errors_against_reference(subject)["output"] > 0.1


def test_gate_poisons_outputs_where_an_implementation_can(monkeypatch):
    """gate(poison=True) runs inside Impl.poisoned: an implementation that leaves an element unwritten fails."""
    state = {"poisoned": False}

    class Poisoned:
        def __enter__(self):
            state["poisoned"] = True

        def __exit__(self, *exc):
            state["poisoned"] = False

    def forgetful(q, k, v, rel_row, rel_col, kernel_size, scale):
        out = sasa_impls.get_impl("reference")(q, k, v, rel_row, rel_col, kernel_size, scale)
        if state["poisoned"]:
            out = out.clone()
            out[0, 0, 0, 0, 0] = float("nan")  # what a kernel writing into a NaN-filled buffer would leave
        return out

    monkeypatch.setitem(registry._REGISTRY, "t_forgetful",
                        registry.Impl(name="t_forgetful", forward=forgetful, description="test-only", poisoned=Poisoned))
    assert pipeline.gate("t_forgetful", "cpu", "float64", "fwd")["status"] == "ok"
    poisoned = pipeline.gate("t_forgetful", "cpu", "float64", "fwd", poison=True)
    assert poisoned["status"] == "incorrect" and poisoned["gate_max_error"] == float("inf")
    assert state["poisoned"] is False


def test_case_fields_lead_the_row_fields():
    assert FIELDS[: len(CASE_FIELDS)] == CASE_FIELDS


def test_a_missing_fvcore_is_named_as_such_not_as_a_trace_failure():
    from bench import fvcore_count

    try:
        import fvcore_is_absent_here  # noqa: F401
    except ImportError as error:
        other = error
    missing = ImportError("No module named 'fvcore'", name="fvcore")
    assert fvcore_count.trace_failure(missing) == "not counted: fvcore is not installed"
    assert "not installed" not in fvcore_count.trace_failure(other)
