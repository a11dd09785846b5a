"""im2col + einsum: gather each pixel's k x k neighbourhood into an explicit column matrix, then
torch.einsum for the logits and for the aggregation. Relative logits are computed factorized
(once per row and per column offset) and broadcast over the window. Memory O(HW k^2 C).
"""
from __future__ import annotations

import torch

from ..common import compute_dtype, factorized_rel_logits, neighbourhood_valid, pad_borders
from ..registry import Impl, register
from ..regions import stage


def im2col_indices(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H W, k k) flat indices into the zero-padded (H + 2r) x (W + 2r) image."""
    padded_width = width + kernel_size - 1
    rows = torch.arange(height, device=device)[:, None] + torch.arange(kernel_size, device=device)  # (H, k)
    cols = torch.arange(width, device=device)[:, None] + torch.arange(kernel_size, device=device)  # (W, k)
    flat = rows[:, None, :, None] * padded_width + cols[None, :, None, :]  # (H, W, k, k)
    return flat.reshape(height * width, kernel_size * kernel_size)


def im2col_einsum_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0) -> torch.Tensor:
    batch, heads, height, width, head_dim = q.shape
    ct = compute_dtype(q.dtype)
    with stage("layout"):
        index = im2col_indices(height, width, kernel_size, q.device)

    def columns(x: torch.Tensor) -> torch.Tensor:  # (B, h, HW, k k, D), a gathered copy
        with stage("layout"):  # inside whichever stage uses it: the innermost region gets the time
            return pad_borders(x.to(ct), kernel_size // 2).flatten(2, 3)[:, :, index]

    with stage("layout"):
        queries = q.to(ct).reshape(batch, heads, height * width, head_dim)
    with stage("logits"):
        logits = torch.einsum("bhnd,bhntd->bhnt", queries, columns(k))
    if rel_row is not None:
        with stage("relative"):
            row_terms, col_terms = factorized_rel_logits(queries, rel_row.to(ct), rel_col.to(ct))
            logits = logits + (row_terms[..., :, None] + col_terms[..., None, :]).flatten(-2)
    with stage("softmax"):
        valid = neighbourhood_valid(height, width, kernel_size, q.device).reshape(height * width, -1)
        weights = torch.softmax((logits * scale).masked_fill(~valid, float("-inf")), dim=-1)
    with stage("aggregate"):
        out = torch.einsum("bhnt,bhntd->bhnd", weights, columns(v))
    with stage("layout"):
        return out.reshape(q.shape).to(q.dtype)


register(Impl(name="im2col_einsum", forward=im2col_einsum_attention, auto_priority={"cpu": 20, "cuda": 20},
              description="explicit im2col gather, einsum logits and aggregation, factorized relative logits"))
