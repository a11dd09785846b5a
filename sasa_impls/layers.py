"""Layers built on the op: SASA2d (the paper's attention layer) and AttentionStem (paper 3.2)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import check_kernel_size, local_attention, rel_shapes


def _check_heads(in_channels: int, out_channels: int, heads: int) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if out_channels % heads:
        raise ValueError(f"heads: {heads} does not divide out_channels={out_channels}")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, H, W, C / heads)."""
    batch, channels, height, width = x.shape
    return x.reshape(batch, heads, channels // heads, height, width).permute(0, 1, 3, 4, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W, D) -> (B, heads * D, H, W)."""
    batch, heads, height, width, head_dim = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(batch, heads * head_dim, height, width)


class RelativeEmbeddings(nn.Module):
    """Per-head row and column embeddings: (heads, k, D // 2) and (heads, k, D - D // 2); k d_out weights."""

    def __init__(self, heads: int, kernel_size: int, head_dim: int):
        super().__init__()
        row_shape, col_shape = rel_shapes(heads, kernel_size, head_dim)
        self.rel_row = nn.Parameter(torch.randn(row_shape) * head_dim**-0.5)
        self.rel_col = nn.Parameter(torch.randn(col_shape) * head_dim**-0.5)


class SASA2d(nn.Module):
    """Stand-alone self-attention over k x k windows, a drop-in for a k x k convolution.

    1x1 Q, K, V projections (no bias), per-head relative embeddings, the op, and a 2 x 2 average pool
    when ``stride == 2``. Parameters: 3 d_in d_out + k d_out, whatever k. ``relative=False`` drops the
    embeddings (content-only attention: the paper's ablation, and what peers such as NATTEN compute).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, heads: int = 8, stride: int = 1, impl: str = "auto", scale: float = 1.0, relative: bool = True):
        super().__init__()
        check_kernel_size(kernel_size)
        _check_heads(in_channels, out_channels, heads)
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
        self.kernel_size, self.heads, self.stride, self.impl, self.scale = kernel_size, heads, stride, impl, scale
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.rel = RelativeEmbeddings(heads, kernel_size, out_channels // heads) if relative else None
        self.pool = nn.AvgPool2d(2) if stride == 2 else nn.Identity()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The op on (B, C, H, W) projections; returns (B, C, H, W)."""
        rel_row, rel_col = (self.rel.rel_row, self.rel.rel_col) if self.rel is not None else (None, None)
        out = local_attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads),
            rel_row, rel_col, self.kernel_size, impl=self.impl, scale=self.scale,
        )
        return _merge_heads(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.attend(self.query(x), self.key(x), self.value(x)))


class AttentionStem(SASA2d):
    """The paper's attention stem (3.2): SASA whose values are spatially aware, then 4 x 4 max pool and BN.

    v_ab = (sum_m p(a, b, m) W_V^m) x_ab with p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m):
    ``value_mixtures`` value matrices, mixed by the pixel's position (a, b) inside the ``pool`` x ``pool``
    window of the max pooling that follows (so the mixture is aligned with that pooling).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, kernel_size: int = 7, heads: int = 8, value_mixtures: int = 4, pool: int = 4, impl: str = "auto", scale: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, heads, 1, impl, scale)
        if value_mixtures < 1:
            raise ValueError(f"value_mixtures: expected a positive int, got {value_mixtures!r}")
        if pool < 1:
            raise ValueError(f"pool: expected a positive int, got {pool!r}")
        self.pool_size = pool
        self.value = nn.Conv2d(in_channels, out_channels * value_mixtures, 1, bias=False)  # the W_V^m, stacked
        self.emb_row = nn.Parameter(torch.randn(pool, out_channels) * out_channels**-0.5)
        self.emb_col = nn.Parameter(torch.randn(pool, out_channels) * out_channels**-0.5)
        self.nu = nn.Parameter(torch.randn(value_mixtures, out_channels) * out_channels**-0.5)
        self.pool = nn.Sequential(nn.MaxPool2d(pool), nn.BatchNorm2d(out_channels))

    def mixture_weights(self, height: int, width: int) -> torch.Tensor:
        """p(a, b, m) for every pixel: (m, H, W), positions taken modulo the pooling window."""
        rows = torch.arange(height, device=self.nu.device) % self.pool_size
        cols = torch.arange(width, device=self.nu.device) % self.pool_size
        emb = self.emb_row[rows][:, None, :] + self.emb_col[cols][None, :, :]  # (H, W, C)
        return torch.softmax(emb @ self.nu.t(), dim=-1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        mixtures = self.nu.shape[0]
        values = self.value(x).reshape(batch, mixtures, -1, height, width)
        p = self.mixture_weights(height, width).to(values.dtype)
        v = (values * p[None, :, None]).sum(1)
        return self.pool(self.attend(self.query(x), self.key(x), v))
