"""scripts/native_targets.py: every target of issue 20 gets one line (measured, target, met or missed), with the
machine's build and with every code path limited to AVX2 (--isa avx2: the kernel's AVX2 build, oneDNN's conv and
MKL too); --repeat closes with each target's median, range and count met over the passes; bad arguments are one-line
errors; the fwd+bwd steps pass a dense random cotangent. Timing windows are tiny: what is checked is the wiring,
not speed."""
from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_script
from sasa_impls.impls import _native_build

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "native_targets.py"
TARGETS = 15
LINE = re.compile(r"^(.{60}) +(-?[\d.]+)(x|%)? +(.+?) +(met|MISSED)$")
SUMMARY = re.compile(r"^(.{60}) +(-?[\d.]+)(x|%) +\[(-?[\d.]+), (-?[\d.]+)\] +(.+?) +(\d+)/(\d+) +(met|MISSED)$")

if _native_build.toolchain_problem("cpu"):
    pytest.skip(f"no toolchain for the CPU build: {_native_build.toolchain_problem('cpu')}", allow_module_level=True)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # line-buffered C stdio (stdbuf): oneDNN's verbose lines, printed by the C library, then never split the script's
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    return subprocess.run([*line_buffered, sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("isa, passes", [("native", 2), ("avx2", 1)])
def test_every_target_gets_a_line(isa, passes):
    if isa == "avx2" and "avx2" not in _native_build.cpu_flags().split():
        pytest.skip("the CPU has no AVX2")
    result = run("--isa", isa, "--seconds", "0.05", "--block", "0.005", "--repeat", str(passes),
                 env={"ONEDNN_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.splitlines()
    header = next(line for line in out if "threads; interleaved medians" in line)
    assert f", {isa} build" in header and ("oneDNN and MKL limited to AVX2" in header) == (isa == "avx2")
    ends = [line for line in out if line.endswith(("met", "MISSED")) and not line.startswith("onednn")]
    targets = [LINE.match(line) for line in ends[:passes * TARGETS]]
    assert len(ends) == passes * TARGETS + (TARGETS if passes > 1 else 0), "\n".join(out)
    assert all(targets) and all(float(m.group(2)) > 0 for m in targets), "\n".join(out)
    if passes > 1:  # the summary: each target's median and range over its passes' printed values
        summary = [SUMMARY.match(line) for line in ends[passes * TARGETS:]]
        assert all(summary), "\n".join(ends[passes * TARGETS:])
        for t, line in enumerate(summary):
            values = [float(targets[p * TARGETS + t].group(2)) for p in range(passes)]
            median, low, high = (float(line.group(g)) for g in (2, 4, 5))
            assert abs(median - statistics.median(values)) <= 1.5e-3 and (low, high) == (min(values), max(values))
            assert int(line.group(7)) == sum(targets[p * TARGETS + t].group(5) == "met" for p in range(passes))
            assert targets[t].group(1).startswith(line.group(1).rstrip())  # the pass's name, less its detail
    convs = [line for line in out if line.startswith("onednn_verbose") and ",convolution," in line and ",exec," in line]
    assert convs, "the conv never ran through oneDNN"
    if isa == "avx2":  # oneDNN's conv kernels are its AVX2 ones, whatever wider ISA this CPU has
        assert all(":avx2" in line and "avx512" not in line for line in convs), convs[:3]


def test_the_summary_judges_each_target_by_its_median():
    """Three passes of two targets with fresh values, one at most and one at least its limit: the summary's median
    is the middle value (not the mean), the range the extremes, the count the passes that met it, and the verdict the
    median's."""
    script = load_script(SCRIPT)
    rng = random.Random()
    by_target = []  # each target's three measurements
    for limit, at_most, offsets in ((1.5, True, (-0.2, 0.01, 0.6)), (40.0, False, (8.0, -0.5, -3.0))):
        values = [limit + offset * rng.uniform(0.5, 1.0) for offset in offsets]
        rng.shuffle(values)
        by_target.append([script.Target("t", value, limit, at_most, "%" if not at_most else "x", "detail")
                          for value in values])
    lines = script.render_summary([list(one_pass) for one_pass in zip(*by_target)])
    assert len(lines) == 3 and lines[0].startswith("over 3 passes")
    for line, runs in zip(lines[1:], by_target):
        match = SUMMARY.match(line)
        values = sorted(run.measured for run in runs)
        assert match, line
        assert abs(values[1] - sum(values) / 3) > 0.02  # the draw tells the median from the mean
        assert float(match.group(2)) == pytest.approx(values[1], abs=6e-4)
        assert (float(match.group(4)), float(match.group(5))) == pytest.approx((values[0], values[2]), abs=6e-4)
        assert int(match.group(7)) == sum(run.met for run in runs) == 1  # one pass met, the median missed
        assert match.group(9) == "MISSED" and "detail" not in line


def test_the_backward_takes_a_dense_random_cotangent():
    """The fwd+bwd steps pass back what a network's next layer would (design.md's fwd+bwd: a random cotangent): a
    dense gradient of fresh values, the same one on every call; ``.sum().backward()`` passes an expanded scalar of
    ones, every stride 0, which kernels read through other code (fails here)."""
    script = load_script(SCRIPT)
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    seen = []

    def forward() -> torch.Tensor:
        y = x.permute(0, 2, 3, 1) * 2  # (2, 3, 5, 8)
        if y.requires_grad:
            y.register_hook(seen.append)
        return y

    call = script.backward_call(forward)
    call()
    call()
    first, second = seen
    assert first.shape == (2, 3, 5, 8) and 0 not in first.stride()
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()  # dense: a value per element
    assert first.std() > 0.5 and first.unique().numel() == first.numel()
    assert torch.equal(first, second)
    assert torch.equal(x.grad, 2 * 2 * first.permute(0, 3, 1, 2))  # both calls' gradients, accumulated


@pytest.mark.parametrize("args, message", [
    (["--isa", "sse"], "argument --isa: invalid choice: 'sse'"),
    (["--seconds", "0"], "--seconds: expected a positive number of seconds, got 0"),
    (["--repeat", "0"], "--repeat: expected a positive number of passes, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
