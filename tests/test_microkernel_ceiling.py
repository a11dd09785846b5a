"""scripts/microkernel_ceiling.py: the loops it times are what their names say (FLOPs counted per call, no loop
elided or merged by the compiler) and its command line fails cleanly on bad input."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sasa_impls.impls import _native_build

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "microkernel_ceiling.py"

if _native_build.toolchain_problem("cpu"):
    pytest.skip(f"no toolchain for the CPU build: {_native_build.toolchain_problem('cpu')}", allow_module_level=True)


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("microkernel_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contraction_rows_count_the_kernels_flops(ceiling):
    avx512 = "avx512f" in _native_build.cpu_flags().split()
    lanes, g = (16, 4) if avx512 else (8, 3)  # rows per group, forward and backward: 4 with AVX-512, else 3
    rows = {name: flops for name, flops, _ in ceiling.extension().ceiling(1000)}
    for name, (count, m, n) in {f"contract q.k ({g} rows, 19 x 16)": (g, 19, 16), f"contract a.v ({g} rows, 16 x 19)": (g, 16, 19),
                                f"contract dP ({g} rows, 19 x 16)": (g, 19, 16),
                                f"contract dK ({g} rows, 16 x 19)": (g, 16, 19)}.items():
        assert rows[name] == 2 * count * m * n * lanes
    chains = 16 if avx512 else 8  # the loaded loops' accumulators: all in registers with their loads
    for loads in (f"{chains // 4} aligned", f"{chains // 2} aligned", f"{chains // 4} split", f"{chains // 2} split"):
        assert rows[f"{chains} FMAs + {loads} loads"] == 2 * chains * lanes * 1000


def test_no_loop_is_elided_or_merged(ceiling):
    """An elided call or chains the compiler merges read as a rate far above the FMA peak: the FMA-only row must
    agree with the extension's own peak loop within 3x, and no row may beat it by more than 1.6x."""
    rows = ceiling.ceiling_rows(2_000_000)
    fma_only = rows[0][1]
    with torch.inference_mode():
        peak = _native_build.cpu_extension().fma_peak(False, 1, 2_000_000)
    assert peak / 3 < fma_only < peak * 3, (fma_only, peak)
    assert all(0 < rate < 1.6 * fma_only for _, rate in rows), rows


def test_bad_iterations_exit_with_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--iterations", "0"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["--iterations: expected a positive number, got 0"]
