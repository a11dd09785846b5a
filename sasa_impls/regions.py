"""Named stage regions for the profiler (``sasa-bench profile``, issue 19).

The unfused implementations and the layers mark their stages in the paper's terms with
``with stage("logits"): ...``. While a torch profiler records, each region is a
``torch.profiler.record_function`` range named ``sasa::<stage>`` that the profiler attributes time and
memory to; when no profiler runs, :func:`stage` returns one shared null context, so a region costs a
function call and a flag check (no profiler event, no allocation).

STAGES is the fixed list of stage names every profile row uses.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.autograd import profiler as _autograd_profiler

STAGES = ("projections", "logits", "relative", "softmax", "aggregate", "layout", "other")
PREFIX = "sasa::"
_NULL = contextlib.nullcontext()


def profiling() -> bool:
    """Whether a torch profiler is recording in this process now."""
    return bool(torch.autograd._profiler_enabled())


def stage(name: str) -> ContextManager:
    """The region of stage ``name`` (one of STAGES): a record_function range while profiling, else nothing."""
    if not torch.autograd._profiler_enabled():
        return _NULL
    if name not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {name!r}")
    return _autograd_profiler.record_function(PREFIX + name)


def kernel(name: str) -> ContextManager:
    """A range named ``name`` around a kernel called outside any torch op (an extension's function called
    directly) while profiling, else nothing: without one the profiler would not see its time at all. The
    name is no stage, so the profiler counts the time as a fused kernel's (bench.profiling.attribute)."""
    if not torch.autograd._profiler_enabled():
        return _NULL
    return _autograd_profiler.record_function(name)
