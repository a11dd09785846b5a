"""The public functional op: argument checks, then dispatch to a registered implementation that supports the input."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from . import registry
from .common import records_autograd

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kernel_size(kernel_size: object) -> int:
    """kernel_size must be an odd int >= 1 (the window is centred on the query)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size: expected an odd int >= 1, got {type(kernel_size).__name__} {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size}")
    return kernel_size


def rel_shapes(heads: int, kernel_size: int, head_dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of rel_row and rel_col: rows get the first D // 2 channels, columns the rest."""
    rows = head_dim // 2
    return (heads, kernel_size, rows), (heads, kernel_size, head_dim - rows)


def check_inputs(q, k, v, rel_row, rel_col, kernel_size, scale) -> None:
    """Raise a ValueError/TypeError naming the offending argument when the inputs break the contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name}: expected rank 5 (B, heads, H, W, D), got shape {tuple(t.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected a floating dtype {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    check_kernel_size(kernel_size)
    if (rel_row is None) != (rel_col is None):
        raise ValueError("rel_row, rel_col: give both relative embeddings or neither")
    heads, head_dim = q.shape[1], q.shape[4]
    tensors = [("k", k), ("v", v)]
    if rel_row is not None:
        expected_row, expected_col = rel_shapes(heads, kernel_size, head_dim)
        for name, t, expected in (("rel_row", rel_row, expected_row), ("rel_col", rel_col, expected_col)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape (heads, kernel_size, D part) = {expected}, got {tuple(t.shape)}")
            tensors.append((name, t))
    for name, t in tensors:
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but q is on {q.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")


def select_impl(impl: str, spec: registry.AttentionSpec) -> registry.Impl:
    """Look ``impl`` up ('auto' picks the preferred one) and check it can compute ``spec``."""
    if impl == "auto":
        return registry.resolve_auto(spec)
    chosen = registry.get_impl(impl)
    ok, reason = chosen.supports(spec)
    if not ok:
        raise ValueError(f"impl: {impl!r} {reason}")
    return chosen


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_row: Optional[torch.Tensor],
    rel_col: Optional[torch.Tensor],
    kernel_size: int,
    impl: str = "unfold",
    scale: float = 1.0,
    options: Optional[Mapping[str, Any] | str] = None,
) -> torch.Tensor:
    """SASA local attention over the k x k window of every pixel (docs/design.md: "The operation").

    q, k, v: (B, heads, H, W, D); rel_row: (heads, k, D // 2) and rel_col: (heads, k, D - D // 2), or
    both None for content-only attention. ``options``: the implementation's own options (``Impl.options``,
    e.g. ``{"block": 8}`` for memory_blocks, or the text "block=8"); not with ``impl="auto"``.
    Returns (B, heads, H, W, D) in the input dtype.
    """
    chosen, parsed = _check_and_choose(q, k, v, rel_row, rel_col, kernel_size, impl, scale, options)
    return chosen(q, k, v, rel_row, rel_col, kernel_size, float(scale), **parsed)


def _check_and_choose(q, k, v, rel_row, rel_col, kernel_size, impl, scale, options) -> tuple[registry.Impl, dict]:
    """The arguments checked (errors naming them), then the implementation that computes them and its options."""
    check_inputs(q, k, v, rel_row, rel_col, kernel_size, scale)
    if options and impl == "auto":
        raise ValueError("options: implementation options need an explicit impl, not 'auto'")
    spec = registry.AttentionSpec.of(q, (q, k, v, rel_row, rel_col), kernel_size, rel_row is not None)
    chosen = select_impl(impl, spec)
    return chosen, chosen.parse_options(options)


# What local_attention_checked_once has checked: key -> (the chosen implementation, its parsed options).
_CHECKED: dict[tuple, tuple[registry.Impl, dict]] = {}


def _tensor_kind(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.shape, t.dtype, t.device)


def local_attention_checked_once(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_row: Optional[torch.Tensor],
                                 rel_col: Optional[torch.Tensor], kernel_size: int, impl: str = "unfold",
                                 scale: float = 1.0, options: Optional[Mapping[str, Any] | str] = None) -> torch.Tensor:
    """:func:`local_attention` for a caller that makes the same kind of call again and again (a layer): the
    arguments are checked and the implementation chosen by the first call of each kind (every argument but the
    tensors' data: their shapes, dtypes and devices, whether autograd records, ``kernel_size``, ``impl``,
    ``scale`` and ``options``), later calls of that kind go straight to the implementation. Checking and
    choosing took 23 us of a 1.4 ms SASA2d k = 19 forward at 32 x 32, 1.7% of it."""
    tensors = (q, k, v, rel_row, rel_col)
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return local_attention(q, k, v, rel_row, rel_col, kernel_size, impl, scale, options)  # raises, naming it
    key = (impl, repr(options), type(kernel_size), kernel_size, type(scale), scale, records_autograd(*tensors),
           *(_tensor_kind(t) for t in tensors))
    checked = _CHECKED.get(key) or _check_and_choose(q, k, v, rel_row, rel_col, kernel_size, impl, scale, options)
    chosen, parsed = checked
    out = chosen(q, k, v, rel_row, rel_col, kernel_size, float(scale), **parsed)
    _CHECKED[key] = checked  # once the call has run: a kind whose call failed is checked and chosen again
    return out
