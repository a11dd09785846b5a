"""SASA2d per implementation beside the k x k conv baseline: time, peak memory, CUDA time and memory, MACs.

asv reads this file from the working tree but imports the package of the commit under test, so it relies
only on what every commit has (SASA2d, get_impl, list_impls, reference_attention) and looks implementations
up by name at run time: one that a commit lacks, or that cannot run here, is skipped (NotImplementedError
in setup is asv's skip), never failed. Helpers that came later (bench.flops, bench.measure) skip the same way.
"""
from __future__ import annotations

import os
from typing import Callable

# TRITON_INTERPRET=1 (the tests' setting) would make the Triton kernel "available" on the CPU through the
# interpreter, whose timings mean nothing: asv times compiled kernels only.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sasa_impls  # noqa: E402
from sasa_impls.impls.reference import reference_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# One CPU thread: a history compares commits, and one thread is the setting least disturbed by whatever
# else runs on the machine (two threads on a busy two-core machine made a 50 us conv take 10 ms).
torch.set_num_threads(1)
HEADS = 4  # head dim 8 and 16: NATTEN runs head dims >= 8 only
BATCH = 1
# Every implementation the project has had, then any newer one; "reference" (the float64 oracle) is no contender.
KNOWN = ["conv", "unfold", "im2col_einsum", "memory_blocks", "triton", "flex", "natten"]
IMPLS = KNOWN + sorted(set(sasa_impls.list_impls()) - set(KNOWN) - {"reference"})
GRID = [IMPLS, [3, 7], [32, 64], [16, 32]]  # k, channels, res: a quick run is minutes on 2 cores
GRID_NAMES = ["impl", "k", "channels", "res"]

_checked: set[str] = set()


def check_against_reference(name: str) -> None:
    """Correct before fast: the implementation's float32 output on DEVICE matches the float64 oracle under
    its own border semantics, with the relative logits if it computes them (once per process; an
    AssertionError fails the benchmark, which is what a wrong kernel deserves)."""
    if name in _checked:
        return
    impl = sasa_impls.get_impl(name)
    gen = torch.Generator().manual_seed(0)
    heads, size, head_dim, k = 2, 9, 8, 5
    q, key, v = (torch.randn(1, heads, size, size, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    rel = (None, None)
    if impl.supports_rel:
        rel = tuple(torch.randn(heads, k, part, generator=gen, dtype=torch.float64) for part in (head_dim // 2, head_dim - head_dim // 2))
    inputs = (q, key, v, *rel)
    expected = reference_attention(*inputs, k, borders=impl.borders)
    got = sasa_impls.local_attention(*(t if t is None else t.to(DEVICE, torch.float32) for t in inputs), k, impl=name)
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    _checked.add(name)


def build_layer(impl: str, k: int, channels: int) -> nn.Module:
    """SASA2d(channels, channels, k, HEADS, impl=impl) or, for "conv", the k x k convolution it replaces."""
    if impl == "conv":
        return nn.Conv2d(channels, channels, k, padding=k // 2, bias=False)
    if impl not in sasa_impls.list_impls():
        raise NotImplementedError(f"{impl}: not in this commit")
    chosen = sasa_impls.get_impl(impl)
    ok, reason = chosen.available(DEVICE, torch.float32)
    if not ok:
        raise NotImplementedError(f"{impl}: {reason}")
    if chosen.supports_rel:
        return sasa_impls.SASA2d(channels, channels, k, HEADS, impl=impl)
    try:  # content-only peers (natten) measure the layer without relative embeddings
        return sasa_impls.SASA2d(channels, channels, k, HEADS, impl=impl, relative=False)
    except TypeError as exc:
        raise NotImplementedError(f"{impl}: this commit's SASA2d has no relative=False") from exc


def layer_step(impl: str, k: int, channels: int, res: int, direction: str) -> Callable[[], None]:
    """One call of the layer on a random (BATCH, channels, res, res) input (never zeros): "fwd" under
    no_grad, or "fwd+bwd" (forward, then the gradients of input and weights for a random cotangent),
    synchronised so that wall-clock timers see the GPU's work. The step runs once here: flex and triton
    compile outside the timings, and a NotImplementedError (e.g. no backward on this device) skips
    before the correctness check, which follows."""
    layer = build_layer(impl, k, channels).to(DEVICE)
    x = torch.randn(BATCH, channels, res, res, device=DEVICE, requires_grad=True)
    cotangent = torch.randn_like(x)
    leaves = [x, *layer.parameters()]

    def fwd() -> None:
        with torch.no_grad():
            layer(x)

    def fwd_bwd() -> None:
        torch.autograd.grad(layer(x), leaves, cotangent)

    run = fwd if direction == "fwd" else fwd_bwd

    def step() -> None:
        run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()
    if impl != "conv":
        check_against_reference(impl)
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
    """What asv cannot measure itself on a GPU: kernel time from CUDA events (L2 flushed) and the caching
    allocator's peak above the inputs, through the harness's bench.measure (skipped without a GPU, and in
    commits before bench.measure)."""

    params = GRID
    param_names = GRID_NAMES
    timeout = 300
    direction: str

    def setup(self, impl, k, channels, res):
        if DEVICE.type != "cuda":
            raise NotImplementedError("no CUDA device")
        try:
            from bench import measure
        except ImportError as exc:
            raise NotImplementedError(f"bench.measure is not in this commit: {exc}") from exc
        self.measure = measure
        self.step = layer_step(impl, k, channels, res, self.direction)

    def track_seconds(self, *_):
        return self.measure.time_fn(self.step, DEVICE).median_ms / 1e3

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
