"""Micro-benchmarks (pytest-benchmark): the op of every implementation, forward and forward + backward, at a
few fixed shapes, one benchmark group per shape and direction. Each one also checks the output it timed
(and the gradients) against the float64 reference, so the normal test run (--benchmark-disable, one call
each) still tests something. On a GPU the timed function synchronises, so the time is the kernels' time.

    pytest tests/test_microbench.py --benchmark-autosave --benchmark-storage file://results/pytest-benchmark
    pytest tests/test_microbench.py --benchmark-storage file://results/pytest-benchmark --benchmark-compare
"""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from sasa_impls.impls.reference import reference_attention

from helpers import grads, random_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 against float64 on the same values; looser on GPUs, whose kernels may round through TF32
TOLERANCE = {"cpu": 1e-4, "cuda": 1e-2}[DEVICE.type]
# (kernel_size, heads, res, head_dim), batch 1: a small and a large window, then a larger image
SHAPES = [(3, 4, 16, 8), (7, 4, 16, 8), (7, 4, 32, 16)]
IMPLS = [name for name in sasa_impls.list_impls() if name != "reference"]  # the reference is the oracle


def shape_id(shape: tuple[int, int, int, int]) -> str:
    kernel_size, heads, res, head_dim = shape
    return f"k{kernel_size}-h{heads}-{res}x{res}-D{head_dim}"


def synchronised(fn):
    """``fn`` followed by a CUDA synchronisation on GPUs, so the benchmark's timer sees the kernels."""
    def call():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result
    return call


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_op(benchmark, impl, shape, direction):
    chosen = sasa_impls.get_impl(impl)
    ok, reason = chosen.available(DEVICE, torch.float32)
    if not ok:
        pytest.skip(reason)
    if impl == "triton" and DEVICE.type == "cpu":
        pytest.skip("the Triton interpreter is tested in test_triton.py; timing it means nothing")
    kernel_size, heads, res, head_dim = shape
    benchmark.group = f"{direction} {shape_id(shape)}"
    backward = direction == "fwd+bwd"
    exact = random_inputs(1, heads, res, res, head_dim, kernel_size, with_rel=chosen.supports_rel, requires_grad=backward)
    inputs = [None if t is None else t.detach().float().to(DEVICE).requires_grad_(backward) for t in exact]
    cotangent = torch.randn(1, heads, res, res, head_dim, dtype=torch.float64)

    def forward():
        with torch.set_grad_enabled(backward):
            return sasa_impls.local_attention(*inputs, kernel_size, impl=impl)

    def forward_backward():
        out = forward()
        return [out, *grads(out, inputs, cotangent.to(DEVICE, torch.float32))]

    timed = synchronised(forward_backward if backward else forward)
    try:
        if benchmark.enabled:
            timed()  # warm-up: compiling kernels (flex, triton) stays out of the timings
        results = benchmark(timed)
    except NotImplementedError as exc:  # e.g. no backward on this device
        pytest.skip(str(exc))
    expected = reference_attention(*exact, kernel_size, borders=chosen.borders)
    if backward:
        expected = [expected, *grads(expected, exact, cotangent)]
    else:
        results, expected = [results], [expected]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.double().cpu(), want, rtol=TOLERANCE, atol=TOLERANCE)
