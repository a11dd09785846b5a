"""Small helpers shared by the PyTorch implementations."""
from __future__ import annotations

import torch

# Masked logits get this instead of -inf: a fully masked row (a padding query that is cropped away)
# then gives a uniform softmax instead of NaN, and NaN never leaks into the gradients of real rows.
MASKED_LOGIT = -1e30


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` here: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 (fp64 for fp64 inputs, so the oracle comparisons stay tight)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_offsets(size: int, kernel_size: int, borders: str, device=None) -> torch.Tensor:
    """(size, size) table: entry [i, a] is key a's offset in query i's window (in [0, k) when inside).

    borders="masked": the window is centred, [i - r, i + r]. borders="clamped": it is shifted inward
    to stay inside the image (NATTEN's neighbourhood), which needs kernel_size <= size.
    """
    positions = torch.arange(size, device=device)
    start = positions - kernel_size // 2
    if borders == "clamped":
        start = start.clamp(0, size - kernel_size)
    elif borders != "masked":
        raise ValueError(f"borders: expected 'masked' or 'clamped', got {borders!r}")
    return positions[None, :] - start[:, None]


def neighbourhood_valid(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H, W, k, k) bool: True where window position (a, c) of pixel (i, j) lies inside the image."""
    r = kernel_size // 2
    offsets = torch.arange(kernel_size, device=device) - r
    rows = torch.arange(height, device=device)[:, None] + offsets  # (H, k)
    cols = torch.arange(width, device=device)[:, None] + offsets  # (W, k)
    rows_ok = (rows >= 0) & (rows < height)
    cols_ok = (cols >= 0) & (cols < width)
    return rows_ok[:, None, :, None] & cols_ok[None, :, None, :]


def pad_borders(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero-pad H and W of a (B, heads, H, W, D) tensor by ``radius`` on each side."""
    return torch.nn.functional.pad(x, (0, 0, radius, radius, radius, radius))


def factorized_rel_logits(q: torch.Tensor, rel_row: torch.Tensor, rel_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q_row . rel_row and q_col . rel_col once per offset, k D MACs per pixel.

    q is (B, heads, ..., D); returns two (B, heads, ..., k) tensors (row offsets, column offsets).
    """
    rows = q.shape[-1] // 2
    row_terms = torch.einsum("bh...d,hod->bh...o", q[..., :rows], rel_row.to(q.dtype))
    col_terms = torch.einsum("bh...d,hod->bh...o", q[..., rows:], rel_col.to(q.dtype))
    return row_terms, col_terms
