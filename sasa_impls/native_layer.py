"""SASA2d on the native CPU kernels as one autograd node: the projection's product, the op's forward and, in
the backward, the op's backward and the product's two gradients, all in the extension (csrc/cpu/sasa_cpu.cpp's
LayerStep), with nothing between the kernels but views.

Why: the general path (projection.fused_projection, then local_attention) runs the same kernels through three
autograd Functions (the product, the channel split, the op), the weights' stack and the head split and merge, each
with its own backward node, in Python. Timed inside SASA2d(128, 128, k=19)'s fwd+bwd step between the kernels'
calls (28 x 28, batch 1, AMD Zen 4 f25m17), that glue took 0.75-0.94 ms of a 4.6-4.9 ms step, where the same glue
with the kernels stubbed out took 0.37 ms: after each kernel, what the interpreter and autograd touch is out of the
caches, so every Python frame and node between two kernels costs 2-3x its warm time. The same as one Python
autograd Function took 0.966x the general path's time (fwd+bwd, 28 x 28 batch 1) and 1.005x at batch 8; as one node
in the extension (interleaved against the general path in one process): fwd+bwd 0.956x (28 x 28 batch 1), 0.948x
(32 x 32 batch 1), 0.979x (28 x 28 batch 8), forward 0.971x, 0.981x, 0.984x.

When: SASA2d takes this path where the op's implementation for its input is ``native`` on the CPU and the
projection's backend is the native product (the first call of each kind of input decides: :func:`native_layer_band`);
everything else, and the first call's errors, take the general path. The same kernels on the same operands give the
general path's bits.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .functional import select_impl
from .impls import native
from .impls._native_build import active_cpu_extension
from .projection import projection_backend, stacked_weight
from .registry import AttentionSpec

Tensor = torch.Tensor


def native_layer_band(x: Tensor, convs: Sequence[nn.Conv2d], rel_row: Optional[Tensor], rel_col: Optional[Tensor],
                      heads: int, kernel_size: int, impl: str, options, training: bool) -> Optional[int]:
    """The op's band option where SASA2d's call on ``x`` can be one native node (0: the kernel's default), None
    where it cannot: x not on the CPU, its channels not the projections', the implementation ``impl`` would choose
    for it not ``native``, or the projection's fastest backend for it not the native product. ``training``: whether
    autograd records the call (records_autograd of x, the weights and the embeddings, as SASA2d computed it)."""
    if x.device.type != "cpu" or x.shape[1] != convs[0].in_channels:
        return None
    batch, _, height, width = x.shape
    out_channels = convs[0].out_channels
    spec = AttentionSpec(x.device, x.dtype, batch, heads, height, width, out_channels // heads, kernel_size,
                         rel_row is not None, training)
    try:
        chosen = select_impl(impl, spec)
        band = chosen.parse_options(options).get("band")
    except ValueError:  # the general path raises it, naming the argument
        return None
    if chosen.name != "native" or projection_backend(x, stacked_weight(convs)) != "native":
        return None
    return 0 if band is None else native.check_band(band)


def native_layer(x: Tensor, convs: Sequence[nn.Conv2d], rel_row: Optional[Tensor], rel_col: Optional[Tensor],
                 heads: int, kernel_size: int, scale: float, band: int, training: bool) -> Tensor:
    """SASA2d's projections and op on ``x`` (B, d_in, H, W) -> (B, d_out, H, W) in one call of the extension: one
    autograd node where autograd records (``training``: records_autograd of x, the weights and the embeddings); in
    inference with the weights' stack projection.stacked_weight keeps (a training step stacks them anew: an optimizer
    may change a weight where its version counter does not see it)."""
    weights = [conv.weight for conv in convs]
    stacked = None if training else stacked_weight(convs)
    return active_cpu_extension().layer_step(x, *weights, rel_row, rel_col, stacked, heads, kernel_size, scale,
                                             native.POISON_OUTPUTS, band)
