"""The native CUDA kernels (sasa_impls/csrc/cuda/sasa_cuda.cu, the same source) run on the CPU under an
emulation of the CUDA execution model (tests/cuda_emulation: blocks, threads as fibers, shared memory,
__syncthreads, warp shuffles), and their output and five gradients match the float64 reference on the hard
shapes: borders, k > image, several shared-memory halo chunks, odd head dims, several heads, with and without
relative logits, a launch that opts in to more than 48 KiB of shared memory, fp32 / fp16 / bf16. Every output
buffer starts as NaN, every buffer sits between NaN guard zones (an unwritten element or an out-of-bounds read
shows as NaN; an out-of-bounds write as a changed guard), and the backward run again in the reverse thread
order must give the same bits. What the emulation cannot catch is listed in
tests/cuda_emulation/include/sasa_cuda_emulation.h. SASA_CUDA_EMULATED_SOURCE=path runs the test on another
copy of the kernel source (one with a planted bug, say)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch

from bench.pipeline import TOLERANCE, normalized_error
from sasa_impls.functional import rel_shapes
from sasa_impls.impls.reference import reference_attention

from cuda_emulation import build

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD = 64  # NaN elements before and after every buffer
GRADIENTS = ("q", "k", "v", "rel_row", "rel_col")
# (B, heads, H, W, D, k, relative, dtype, what makes it hard)
CASES = [
    (2, 3, 9, 11, 8, 5, True, torch.float32, "borders on every side, 3 heads, batch 2, groups of 1 thread"),
    (1, 2, 5, 6, 13, 9, True, torch.float32, "k > image, odd head dim (13 -> 16: groups of 2, rel split 6 + 7)"),
    (1, 1, 10, 12, 100, 7, True, torch.float32, "head dim 100 -> 128 (16-thread groups), halo in 2 chunks"),
    (1, 1, 22, 22, 8, 19, True, torch.float32, "k = 19, halo in 2 (forward) and 3 (backward) chunks"),
    (1, 1, 16, 16, 40, 11, True, torch.float32, "head dim 40 -> 64 (8-thread groups), halo in 3 chunks"),
    (1, 2, 13, 7, 24, 5, False, torch.float32, "content-only, head dim 24 -> 32"),
    (1, 1, 14, 12, 8, 25, True, torch.float32, "k = 25: the query backward opts in to 53 KiB of shared memory"),
    (1, 2, 9, 11, 16, 7, True, torch.float16, "fp16"),
    (1, 2, 9, 11, 32, 7, True, torch.bfloat16, "bf16"),
]


@pytest.fixture(scope="module")
def kernels() -> ctypes.CDLL:
    if build.compiler() is None:
        pytest.skip("no g++ to build the CUDA emulation")
    source = os.environ.get("SASA_CUDA_EMULATED_SOURCE")  # a copy of sasa_cuda.cu with a planted bug, say
    return build.load(build.build(Path(source)) if source else build.build())


class Guarded:
    """A tensor of ``shape`` inside a NaN-filled buffer with GUARD elements on each side."""

    def __init__(self, shape, dtype, values: torch.Tensor | None = None):
        numel = int(torch.Size(shape).numel())
        self.base = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
        self.tensor = self.base[GUARD:GUARD + numel].view(shape)
        if values is not None:
            self.tensor.copy_(values)

    @property
    def ptr(self) -> int:
        return self.tensor.data_ptr()

    def guards_intact(self) -> bool:
        return bool(self.base[:GUARD].isnan().all() and self.base[-GUARD:].isnan().all())


def _dims(q: torch.Tensor, kernel_size: int):
    return (ctypes.c_int * 6)(*q.shape, kernel_size)


def emulated_forward(lib, q, k, v, rel_row, rel_col, kernel_size, scale):
    """out, lse from the emulated forward kernel; the guarded buffers it touched."""
    inputs = [Guarded(t.shape, t.dtype, t) if t is not None else None for t in (q, k, v, rel_row, rel_col)]
    out = Guarded(q.shape, q.dtype)
    lse = Guarded(q.shape[:4], torch.float32)
    error = lib.emu_forward(DTYPE_CODES[q.dtype], _dims(q, kernel_size), scale,
                            *[t.ptr if t is not None else None for t in inputs], out.ptr, lse.ptr)
    assert error is None, error.decode()
    return out.tensor.clone(), lse.tensor.clone(), [t for t in inputs + [out, lse] if t is not None]


def emulated_backward(lib, grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale):
    """dq, dk, dv, drel_row, drel_col (None without relative logits) from the emulated backward kernels."""
    inputs = [Guarded(t.shape, t.dtype, t) if t is not None else None for t in (grad_out, q, k, v, rel_row, rel_col, out, lse)]
    grads = [Guarded(t.shape, t.dtype) if t is not None else None for t in (q, k, v, rel_row, rel_col)]
    dims = _dims(q, kernel_size)
    workspace = Guarded((lib.emu_workspace_floats(dims),), torch.float32)
    error = lib.emu_backward(DTYPE_CODES[q.dtype], dims, scale, *[t.ptr if t is not None else None for t in inputs],
                             *[g.ptr if g is not None else None for g in grads], workspace.ptr)
    assert error is None, error.decode()
    touched = [t for t in inputs + grads + [workspace] if t is not None]
    assert all(t.guards_intact() for t in touched), "a kernel wrote outside its buffers"
    return [g.tensor.clone() if g is not None else None for g in grads]


def random_problem(batch, heads, height, width, head_dim, kernel_size, relative, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, height, width, head_dim)
    draw = lambda s: torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v, grad_out = (draw(shape) for _ in range(4))
    rel = [draw(s) for s in rel_shapes(heads, kernel_size, head_dim)] if relative else [None, None]
    return q, k, v, rel[0], rel[1], grad_out


def reference(q, k, v, rel_row, rel_col, grad_out, kernel_size, scale):
    """Output and the five gradients of the float64 reference (None for absent relative embeddings)."""
    leaves = [t.double().requires_grad_(True) if t is not None else None for t in (q, k, v, rel_row, rel_col)]
    out = reference_attention(*leaves, kernel_size, scale)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.double()))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_emulated_kernels_match_the_reference(kernels, case, capfd):
    *shape, kernel_size, relative, dtype, _ = case
    q, k, v, rel_row, rel_col, grad_out = random_problem(*shape, kernel_size, relative, dtype, seed=len(shape) + kernel_size)
    scale = shape[4] ** -0.5
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    out, lse, touched = emulated_forward(kernels, q, k, v, rel_row, rel_col, kernel_size, scale)
    assert all(t.guards_intact() for t in touched), "the forward wrote outside its buffers"
    expected_out, expected_grads = reference(q, k, v, rel_row, rel_col, grad_out, kernel_size, scale)
    errors = {"output": normalized_error(out, expected_out)}
    kernels.emu_set_schedule(0)
    grads = emulated_backward(kernels, grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale)
    for name, got, want in zip(GRADIENTS, grads, expected_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            errors[f"grad_{name}"] = normalized_error(got, want)
    assert max(errors.values()) <= tolerance, errors
    kernels.emu_set_schedule(1)  # the other thread order: a result depending on it is a race
    try:
        again = emulated_backward(kernels, grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale)
    finally:
        kernels.emu_set_schedule(0)
    for name, first, second in zip(GRADIENTS, grads, again):
        if first is not None:
            assert torch.equal(first.view(torch.int16 if first.element_size() == 2 else torch.int32),
                               second.view(torch.int16 if second.element_size() == 2 else torch.int32)), name
    assert "runtime error" not in capfd.readouterr().err  # UBSan: a misaligned float4 access

