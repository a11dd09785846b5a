"""ResNet-26/38/50 with bottleneck blocks, in the paper's three variants (docs/design.md "Layers and models").

- ``conv``: the standard ResNet (7x7 stride-2 conv + 3x3 stride-2 max pool stem, 3x3 convs in the
  bottlenecks, stride on the 3x3 conv as in torchvision's ResNet v1.5).
- ``conv_stem_attention``: every 3x3 bottleneck conv becomes SASA2d (k = 7, 8 heads); where the block
  downsamples, the attention runs at the input resolution and a 2x2 average pool follows it.
- ``full_attention``: the stem too is attention: AttentionStem (3 -> 64 channels, the same heads, 4
  spatially-aware value matrices), in which every pixel attends to the 16 pixels of its 4x4 block, then
  4x4 max pooling over those same blocks and batch norm, then ReLU: 224x224 -> 56x56, like the conv stem
  (the paper's stem, sec. 3.2; its 4x4 window replaces k, see sasa_impls.layers.AttentionStem).

Any registered implementation can back the attention layers (``impl``; :func:`set_impl` switches it on a
built model, keeping its weights). Weights use PyTorch's default initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from .layers import AttentionStem, SASA2d
from .registry import get_impl

BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STEM_CHANNELS = 64


@dataclass(frozen=True)
class AttentionConfig:
    """What every attention layer of a model shares."""

    kernel_size: int = 7
    heads: int = 8
    impl: str = "auto"


def conv_stem(config: AttentionConfig) -> nn.Module:
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool: 224 -> 56."""
    return nn.Sequential(
        nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(STEM_CHANNELS),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def attention_stem(config: AttentionConfig) -> nn.Module:
    """AttentionStem (attention inside each 4x4 block, 4x4 max pool, BN) then ReLU: 224 -> 56."""
    stem = AttentionStem(3, STEM_CHANNELS, heads=config.heads, impl=config.impl)
    return nn.Sequential(stem, nn.ReLU(inplace=True))


def conv3x3(in_channels: int, out_channels: int, stride: int, config: AttentionConfig) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def attention(in_channels: int, out_channels: int, stride: int, config: AttentionConfig) -> nn.Module:
    return SASA2d(in_channels, out_channels, config.kernel_size, config.heads, stride, impl=config.impl)


@dataclass(frozen=True)
class Variant:
    """A model variant: how it builds its stem and the spatial layer of every bottleneck."""

    stem: Callable[[AttentionConfig], nn.Module]
    spatial: Callable[[int, int, int, AttentionConfig], nn.Module]


VARIANTS = {
    "conv": Variant(conv_stem, conv3x3),
    "conv_stem_attention": Variant(conv_stem, attention),
    "full_attention": Variant(attention_stem, attention),
}


class Bottleneck(nn.Module):
    """1x1 reduce, spatial layer (3x3 conv or SASA2d, carries the stride), 1x1 expand x4, residual."""

    def __init__(self, in_channels: int, width: int, stride: int, spatial: nn.Module):
        super().__init__()
        out_channels = width * EXPANSION
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.spatial = nn.Sequential(spatial, nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.expand(self.spatial(self.reduce(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages of bottlenecks (widths 64-128-256-512, x4 expansion), global average pool, fc."""

    def __init__(self, depth: int, variant: str, num_classes: int, config: AttentionConfig):
        super().__init__()
        self.depth, self.variant = depth, variant
        build = VARIANTS[variant]
        self.stem = build.stem(config)
        stages, in_channels = [], STEM_CHANNELS
        for index, (blocks, width) in enumerate(zip(BLOCKS[depth], WIDTHS)):
            layers = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(Bottleneck(in_channels, width, stride, build.spatial(width, width, stride, config)))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet(depth: int, variant: str, impl: str = "auto", num_classes: int = 1000, kernel_size: int = 7, heads: int = 8) -> ResNet:
    """ResNet-``depth`` (26, 38 or 50) in ``variant`` (see VARIANTS); ``impl`` backs its attention layers.

    ``kernel_size`` applies to the bottleneck attention layers (the stem attends within its 4x4 pooling
    blocks whatever k), ``heads`` to every attention layer; the conv variant has none and ignores them
    and ``impl``.
    """
    if depth not in BLOCKS:
        raise ValueError(f"depth: expected one of {tuple(BLOCKS)}, got {depth!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {variant!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    if impl != "auto":
        get_impl(impl)
    return ResNet(depth, variant, num_classes, AttentionConfig(kernel_size, heads, impl))


def set_impl(model: nn.Module, impl: str, options: Optional[Mapping[str, Any] | str] = None) -> nn.Module:
    """Back every attention layer of ``model`` with ``impl`` and its ``options`` (weights unchanged);
    returns ``model``."""
    if impl != "auto":
        get_impl(impl).parse_options(options)
    for module in model.modules():
        if isinstance(module, SASA2d):
            module.impl, module.options = impl, options
    return model
