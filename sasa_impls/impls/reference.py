"""Reference: dense attention over every pixel, restricted to each query's window by a mask.

Plain and obviously right (it never shifts, pads or gathers neighbourhoods), O((HW)^2) memory: the
float64 oracle for every test, meant for small inputs. Masked positions are absent, not weighted by
zero: the values are summed over the in-window (query, key) pairs only, so a NaN in v reaches exactly the
outputs whose window holds it, as the contract says; an empty batch gives an empty result.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common import compute_dtype, window_offsets
from ..registry import Impl, register
from ..regions import stage


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_row: Optional[torch.Tensor],
                        rel_col: Optional[torch.Tensor], kernel_size: int, scale: float = 1.0,
                        borders: str = "masked") -> torch.Tensor:
    """SASA with the contract's masked borders, or with NATTEN's clamped windows (``borders="clamped"``)."""
    _, _, height, width, head_dim = q.shape
    if borders == "clamped" and kernel_size > min(height, width):
        raise ValueError(f"kernel_size: clamped windows need kernel_size <= H and W, got {kernel_size} for {height}x{width}")
    in_dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    row_off = window_offsets(height, kernel_size, borders, q.device)  # [i, a]
    col_off = window_offsets(width, kernel_size, borders, q.device)  # [j, c]
    in_row = (row_off >= 0) & (row_off < kernel_size)
    in_col = (col_off >= 0) & (col_off < kernel_size)
    in_window = in_row[:, None, :, None] & in_col[None, :, None, :]  # [i, j, a, c]

    with stage("logits"):
        logits = torch.einsum("bhijd,bhacd->bhijac", q, k)
    if rel_row is not None:
        with stage("relative"):
            rows = head_dim // 2
            # logit of the row offset a - i + r for every (i, a), likewise for columns
            row_terms = torch.einsum("bhijd,hod->bhijo", q[..., :rows], rel_row.to(ct))
            col_terms = torch.einsum("bhijd,hod->bhijo", q[..., rows:], rel_col.to(ct))
            row_idx = row_off.clamp(0, kernel_size - 1)[:, None, :].expand(height, width, height)
            col_idx = col_off.clamp(0, kernel_size - 1)[None, :, :].expand(height, width, width)
            shape = row_terms.shape[:4]
            row_logit = row_terms.gather(-1, row_idx.expand(*shape, height))  # [b, h, i, j, a]
            col_logit = col_terms.gather(-1, col_idx.expand(*shape, width))  # [b, h, i, j, c]
            logits = logits + row_logit[..., :, None] + col_logit[..., None, :]
    with stage("softmax"):
        logits = (logits * scale).masked_fill(~in_window, float("-inf"))
        batch, heads, pixels = q.shape[0], q.shape[1], height * width
        weights = torch.softmax(logits.reshape(batch, heads, pixels, pixels), dim=-1)  # [b, h, query, key]
    with stage("aggregate"):
        # Masked means absent: only the (query, key) pairs inside a window are summed. A masked pair is
        # never weight 0 times v, which would spread a NaN or inf of v to every pixel (0 x NaN = NaN).
        query, key = in_window.reshape(pixels, pixels).nonzero(as_tuple=True)
        terms = weights[:, :, query, key, None] * v.reshape(batch, heads, pixels, head_dim)[:, :, key]
        out = torch.zeros(batch, heads, pixels, head_dim, dtype=ct, device=q.device).index_add(2, query, terms)
    return out.reshape(q.shape).to(in_dtype)


register(Impl(name="reference", forward=reference_attention, description="dense attention with a window mask (oracle)"))
