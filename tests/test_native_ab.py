"""scripts/native_ab.py: an A/B of two versions of the native kernel reports a ratio and whether the bits agree for every
case it is given, tells bits apart, and fails cleanly on bad input."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sasa_impls
from sasa_impls.impls import _native_build

from helpers import load_script, preset_projection_backend

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "native_ab.py"

if _native_build.toolchain_problem("cpu"):
    pytest.skip(f"no toolchain for the CPU build: {_native_build.toolchain_problem('cpu')}", allow_module_level=True)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_every_case_gets_a_ratio_and_its_bits():
    """This checkout against itself (one build, no compile beyond the op's own): every kind of case is timed, and
    the two sides, the same code, give the same bits."""
    cases = ["fwd:3:8:1", "bwd:5:9:2", "mm:6:1", "mmbwd:5:2", "chain:3:8:1", "chainbwd:5:7:2"]
    result = run("worktree", *(f"--case={c}" for c in cases), "--seconds", "0.2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "new/base" in line]
    assert [line.split()[0] for line in lines] == ["fwd", "bwd", "mm", "mmbwd", "chain", "chainbwd"]
    for line in lines:
        ratio, low, high = map(float, re.search(r"new/base ([\d.]+) \[([\d.]+), ([\d.]+)\]", line).groups())
        assert 0 < low <= ratio <= high and line.endswith("same bits")


def test_the_chain_computes_what_the_layer_computes(monkeypatch):
    """chainbwd's kernels, called as the script calls them, give SASA2d's output and gradients (native impl, its
    projection on the native product as the chain's, the same weights, input and output gradient): the chain times the
    layer's work, not some other. (The layer's backend is set, not timed: where timing picked the conv or MKL, their
    other summation order put dX 5e-5 off in one CI run.)"""
    module = load_script(SCRIPT)
    case = module.Case.parse("chainbwd:5:7:2")
    weight, x, rel_row, rel_col, grad = module.chain_inputs(case)
    out, drow, dcol, dx, dw = module.chain_call(_native_build.cpu_extension(), case, (weight, x, rel_row, rel_col, grad))()
    channels = module.HEADS * module.HEAD_DIM
    layer = sasa_impls.SASA2d(channels, channels, 5, module.HEADS, impl="native")
    with torch.no_grad():
        for conv, w in zip((layer.query, layer.key, layer.value), weight.split(channels)):
            conv.weight.copy_(w[:, :, None, None])
        layer.rel.rel_row.copy_(rel_row)
        layer.rel.rel_col.copy_(rel_col)
    image = x.reshape(2, channels, 7, 7).clone().requires_grad_()
    preset_projection_backend(monkeypatch, image, 3 * channels, "native")
    y = layer(image)
    y.backward(grad.permute(0, 1, 4, 2, 3).reshape(y.shape))
    torch.testing.assert_close(out.permute(0, 1, 4, 2, 3).reshape(y.shape), y.detach())
    torch.testing.assert_close(drow, layer.rel.rel_row.grad)
    torch.testing.assert_close(dcol, layer.rel.rel_col.grad)
    torch.testing.assert_close(dx.reshape(image.shape), image.grad)
    stacked = torch.cat([conv.weight.grad.flatten(1) for conv in (layer.query, layer.key, layer.value)])
    torch.testing.assert_close(dw, stacked)


def test_different_results_are_reported_as_such():
    module = load_script(SCRIPT)
    a = (torch.randn(4, 5), torch.randn(3))
    assert module.compare_bits(a, tuple(t.clone() for t in a)) == "same bits"
    nudged = (a[0], a[1] + 1e-3 * a[1].abs().max())
    assert module.compare_bits(a, nudged).startswith("bits differ (max rel 1.0e-03")


@pytest.mark.parametrize("args, message", [
    (["worktree", "--case", "fwd:4:8:1"], "--case: expected one of fwd, bwd, mm, mmbwd, chain, chainbwd, an odd k"),
    (["worktree", "--case", "mm:8"], "--case: expected direction:k:resolution:batch"),
    (["worktree", "--threads", "0"], "--threads: expected a positive int"),
    (["no-such-revision-here"], "native_ab: version 'no-such-revision-here'"),
])
def test_bad_input_is_one_line(args, message):
    result = run(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
