"""Sliding-window memory blocks: queries grouped in b x b blocks attend to their (b + k - 1)^2 halo
block with two dense batched matmuls; each query's own k x k window and the image border are applied
as a mask. Relative logits are computed factorized and scattered onto the halo.

Memory O(HW (1 + (k - 1) / b)^2 C): the halo copies of K and V and the (b^2 x L^2) logits per block.
"""
from __future__ import annotations

import math

import torch

from ..common import MASKED_LOGIT, compute_dtype, factorized_rel_logits
from ..registry import Impl, Option, positive_int, register
from ..regions import stage

# Query block edge per device type. A block computes (b + k - 1)^2 logits per query instead of k^2 and copies
# K and V (1 + (k - 1) / b)^2 times, so small blocks waste less; but each block is one matmul with b^2 query rows,
# and too few rows run inefficiently. On CPU (1 thread, fp32 forward, min of 7-15 runs): at 32x32, D=16, k = 3..19,
# b = 4 was the fastest of {4, 8, 12, 16} (k=19: b=4 26.6 ms, b=8 29.9 ms, b=16 76.2 ms; unfold 272 ms); at the
# ResNet-50 layer shapes (k=7) it was within 17% of b = 2, the fastest of {2, 4, 6, 8}, and b = 2 lost at k = 19.
# On CUDA, 64-row tiles (b = 8) keep the tensor cores fed; not yet measured on a GPU.
BLOCK_BY_DEVICE = {"cpu": 4, "cuda": 8}


def block_size(height: int, width: int, device: torch.device) -> int:
    """The query block edge for this shape and device, never larger than the image."""
    return max(1, min(BLOCK_BY_DEVICE.get(device.type, 8), max(height, width)))


def memory_blocks_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0, block: int | None = None) -> torch.Tensor:
    batch, heads, height, width, head_dim = q.shape
    ct = compute_dtype(q.dtype)
    b = block or block_size(height, width, q.device)
    halo = b + kernel_size - 1
    radius = kernel_size // 2
    blocks_h, blocks_w = math.ceil(height / b), math.ceil(width / b)
    extra_h, extra_w = blocks_h * b - height, blocks_w * b - width
    pad = torch.nn.functional.pad

    def halo_blocks(x: torch.Tensor) -> torch.Tensor:  # (B, h, nbh, nbw, L*L, D)
        with stage("layout"):  # inside whichever stage uses it: the innermost region gets the time
            padded = pad(x.to(ct), (0, 0, radius, radius + extra_w, radius, radius + extra_h))
            windows = padded.unfold(2, halo, b).unfold(3, halo, b)  # (B, h, nbh, nbw, D, L, L)
            return windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(batch, heads, blocks_h, blocks_w, halo * halo, head_dim)

    with stage("layout"):
        # (B, h, nbh, nbw, b*b, D): queries of each block
        queries = pad(q.to(ct), (0, 0, 0, extra_w, 0, extra_h))
        queries = queries.reshape(batch, heads, blocks_h, b, blocks_w, b, head_dim).transpose(3, 4)
        queries = queries.reshape(batch, heads, blocks_h, blocks_w, b * b, head_dim)
    with stage("logits"):
        logits = queries @ halo_blocks(k).transpose(-1, -2)  # (B, h, nbh, nbw, b*b, L*L)

    device = q.device
    with stage("softmax"):  # the window and border mask
        offset = torch.arange(halo, device=device)[None, :] - torch.arange(b, device=device)[:, None]  # [qi, hi]
        in_window_1d = (offset >= 0) & (offset < kernel_size)
        in_window = (in_window_1d[:, None, :, None] & in_window_1d[None, :, None, :]).reshape(b * b, halo * halo)
        key_rows = torch.arange(blocks_h, device=device)[:, None] * b - radius + torch.arange(halo, device=device)
        key_cols = torch.arange(blocks_w, device=device)[:, None] * b - radius + torch.arange(halo, device=device)
        rows_ok = (key_rows >= 0) & (key_rows < height)
        cols_ok = (key_cols >= 0) & (key_cols < width)
        in_image = (rows_ok[:, None, :, None] & cols_ok[None, :, None, :]).reshape(blocks_h, blocks_w, 1, halo * halo)

    if rel_row is not None:
        with stage("relative"):
            row_terms, col_terms = factorized_rel_logits(queries, rel_row.to(ct), rel_col.to(ct))  # (..., b*b, k)
            index = offset.clamp(0, kernel_size - 1)  # [q_i, h_i] -> offset index
            lead = row_terms.shape[:-2]
            row_terms = row_terms.reshape(*lead, b, b, kernel_size)
            col_terms = col_terms.reshape(*lead, b, b, kernel_size)
            row_logit = row_terms.gather(-1, index[:, None, :].expand(b, b, halo).expand(*lead, b, b, halo))
            col_logit = col_terms.gather(-1, index[None, :, :].expand(b, b, halo).expand(*lead, b, b, halo))
            logits = logits + (row_logit[..., :, None] + col_logit[..., None, :]).reshape(*lead, b * b, halo * halo)

    with stage("softmax"):
        weights = torch.softmax((logits * scale).masked_fill(~(in_window & in_image), MASKED_LOGIT), dim=-1)
    with stage("aggregate"):
        out = weights @ halo_blocks(v)  # (B, h, nbh, nbw, b*b, D)
    with stage("layout"):
        out = out.reshape(batch, heads, blocks_h, blocks_w, b, b, head_dim).transpose(3, 4)
        out = out.reshape(batch, heads, blocks_h * b, blocks_w * b, head_dim)[:, :, :height, :width]
        return out.to(q.dtype)


register(Impl(name="memory_blocks", forward=memory_blocks_attention, auto_priority={"cpu": 10, "cuda": 10},
              options={"block": Option(positive_int, "query block edge b; default per device, BLOCK_BY_DEVICE")},
              description="b x b query blocks attend to their halo block with dense matmuls and a window mask"))
