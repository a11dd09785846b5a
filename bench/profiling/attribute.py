"""Stage times and allocations of a profiled step, from torch.profiler's events.

Every event inside a ``sasa-bench::step`` range is given one stage, and its *self* time (its duration less its
children's) is added to that stage in that step, so within each step the stages partition its time exactly.
Stage times and the total are means over the faster half of the steps (a step that another process
preempted is left out), so they still add up exactly. An event's stage is, in order:

1. its innermost ``sasa::<stage>`` region (sasa_impls.regions; the region's own self time is the Python
   between its ops);
2. for backward work, the stage of the forward op that recorded the autograd node (the profiler gives both
   the same ``sequence_nr``), so a backward is charged to the stage whose forward created it;
3. else, by the ATen name of the op that called it (unmarked ops: SASA2d's 1x1 convolutions are
   ``projections``, reshapes/permutes/copies/casts/pads are ``layout``): method "aten op names";
4. else it is opaque: work inside a fused kernel (``OPAQUE``), which bench.profiling.ablation splits. The
   step range's own self time (Python between the top-level calls) is ``other``.

Memory: ``profile_memory``'s allocations, the positive self allocations of each op summed (frees are not
subtracted: what the stage allocates, not what it keeps).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from sasa_impls.regions import PREFIX

STEP = "sasa-bench::step"  # the range around each profiled call
OPAQUE = "(fused)"  # time inside ops no region or name explains: a fused kernel
BACKWARD = "autograd::engine::evaluate_function: "
# Unmarked ops recognised by name: forward ATen ops and autograd nodes, lower case, without "aten::" and "Backward<n>".
PROJECTION_OPS = {"conv2d", "convolution", "_convolution", "mkldnn_convolution", "thnn_conv2d", "_slow_conv2d_forward",
                  "cudnn_convolution"}
LAYOUT_OPS = {"permute", "reshape", "view", "_unsafe_view", "unsafeview", "contiguous", "clone", "copy_", "to", "_to_copy",
              "tocopy", "transpose", "t", "pad", "constant_pad_nd", "constantpadnd", "unfold", "as_strided", "asstrided",
              "expand", "cat", "flatten", "unflatten", "select", "slice", "narrow", "squeeze", "unsqueeze", "alias"}

@dataclass
class Attribution:
    """Per profiled step: ms and allocated bytes by stage (OPAQUE included), how each stage was found, the
    step's wall time, and whether any ``sasa::`` region was recorded."""

    ms: dict[str, float]
    alloc_bytes: dict[str, int]
    methods: dict[str, set[str]]
    total_ms: float
    regions: bool
    calls: int = 1  # the steps the times average over
    names: dict[str, set[str]] = field(default_factory=dict)  # top-level op names per stage (for messages)


def by_name(name: str, impl_is_conv: bool) -> str | None:
    """The stage of an unmarked op from its name (forward op or autograd node), None when unknown."""
    base = re.sub(r"backward\d*$", "", name.lower().removeprefix(BACKWARD.lower()).removeprefix("aten::"))
    if base in PROJECTION_OPS:
        return "conv" if impl_is_conv else "projections"
    return "layout" if base in LAYOUT_OPS else None

def _chain(event) -> tuple[list, object]:
    """(``event`` and its ancestors below the step range, innermost first; that step range), ([], None) when
    the event is not inside a step."""
    chain = []
    while event is not None and event.name != STEP:
        chain.append(event)
        event = event.cpu_parent
    return (chain, event) if event is not None else ([], None)


def _time_us(event, device: str) -> float:
    if device.startswith("cuda"):
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)
    return float(event.self_cpu_time_total)


def _alloc(event, device: str) -> int:
    if device.startswith("cuda"):
        used = getattr(event, "self_device_memory_usage", None)
        used = getattr(event, "self_cuda_memory_usage", 0) if used is None else used
    else:
        used = event.self_cpu_memory_usage
    return max(int(used or 0), 0)


def attribute(events, device: str = "cpu", impl_is_conv: bool = False) -> Attribution:
    """Stages of the profiled steps (each inside a STEP range) from torch.profiler's ``events()``: the mean
    over the faster half of the steps (a step another process preempted is left out) of each stage's time
    and of the step's, and the mean allocations over all steps."""
    events = [e for e in events if e.name != "[memory]"]
    steps = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    if not steps:
        raise ValueError("events: no sasa-bench::step range was recorded")
    index = {id(s): i for i, s in enumerate(steps)}
    per_step: list[dict[str, float]] = [defaultdict(float) for _ in steps]
    alloc: dict[str, int] = defaultdict(int)
    methods: dict[str, set[str]] = defaultdict(set)
    names: dict[str, set[str]] = defaultdict(set)
    forward_stage: dict[int, tuple[str, str]] = {}  # sequence_nr -> (stage, method) of its forward op
    regions = False
    for event in sorted(events, key=lambda e: e.time_range.start):
        if event.name == STEP:
            chain, step, found = [], event, ("other", "profiler: step overhead")
        else:
            chain, step = _chain(event)
            if step is None:
                continue
            found = _stage(chain, forward_stage, impl_is_conv)
            regions = regions or found[1] == "regions"
            if event.sequence_nr >= 0 and not any(e.name.startswith(BACKWARD) for e in chain):
                forward_stage.setdefault(event.sequence_nr, found)
        stage, method = found
        per_step[index[id(step)]][stage] += _time_us(event, device) / 1e3
        alloc[stage] += _alloc(event, device) // len(steps)
        methods[stage].add(method)
        if chain:
            names[stage].add(chain[-1].name)
    kept = sorted(range(len(steps)), key=lambda i: steps[i].time_range.elapsed_us())[:math.ceil(len(steps) / 2)]
    ms = {stage: sum(per_step[i].get(stage, 0.0) for i in kept) / len(kept) for stage in methods}
    total_ms = sum(steps[i].time_range.elapsed_us() for i in kept) / 1e3 / len(kept)
    return Attribution(ms, dict(alloc), dict(methods), total_ms, regions, len(kept), dict(names))


def _stage(chain: list, forward_stage: dict[int, tuple[str, str]], impl_is_conv: bool) -> tuple[str, str]:
    """(stage, method) of the innermost event of ``chain`` (see the module docstring for the order)."""
    for event in chain:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX):], "regions"
    node = next((e for e in chain if e.name.startswith(BACKWARD)), None)
    if node is not None:
        if node.sequence_nr in forward_stage:
            return forward_stage[node.sequence_nr]
        named = by_name(node.name, impl_is_conv)
        return (named, "aten op names") if named else (OPAQUE, "opaque")
    named = by_name(chain[-1].name, impl_is_conv)
    return (named, "aten op names") if named else (OPAQUE, "opaque")
