"""sasa_impls: stand-alone self-attention (SASA) and its interchangeable implementations.

Public API (DESIGN.md): list_impls, get_impl, local_attention, SASA2d, AttentionStem.
"""
from .functional import local_attention
from .layers import AttentionStem, SASA2d
from .registry import get_impl, list_impls, load_all

load_all()

__all__ = ["list_impls", "get_impl", "local_attention", "SASA2d", "AttentionStem"]
