"""The head split of SASA2d: the (B, C, H, W) channel-major tensors of the layer as the op's (B, heads, H, W, D)
views, and back. Both are views (no copy) of channel-major tensors: the op reads any strides."""
from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, H, W, C / heads)."""
    batch, channels, height, width = x.shape
    return x.reshape(batch, heads, channels // heads, height, width).permute(0, 1, 3, 4, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W, D) -> (B, heads * D, H, W)."""
    batch, heads, height, width, head_dim = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(batch, heads * head_dim, height, width)
