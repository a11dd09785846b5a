"""The fused Triton kernel (impl "triton") against the float64 reference, run by the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported: triton.jit reads it when it decorates a
function, triton's own library (tl.sum, tl.zeros, ...) included. It stays set for the rest of the session,
so modules collected after this one also see "triton" as available on the CPU (correct, only slower).
In fp64 the kernel accumulates in fp64, which allows oracle tolerances of 1e-10.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1",
                allow_module_level=True)

import sasa_impls  # noqa: E402
from sasa_impls.impls.reference import reference_attention  # noqa: E402
from sasa_impls.impls.triton_fused import triton_attention  # noqa: E402

from helpers import grads, random_inputs  # noqa: E402


# (batch, heads, H, W, D, k, with_rel, scale, tile): H, W not multiples of the tile (partial tiles in
# both directions), k = 1, k larger than the image (9 > 5x7, 31), odd D, D = 128, one-row and
# one-column images, batch > 1 (relative gradients summed over batch and tiles), several tile shapes.
CASES = [
    (1, 2, 5, 7, 8, 3, True, 1.0, (4, 4)),
    (2, 2, 5, 7, 9, 5, True, 0.7, (4, 4)),
    (1, 2, 5, 7, 16, 7, True, 1.0, (2, 8)),
    (1, 1, 5, 7, 8, 9, True, 1.3, (8, 2)),
    (1, 2, 6, 5, 12, 5, False, 0.5, (4, 4)),
    (1, 1, 5, 7, 8, 1, True, 1.0, (4, 4)),
    (1, 1, 9, 10, 8, 3, True, 1.0, (8, 8)),
    (1, 1, 1, 6, 8, 3, True, 1.0, (1, 16)),
    (1, 1, 6, 1, 10, 5, False, 1.0, (16, 1)),
    (1, 1, 3, 4, 8, 31, True, 1.0, (4, 4)),
    (1, 1, 3, 5, 128, 3, True, 0.2, (4, 8)),
]


def case_id(case) -> str:
    return "B{}h{}_{}x{}_D{}_k{}_rel{}_s{}_t{}x{}".format(*case[:8], *case[8])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_all_gradients_match_reference(case):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale, tile = case
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, requires_grad=True)
    expected = reference_attention(*inputs, kernel_size, scale)
    actual = triton_attention(*inputs, kernel_size, scale, tile=tile)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)

    cotangent = torch.randn_like(expected)
    got, want = grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)
    assert len(got) == (5 if with_rel else 3)
    for name, g, w in zip(("q", "k", "v", "rel_row", "rel_col"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


# Inputs rounded to the dtype, reference in float64 on those same values. fp32: the kernel's own fp32
# accumulation; fp16: the probabilities and dS are rounded to fp16 before their dots (flash-style).
TOLERANCE = {torch.float32: (1e-5, 5e-5), torch.float16: (4e-3, 2e-2)}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_low_precision_against_float64_reference(dtype):
    forward_tol, grad_tol = TOLERANCE[dtype]
    inputs = random_inputs(1, 2, 5, 6, 16, 5, True, dtype=dtype, requires_grad=True)
    actual = sasa_impls.local_attention(*inputs, 5, impl="triton")
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference_attention(*exact, 5)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, rtol=forward_tol, atol=forward_tol)

    cotangent = torch.randn_like(expected)
    for g, w in zip(grads(actual, inputs, cotangent.to(dtype)), grads(expected, exact, cotangent)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=grad_tol, atol=grad_tol)


def test_gradients_are_deterministic():
    """No atomics: two backward passes give bitwise equal gradients."""
    inputs = random_inputs(2, 1, 6, 5, 8, 3, True, dtype=torch.float32, requires_grad=True)
    cotangent = torch.randn(2, 1, 6, 5, 8)
    runs = [grads(triton_attention(*inputs, 3, tile=(4, 4)), inputs, cotangent) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_availability_and_registration(monkeypatch):
    impl = sasa_impls.get_impl("triton")
    assert impl.auto_priority == {"cuda": 0} and impl.supports_rel and impl.borders == "masked"
    assert impl.available("cpu", torch.float32) == (True, "")
    ok, reason = impl.available("cpu", torch.bfloat16)
    assert not ok and "bfloat16" in reason
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, reason = impl.available("cpu", torch.float32)
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match="impl: 'triton' is not available"):
        sasa_impls.local_attention(*random_inputs(1, 1, 3, 3, 8, 3, dtype=torch.float32), 3, impl="triton")


@pytest.mark.parametrize("tile", [(4, 3), (2, 4), (0, 16), (4,), 8])
def test_bad_tile_is_rejected(tile):
    with pytest.raises(ValueError, match="tile"):
        triton_attention(*random_inputs(1, 1, 3, 3, 8, 3), 3, tile=tile)


H100_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum of sm_90

COMPILE_SCRIPT = """
import torch
from sasa_impls.impls._triton_kernels import compile_for
from sasa_impls.impls.triton_fused import default_tile
for dtype, head_dim, k in ((torch.bfloat16, 64, 7), (torch.float32, 16, 19)):
    for name, kernel in compile_for(90, dtype, head_dim, k, True, default_tile(head_dim, k)).items():
        print(name, kernel.metadata.shared, len(kernel.asm["cubin"]))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels as Python: compile them for an H100 too (triton ships ptxas), in a
    process without TRITON_INTERPRET, and check their shared memory fits one block."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode and "Cannot find ptxas" in done.stderr:
        pytest.skip("this triton has no bundled ptxas")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [name for name, *_ in lines] == ["fwd", "dq", "dkdv"] * 2
    for name, shared, cubin_bytes in lines:
        assert 0 < int(shared) <= H100_SHARED_BYTES and int(cubin_bytes) > 0, (name, shared, cubin_bytes)

