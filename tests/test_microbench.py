"""Micro-benchmarks (pytest-benchmark): the op of every implementation, forward and forward + backward, at a
few fixed shapes, one benchmark group per shape and direction, built and stepped by the suite's pipeline
(bench.pipeline, level "op"). Each one also checks what it timed (output and every gradient) against the
float64 reference with the gate's tolerance, so the normal test run (--benchmark-disable, one call each)
still tests something. On a GPU the timed function synchronises, so the time is the kernels' time.

    pytest tests/test_microbench.py --benchmark-autosave --benchmark-storage file://results/pytest-benchmark
    pytest tests/test_microbench.py --benchmark-storage file://results/pytest-benchmark --benchmark-compare
"""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from bench import pipeline
from bench.cases import attention_spec
from bench.schema import Case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (kernel_size, heads, res, head_dim), batch 1: a small and a large window, then a larger image
SHAPES = [(3, 4, 16, 8), (7, 4, 16, 8), (7, 4, 32, 16)]
IMPLS = [name for name in sasa_impls.list_impls() if name != "reference"]  # the reference is the oracle


def shape_id(shape: tuple[int, int, int, int]) -> str:
    kernel_size, heads, res, head_dim = shape
    return f"k{kernel_size}-h{heads}-{res}x{res}-D{head_dim}"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_op(benchmark, impl, shape, direction):
    kernel_size, heads, res, head_dim = shape
    chosen = sasa_impls.get_impl(impl)
    case = Case(impl, kernel_size, heads * head_dim, heads, res, 1, "float32", DEVICE.type, direction, level="op",
                relative=chosen.supports_rel)
    ok, why = chosen.supports(attention_spec(case))
    if not ok:
        pytest.skip(f"{impl} {why}")
    if impl == "triton" and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter is tested in test_triton.py; timing it means nothing")
    benchmark.group = f"{direction} {shape_id(shape)}"
    subject = pipeline.build(case, seed=torch.randint(1 << 30, ()).item())
    run = pipeline.step(subject)

    def timed():
        result = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    if benchmark.enabled:
        timed()  # warm-up: compiling kernels (flex, triton, native) stays out of the timings
    benchmark(timed)
    errors = pipeline.errors_against_reference(subject)
    assert max(errors.values()) <= pipeline.TOLERANCE["float32"], errors
