"""Analytic MAC counts (docs/design.md "FLOP accounting"). MACs = multiply-accumulates; FLOPs = 2 x MACs."""
from __future__ import annotations

ACCOUNTINGS = ("content_only", "rel_per_key", "rel_factorized")


def attention_macs_per_pixel(d_in: int, d_out: int, kernel_size: int) -> dict[str, int]:
    """MACs per output pixel of SASA2d by component (d_out = heads x D, summed over heads).

    projections: 3 d_in d_out; qk and av: k^2 d_out each; relative logits: k^2 d_out when added to every
    key (what unfold-style code does and the paper's tables count), k d_out when factorized.
    """
    k2 = kernel_size * kernel_size
    return {
        "projections": 3 * d_in * d_out,
        "qk": k2 * d_out,
        "av": k2 * d_out,
        "rel_per_key": k2 * d_out,
        "rel_factorized": kernel_size * d_out,
    }


def softmax_ops_per_pixel(kernel_size: int, heads: int) -> int:
    """exp + add per pixel for the softmax: k^2 per head (reported beside MACs, never inside them)."""
    return kernel_size * kernel_size * heads


def attention_total_macs(per_pixel: dict[str, int], accounting: str) -> int:
    """Total MACs per pixel under one accounting of the relative logits (see ACCOUNTINGS)."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting: expected one of {ACCOUNTINGS}, got {accounting!r}")
    content = per_pixel["projections"] + per_pixel["qk"] + per_pixel["av"]
    if accounting == "content_only":
        return content
    return content + per_pixel["rel_per_key" if accounting == "rel_per_key" else "rel_factorized"]


def conv_macs_per_pixel(d_in: int, d_out: int, kernel_size: int) -> int:
    """k^2 d_in d_out MACs per output pixel of a k x k convolution."""
    return kernel_size * kernel_size * d_in * d_out


def attention_params(d_in: int, d_out: int, kernel_size: int, relative: bool = True) -> int:
    """SASA2d parameters: 3 d_in d_out projection weights + k d_out relative embeddings (if ``relative``)."""
    return 3 * d_in * d_out + (kernel_size * d_out if relative else 0)


def conv_params(d_in: int, d_out: int, kernel_size: int) -> int:
    """k x k convolution without bias: k^2 d_in d_out."""
    return kernel_size * kernel_size * d_in * d_out
