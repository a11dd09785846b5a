"""What runs inside a case's own subprocess: the correctness gate, or the measurement of one case.

The runner starts :func:`child_main` in a fresh process per task, so an exception, a crash, running out
of memory or time only ends that process; the result (or the failure, classified as a row ``status``)
goes back through a pipe.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import resource
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import sasa_impls
from sasa_impls.impls.reference import reference_attention

from . import fvcore_count, measure
from .cases import CONV, Case

# Correctness gate: max |impl - reference| / max |reference| (output, then every input gradient) must stay
# below this for the impl's dtype. fp32 accumulation makes errors ~1e-6 in fp32; fp16/bf16 are dominated
# by rounding the output (2^-11, 2^-8) and the gradients through the softmax.
GATE_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# Gate input (B, heads, H, W, D) and k: small, non-square, k < H, W so clamped windows exist too.
GATE_SHAPE, GATE_K = (2, 2, 9, 11, 8), 5
# Messages of allocation failures that torch raises as plain RuntimeErrors (CPU allocator, older CUDA).
OOM_MARKERS = ("can't allocate memory", "out of memory")
PLUGINS_ENV = "SASA_BENCH_PLUGINS"


def load_plugins(specs: list[str]) -> None:
    """Import extra modules that register implementations: dotted names or paths to .py files
    (the runner passes the ``SASA_BENCH_PLUGINS`` list, comma-separated, to every worker)."""
    for spec in specs:
        if not spec.endswith(".py"):
            importlib.import_module(spec)
            continue
        name = "sasa_bench_plugin_" + re.sub(r"\W", "_", str(Path(spec).resolve()))
        if name in sys.modules:
            continue
        module_spec = importlib.util.spec_from_file_location(name, spec)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)


def plugin_specs() -> list[str]:
    """The plugin modules named in ``SASA_BENCH_PLUGINS``."""
    return [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]


def normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when anything is NaN or infinite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual - expected).abs().max() / scale)
    return error if math.isfinite(error) else math.inf  # NaN must fail the gate, and sort as the worst


def gate(impl: str, device: str, dtype: str, direction: str) -> dict:
    """Compare ``impl`` with the float64 reference (under the impl's own border semantics, with relative
    logits when it has them) on a small random input rounded to ``dtype``; fwd+bwd also compares the
    gradients of every input. Returns status ok/incorrect, the worst normalized error and the tolerance."""
    chosen = sasa_impls.get_impl(impl)
    generator = torch.Generator().manual_seed(0)
    batch, heads, height, width, head_dim = GATE_SHAPE
    shapes = [GATE_SHAPE] * 3
    if chosen.supports_rel:
        shapes += [(heads, GATE_K, head_dim // 2), (heads, GATE_K, head_dim - head_dim // 2)]
    # the same values for both sides: drawn in fp64, rounded to dtype, the reference gets them back in fp64
    rounded = [torch.randn(s, generator=generator, dtype=torch.float64).to(getattr(torch, dtype)) for s in shapes]
    backward = direction == "fwd+bwd"
    ours = [t.to(device).requires_grad_(backward) for t in rounded]
    theirs = [t.double().requires_grad_(backward) for t in rounded]
    rel = (None, None) if not chosen.supports_rel else ()
    actual = sasa_impls.local_attention(*ours, *rel, GATE_K, impl=impl)
    expected = reference_attention(*theirs, *rel, GATE_K, borders=chosen.borders)
    errors = {"output": normalized_error(actual, expected)}
    if backward:
        cotangent = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
        got = torch.autograd.grad(actual, ours, cotangent.to(device, actual.dtype))
        want = torch.autograd.grad(expected, theirs, cotangent)
        names = ["q", "k", "v", "rel_row", "rel_col"]
        errors.update({f"grad_{n}": normalized_error(g, w) for n, g, w in zip(names, got, want)})
    worst = max(errors, key=errors.get)
    tolerance = GATE_TOLERANCE[dtype]
    ok = errors[worst] <= tolerance
    message = None if ok else f"{worst} differs from the reference ({chosen.borders} borders): normalized error {errors[worst]:.3g} > {tolerance:g}"
    return {"status": "ok" if ok else "incorrect", "error": message, "gate_max_error": errors[worst], "gate_tolerance": tolerance}


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The case's module (seeded random weights) and a random input, on its device and dtype."""
    torch.manual_seed(0)
    if case.impl == CONV:
        module = nn.Conv2d(case.channels, case.channels, case.k, padding=case.k // 2, bias=False)
    else:
        relative = sasa_impls.get_impl(case.impl).supports_rel  # content-only peers measure SASA2d without them
        module = sasa_impls.SASA2d(case.channels, case.channels, case.k, case.heads, impl=case.impl, relative=relative)
    dtype = getattr(torch, case.dtype)
    module = module.to(case.device, dtype)
    x = torch.randn(case.batch, case.channels, case.res, case.res, device=case.device, dtype=dtype)
    return module, x


def step(case: Case, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One call of the measured work: inference forward (no autograd graph), or forward and the
    gradients of a random cotangent w.r.t. the input and every parameter (nothing accumulates)."""
    if case.direction == "fwd":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return forward
    x = x.detach().requires_grad_(True)
    leaves = [x, *module.parameters()]
    with torch.no_grad():
        cotangent = torch.randn_like(module(x))
    return lambda: torch.autograd.grad(module(x), leaves, cotangent)


def measure_memory(case: Case) -> dict:
    """Peak memory of one call (after a first call, so one-time work such as compilation is not counted).

    A task of its own: on CPUs the measurement switches glibc to returning freed memory at once
    (bench.measure), which would slow the timed calls, and after many timed calls the heap no longer
    returns to one state (the peak then varied by 2x between identical runs).
    """
    module, x = build(case)
    fn = step(case, module, x)
    fn()
    return {"status": "ok", "peak_mem_bytes": measure.peak_memory_bytes(fn, case.device)}


def measure_time(case: Case, settings: dict) -> dict:
    """Latency (bench.measure.time_fn), params and fvcore's count of one case."""
    module, x = build(case)
    fn = step(case, module, x)
    timing = measure.time_fn(fn, case.device, warmup=settings["warmup"], reps=settings["reps"],
                             min_time_s=settings["min_time_s"], threads=settings["threads"])
    row = {"status": "ok", "error": None, "latency_ms": timing.median_ms, "latency_iqr_ms": timing.iqr_ms,
           "reps": timing.reps, "params": sum(p.numel() for p in module.parameters())}
    try:
        counted = fvcore_count.analyse(module, (x.detach(),))
        row.update(flops_fvcore=counted.total, fvcore_by_op=counted.by_op, fvcore_uncounted=counted.uncounted)
    except Exception as error:  # a module fvcore cannot trace (compiled or custom code): say so, keep the row
        row.update(flops_fvcore=None, fvcore_by_op=None, fvcore_uncounted={"<trace failed>": 1}, fvcore_error=_message(error))
    return row


TASKS: dict[str, Callable[[dict], dict]] = {
    "gate": lambda task: gate(task["impl"], task["device"], task["dtype"], task["direction"]),
    "memory": lambda task: measure_memory(Case(**task["case"])),
    "time": lambda task: measure_time(Case(**task["case"]), task["settings"]),
}


def _message(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def failure_status(error: BaseException) -> str:
    """Row status of an exception: ``oom`` for allocation failures, ``unsupported`` for what an
    implementation declares it cannot do (NotImplementedError, e.g. a backward it lacks), else ``error``."""
    if isinstance(error, NotImplementedError):
        return "unsupported"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return "oom"
    if isinstance(error, RuntimeError) and any(m in str(error).lower() for m in OOM_MARKERS):
        return "oom"
    return "error"


def limit_address_space(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes`` (RLIMIT_AS), so
    allocating more fails with an allocation error (tests use it to make a case run out of memory)."""
    current = measure.proc_status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, hard))


def child_main(task: dict, conn) -> None:
    """Subprocess entry: set up (threads, plugins, memory cap), run the task, send its result dict."""
    try:
        torch.set_num_threads(task["settings"]["threads"])
        load_plugins(task["plugins"])
        if task["settings"].get("memory_limit_bytes"):
            limit_address_space(task["settings"]["memory_limit_bytes"])
        result = TASKS[task["kind"]](task)
    except BaseException as error:  # every failure becomes the row's status; the sweep goes on
        result = {"status": failure_status(error), "error": _message(error)}
    conn.send(result)
    conn.close()
