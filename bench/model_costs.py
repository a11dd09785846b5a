"""Analytic parameters and MACs of a whole model (docs/design.md "FLOP accounting"), layer by layer.

Parameters: a formula per layer type (conv, linear, batch norm, SASA2d, AttentionStem), checked
against ``sum(p.numel())`` by the tests. MACs: one forward pass on the ``meta`` device (shapes only,
no arithmetic, so ResNet-50 at 224x224 costs milliseconds) with forward hooks recording every layer's
sizes, then the per-layer formulas of bench/flops.py. Batch norm, activations, pooling, residual
adds and the softmax are not MACs and are left out, as in the paper's tables.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from sasa_impls.layers import AttentionStem, SASA2d
from sasa_impls.models import set_impl

from .flops import ACCOUNTINGS, attention_macs_per_pixel, attention_params, attention_total_macs, conv_params

# a shape-only implementation for the meta-device pass (every pure-PyTorch one runs on meta)
META_IMPL = "unfold"


def _conv_params(m: nn.Conv2d) -> int:
    kh, kw = m.kernel_size
    bias = m.out_channels if m.bias is not None else 0
    if kh == kw and m.groups == 1:
        return conv_params(m.in_channels, m.out_channels, kh) + bias
    return kh * kw * m.in_channels // m.groups * m.out_channels + bias


def _linear_params(m: nn.Linear) -> int:
    return m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)


def _batch_norm_params(m: nn.BatchNorm2d) -> int:
    return 2 * m.num_features if m.affine else 0


def _sasa_params(m: SASA2d) -> int:
    return attention_params(m.query.in_channels, m.query.out_channels, m.kernel_size, relative=m.rel is not None)


def _stem_params(m: AttentionStem) -> int:
    """SASA2d's count (relative embeddings of the 2 pool - 1 offsets inside a block) with m value matrices
    instead of one, plus emb_row, emb_col, nu and the BN."""
    d_in, d_out, mixtures = m.query.in_channels, m.query.out_channels, m.nu.shape[0]
    extra_values = (mixtures - 1) * d_in * d_out
    position = (2 * m.pool_size + mixtures) * d_out
    return attention_params(d_in, d_out, m.kernel_size) + extra_values + position + 2 * d_out


# exact type -> parameters of the module and everything inside it
PARAM_FORMULAS: dict[type, Callable[[nn.Module], int]] = {
    nn.Conv2d: _conv_params,
    nn.Linear: _linear_params,
    nn.BatchNorm2d: _batch_norm_params,
    SASA2d: _sasa_params,
    AttentionStem: _stem_params,
}


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` by formula; ValueError for a layer holding parameters no formula covers."""
    formula = PARAM_FORMULAS.get(type(model))
    if formula is not None:
        return formula(model)
    if any(True for _ in model.parameters(recurse=False)):
        raise ValueError(f"model: no parameter formula for {type(model).__name__}")
    return sum(count_params(child) for child in model.children())


def _projection_ids(model: nn.Module) -> set[int]:
    """ids of the 1x1 Q/K/V convs inside attention layers (counted as projections, not convs)."""
    return {id(conv) for m in model.modules() if isinstance(m, SASA2d) for conv in (m.query, m.key, m.value)}


def _keys_side(m: SASA2d) -> int:
    """Side of the square of keys every pixel attends to: k for SASA2d, the pooling block for the stem.

    The MAC formulas of bench/flops.py only depend on that square (side^2 keys for q.k and a.v, side
    offsets per axis for the factorized relative logits), so the stem's pool^2 keys count as a pool x
    pool window, not as the 2 pool - 1 window the op is called with (whose extra positions are masked).
    """
    return m.pool_size if isinstance(m, AttentionStem) else m.kernel_size


def count_macs(model: nn.Module, resolution: int, in_channels: int = 3) -> dict[str, int]:
    """MACs of one image at ``resolution`` x ``resolution``, by component.

    Components: conv (every conv outside attention layers), linear, projections (the attention layers'
    1x1 Q/K/V convs), value_mix (the stem's position logits (emb_row + emb_col) . nu_m and the mixing of
    its m value maps: 2 m d_out per pixel), qk, av,
    rel_per_key and rel_factorized (the two accountings of the relative logits; add one of them).
    """
    probe = set_impl(copy.deepcopy(model).to("meta"), META_IMPL)
    projections = _projection_ids(probe)
    totals = dict.fromkeys(("conv", "linear", "projections", "value_mix", "qk", "av", "rel_per_key", "rel_factorized"), 0)

    def on_conv(m: nn.Conv2d, inputs, output) -> None:
        kh, kw = m.kernel_size
        per_image = output[0].numel() * kh * kw * m.in_channels // m.groups
        totals["projections" if id(m) in projections else "conv"] += per_image

    def on_linear(m: nn.Linear, inputs, output) -> None:
        totals["linear"] += output[0].numel() * m.in_features

    def on_attention(m: SASA2d, inputs, output) -> None:
        _, _, height, width = inputs[0].shape  # the op runs before the layer's pooling
        per_pixel = attention_macs_per_pixel(m.query.in_channels, m.query.out_channels, _keys_side(m))
        for key in ("qk", "av", "rel_per_key", "rel_factorized"):
            totals[key] += per_pixel[key] * height * width
        if isinstance(m, AttentionStem):
            totals["value_mix"] += 2 * m.nu.shape[0] * m.query.out_channels * height * width

    hooks = {nn.Conv2d: on_conv, nn.Linear: on_linear, SASA2d: on_attention, AttentionStem: on_attention}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in probe.modules() if type(m) in hooks]
    try:
        with torch.no_grad():
            probe(torch.empty(1, in_channels, resolution, resolution, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return totals


def total_macs(components: dict[str, int], accounting: str = "rel_per_key") -> int:
    """Total MACs of :func:`count_macs` components under one accounting of the relative logits."""
    attention = {
        "projections": components["projections"] + components["value_mix"],
        "qk": components["qk"],
        "av": components["av"],
        "rel_per_key": components["rel_per_key"],
        "rel_factorized": components["rel_factorized"],
    }
    return components["conv"] + components["linear"] + attention_total_macs(attention, accounting)


def model_costs(model: nn.Module, resolution: int = 224) -> dict:
    """params, MACs under every accounting and paper-convention FLOPs (2 x MACs, logits per key)."""
    components = count_macs(model, resolution)
    macs = {accounting: total_macs(components, accounting) for accounting in ACCOUNTINGS}
    return {
        "params": count_params(model),
        "macs": macs["rel_per_key"],
        "macs_rel_factorized": macs["rel_factorized"],
        "macs_content_only": macs["content_only"],
        "flops_paper": 2 * macs["rel_per_key"],
        "macs_components": components,
        "cost_res": resolution,
    }
