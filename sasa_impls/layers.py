"""Layers built on the op: SASA2d (the paper's attention layer) and AttentionStem (paper 3.2, block attention)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .common import records_autograd
from .functional import check_kernel_size, local_attention_checked_once, rel_shapes
from .heads import merge_heads, split_heads
from .impls._native_build import active_cpu_variant
from .native_layer import native_layer, native_layer_band
from .projection import fused_projection
from .regions import stage
from .registry import get_impl


def _check_heads(in_channels: int, out_channels: int, heads: int) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if out_channels % heads:
        raise ValueError(f"heads: {heads} does not divide out_channels={out_channels}")


def _check_rank4(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected rank 4 (B, C, H, W), got shape {tuple(x.shape)}")


class RelativeEmbeddings(nn.Module):
    """Per-head row and column embeddings: (heads, k, D // 2) and (heads, k, D - D // 2); k d_out weights."""

    def __init__(self, heads: int, kernel_size: int, head_dim: int):
        super().__init__()
        row_shape, col_shape = rel_shapes(heads, kernel_size, head_dim)
        self.rel_row = nn.Parameter(torch.randn(row_shape) * head_dim**-0.5)
        self.rel_col = nn.Parameter(torch.randn(col_shape) * head_dim**-0.5)


class SASA2d(nn.Module):
    """Stand-alone self-attention over k x k windows, a drop-in for a k x k convolution.

    1x1 Q, K, V projections (no bias; three nn.Conv2d modules, so checkpoints keep ``query.weight`` etc.,
    computed together as one product by :func:`fused_projection`), per-head relative embeddings, the op,
    and a 2 x 2 average pool when ``stride == 2``. With the native op and the native product on the CPU, the
    projections and the op run as one autograd node (sasa_impls/native_layer.py: the same bits, less glue).
    Parameters: 3 d_in d_out + k d_out, whatever k. ``relative=False`` drops the embeddings (content-only
    attention: the paper's ablation, and what peers such as NATTEN compute).
    ``impl`` names the implementation (checked here, so a typo fails at construction), ``options`` its
    own options (``Impl.options``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, heads: int = 8, stride: int = 1, impl: str = "auto", scale: float = 1.0, relative: bool = True, options: Optional[Mapping[str, Any] | str] = None):
        super().__init__()
        check_kernel_size(kernel_size)
        _check_heads(in_channels, out_channels, heads)
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
        if impl != "auto":
            get_impl(impl).parse_options(options)
        elif options:
            raise ValueError("options: implementation options need an explicit impl, not 'auto'")
        self.kernel_size, self.heads, self.stride, self.impl, self.scale = kernel_size, heads, stride, impl, scale
        self.options = options
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.rel = RelativeEmbeddings(heads, kernel_size, out_channels // heads) if relative else None
        self.pool = nn.AvgPool2d(2) if stride == 2 else nn.Identity()
        self._native_bands: dict[tuple, Optional[int]] = {}  # _native_band's decisions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The op on (B, C, H, W) projections; returns (B, C, H, W)."""
        rel_row, rel_col = self._relative()
        with stage("layout"):
            q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        out = local_attention_checked_once(q, k, v, rel_row, rel_col, self.kernel_size, impl=self.impl, scale=self.scale,
                                           options=self.options)
        with stage("layout"):
            return merge_heads(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank4(x)
        convs, (rel_row, rel_col) = (self.query, self.key, self.value), self._relative()
        training = records_autograd(x, *(conv.weight for conv in convs), rel_row, rel_col)
        band = self._native_band(x, convs, rel_row, rel_col, training)
        if band is not None:  # the projections and the op as one node on the native kernels
            return self.pool(native_layer(x, convs, rel_row, rel_col, self.heads, self.kernel_size, float(self.scale),
                                          band, training))
        with stage("projections"):
            q, k, v = fused_projection(x, convs)
        return self.pool(self.attend(q, k, v))

    def _relative(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return (self.rel.rel_row, self.rel.rel_col) if self.rel is not None else (None, None)

    def _native_band(self, x: torch.Tensor, convs: tuple[nn.Conv2d, ...], rel_row: Optional[torch.Tensor],
                     rel_col: Optional[torch.Tensor], training: bool) -> Optional[int]:
        """native_layer_band for this call, decided once per kind of call (the input's shape, dtype, device and
        memory format, whether autograd records (``training``), the native build, the layer's impl, options, k and
        scale) and kept with the layer."""
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(), training, active_cpu_variant(), self.impl,
               repr(self.options), self.kernel_size, self.scale)
        if key not in self._native_bands:
            self._native_bands[key] = native_layer_band(x, convs, rel_row, rel_col, self.heads, self.kernel_size,
                                                        self.impl, self.options, training)
        return self._native_bands[key]


def _to_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/size * W/size, C, size, size): every size x size block as an image of its own."""
    batch, channels, height, width = x.shape
    blocks = x.reshape(batch, channels, height // size, size, width // size, size)  # (B, C, H/s, s, W/s, s)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(-1, channels, size, size)  # (B * H/s * W/s, C, s, s)


def _from_blocks(blocks: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`_to_blocks`: (B * H/s * W/s, C, s, s) -> (B, C, H, W)."""
    _, channels, size, _ = blocks.shape
    grid = blocks.reshape(batch, height // size, width // size, channels, size, size)  # (B, H/s, W/s, C, s, s)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)  # (B, C, H, W)


class AttentionStem(SASA2d):
    """The paper's attention stem (sec. 3.2, appendix A.1): attention inside each ``pool`` x ``pool`` block
    with spatially-aware values, then ``pool`` x ``pool`` max pooling and batch norm (224 -> 56 for pool 4).

    What it computes, per head, for pixel (i, j):

    - keys: the pool^2 pixels (a, b) of its own block, the non-overlapping block the max pooling takes
      ("the attention receptive field aligns with the max pooling window");
    - values: v_ab = (sum_m p(a, b, m) W_V^m) x_ab with p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m),
      ``value_mixtures`` matrices W_V^m mixed by the position (a mod pool, b mod pool) inside the block,
      p shared by all heads;
    - logits: those of the paper's attention layer (its eq. 3, relative logits included):
      q_ij . k_ab + q_ij[:D/2] . rel_row[a - i + pool - 1] + q_ij[D/2:] . rel_col[b - j + pool - 1];
      offsets inside a block lie in [-(pool - 1), pool - 1], so the per-head embeddings hold 2 pool - 1 rows
      (7 for pool 4: the contract's layout for k = 7). Kept because sec. 3.2 builds the stem from that
      layer and changes only its values, and because Table 1's full-attention FLOPs need them: with them
      ResNet-26/38/50 give 4.72/5.96/7.21 G (paper 4.7/6.0/7.2), without them 0.10 G less (4.6/5.9/7.1);
    - y_ij = sum_ab softmax_ab(logits) v_ab, then max pool and batch norm.

    How: each block is cut out as an image of its own and the suite's op runs on those images with
    kernel_size = 2 pool - 1. That window, centred on any pixel of a pool x pool image, covers the whole
    image, and the contract's masked borders drop the window positions outside it: the op computes exactly
    the block attention, with whichever implementation ``impl`` names. H and W must be multiples of
    ``pool`` (ValueError otherwise): a partial block would have no max-pool window to align with.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, *, heads: int = 8, value_mixtures: int = 4,
                 pool: int = 4, impl: str = "auto", scale: float = 1.0):
        for name, value in (("value_mixtures", value_mixtures), ("pool", pool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        super().__init__(in_channels, out_channels, 2 * pool - 1, heads, 1, impl, scale)
        self.pool_size = pool
        self.value = nn.Conv2d(in_channels, out_channels * value_mixtures, 1, bias=False)  # the W_V^m, stacked
        self.emb_row = nn.Parameter(torch.randn(pool, out_channels) * out_channels**-0.5)
        self.emb_col = nn.Parameter(torch.randn(pool, out_channels) * out_channels**-0.5)
        self.nu = nn.Parameter(torch.randn(value_mixtures, out_channels) * out_channels**-0.5)
        self.pool = nn.Sequential(nn.MaxPool2d(pool), nn.BatchNorm2d(out_channels))

    def mixture_weights(self, height: int, width: int) -> torch.Tensor:
        """p(a, b, m) for every pixel: (m, H, W), positions taken inside the pooling block (modulo pool)."""
        rows = torch.arange(height, device=self.nu.device) % self.pool_size
        cols = torch.arange(width, device=self.nu.device) % self.pool_size
        emb = self.emb_row[rows][:, None, :] + self.emb_col[cols][None, :, :]  # (H, W, C)
        return torch.softmax(emb @ self.nu.t(), dim=-1).permute(2, 0, 1)

    def spatially_aware_values(self, values: torch.Tensor) -> torch.Tensor:
        """v_ab = (sum_m p(a, b, m) W_V^m) x_ab for every pixel from the m value maps W_V^m x (``self.value``'s
        output): (B, m C_out, H, W) -> (B, C_out, H, W)."""
        batch, _, height, width = values.shape
        values = values.reshape(batch, self.nu.shape[0], -1, height, width)  # (B, m, C_out, H, W)
        p = self.mixture_weights(height, width).to(values.dtype)
        return (values * p[None, :, None]).sum(1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The op inside every pool x pool block (each block an image of its own); (B, C, H, W) in and out."""
        batch, _, height, width = q.shape
        blocks = [_to_blocks(t, self.pool_size) for t in (q, k, v)]
        return _from_blocks(super().attend(*blocks), batch, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank4(x)
        height, width = x.shape[-2:]
        if height % self.pool_size or width % self.pool_size:
            raise ValueError(f"x: height and width must be multiples of pool={self.pool_size} (each attention block "
                             f"is a max-pool window), got {height}x{width}")
        with stage("projections"):
            q, k, values = fused_projection(x, (self.query, self.key, self.value))
        return self.pool(self.attend(q, k, self.spatially_aware_values(values)))
