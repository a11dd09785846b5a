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

from ..registry import AttentionSpec, Impl, register

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


def natten_limits(spec: AttentionSpec) -> tuple[bool, str]:
    """NATTEN's clamped windows need k <= H and W; on CPU it has no backward and its (uncompiled Flex)
    backend takes only some head dims, which NATTEN's own check judges."""
    if spec.kernel_size > min(spec.height, spec.width):
        return False, (f"needs kernel_size <= H and W (clamped windows), got kernel_size {spec.kernel_size} "
                       f"for {spec.height}x{spec.width}")
    if spec.device.type != "cpu":
        return True, ""
    if spec.requires_grad:
        return False, "cannot compute gradients on cpu: NATTEN has no backward on CPU (its Flex backend); run it under torch.no_grad()"
    probe = torch.empty(1, 1, 1, 1, spec.head_dim, dtype=spec.dtype)  # (B, H, W, heads, D): only D and dtype matter
    try:
        can_run_flex_attention(probe, probe, probe, torch_compile=False, raise_error=True)
    except (ValueError, RuntimeError) as error:  # NATTEN raises either, by the check that failed
        return False, f"cannot run head_dim {spec.head_dim} on cpu: {error}"
    return True, ""


def natten_attention(q, k, v, rel_row, rel_col, kernel_size: int, scale: float = 1.0) -> torch.Tensor:
    """Content-only neighbourhood attention with NATTEN's clamped windows, in our (B, heads, H, W, D) layout
    (inputs judged by :func:`natten_limits` first)."""
    # (B, heads, H, W, D) -> NATTEN's heads-last (B, H, W, heads, D)
    query, key, value = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
    out = natten.na2d(query, key, value, kernel_size=kernel_size, scale=scale,
                      torch_compile=compile_flex(query, key, value))
    return out.permute(0, 3, 1, 2, 4)


register(
    Impl(
        name="natten",
        forward=natten_attention,
        description="natten.na2d: clamped windows, no relative logits (CPU: uncompiled Flex, forward only)",
        check=natten_available,
        limits=natten_limits,
        borders="clamped",
        supports_rel=False,
    )
)
