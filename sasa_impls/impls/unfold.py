"""Unfold: zero-pad K and V, view them as k x k neighbourhoods with Tensor.unfold, multiply and sum.

The approach of most public SASA code. The multiply-sum materialises k^2 copies of K and V, and the
relative logits are added to every key (k^2 D MACs per pixel): memory grows as O(HW k^2 C).
Borders follow the contract: padded positions are masked out of the softmax, not used as zero keys.
"""
from __future__ import annotations

import torch

from ..common import compute_dtype, neighbourhood_valid, pad_borders
from ..registry import Impl, register
from ..regions import stage


def unfold_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0) -> torch.Tensor:
    _, heads, height, width, head_dim = q.shape
    ct = compute_dtype(q.dtype)
    radius = kernel_size // 2

    def neighbourhoods(x: torch.Tensor) -> torch.Tensor:  # (B, h, H, W, D, k, k), a view
        with stage("layout"):  # inside whichever stage uses it: the innermost region gets the time
            return pad_borders(x.to(ct), radius).unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)

    with stage("layout"):
        queries = q.to(ct)[..., None, None]  # (B, h, H, W, D, 1, 1)
    with stage("logits"):
        logits = (queries * neighbourhoods(k)).sum(4)  # (B, h, H, W, k, k)
    if rel_row is not None:
        with stage("relative"):
            rows = head_dim // 2
            rel_key = torch.cat(  # (h, D, k, k): the relative embedding of every key position
                (
                    rel_row.to(ct).transpose(1, 2)[:, :, :, None].expand(heads, rows, kernel_size, kernel_size),
                    rel_col.to(ct).transpose(1, 2)[:, :, None, :].expand(heads, head_dim - rows, kernel_size, kernel_size),
                ),
                dim=1,
            )
            logits = logits + (queries * rel_key[None, :, None, None]).sum(4)
    with stage("softmax"):
        valid = neighbourhood_valid(height, width, kernel_size, q.device)
        logits = (logits * scale).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits.flatten(-2), dim=-1).unflatten(-1, (kernel_size, kernel_size))
    with stage("aggregate"):
        out = (weights[..., None, :, :] * neighbourhoods(v)).sum((-2, -1))
    with stage("layout"):
        return out.to(q.dtype)


register(Impl(name="unfold", forward=unfold_attention, rel_accounting="rel_per_key",
              auto_priority={"cpu": 30, "cuda": 30},
              description="pad + Tensor.unfold neighbourhoods, multiply-sum, relative logits per key"))
