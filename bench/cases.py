"""Benchmark cases (bench.schema.Case) and the named presets (grids of cases) that ``sasa-bench run --suite`` measures.

A case measures, at level "layer", ``SASA2d(channels, channels, k, heads, impl=impl)`` (content-only when not
``relative``) or, for ``impl="conv"``, the baseline ``nn.Conv2d(channels, channels, k, padding=k // 2, bias=False)``,
on a random (batch, channels, res, res) input; at level "op", the bare op on random q, k, v of shape
(batch, heads, res, res, channels // heads) (the conv: ``F.conv2d`` on the same input as the layer). One
direction: "fwd" (inference) or "fwd+bwd". :func:`expand` is the one place a grid becomes cases.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

import sasa_impls
from sasa_impls.registry import AttentionSpec, options_text

from . import flops
from .schema import CONV, DIRECTIONS, Case

# Never timed by default: the reference is the O((HW)^2) oracle the correctness gate compares against.
NOT_TIMED_BY_DEFAULT = ("reference",)
# Preset batch per device type: one image on CPUs, a small batch on GPUs so they are not launch-bound.
PRESET_BATCH = {"cpu": 1, "cuda": 8}
# --relative: "auto" = with the relative logits where the implementation has them (content-only peers without)
RELATIVE_MODES = ("auto", "yes", "no")


def default_impls(device: str, dtype: str = "float32") -> list[str]:
    """Every registered implementation that can run on ``device``/``dtype`` (except the reference), plus conv."""
    names = []
    for name in sasa_impls.list_impls():
        if name in NOT_TIMED_BY_DEFAULT:
            continue
        if sasa_impls.get_impl(name).available(torch.device(device), getattr(torch, dtype))[0]:
            names.append(name)
    return names + [CONV]


def relative_choices(impl: str, modes: Iterable[str]) -> list[bool]:
    """The ``relative`` values to measure ``impl`` with for the --relative ``modes`` (the conv: False only)."""
    if impl == CONV:
        return [False]
    own = sasa_impls.get_impl(impl).supports_rel
    values = {"auto": own, "yes": True, "no": False}
    return list(dict.fromkeys(values[mode] for mode in modes))


def option_choices(impl: str, options: Mapping[str, Sequence[str]]) -> list[str]:
    """Every combination of the ``options`` values that ``impl`` takes, as canonical text ("" when none)."""
    if impl == CONV:
        return [""]
    taken = {key: values for key, values in options.items() if key in sasa_impls.get_impl(impl).options}
    combos = itertools.product(*taken.values())
    return [options_text(dict(zip(taken, combo))) for combo in combos]


def expand(impls: Iterable[str], ks: Iterable[int], pairs: Iterable[tuple[int, int]], heads: Iterable[int],
           batches: Iterable[int], dtypes: Iterable[str], devices: Iterable[str], directions: Iterable[str],
           levels: Iterable[str] = ("layer",), relative: Iterable[str] = ("auto",),
           options: Mapping[str, Sequence[str]] | None = None) -> list[Case]:
    """Every combination (``pairs`` are (res, channels)), ordered so one shape's implementations run side by
    side; per implementation, its ``relative`` choices and the combinations of the ``options`` it takes."""
    impls, options = list(impls), options or {}
    per_impl = {impl: [(rel, opts) for rel in relative_choices(impl, relative) for opts in option_choices(impl, options)]
                for impl in impls}
    cases = []
    for device, dtype, direction, level, k, (res, channels), h, batch in itertools.product(
            devices, dtypes, directions, levels, ks, pairs, heads, batches):
        cases.extend(Case(impl, k, channels, h, res, batch, dtype, device, direction, level, rel, opts)
                     for impl in impls for rel, opts in per_impl[impl])
    return cases


def grid(impls: Iterable[str], ks: Iterable[int], channels: Iterable[int], heads: Iterable[int], res: Iterable[int],
         batch: Iterable[int], dtypes: Iterable[str], devices: Iterable[str], directions: Iterable[str], **more) -> list[Case]:
    """Every combination of the shape lists (see :func:`expand` for ``levels``, ``relative``, ``options``)."""
    pairs = [(r, c) for c in channels for r in res]
    return expand(impls, ks, pairs, heads, batch, dtypes, devices, directions, **more)


@dataclass(frozen=True)
class Shapes:
    """A preset's shape grid: kernel sizes, channel counts, heads and resolutions (square images)."""

    ks: Sequence[int]
    channels: Sequence[int]
    heads: int
    res: Sequence[int]
    pairs: Sequence[tuple[int, int]] = ()  # (res, channels) pairs instead of the res x channels product

    def shape_pairs(self) -> list[tuple[int, int]]:
        """(res, channels) of every shape."""
        return list(self.pairs) or [(r, c) for c in self.channels for r in self.res]


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
           directions: Sequence[str] = DIRECTIONS, batch: int | None = None, **more) -> list[Case]:
    """The cases of preset ``name`` on ``device`` (default impls: :func:`default_impls`, plus conv; batch:
    PRESET_BATCH of the device type; see :func:`expand` for ``levels``, ``relative``, ``options``)."""
    if name not in PRESETS:
        raise ValueError(f"suite: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    shapes = PRESETS[name]
    impls = list(impls) if impls is not None else default_impls(device, dtypes[0])
    batch = batch or PRESET_BATCH.get(device.split(":")[0], 1)
    return expand(impls, shapes.ks, shapes.shape_pairs(), [shapes.heads], [batch], dtypes, [device], directions, **more)


def attention_spec(case: Case) -> AttentionSpec:
    """What the case asks of its implementation (the op inside the layer, for level "layer")."""
    return AttentionSpec(torch.device(case.device), getattr(torch, case.dtype), case.batch, case.heads, case.res,
                         case.res, case.channels // case.heads, case.k, case.relative, case.direction == "fwd+bwd")


def rel_accounting(case: Case) -> str | None:
    """How the case's relative logits are counted (bench.flops.ACCOUNTINGS); None for the conv."""
    if case.impl == CONV:
        return None
    return sasa_impls.get_impl(case.impl).rel_accounting if case.relative else "content_only"


def analytic_costs(case: Case) -> dict:
    """Forward MACs of the case at its shape (total under the impl's own accounting, and by component:
    per-pixel formulas of bench.flops times batch x res^2; the op level has no projections), softmax ops
    apart, and the analytic params of the measured module (None for the bare op)."""
    pixels = case.batch * case.res * case.res
    c, k = case.channels, case.k
    if case.impl == CONV:
        macs = flops.conv_macs_per_pixel(c, c, k) * pixels
        return {"macs_analytic": macs, "macs_components": {"conv": macs}, "rel_accounting": None,
                "params_analytic": flops.conv_params(c, c, k) if case.level == "layer" else None}
    per_pixel = flops.attention_macs_per_pixel(c, c, k)
    if case.level == "op":
        per_pixel["projections"] = 0
    accounting = rel_accounting(case)
    components = {name: n * pixels for name, n in per_pixel.items()}
    components["softmax_ops"] = flops.softmax_ops_per_pixel(k, case.heads) * pixels
    params = flops.attention_params(c, c, k, relative=case.relative) if case.level == "layer" else None
    return {"macs_analytic": flops.attention_total_macs(per_pixel, accounting) * pixels, "macs_components": components,
            "rel_accounting": accounting, "params_analytic": params}
