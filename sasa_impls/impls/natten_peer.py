"""NATTEN (optional peer): ``natten.na2d``, neighbourhood attention with NATTEN's own semantics.

Its windows are clamped at the borders (shifted inward to stay k x k inside the image, so it needs
kernel_size <= H and W) and it has no relative-position term: validated against
``reference_attention(..., borders="clamped")`` content-only, compared with the others on speed only.

Backends (NATTEN picks): CUTLASS kernels on CUDA when NATTEN is built with them, else its FlexAttention
backend. NATTEN compiles Flex only on CUDA and only once allowed (``natten.allow_flex_compile``, switched
on here for the forward; its backprop switch stays as the user set it, NATTEN's default being off). On CPU
it runs Flex uncompiled, which materialises every (query, key) score, and has no backward there. NATTEN's scale defaults
to D^-0.5: the contract's ``scale`` is always passed.
"""
from __future__ import annotations

import torch

from ..registry import Impl, register

try:
    import natten
    from natten.backends import can_run_flex_attention
except ImportError as error:  # optional dependency: the suite works without it
    natten = None
    IMPORT_ERROR = str(error)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def natten_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """NATTEN installed, on CPU or CUDA, in fp32/fp16/bf16 (CPU: forward only)."""
    if natten is None:
        return False, f"natten is not installed ({IMPORT_ERROR})"
    if device.type not in ("cpu", "cuda"):
        return False, f"NATTEN runs on cpu and cuda, not {device.type}"
    if dtype not in DTYPES:
        return False, f"NATTEN takes {[str(d) for d in DTYPES]}, not {dtype}"
    return True, ""


def compile_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether to ask NATTEN to compile its Flex backend: on CUDA, where NATTEN's checks allow it."""
    if q.device.type != "cuda":
        return False
    if not natten.is_flex_compile_allowed():
        natten.allow_flex_compile(True, backprop=natten.is_flex_compile_backprop_allowed())
    return can_run_flex_attention(q, k, v, torch_compile=True)


def natten_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0) -> torch.Tensor:
    """Content-only neighbourhood attention with NATTEN's clamped windows, in our (B, heads, H, W, D) layout."""
    _, _, height, width, _ = q.shape
    if rel_row is not None or rel_col is not None:
        raise ValueError("rel_row, rel_col: natten has no relative-position term; pass None for both")
    if kernel_size > min(height, width):
        raise ValueError(
            f"kernel_size: natten's clamped windows need kernel_size <= H and W, got {kernel_size} for {height}x{width}"
        )
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "impl 'natten': NATTEN has no backward on CPU (its Flex backend); run it under torch.no_grad()"
        )
    # (B, heads, H, W, D) -> NATTEN's heads-last (B, H, W, heads, D)
    query, key, value = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
    if q.device.type == "cpu":  # Flex is NATTEN's only CPU backend: say why it cannot run (e.g. the head dim)
        try:
            can_run_flex_attention(query, key, value, torch_compile=False, raise_error=True)
        except ValueError as error:
            raise ValueError(f"q: natten cannot run this input on cpu: {error}") from error
    out = natten.na2d(query, key, value, kernel_size=kernel_size, scale=scale,
                      torch_compile=compile_flex(query, key, value))
    return out.permute(0, 3, 1, 2, 4)


register(
    Impl(
        name="natten",
        forward=natten_attention,
        description="natten.na2d: clamped windows, no relative logits (CPU: uncompiled Flex, forward only)",
        check=natten_available,
        borders="clamped",
        supports_rel=False,
    )
)
