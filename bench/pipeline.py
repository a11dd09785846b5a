"""The one measuring pipeline: a case becomes a subject (the module or the bare op on its inputs), the
subject a step (one call of the measured work), the step is checked against the float64 reference,
timed, its peak memory measured and its FLOPs counted, and each gives fields of the result row.

Every entry point goes through here: the runner's workers (bench/worker.py), the asv benchmarks, the
pytest-benchmark micro-benchmarks, ``sasa-bench models`` and the GPU benchmark script. What it keeps
that no library does: the oracle gate (correct before fast), CPU peak RSS, and (in bench/runner.py)
one subprocess per case.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import sasa_impls
from sasa_impls.functional import rel_shapes
from sasa_impls.impls.reference import reference_attention
from sasa_impls.models import set_impl

from . import fvcore_count, measure
from .schema import CONV, Case, Status

# Largest max|impl - reference| / max|reference| accepted, per dtype, for the output and every gradient.
# fp32 accumulation makes errors ~1e-6 in fp32; fp16/bf16 are dominated by rounding the output (2^-11,
# 2^-8) and the gradients through the softmax.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# The gate's inputs, (batch, heads, H, W, D, k): small, non-square (a transposed index shows), k < H, W so
# clamped windows exist too, borders on every side.
GATE_SHAPES = ((2, 2, 9, 11, 8, 5),)
GRAD_NAMES = ("q", "k", "v", "rel_row", "rel_col")


@dataclass
class Subject:
    """The measured work: ``forward(*inputs)`` (a module's call, the bare op, or the conv), the tensors
    it takes, the module whose parameters also get gradients, the cotangent of the backward, and how to
    build its float64 twin computing the same function the reference way (:func:`reference_twin`)."""

    forward: Callable[..., torch.Tensor]
    inputs: list[Optional[torch.Tensor]]
    names: list[str]  # of the inputs, for error messages ("q", "grad_rel_row", "input", ...)
    direction: str
    module: Optional[nn.Module] = None
    cotangent: Optional[torch.Tensor] = None
    twin: Optional[Callable[[], "Subject"]] = field(default=None, repr=False)

    def leaves(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything that gets a gradient in fwd+bwd: the inputs, then the parameters."""
        named = [(n, t) for n, t in zip(self.names, self.inputs) if t is not None and t.is_floating_point()]
        return named + (list(self.module.named_parameters()) if self.module is not None else [])


def random_like(shape: Sequence[int], dtype: torch.dtype, device: str | torch.device, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) values drawn in float64 and rounded to ``dtype`` (so a float64 twin gets exactly them)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def op_subject(impl: str, shape: Sequence[int], kernel_size: int, dtype: str, device: str, direction: str,
               relative: bool = True, options: str = "", scale: float = 1.0, seed: int = 0) -> Subject:
    """The bare op of ``impl`` on random q, k, v of ``shape`` (B, heads, H, W, D) and, when ``relative``,
    random relative embeddings; its twin is the float64 reference under the impl's own borders."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, height, width, head_dim = shape
    shapes = [tuple(shape)] * 3 + (list(rel_shapes(heads, kernel_size, head_dim)) if relative else [])
    inputs = [random_like(s, getattr(torch, dtype), device, generator) for s in shapes] + ([] if relative else [None, None])
    chosen = sasa_impls.get_impl(impl)
    parsed = chosen.parse_options(options)

    def forward(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
        return sasa_impls.local_attention(*tensors, kernel_size, impl=impl, scale=scale, options=parsed)

    cotangent = random_like(shape, getattr(torch, dtype), device, generator) if direction == "fwd+bwd" else None

    def twin() -> Subject:
        def reference(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
            return reference_attention(*tensors, kernel_size, scale, borders=chosen.borders)
        return Subject(reference, [_float64(t) for t in inputs], list(GRAD_NAMES), direction, None, _float64(cotangent))

    return Subject(forward, inputs, list(GRAD_NAMES), direction, None, cotangent, twin)


def module_subject(module: nn.Module, x: torch.Tensor, direction: str, seed: int = 0) -> Subject:
    """``module(x)``; its twin is a float64 copy of the module with every attention layer on the reference."""
    cotangent = None
    if direction == "fwd+bwd":
        with torch.no_grad():
            out_shape = module(x).shape
        cotangent = random_like(out_shape, x.dtype, x.device, torch.Generator().manual_seed(seed + 1))

    def twin() -> Subject:
        reference = set_impl(copy.deepcopy(module).to("cpu", torch.float64), "reference")
        return Subject(reference, [_float64(x)], ["input"], direction, reference, _float64(cotangent))

    return Subject(module, [x], ["input"], direction, module, cotangent, twin)


def conv_op_subject(case: Case, seed: int = 0) -> Subject:
    """The conv baseline as a bare op: ``F.conv2d(x, weight)`` (the weight is an input)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    x = random_like((case.batch, case.channels, case.res, case.res), dtype, case.device, generator)
    weight = random_like((case.channels, case.channels, case.k, case.k), dtype, case.device, generator) * case.channels**-0.5

    def forward(inputs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inputs, w, padding=case.k // 2)

    cotangent = random_like(x.shape, dtype, case.device, generator) if case.direction == "fwd+bwd" else None

    def twin() -> Subject:
        return Subject(forward, [_float64(x), _float64(weight)], ["input", "weight"], case.direction, None, _float64(cotangent))

    return Subject(forward, [x, weight], ["input", "weight"], case.direction, None, cotangent, twin)


def build_module(case: Case) -> nn.Module:
    """The case's layer (seeded weights) on its device and dtype: SASA2d, or the conv baseline."""
    torch.manual_seed(0)
    if case.impl == CONV:
        module = nn.Conv2d(case.channels, case.channels, case.k, padding=case.k // 2, bias=False)
    else:
        module = sasa_impls.SASA2d(case.channels, case.channels, case.k, case.heads, impl=case.impl,
                                   relative=case.relative, options=case.impl_options or None)
    return module.to(case.device, getattr(torch, case.dtype))


def build(case: Case, seed: int = 0) -> Subject:
    """The subject of ``case`` at its level (see bench/cases.py)."""
    if case.level == "op":
        if case.impl == CONV:
            return conv_op_subject(case, seed)
        shape = (case.batch, case.heads, case.res, case.res, case.channels // case.heads)
        return op_subject(case.impl, shape, case.k, case.dtype, case.device, case.direction, case.relative,
                          case.impl_options, seed=seed)
    module = build_module(case)
    x = random_like((case.batch, case.channels, case.res, case.res), getattr(torch, case.dtype), case.device,
                    torch.Generator().manual_seed(seed))
    return module_subject(module, x, case.direction, seed)


def step(subject: Subject) -> Callable[[], Any]:
    """One call of the measured work: inference forward (no autograd graph), or forward and the
    gradients of the cotangent w.r.t. every input and parameter (nothing accumulates between calls)."""
    if subject.direction == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return subject.forward(*subject.inputs)
        return forward
    leaves = [tensor.requires_grad_(True) for _, tensor in subject.leaves()]
    return lambda: torch.autograd.grad(subject.forward(*subject.inputs), leaves, subject.cotangent)


def evaluate(subject: Subject) -> dict[str, torch.Tensor]:
    """The subject's output and, for fwd+bwd, the gradient of every leaf, by name."""
    if subject.direction == "fwd":
        return {"output": step(subject)()}
    leaves = [(name, tensor.requires_grad_(True)) for name, tensor in subject.leaves()]
    output = subject.forward(*subject.inputs)
    grads = torch.autograd.grad(output, [tensor for _, tensor in leaves], subject.cotangent)
    return {"output": output.detach(), **{f"grad_{name}": grad for (name, _), grad in zip(leaves, grads)}}


def normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when anything is NaN or infinite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual - expected).abs().max() / scale)
    return error if math.isfinite(error) else math.inf  # NaN must fail the gate, and sort as the worst


def errors_against_reference(subject: Subject) -> dict[str, float]:
    """Normalized error of the output and of every gradient against the subject's float64 twin."""
    ours, theirs = evaluate(subject), evaluate(subject.twin())
    return {name: normalized_error(ours[name], theirs[name]) for name in ours}


def gate(impl: str, device: str, dtype: str, direction: str, relative: bool = True, options: str = "",
         shapes: Sequence[Sequence[int]] = GATE_SHAPES, poison: bool = False) -> dict:
    """Compare ``impl`` with the float64 reference on small random inputs at each of ``shapes``
    ((B, heads, H, W, D, k)), forward and (fwd+bwd) every gradient, under the impl's own borders; with
    ``poison`` its output buffers are filled with NaN first (where it can: ``Impl.poisoned``).
    Returns the status (ok / incorrect), the worst error with what it was, and the tolerance."""
    chosen = sasa_impls.get_impl(impl)
    tolerance = TOLERANCE[dtype]
    worst_name, worst = "output", 0.0
    with chosen.poisoned() if poison and chosen.poisoned else contextlib.nullcontext():
        for *shape, kernel_size in shapes:
            subject = op_subject(impl, shape, kernel_size, dtype, device, direction, relative and chosen.supports_rel, options)
            errors = errors_against_reference(subject)
            name = max(errors, key=errors.get)
            if errors[name] >= worst:
                worst_name, worst = f"{name} at {'x'.join(map(str, shape))} k={kernel_size}", errors[name]
    ok = worst <= tolerance
    message = None if ok else (f"{worst_name} differs from the reference ({chosen.borders} borders): "
                               f"normalized error {worst:.3g} > {tolerance:g}")
    return {"status": Status.OK if ok else Status.INCORRECT, "error": message, "gate_max_error": worst,
            "gate_tolerance": tolerance}


def measure_memory(case: Case) -> dict:
    """Peak memory of one call (after a first call, so one-time work such as compilation is not counted).

    Its own task (process): on CPUs the measurement switches glibc to returning freed memory at once
    (bench.measure), which would slow the timed calls, and after many timed calls the heap no longer
    returns to one state (the peak then varied by 2x between identical runs).
    """
    fn = step(build(case))
    fn()
    return {"status": Status.OK, "peak_mem_bytes": measure.peak_memory_bytes(fn, case.device)}


def count_flops(subject: Subject) -> dict:
    """fvcore's count of the subject's forward, what it counted by op and what it skipped; a subject it
    cannot trace (compiled or custom code) gets the reason instead."""
    tensors = [t for t in subject.inputs if t is not None]
    module = subject.module if subject.module is not None else _Traced(subject)
    try:
        counted = fvcore_count.analyse(module, tuple(t.detach() for t in tensors))
    except Exception as error:  # a trace failure says why; the row keeps its measurements
        return {"flops_fvcore": None, "fvcore_by_op": None, "fvcore_uncounted": None,
                "fvcore_error": fvcore_count.trace_failure(error)}
    return {"flops_fvcore": counted.total, "fvcore_by_op": counted.by_op, "fvcore_uncounted": counted.uncounted,
            "fvcore_error": None}


class _Traced(nn.Module):
    """An op subject as a module for fvcore's tracer (its None inputs closed over)."""

    def __init__(self, subject: Subject):
        super().__init__()
        self.subject = subject

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        given = iter(tensors)
        return self.subject.forward(*(None if t is None else next(given) for t in self.subject.inputs))


def measure_time(case: Case, settings: measure.TimerSettings) -> dict:
    """Latency of the case's step (bench.measure.time_call), its parameters and fvcore's count."""
    subject = build(case)
    timing = measure.time_call(step(subject), case.device, settings)
    params = sum(p.numel() for p in subject.module.parameters()) if subject.module is not None else None
    return {"status": Status.OK, "error": None, "latency_ms": timing.median_ms, "latency_iqr_ms": timing.iqr_ms,
            "reps": timing.reps, "latency_confident": timing.confident, "timer": timing.timer, "params": params,
            "other_load": timing.other_load, "contended": timing.contended,
            **count_flops(subject)}


def _float64(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)
