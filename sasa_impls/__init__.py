"""sasa_impls: stand-alone self-attention (SASA) and its interchangeable implementations.

Public API (docs/design.md): list_impls, get_impl, local_attention, SASA2d, AttentionStem; the models
(ResNet-26/38/50 in the paper's three variants) are ``sasa_impls.models``.
"""
from . import models
from .functional import local_attention
from .layers import AttentionStem, SASA2d
from .registry import get_impl, list_impls, load_all

load_all()

__all__ = ["list_impls", "get_impl", "local_attention", "SASA2d", "AttentionStem", "models"]
