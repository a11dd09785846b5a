"""SASA2d per implementation beside the k x k conv baseline: time, peak memory, CUDA time and memory, MACs.

asv reads this file from the working tree but imports the package of the commit under test. Every
benchmark goes through the suite's measuring pipeline (bench.pipeline: build the case, gate it against the
float64 reference, one step), so it measures what `sasa-bench run` measures. What a commit cannot run is
skipped (NotImplementedError in setup is asv's skip), never failed: an implementation it lacks or that
cannot run here (Impl.supports: triton on CPUs, flex and natten backward on CPUs), and commits from before
the pipeline existed (their history stays in results/asv; run `sasa-bench` from those commits to extend it).
"""
from __future__ import annotations

import os
from typing import Callable

# TRITON_INTERPRET=1 (the tests' setting) would make the Triton kernel "available" on the CPU through the
# interpreter, whose timings mean nothing: asv times compiled kernels only.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import sasa_impls  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# One CPU thread: a history compares commits, and one thread is the setting least disturbed by whatever
# else runs on the machine (two threads on a busy two-core machine made a 50 us conv take 10 ms).
torch.set_num_threads(1)
HEADS = 4  # head dim 8 and 16: NATTEN runs head dims >= 8 only
BATCH = 1
# Every implementation the project has had, then any newer one; "reference" (the float64 oracle) is no contender.
KNOWN = ["conv", "unfold", "im2col_einsum", "memory_blocks", "triton", "flex", "natten", "native"]
IMPLS = KNOWN + sorted(set(sasa_impls.list_impls()) - set(KNOWN) - {"reference"})
GRID = [IMPLS, [3, 7], [32, 64], [16, 32]]  # k, channels, res: a quick run is minutes on 2 cores
GRID_NAMES = ["impl", "k", "channels", "res"]

_gated: set[tuple] = set()


def pipeline():
    """bench.pipeline and bench.schema of the commit under test (skip commits from before them)."""
    try:
        from bench import measure, pipeline as core, schema
        from bench.cases import attention_spec
    except ImportError as exc:
        raise NotImplementedError(f"bench.pipeline is not in this commit: {exc}") from exc
    return core, schema, measure, attention_spec


def layer_step(impl: str, k: int, channels: int, res: int, direction: str) -> Callable[[], None]:
    """One call of the layer (SASA2d, content-only for peers without relative logits, or the conv) on a
    random input, synchronised so wall-clock timers see the GPU's work. Correct before fast: the
    implementation passes the suite's gate first (an AssertionError fails the benchmark, which is what a
    wrong kernel deserves). The step runs once here, so flex, triton and native compile outside the timings."""
    core, schema, _, attention_spec = pipeline()
    if impl != schema.CONV and impl not in sasa_impls.list_impls():
        raise NotImplementedError(f"{impl}: not in this commit")
    relative = impl != schema.CONV and sasa_impls.get_impl(impl).supports_rel
    case = schema.Case(impl, k, channels, HEADS, res, BATCH, "float32", DEVICE.type, direction, relative=relative)
    if impl != schema.CONV:
        ok, why = sasa_impls.get_impl(impl).supports(attention_spec(case))
        if not ok:
            raise NotImplementedError(f"{impl} {why}")
        key = (impl, direction)
        if key not in _gated:
            verdict = core.gate(impl, case.device, case.dtype, direction, relative)
            assert verdict["status"] == "ok", verdict["error"]
            _gated.add(key)
    run = core.step(core.build(case))

    def step() -> None:
        run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()
    return step


class _Layer:
    """Wall time and peak resident memory of one layer (subclasses pick the direction)."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300  # flex and triton compile on their first call
    rounds = 1
    repeat = (1, 10, 2.0)  # 1 to 10 samples, stopping after 2 s: the CPU is small and shared
    direction: str

    def setup(self, impl, k, channels, res):
        self.step = layer_step(impl, k, channels, res, self.direction)

    def time_layer(self, *_):
        self.step()

    def peakmem_layer(self, *_):
        self.step()


class Forward(_Layer):
    direction = "fwd"


class ForwardBackward(_Layer):
    direction = "fwd+bwd"


class _Cuda:
    """What asv cannot measure itself on a GPU: kernel time through the pipeline's timer (triton's do_bench,
    L2 flushed) and the caching allocator's peak above the inputs (skipped without a GPU)."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    direction: str

    def setup(self, impl, k, channels, res):
        if DEVICE.type != "cuda":
            raise NotImplementedError("no CUDA device")
        self.measure = pipeline()[2]
        self.step = layer_step(impl, k, channels, res, self.direction)

    def track_seconds(self, *_):
        return self.measure.time_call(self.step, DEVICE).median_ms / 1e3

    def track_peak_bytes(self, *_):
        return self.measure.peak_memory_bytes(self.step, DEVICE)

    track_seconds.unit = "seconds"
    track_peak_bytes.unit = "bytes"


class CudaForward(_Cuda):
    direction = "fwd"


class CudaForwardBackward(_Cuda):
    direction = "fwd+bwd"


class Macs:
    """Analytic forward MACs (bench.flops) of the layer on the benchmark's input, per accounting of the
    relative logits; "conv" is the k x k convolution. Flat by construction unless the formulas change."""

    params = [["conv", "content_only", "rel_factorized", "rel_per_key"], [3, 7], [32, 64], [16, 32]]
    param_names = ["accounting", "k", "channels", "res"]

    def setup(self, accounting, k, channels, res):
        try:
            from bench import flops
        except ImportError as exc:
            raise NotImplementedError(f"bench.flops is not in this commit: {exc}") from exc
        self.flops = flops

    def track_macs(self, accounting, k, channels, res):
        if accounting == "conv":
            per_pixel = self.flops.conv_macs_per_pixel(channels, channels, k)
        else:
            components = self.flops.attention_macs_per_pixel(channels, channels, k)
            per_pixel = self.flops.attention_total_macs(components, accounting)
        return BATCH * res * res * per_pixel

    track_macs.unit = "MACs"
