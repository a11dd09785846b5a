"""sasa-bench peak: the physical FMA peak (native microbenchmark), its entry in peak.json, and rows recording it."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench.commands.peak import fma_peak_gflops, measure_peaks
from bench.env import machine_id
from bench.report.peaks import recorded_peak, row_peak
from sasa_impls.impls._native_build import cpu_extension, native_available

pytestmark = pytest.mark.skipif(not native_available("cpu", torch.float32)[0],
                                reason="needs the native CPU extension's toolchain")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fma_peak_is_a_positive_finite_rate(dtype):
    rate = fma_peak_gflops(dtype, 1, seconds=0.02, repeats=2)
    assert math.isfinite(rate) and rate > 0


@pytest.mark.parametrize("threads", [0, -1, (os.cpu_count() or 1) + 1, 1.5, True])
def test_threads_are_validated(threads):
    with pytest.raises(ValueError, match="threads"):
        fma_peak_gflops("float32", threads)


def test_dtype_without_a_loop_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        fma_peak_gflops("bfloat16", 1)


def test_extension_checks_its_threads_too():
    with pytest.raises(RuntimeError, match="threads"):
        cpu_extension().fma_peak(False, 0, 10)


def test_peak_file_names_the_kind_and_rows_record_it(tmp_path):
    path = measure_peaks(str(tmp_path), ["float32"], 1, [64], min_time_s=0.05)
    entry = json.loads(path.read_text())["float32"]["1"]
    assert entry["kind"] == "fma" and entry["gflops"] == entry["fma_gflops"] > 0
    assert entry["matmul_gflops"] > 0 and entry["conv_gflops"] > 0 and entry["by_size"].keys() == {"64"}
    fields = recorded_peak(tmp_path, machine_id(), "cpu", "float32", 1)
    assert fields == {"peak_gflops": entry["gflops"], "peak_kind": "fma"}
    assert recorded_peak(tmp_path, machine_id(), "cpu", "float32", 2) == {"peak_gflops": None, "peak_kind": None}
    # a row keeps the peak it recorded, whatever the peak file says now
    row = {"device": "cpu", "machine": machine_id(), "dtype": "float32", "threads": 1, "peak_gflops": 123.0}
    measured = {(machine_id(), "float32", 1): 4e9}
    assert row_peak(row, measured) == 123e9
    assert row_peak({**row, "peak_gflops": None}, measured) == 4e9  # older rows: the file's entry
