"""scripts/native_ab.py: an A/B of two versions of the native kernel reports a ratio and whether the bits agree for every
case it is given, tells bits apart, and fails cleanly on bad input."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sasa_impls.impls import _native_build

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "native_ab.py"

if _native_build.toolchain_problem("cpu"):
    pytest.skip(f"no toolchain for the CPU build: {_native_build.toolchain_problem('cpu')}", allow_module_level=True)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_every_case_gets_a_ratio_and_its_bits():
    """This checkout against itself (one build, no compile beyond the op's own): every kind of case is timed, and
    the two sides, the same code, give the same bits."""
    cases = ["fwd:3:8:1", "bwd:5:9:2", "mm:6:1", "mmbwd:5:2"]
    result = run("worktree", *(f"--case={c}" for c in cases), "--seconds", "0.2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "new/base" in line]
    assert [line.split()[0] for line in lines] == ["fwd", "bwd", "mm", "mmbwd"]
    for line in lines:
        ratio, low, high = map(float, re.search(r"new/base ([\d.]+) \[([\d.]+), ([\d.]+)\]", line).groups())
        assert 0 < low <= ratio <= high and line.endswith("same bits")


def test_different_results_are_reported_as_such():
    spec = importlib.util.spec_from_file_location("native_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    a = (torch.randn(4, 5), torch.randn(3))
    assert module.compare_bits(a, tuple(t.clone() for t in a)) == "same bits"
    nudged = (a[0], a[1] + 1e-3 * a[1].abs().max())
    assert module.compare_bits(a, nudged).startswith("bits differ (max rel 1.0e-03")


@pytest.mark.parametrize("args, message", [
    (["worktree", "--case", "fwd:4:8:1"], "--case: expected fwd, bwd, mm or mmbwd, an odd k"),
    (["worktree", "--case", "mm:8"], "--case: expected direction:k:resolution:batch"),
    (["worktree", "--threads", "0"], "--threads: expected a positive int"),
    (["no-such-revision-here"], "native_ab: version 'no-such-revision-here'"),
])
def test_bad_input_is_one_line(args, message):
    result = run(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
