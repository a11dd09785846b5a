"""Stages of a fused kernel by ablation: the same op timed with a stage left out, since regions cannot see
inside one call.

Variants of the case's bare op (same shape, direction, options; un-profiled), timed interleaved in rounds
(bench.interleave.time_rounds), each variant's median over the rounds:
- ``relative``: the op with relative logits minus the op content-only;
- ``softmax``: the op minus the op built without the softmax's exp (the native CPU kernel's no-exp
  profiling build, sasa_impls.impls._native_build.cpu_variant): the exp only, the running max and
  rescaling stay in the other stages; where no such build exists the softmax is not separated;
- ``other``: the op at k = 1 (the fixed cost of a call: launch, allocation, loading q and storing y);
- ``logits`` and ``aggregate``: what remains (the core), split equally: q . k and a . v have the same MACs
  (k^2 d each) and no variant separates them.
Differences below zero (noise) count as zero; when the parts exceed the whole they are scaled to it.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import torch

import sasa_impls

from .. import pipeline
from ..interleave import InterleaveSettings, time_rounds
from ..schema import Case
from ..worker import message

CORE_SPLIT = "split equally between logits and aggregate (the same MACs)"
ROUNDS = InterleaveSettings(rounds=15, block_s=0.03)  # the variants' interleaved timing


@dataclasses.dataclass
class Ablation:
    """Fractions of the op's time by stage (they sum to 1), how each was measured, the variants' times."""

    fractions: dict[str, float]
    methods: dict[str, str]
    variants_ms: dict[str, float | str]  # variant -> median ms, or why it could not run


def ablate(case: Case, rounds: InterleaveSettings = ROUNDS) -> Ablation:
    """Time the op variants of ``case`` interleaved in ``rounds`` (bench.interleave.time_rounds: drift between
    variants cancels) and turn the differences of their median times into stage fractions (module docstring)."""
    op = dataclasses.replace(case, level="op")
    variants: dict[str, Case] = {"full": op}
    if case.relative and sasa_impls.get_impl(case.impl).supports_rel:
        variants["content_only"] = dataclasses.replace(op, relative=False)
    variants["no_exp"] = op
    variants["k1"] = dataclasses.replace(op, k=1)
    fns: dict[str, Callable[[], object]] = {}
    times: dict[str, float | str] = {}
    for name, variant in variants.items():
        try:
            fn = pipeline.step(pipeline.build(variant))
            if name == "no_exp":
                fn = _in_no_exp_build(case, fn)
            fn()
            fns[name] = fn
        except Exception as error:  # a variant the impl cannot run leaves its stage unseparated
            times[name] = message(error)
    sync = torch.cuda.synchronize if case.device.startswith("cuda") else (lambda: None)
    for name, per_round in zip(fns, time_rounds(list(fns.values()), rounds, sync)):
        times[name] = statistics.median(per_round) * 1e3
    return compose(times)


def _in_no_exp_build(case: Case, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the native CPU kernel's no-exp profiling build; NotImplementedError where there is none."""
    if case.impl != "native" or not case.device.startswith("cpu"):
        raise NotImplementedError(f"no no-exp build of {case.impl} on {case.device}")
    from sasa_impls.impls._native_build import cpu_variant

    def no_exp() -> object:
        with cpu_variant("no_exp"):
            return fn()
    return no_exp


def compose(times: dict[str, float | str]) -> Ablation:
    """Stage fractions from the variants' times (``full`` must be a number)."""
    full = times["full"]
    if not isinstance(full, float):
        raise RuntimeError(f"ablation: the op itself failed: {full}")

    def drop(name: str) -> float | None:
        value = times.get(name)
        return max(full - value, 0.0) if isinstance(value, float) else None

    parts: dict[str, float] = {}
    methods: dict[str, str] = {}
    relative = drop("content_only")
    if relative is not None:
        parts["relative"], methods["relative"] = relative, "ablation: the op minus the op content-only"
    softmax = drop("no_exp")
    if softmax is not None:
        parts["softmax"], methods["softmax"] = softmax, "ablation: the op minus its no-exp build (the exp only)"
    if isinstance(times.get("k1"), float):
        parts["other"], methods["other"] = min(times["k1"], full), "ablation: the op at k = 1 (fixed cost of a call)"
    core = max(full - sum(parts.values()), 0.0)
    rest = "ablation: the remainder" + ("" if softmax is not None else " (softmax included: no no-exp build)")
    for name in ("logits", "aggregate"):
        parts[name], methods[name] = core / 2, f"{rest}, {CORE_SPLIT}"
    total = sum(parts.values()) or 1.0
    return Ablation({name: value / total for name, value in parts.items()}, methods, times)
