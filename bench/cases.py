"""Benchmark cases and the named presets (grids of cases) that ``sasa-bench run --suite`` measures.

A case measures one module at one shape: ``SASA2d(channels, channels, k, heads, impl=impl)`` or, for
``impl="conv"``, the baseline ``nn.Conv2d(channels, channels, k, padding=k // 2, bias=False)``, on a
random (batch, channels, res, res) input, in one direction ("fwd" or "fwd+bwd").
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

import sasa_impls

from . import flops

CONV = "conv"
DIRECTIONS = ("fwd", "fwd+bwd")
DTYPES = ("float16", "bfloat16", "float32", "float64")
# Never timed by default: the reference is the O((HW)^2) oracle the correctness gate compares against.
NOT_TIMED_BY_DEFAULT = ("reference",)
# Preset batch per device type: one image on CPUs, a small batch on GPUs so they are not launch-bound.
PRESET_BATCH = {"cpu": 1, "cuda": 8}


@dataclass(frozen=True)
class Case:
    """One measurement: which module, at which shape, dtype, device and direction."""

    impl: str
    k: int
    channels: int
    heads: int
    res: int
    batch: int
    dtype: str
    device: str
    direction: str

    def key(self) -> tuple:
        """The identity of the case in result rows (resume and reports match on it)."""
        return tuple(asdict(self).values())

    def label(self) -> str:
        """Short human-readable description for progress lines."""
        return (f"{self.impl} k={self.k} C={self.channels} h={self.heads} {self.res}x{self.res} "
                f"B={self.batch} {self.dtype} {self.device} {self.direction}")


def case_key(row: dict) -> tuple:
    """The key of the case a result row (or a Case as a dict) belongs to."""
    return tuple(row[name] for name in Case.__dataclass_fields__)


def default_impls(device: str, dtype: str = "float32") -> list[str]:
    """Every registered implementation that can run on ``device``/``dtype`` (except the reference), plus conv."""
    names = []
    for name in sasa_impls.list_impls():
        if name in NOT_TIMED_BY_DEFAULT:
            continue
        if sasa_impls.get_impl(name).available(torch.device(device), getattr(torch, dtype))[0]:
            names.append(name)
    return names + [CONV]


def grid(impls: Iterable[str], ks: Iterable[int], channels: Iterable[int], heads: Iterable[int], res: Iterable[int],
         batch: Iterable[int], dtypes: Iterable[str], devices: Iterable[str], directions: Iterable[str]) -> list[Case]:
    """Every combination, ordered so that one shape's implementations run next to each other."""
    cases = []
    for device, dtype, direction, k, c, h, r, b in itertools.product(devices, dtypes, directions, ks, channels, heads, res, batch):
        cases.extend(Case(i, k, c, h, r, b, dtype, device, direction) for i in impls)
    return cases


@dataclass(frozen=True)
class Shapes:
    """A preset's shape grid: kernel sizes, channel counts, heads and resolutions (square images)."""

    ks: Sequence[int]
    channels: Sequence[int]
    heads: int
    res: Sequence[int]
    pairs: Sequence[tuple[int, int]] = ()  # (res, channels) pairs instead of the res x channels product


PRESETS: dict[str, Shapes] = {
    # small enough for a 2-core CPU in a few minutes, big enough that attention dominates the projections
    "quick": Shapes(ks=(3, 7), channels=(64,), heads=8, res=(32,)),
    "k-sweep": Shapes(ks=(3, 5, 7, 9, 11, 13, 15, 17, 19), channels=(128,), heads=8, res=(32,)),
    "channels": Shapes(ks=(7,), channels=(32, 64, 128, 256), heads=8, res=(32,)),
    "resolution": Shapes(ks=(7,), channels=(64,), heads=8, res=(14, 28, 56, 112)),
    # the SASA layers of ResNet-50 at 224 x 224: stage resolution and bottleneck width
    "resnet50-layers": Shapes(ks=(7,), channels=(), heads=8, res=(), pairs=((56, 64), (28, 128), (14, 256), (7, 512))),
    # d_in = d_out = 128 at the 28 x 28 stage: attention k = 3..19 against conv at the same k (k = 3 is the claim)
    "claim": Shapes(ks=(3, 7, 11, 15, 19), channels=(128,), heads=8, res=(28,)),
}


def preset(name: str, device: str = "cpu", dtypes: Sequence[str] = ("float32",), impls: Sequence[str] | None = None,
           directions: Sequence[str] = DIRECTIONS, batch: int | None = None) -> list[Case]:
    """The cases of preset ``name`` on ``device`` (default impls: :func:`default_impls`, plus conv)."""
    if name not in PRESETS:
        raise ValueError(f"suite: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    shapes = PRESETS[name]
    impls = list(impls) if impls is not None else default_impls(device, dtypes[0])
    batch = batch or PRESET_BATCH.get(device.split(":")[0], 1)
    pairs = shapes.pairs or [(r, c) for c in shapes.channels for r in shapes.res]
    return [
        Case(impl, k, c, shapes.heads, r, batch, dtype, device, direction)
        for dtype, direction, k, (r, c), impl in itertools.product(dtypes, directions, shapes.ks, pairs, impls)
    ]


def rel_accounting(impl: str) -> str:
    """The accounting of ``impl``'s relative logits (bench.flops.ACCOUNTINGS): per key, factorized, or none."""
    chosen = sasa_impls.get_impl(impl)
    return chosen.rel_accounting if chosen.supports_rel else "content_only"


def analytic_costs(case: Case) -> dict:
    """Forward MACs of the case's module at its shape (total under the impl's own accounting, and by
    component: per-pixel formulas of bench.flops times batch x res^2), softmax ops apart, analytic params."""
    pixels = case.batch * case.res * case.res
    c, k = case.channels, case.k
    if case.impl == CONV:
        macs = flops.conv_macs_per_pixel(c, c, k) * pixels
        return {"macs_analytic": macs, "macs_components": {"conv": macs}, "rel_accounting": None,
                "params_analytic": flops.conv_params(c, c, k)}
    per_pixel = flops.attention_macs_per_pixel(c, c, k)
    accounting = rel_accounting(case.impl)
    components = {name: n * pixels for name, n in per_pixel.items()}
    components["softmax_ops"] = flops.softmax_ops_per_pixel(k, case.heads) * pixels
    return {"macs_analytic": flops.attention_total_macs(per_pixel, accounting) * pixels, "macs_components": components,
            "rel_accounting": accounting, "params_analytic": flops.attention_params(c, c, k, relative=accounting != "content_only")}
