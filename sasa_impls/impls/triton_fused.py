"""Triton: one fused kernel per direction, online softmax, factorized relative logits (O(HW C) memory).

The kernels live in ``_triton_kernels`` (imported on first use, so this module imports without triton).
On CUDA it runs compiled; on the CPU only under the Triton interpreter (``TRITON_INTERPRET=1``, set
before triton is first imported: triton.jit reads it when it decorates), which is how the tests run it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from ..registry import Impl, Option, int_pair, register
from ._fused import fused_attention


def default_tile(head_dim: int, kernel_size: int) -> tuple[int, int]:
    """Query/key tile (rows, columns): TH * TW pixels share one halo of (TH + k - 1) x (TW + k - 1) keys.

    Chosen from sm_90 compiles (ptxas register and spill counts, 8 warps; no GPU was available to time
    them): in bf16, 8 x 8 spills nothing up to D = 32 at k <= 19 and D = 64 at k = 7; wider heads and
    larger windows keep more per-program state, and 4 x 8 keeps it in registers up to D = 128.
    """
    return (4, 8) if head_dim > 64 or (head_dim > 32 and kernel_size > 7) else (8, 8)


# Dtypes per device type. The interpreter (triton 3.9) computes bf16 tl.dot wrongly, so bf16 is CUDA only;
# fp64 (fp64 accumulation) is for tight tests against the oracle and is not offered on CUDA.
DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.float32, torch.float64),
}


def triton_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """True on CUDA when triton imports; on the CPU only under TRITON_INTERPRET=1 (read at call time)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "on the CPU the Triton kernels run only in the interpreter: set TRITON_INTERPRET=1"
    if device.type not in DTYPES:
        return False, f"no Triton backend for device type {device.type!r}"
    if dtype not in DTYPES[device.type]:
        return False, f"dtype {dtype} not supported on {device.type}; supported: {[str(d) for d in DTYPES[device.type]]}"
    return True, ""


def check_tile(tile: tuple[int, int] | str) -> tuple[int, int]:
    """A tile is two powers of two with at least 16 pixels (tl.dot needs blocks of >= 16 rows); "4x8" is (4, 8)."""
    try:
        rows, cols = int_pair(tile)
    except ValueError:
        rows = cols = 0
    if rows < 1 or cols < 1 or rows & (rows - 1) or cols & (cols - 1) or rows * cols < 16:
        raise ValueError(f"tile: expected two powers of two with a product >= 16, got {tile!r}")
    return rows, cols


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within: every output and gradient buffer is filled with NaN before the kernels write it."""
    from . import _triton_kernels as kernels

    kernels.POISON_OUTPUTS = True
    try:
        yield
    finally:
        kernels.POISON_OUTPUTS = False


class _TritonKernels:
    """The Triton kernel pair for :class:`~._fused.FusedSASA` (config: the tile); they read contiguous tensors."""

    @staticmethod
    def prepare(*tensors):
        return tuple(t.contiguous() if t is not None else None for t in tensors)

    @staticmethod
    def forward(*args):
        from . import _triton_kernels as kernels

        return kernels.forward(*args)

    @staticmethod
    def backward(*args):
        from . import _triton_kernels as kernels

        return kernels.backward(*args)


def triton_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0,
                     tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Fused SASA (forward and backward in Triton); ``tile`` is the (rows, columns) query/key tile
    (default: :func:`default_tile`)."""
    tile = check_tile(tile) if tile is not None else default_tile(q.shape[-1], kernel_size)
    return fused_attention(_TritonKernels, q, k, v, rel_row, rel_col, kernel_size, float(scale), tile)


register(
    Impl(
        name="triton",
        forward=triton_attention,
        description="fused Triton kernel: tiled tl.dot, online softmax, factorized relative logits, fwd + bwd",
        check=triton_available,
        auto_priority={"cuda": 0},
        options={"tile": Option(check_tile, "query/key tile ROWSxCOLS, powers of two, e.g. 4x8; default default_tile")},
        poisoned=poisoned_outputs,
    )
)
