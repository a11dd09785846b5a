"""The autograd of the fused kernels (native, triton): a forward that also returns the log-sum-exp of
every query's logits, and a backward that recomputes the probabilities from it (flash-style), so nothing
of size k^2 per pixel is saved. Each implementation supplies its kernel pair as :class:`FusedKernels` and
calls :func:`fused_attention`.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch.autograd.function import once_differentiable

from ..common import records_autograd
from ..regions import kernel

Tensor = torch.Tensor


class FusedKernels(Protocol):
    """A fused kernel pair: ``prepare`` makes tensors the kernels can read (e.g. contiguous); ``forward``
    returns (out, lse); ``backward`` the gradients of q, k, v and, with relative logits, rel_row, rel_col.
    ``config`` is the implementation's own setting (native: the CPU band; triton: the tile)."""

    def prepare(self, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]: ...

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rel_row: Optional[Tensor], rel_col: Optional[Tensor],
                kernel_size: int, scale: float, config: Any) -> tuple[Tensor, Tensor]: ...

    def backward(self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_row: Optional[Tensor],
                 rel_col: Optional[Tensor], out: Tensor, lse: Tensor, kernel_size: int, scale: float,
                 config: Any) -> tuple[Optional[Tensor], ...]: ...


class FusedSASA(torch.autograd.Function):
    """``FusedSASA.apply(kernels, q, k, v, rel_row, rel_col, kernel_size, scale, config)``."""

    @staticmethod
    def forward(ctx, kernels: FusedKernels, q, k, v, rel_row, rel_col, kernel_size: int, scale: float, config):
        inputs = kernels.prepare(q, k, v, rel_row, rel_col)
        out, lse = kernels.forward(*inputs, kernel_size, scale, config)
        ctx.save_for_backward(*inputs, out, lse)
        ctx.kernels, ctx.config = kernels, (kernel_size, scale, config)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, rel_row, rel_col, out, lse = ctx.saved_tensors
        (grad_out,) = ctx.kernels.prepare(grad_out)
        grads = ctx.kernels.backward(grad_out, q, k, v, rel_row, rel_col, out, lse, *ctx.config)
        return (None, *(*grads, None, None)[:5], None, None, None)  # content-only kernels return 3 gradients


def fused_attention(kernels: FusedKernels, q: Tensor, k: Tensor, v: Tensor, rel_row: Optional[Tensor],
                    rel_col: Optional[Tensor], kernel_size: int, scale: float, config: Any) -> Tensor:
    """The op through ``kernels``: FusedSASA where autograd records (grad mode on and an input that requires
    grad), else the forward kernel alone. Function.apply saves the tensors for a backward that will not run:
    it cost 39 us of a 1.15 ms native k = 19 op at 28x28 (2 threads) and a third of a small op's 30 us."""
    if records_autograd(q, k, v, rel_row, rel_col):
        return FusedSASA.apply(kernels, q, k, v, rel_row, rel_col, kernel_size, scale, config)
    inputs = kernels.prepare(q, k, v, rel_row, rel_col)
    with kernel(FusedSASA.__name__):  # the range autograd gives FusedSASA, so profiles read the same either way
        return kernels.forward(*inputs, kernel_size, scale, config)[0]
