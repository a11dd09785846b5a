"""The result row: every field a measurement writes, with its type and unit, in one place.

Torch-free on purpose: the runner writes rows with it, the report and `compare` read rows with it, the
tests check rows against it, and none of them should need torch to know what a row is. A row on disk is
one JSON object per line (bench/store.py); :func:`normalize` turns what was read (including rows written
before a field existed) into a dict with every field of :class:`Row`, or says why it cannot.

    python -m bench.schema        # prints the fields, their types and units (the README points here)
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

CONV = "conv"  # the baseline: nn.Conv2d(C, C, k, padding=k // 2, bias=False), measured beside the attention
DIRECTIONS = ("fwd", "fwd+bwd")
# forward-pass equivalents of one call: a backward costs about two forwards (achieved GFLOP/s uses it)
DIRECTION_PASSES = {"fwd": 1, "fwd+bwd": 3}
DTYPES = ("float16", "bfloat16", "float32", "float64")
# "layer": SASA2d (projections + op) or the conv module on (B, C, H, W); "op": the bare op on q, k, v (B, heads, H, W, D)
LEVELS = ("layer", "op")


class Status(str, enum.Enum):
    """What happened to a case. Only ``ok`` rows carry a latency."""

    OK = "ok"
    OOM = "oom"  # ran out of memory (allocation failure, --memory-limit, or killed by the OOM killer)
    ERROR = "error"  # raised, crashed, or its process or node died
    TIMEOUT = "timeout"  # no result within --timeout seconds
    UNSUPPORTED = "unsupported"  # the implementation declares it cannot run this case (Impl.supports)
    INCORRECT = "incorrect"  # its output or a gradient differs from the float64 reference: never timed

    def __str__(self) -> str:
        return self.value


# Statuses that `--resume` keeps; error and timeout may be transient and are measured again.
FINAL_STATUSES = frozenset({Status.OK, Status.OOM, Status.UNSUPPORTED, Status.INCORRECT})


@dataclass(frozen=True)
class Case:
    """One measurement: which implementation, at which shape, dtype, device, direction and level.

    ``relative``: with the relative-position logits (content-only when False; the conv has none).
    ``impl_options``: the implementation's options as canonical text, "" or e.g. "block=8" (Impl.options).
    """

    impl: str
    k: int
    channels: int
    heads: int
    res: int
    batch: int
    dtype: str
    device: str
    direction: str
    level: str = "layer"
    relative: bool = True
    impl_options: str = ""

    def key(self) -> tuple:
        """The identity of the case in result rows (resume, reports and compare match on it)."""
        return dataclasses.astuple(self)

    def label(self) -> str:
        """Short human-readable description for progress lines."""
        extra = "" if self.level == "layer" else f" {self.level}"
        extra += "" if self.relative or self.impl == CONV else " content-only"
        extra += f" [{self.impl_options}]" if self.impl_options else ""
        return (f"{self.impl} k={self.k} C={self.channels} h={self.heads} {self.res}x{self.res} "
                f"B={self.batch} {self.dtype} {self.device} {self.direction}{extra}")


CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))


def _unit(text: str, unit: str = "") -> Any:
    return field(default=None, metadata={"doc": text, "unit": unit})


# The fields below are one declaration each, alike by design (name, type, doc, unit): `duplicates` lists them
# as a pair of same-shape runs; that is the price of one flat, greppable list of row fields.
@dataclass(frozen=True, kw_only=True)
class Row(Case):
    """A result row: the case, what was measured, and the environment it was measured in."""

    repeat: int = _unit("pass index of --repeat (0..N-1)")
    status: str = _unit("ok | oom | error | timeout | unsupported | incorrect (Status)")
    error: Optional[str] = _unit("why the case has no measurement (one line)")
    warnings: Optional[list] = _unit("distinct warnings the measured libraries printed while measuring")
    # latency
    latency_ms: Optional[float] = _unit("median time of one call", "ms")
    latency_iqr_ms: Optional[float] = _unit("inter-quartile range of the call times", "ms")
    reps: Optional[int] = _unit("timed calls")
    latency_confident: Optional[bool] = _unit("the timer met its confidence (IQR / median below --confidence)")
    timer: Optional[str] = _unit("what timed it: torch.utils.benchmark adaptive_autorange, triton do_bench, cuda events")
    gflops: Optional[float] = _unit("achieved: 2 x macs_analytic x passes / latency (passes: 1 fwd, 3 fwd+bwd)", "GFLOP/s")
    peak_gflops: Optional[float] = _unit("the CPU's peak when the row was measured (<machine>/peak.json at the row's "
                                         "dtype and threads; GPUs: None, their published peak is used)", "GFLOP/s")
    peak_kind: Optional[str] = _unit("what that peak is: fma (physical FMA throughput) | matmul (best GEMM)")
    other_load: Optional[float] = _unit("CPU: share (0..1) of the machine's CPU time other processes used while the "
                                        "case was timed (/proc/stat busy time minus the worker's own; bench/contention.py)")
    contended: Optional[bool] = _unit("CPU: other_load was above 0.25 of a CPU per timed thread "
                                      "(bench.contention.CONTENDED_SHARE): the latency includes other processes' load")
    # interleaved ratio (bench/interleave.py): this case timed in alternating rounds with a baseline case
    ratio_baseline: Optional[str] = _unit("the case the ratio divides by (Case.label), timed interleaved with this one")
    latency_ratio: Optional[float] = _unit("median over rounds of this case's time / the baseline's in the same round")
    latency_ratio_low: Optional[float] = _unit("lower end of the ratio's bootstrap 95% interval")
    latency_ratio_high: Optional[float] = _unit("upper end of the ratio's bootstrap 95% interval")
    rounds: Optional[int] = _unit("interleaved rounds timed (each a block of calls of every case, in random order)")
    # memory
    peak_mem_bytes: Optional[int] = _unit("peak memory of one call beyond its inputs and weights "
                                          "(CUDA allocator peak; CPU: growth of the process's peak RSS)", "bytes")
    # costs
    params: Optional[int] = _unit("parameters of the measured module, counted")
    params_analytic: Optional[int] = _unit("parameters by formula (bench/flops.py)")
    macs_analytic: Optional[int] = _unit("forward multiply-accumulates by formula, under rel_accounting", "MAC")
    rel_accounting: Optional[str] = _unit("how the relative logits are counted: rel_per_key | rel_factorized | content_only")
    macs_components: Optional[dict] = _unit("forward MACs by component (projections, qk, av, rel_per_key, "
                                            "rel_factorized; softmax_ops apart; conv)", "MAC")
    flops_fvcore: Optional[int] = _unit("fvcore's count of the forward (one MAC counted as one flop)", "MAC")
    fvcore_by_op: Optional[dict] = _unit("fvcore's count by aten op", "MAC")
    fvcore_uncounted: Optional[dict] = _unit("ops fvcore skipped, with call counts")
    fvcore_error: Optional[str] = _unit("why fvcore could not count (e.g. compiled code cannot be traced)")
    # correctness gate
    gate_max_error: Optional[float] = _unit("worst max|impl - reference| / max|reference| of the gate (output and gradients)")
    gate_tolerance: Optional[float] = _unit("the gate's tolerance for the dtype")
    borders: Optional[str] = _unit("the implementation's border semantics: masked | clamped")
    # profile rows (`sasa-bench profile`, bench/profiling/; None in the rows of `run`)
    profiler: Optional[str] = _unit("what profiled the row: torch.profiler (set on every profile row, failed ones too: "
                                    "how readers tell profile rows from run rows)")
    profile_total_ms: Optional[float] = _unit("mean time of one step under the profiler (each step a profiler range)", "ms")
    unprofiled_ms: Optional[float] = _unit("median time of the same step without the profiler, same process, same run", "ms")
    profile_calls: Optional[int] = _unit("profiled steps profile_total_ms and the stages average over (the faster "
                                         "half of those profiled: a preempted step is left out)")
    stages: Optional[dict] = _unit("stage (projections, logits, relative, softmax, aggregate, layout, other; conv: conv) -> "
                                   "{ms (per step), share (of profile_total_ms), method (how it was found: regions, aten op "
                                   "names, ablation ...), macs (analytic, x3 for fwd+bwd), gflops (2 macs / ms), alloc_bytes "
                                   "(allocated by its ops per step)}", "ms, MAC, GFLOP/s, bytes")
    profile_residual: Optional[str] = _unit("where the stages miss profile_total_ms, or it misses unprofiled_ms, by more "
                                            "than 15%: by how much (None when both agree)")
    ablation_ms: Optional[dict] = _unit("fused kernels: the op variants timed for the ablation (full, content_only, "
                                        "no_exp, k1) -> median ms, or why the variant could not run", "ms")
    trace: Optional[str] = _unit("the Chrome/Perfetto trace of the profiled steps (--trace DIR)")
    memory_snapshot: Optional[str] = _unit("CUDA: the HTML view of the caching allocator's history (--memory-snapshot DIR)")
    counters: Optional[dict] = _unit("hardware counters per step: perf stat (cycles, instructions, FP, cache) on CPUs "
                                     "with a PMU; Nsight Compute metrics with --ncu on GPUs")
    # where and when
    machine: Optional[str] = _unit("the results folder of the machine that measured (GPU name, or CPU model and cores)")
    node: Optional[str] = _unit("host name of the machine that measured")
    run_id: Optional[str] = _unit("one invocation of the runner")
    suite: Optional[str] = _unit("the preset, if one was run")
    timestamp: Optional[str] = _unit("UTC time the row was written, ISO 8601")
    # environment (bench/env.py)
    commit: Optional[str] = _unit("git commit of the code")
    dirty: Optional[bool] = _unit("code differs from the commit (results/, reports/ and Markdown files ignored)")
    python: Optional[str] = _unit("Python version")
    torch: Optional[str] = _unit("torch version")
    cuda: Optional[str] = _unit("CUDA version torch was built with")
    triton: Optional[str] = _unit("triton version")
    natten: Optional[str] = _unit("natten version")
    fvcore: Optional[str] = _unit("fvcore version")
    cpu: Optional[str] = _unit("CPU model")
    cpu_count: Optional[int] = _unit("logical CPUs of the machine")
    cpu_vendor: Optional[str] = _unit("CPU vendor: intel | amd | arm (None: row written before it was recorded)")
    cpu_family: Optional[int] = _unit("CPU family number (/proc/cpuinfo; with cpu_model_id: the microarchitecture)")
    cpu_model_id: Optional[int] = _unit("CPU model number (/proc/cpuinfo)")
    cpu_isa: Optional[str] = _unit("widest vector ISA of the CPU: avx512 | avx2 | avx | sve | neon | sse4")
    native_isa: Optional[str] = _unit("ISA the native kernel was built for (-march=native: the CPU's), on native rows")
    threads: Optional[int] = _unit("torch CPU threads used for the case")
    gpu: Optional[str] = _unit("GPU name (nvidia-ml-py), before the case")
    gpu_driver: Optional[str] = _unit("NVIDIA driver version")
    gpu_clocks: Optional[dict] = _unit("SM / memory clocks and SM max clock", "MHz")
    gpu_power_w: Optional[float] = _unit("board power draw", "W")
    gpu_temp_c: Optional[float] = _unit("GPU temperature", "C")
    gpu_memory: Optional[dict] = _unit("used and total device memory", "bytes")
    gpu_after: Optional[dict] = _unit("the same GPU readings after the case (throttling shows here)")


FIELDS = tuple(f.name for f in dataclasses.fields(Row))
# Fields holding a number (int or float; None where unmeasured): a row with text there is not a row.
NUMERIC_FIELDS = tuple(f.name for f in dataclasses.fields(Row) if f.type in ("int", "float", "Optional[int]", "Optional[float]"))


def achieved_gflops(macs: float | None, latency_ms: float | None, direction: str | None) -> float | None:
    """2 x MACs x passes / latency in GFLOP/s (passes: 1 for fwd, 3 for fwd+bwd); None when unknown."""
    passes = DIRECTION_PASSES.get(direction)
    if macs is None or not latency_ms or passes is None:
        return None
    return 2.0 * macs * passes / (latency_ms * 1e-3) / 1e9


def normalize(raw: object) -> dict:
    """A row read from disk as a dict holding every field of :class:`Row`; ValueError saying why not.

    Rows written before a field existed get its value: ``level`` "layer", ``relative`` from their
    ``rel_accounting``, ``impl_options`` "", ``gflops`` from their latency. Rows written before the CPU's
    identity was recorded get None for ``cpu_vendor``, ``cpu_family``, ``cpu_model_id``, ``cpu_isa`` and
    ``native_isa`` and keep their ``machine`` (the folder they are in, e.g. ``amd-epyc-2c``, which may mix
    microarchitectures); rows not measured interleaved have no ``latency_ratio``. Unknown keys are kept.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    missing = [name for name in CASE_FIELDS[:9] if name not in raw]
    if missing:
        raise ValueError(f"not a result row: no {', '.join(missing)}")
    for name in NUMERIC_FIELDS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name}: expected a number, got {value!r}")
    row = {name: None for name in FIELDS} | raw
    if raw.get("level") is None:
        row["level"] = "layer"
    if raw.get("relative") is None:
        row["relative"] = raw["impl"] != CONV and raw.get("rel_accounting") != "content_only"
    if raw.get("impl_options") is None:
        row["impl_options"] = ""
    if raw.get("gflops") is None and row.get("status") == Status.OK:
        row["gflops"] = achieved_gflops(row.get("macs_analytic"), row.get("latency_ms"), row.get("direction"))
    return row


def case_key(row: dict) -> tuple:
    """The key of the case a (normalized) row belongs to: equal to ``Case.key()`` of that case."""
    return tuple(row[name] for name in CASE_FIELDS)


def series(row: dict) -> str:
    """How a row's implementation variant is labelled (a report column, a plot line, a table row):
    "unfold", "triton (content-only)", "memory_blocks [block=8]", so variants never share a cell."""
    label = row["impl"]
    if row["impl"] != CONV and not row.get("relative"):
        label += " (content-only)"
    return label + (f" [{row['impl_options']}]" if row.get("impl_options") else "")


def describe() -> str:
    """The fields as text: name, type, unit, meaning."""
    lines = []
    for f in dataclasses.fields(Row):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        unit = f.metadata.get("unit", "")
        lines.append(f"{f.name:<18} {kind.replace('Optional[', '').rstrip(']'):<6} {unit:<8} {f.metadata.get('doc', 'the case')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
