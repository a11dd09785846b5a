"""fvcore's counted FLOPs for a module, with handles for the ops that carry attention's work elsewhere.

fvcore traces the module (torch.jit.trace) and counts, per aten op, one multiply-accumulate as one
flop; ops without a handle are skipped and listed in ``unsupported_ops()``. Out of the box it counts
matmul/bmm/einsum/linear/conv. The implementations that do their multiply-accumulates as an elementwise
product followed by a reduction (unfold: ``(q * k_window).sum(-1)``) would then count as zero, so the
handles below are registered:

- ``aten::mul``: one flop per output element (the multiply of a multiply-and-sum is one MAC);
- ``aten::sum``: zero (its adds are the accumulate half of those MACs, already counted by ``mul``).

Everything else stays uncounted and is returned with its number of calls (softmax, exp, masking,
padding, gathers, and custom kernels such as Triton's, which a trace sees as opaque calls).
"""
from __future__ import annotations

import logging
import traceback
import warnings
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn


def _output_elements(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    return prod(get_shape(outputs[0]) or [1])


def _no_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


# aten op -> fvcore handle: the ops fvcore skips but that carry an implementation's MACs (see module doc)
EXTRA_HANDLES = {
    "aten::mul": _output_elements,
    "aten::mul_": _output_elements,
    "aten::sum": _no_flops,
}


@dataclass(frozen=True)
class FlopCount:
    """fvcore's total (MACs, its "flops"), the same split by op, and the uncounted ops with call counts."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)


def analyse(module: nn.Module, inputs: tuple) -> FlopCount:
    """Trace ``module(*inputs)`` once with fvcore (and :data:`EXTRA_HANDLES`) and count."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # fvcore's import and the tracer warn about deprecated torch.jit APIs
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, inputs).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = {op: int(n) for op, n in analysis.by_operator().items()}
        uncounted = {op: int(n) for op, n in analysis.unsupported_ops().items()}
    return FlopCount(total=int(analysis.total()), by_op=by_op, uncounted=uncounted)


# Code fvcore's tracer (torch.jit.trace) cannot follow, found by where the failure was raised: file
# fragment -> what it is, in words.
UNTRACEABLE_CODE = (
    ("/natten/", "NATTEN, which checks its input sizes as Python ints where a trace gives tensors"),
    ("torch/nn/attention/flex_attention", "FlexAttention, whose block mask is built with torch.vmap and whose kernel "
                                          "is compiled (torch.compile)"),
    ("torch/_dynamo", "compiled code (torch.compile)"),
    ("torch/_functorch", "torch.vmap"),
)


def trace_failure(error: BaseException) -> str:
    """Why fvcore could not count a module, in words: what its tracer could not follow (never the error's text)."""
    if isinstance(error, ImportError) and (error.name or "").split(".")[0] == "fvcore":
        return "not counted: fvcore is not installed"
    frames = [frame.filename.replace("\\", "/") for frame in traceback.extract_tb(error.__traceback__)]
    for fragment, words in UNTRACEABLE_CODE:
        if any(fragment in frame for frame in frames):
            return f"not countable: fvcore traces the module with torch.jit.trace, which cannot follow {words}"
    return "not countable: fvcore could not trace this module with torch.jit.trace"


def count_flops(module: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """fvcore's flops (= MACs) of ``module(*inputs)`` and the uncounted op names with their counts."""
    counted = analyse(module, inputs)
    return counted.total, counted.uncounted
