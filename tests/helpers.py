"""Input factories shared by the tests: fresh random tensors every call, never zeros."""
from __future__ import annotations

import torch

from sasa_impls.functional import rel_shapes


def random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel=True, dtype=torch.float64, device="cpu", requires_grad=False):
    """q, k, v of shape (B, heads, H, W, D) and rel_row/rel_col (or None), drawn from N(0, 1)."""
    def draw(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)

    q, k, v = (draw(batch, heads, height, width, head_dim) for _ in range(3))
    if not with_rel:
        return q, k, v, None, None
    row_shape, col_shape = rel_shapes(heads, kernel_size, head_dim)
    return q, k, v, draw(*row_shape), draw(*col_shape)


def grads(output: torch.Tensor, inputs, cotangent: torch.Tensor) -> list:
    """Gradients of <output, cotangent> w.r.t. every tensor of ``inputs`` that is not None."""
    leaves = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(output, leaves, cotangent))
