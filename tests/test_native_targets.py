"""scripts/native_targets.py: every target of issue 20 gets one line (measured, target, met or missed), with the
machine's build and with every code path limited to AVX2 (--isa avx2: the kernel's AVX2 build, oneDNN's conv and
MKL too), and bad arguments are one-line errors. Timing windows are tiny: what is checked is the wiring, not speed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sasa_impls.impls import _native_build

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "native_targets.py"
TARGETS = 15
LINE = re.compile(r"^(.{60}) +(-?[\d.]+)(x|%)? +(.+?) +(met|MISSED)$")

if _native_build.toolchain_problem("cpu"):
    pytest.skip(f"no toolchain for the CPU build: {_native_build.toolchain_problem('cpu')}", allow_module_level=True)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # line-buffered C stdio (stdbuf): oneDNN's verbose lines, printed by the C library, then never split the script's
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    return subprocess.run([*line_buffered, sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_every_target_gets_a_line(isa):
    if isa == "avx2" and "avx2" not in _native_build.cpu_flags().split():
        pytest.skip("the CPU has no AVX2")
    result = run("--isa", isa, "--seconds", "0.05", "--block", "0.005", env={"ONEDNN_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.splitlines()
    header = next(line for line in out if "threads; interleaved medians" in line)
    assert f", {isa} build" in header and ("oneDNN and MKL limited to AVX2" in header) == (isa == "avx2")
    targets = [LINE.match(line) for line in out if line.endswith(("met", "MISSED")) and not line.startswith("onednn")]
    assert len(targets) == TARGETS and all(targets), "\n".join(out)
    assert all(float(m.group(2)) > 0 for m in targets)
    convs = [line for line in out if line.startswith("onednn_verbose") and ",convolution," in line and ",exec," in line]
    assert convs, "the conv never ran through oneDNN"
    if isa == "avx2":  # oneDNN's conv kernels are its AVX2 ones, whatever wider ISA this CPU has
        assert all(":avx2" in line and "avx512" not in line for line in convs), convs[:3]


@pytest.mark.parametrize("args, message", [
    (["--isa", "sse"], "argument --isa: invalid choice: 'sse'"),
    (["--seconds", "0"], "--seconds: expected a positive number of seconds, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
