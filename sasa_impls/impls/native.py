"""Native: a PyTorch C++/CUDA extension, one fused kernel per device, forward and backward (issue 11).

The op is the local self-attention of SASA (Ramachandran et al., "Stand-Alone Self-Attention in Vision
Models", NeurIPS 2019) with the contract's masked borders and factorized relative logits.

CPU (``csrc/cpu``): fused, vectorized for the machine's ISA (GCC/Clang vector extensions, -march=native), parallel over
(batch, head, row band) tasks on ATen's threads, each thread first running its own contiguous share of them
(sasa_cpu.cpp's run_tasks). Per query block (a vector of consecutive pixels of one row; four rows at a time with
AVX-512, three with AVX2: csrc/cpu/forward.h, backward.h) it walks the key rows of the window with an online softmax,
computing the logits of all k column offsets from shifted loads of a packed key row; where one head's row would leave a
vector's lanes empty (28 pixels in 32 lanes), 2 or 4 heads' pixels share the vectors (the forward up to 4, the backward
up to 2: csrc/cpu/problem.h's interleaved_heads); relative logits are factorized (k D MACs per pixel); nothing of size
k^2 per pixel is stored (memory O(HW C); the forward's scratch does not grow with the band). The backward recomputes the
probabilities from the saved log-sum-exp and sums per-band key gradients in band order, so every result is bitwise
independent of the thread count. fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64 (the tests' oracle tolerances).
Status (README "What the committed results say"): the fastest attention on the CPU at every benchmark shape; SASA2d(128,
128, k=19) takes 1.21-1.29x a k = 3 convolution forward and 1.48-1.54x fwd+bwd on an AMD Zen 5 (AVX-512 with full-width
FMAs; `sasa-bench claim`, 28 x 28 batch 1, four runs over two sessions), 1.23-1.32x and 1.37-1.46x on an AMD Zen 4 (in
its VM's fast pass), 1.5x and 2.0x on an AVX-512 Xeon (before the two changes below); the bare op at k = 19 reaches
42-56% of the physical FMA peak forward and 30-43% fwd+bwd on the Zen 5 (by the VM's pass; medians 47-52% and 35-37%),
56-69% and 42-55% on the Zen 4, 40-42% and 27-29% on the Xeon (`scripts/native_targets.py`). On the Zen 4 issue 20's
1.5x holds in every case of eight runs, forward and fwd+bwd (28 x 28 fwd+bwd 1.38-1.48x); on the Zen 5 in every case but
28 x 28 fwd+bwd (medians of eight passes 1.52x at batch 1, 1.61x at batch 8; 1.54x and 1.53x in three slower passes once
the projection's product read its operand in place; 1.53x and 1.52x over nine slow passes once the backward packed whole
bands channel by channel and stored p skewed), since SASA2d on these kernels runs as one autograd node
(sasa_impls/native_layer.py: the general path's Python and autograd glue between the kernels took 0.75-0.94 ms of a
4.6-4.9 ms step at 28 x 28 batch 1; the node's step 0.95-0.98x the general path's) and timing keeps glibc's heap
(bench.measure.keep_freed_memory: the step had paid 48-131 page faults per call). The backward still pays an eighth of
its lanes as padding at 28 x 28 (4 interleaved heads spill its buffers out of L2), and its dK sweep reads dS diagonally,
across two cache lines from L2 (p is stored skewed so that dV's reads are aligned: a skewed copy of dS cost more in
stores than it saved); the projection's three products run at 86-92% of the FMA loop
(csrc/cpu/gemm.h). What bounds it: the contraction microkernel alone, on data in L1, runs at 50-85% of the FMA-only rate
(the per-block set-up and drain against reductions of only D = 16 or k = 19 terms; 97% at 76 terms on the Zen 4, though
aggregating 4 key rows at once gained the forward 0-3%; the backward's dQ, dK and dV sum 4 x 19 terms per accumulator
where a group's query and key rows all meet, 0.95-0.98 of its time, and blocks of up to 20 accumulators take the
logits' 19 offsets in 4 blocks instead of 5, 0.96-0.98 backward, 0.98-0.99 forward), the backward, 2.5x the forward's
FMAs, takes 2.5-3.2x its time, and its kernels run 1-7% slower in the layer's sequence than each alone (each stage
timed inside the chain: the product's output written to lines out of the caches, the op reading it). The AVX2 build
(the "avx2" variant, -march=haswell, 3-row groups) passes the reference checks in the tests on any AVX2 machine; on the
Zen 4, whose 256- and 512-bit FMA rates are equal, it takes 1.25-1.39x the AVX-512 build's time forward and 1.19-1.47x
backward (28 x 28 and 32 x 32, batch 1), and with every code path limited to AVX2 (`native_targets.py --isa avx2`: the
conv's too) the layer is within 1.5x forward and fwd+bwd at 28 x 28 but 1.48-1.59x fwd+bwd at 32 x 32, the bare op at
49.5-54% of the AVX2 FMA loop forward and 38-40% fwd+bwd; on the Zen 5 (256-bit FMAs at half the 512-bit rate) within
1.5x in every case of five passes (fwd+bwd 1.23-1.45x), the bare op at 48-61% and 37-47%; it has not been timed on an
AVX2-only CPU.

CUDA (``csrc/cuda``): flash-style kernels with shared-memory halo chunks on CUDA cores, fp32
accumulation, no atomics. They compile here (tests/test_native_cuda_compile.py checks ptxas' register
and spill counts) and run on the CPU under an emulation of the CUDA execution model, checked against the
float64 reference (tests/test_native_cuda_emulated.py), but have not run on a GPU yet:
scripts/gpu_benchmark.py and the GPU tests of tests/test_native.py validate them where a GPU exists.

Inputs may have any strides: inside SASA2d q, k, v are channel-major views, which the CPU kernel reads
without a copy, and the output keeps q's memory format (``empty_like``), so the layer's head merge needs
no copy either; dq, dk, dv keep q, k, v's layout, as slices of one buffer where q, k, v are slices of one
(the projection's product), so its gradient needs no concatenation (projection.concatenated_channels).
The CUDA kernels take contiguous (B, heads, H, W, D) tensors (copied here if needed).
The extensions are compiled on first use (``_native_build``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ..registry import AttentionSpec, Impl, Option, positive_int, register
from ._fused import fused_attention
from ._native_build import active_cpu_extension, cuda_extension, native_available

# Head dims the CUDA kernels take (channels padded to a power of two, 8 threads' worth each).
CUDA_MAX_HEAD_DIM = 256

# Validation aid (tests, scripts/gpu_benchmark.py): when True every output and gradient buffer is filled
# with NaN before the kernels write it, so an element a kernel forgets shows up instead of hiding behind
# stale memory.
POISON_OUTPUTS = False


def check_band(band: object) -> int:
    """The CPU band height: a positive int (query rows per task; text such as "8" too)."""
    try:
        return positive_int(band)
    except ValueError:
        raise ValueError(f"band: expected a positive int (query rows per CPU task), got {band!r}") from None


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within: every output and gradient buffer is filled with NaN before the kernels write it."""
    global POISON_OUTPUTS
    POISON_OUTPUTS = True
    try:
        yield
    finally:
        POISON_OUTPUTS = False


def native_limits(spec: AttentionSpec) -> tuple[bool, str]:
    """The CUDA kernels take head dims up to CUDA_MAX_HEAD_DIM; the CPU kernel any shape."""
    if spec.device.type == "cuda" and spec.head_dim > CUDA_MAX_HEAD_DIM:
        return False, f"takes head dims up to {CUDA_MAX_HEAD_DIM} on CUDA, got {spec.head_dim}"
    return True, ""


def _run(name: str, device: torch.device, band: int, *args):
    """Call ``name`` of the extension of ``device``'s type: the CPU one also gets the band height, the
    CUDA one the current stream."""
    if device.type == "cuda":
        return getattr(cuda_extension(), name)(*args, torch.cuda.current_stream(device).cuda_stream)
    return getattr(active_cpu_extension(), name)(*args, band)


def _prepare(device: torch.device, *tensors):
    """CUDA kernels read contiguous tensors; the CPU kernel reads any strides."""
    if device.type == "cuda":
        return tuple(t.contiguous() if t is not None else None for t in tensors)
    return tensors


class _NativeKernels:
    """The extension's kernel pair for :class:`~._fused.FusedSASA` (config: the CPU band height)."""

    @staticmethod
    def prepare(*tensors):
        return _prepare(tensors[0].device, *tensors)

    @staticmethod
    def forward(q, k, v, rel_row, rel_col, kernel_size, scale, band):
        return _run("forward", q.device, band, q, k, v, rel_row, rel_col, kernel_size, scale, POISON_OUTPUTS)

    @staticmethod
    def backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale, band):
        return _run("backward", q.device, band, grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale,
                    POISON_OUTPUTS)


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_row: Optional[torch.Tensor],
                     rel_col: Optional[torch.Tensor], kernel_size: int, scale: float = 1.0,
                     band: Optional[int] = None) -> torch.Tensor:
    """Fused SASA with the native kernels, forward and backward (arguments as ``local_attention``).
    ``band``: query rows per CPU task (default: backward the whole image where the planes, (batch, group of
    interleaved heads), split evenly over the machine's CPUs or give 4 tasks per CPU, else k - 1 rounded down to
    whole groups of rows, at least 8; forward likewise the whole image where the planes split evenly over the
    threads, else whole 4-row groups, about 4 tasks per thread; 0 to the extension); the gradients' bits depend on
    it, never on the thread count. CUDA tiles are fixed per head dim (csrc/cuda/plan.h)."""
    band = 0 if band is None else check_band(band)
    return fused_attention(_NativeKernels, q, k, v, rel_row, rel_col, kernel_size, float(scale), band)


register(
    Impl(
        name="native",
        forward=native_attention,
        description="C++/CUDA extension: fused vectorized CPU kernel and CUDA kernel, online softmax, "
        "factorized relative logits, fwd + bwd",
        check=native_available,
        limits=native_limits,
        auto_priority={"cpu": 0, "cuda": 5},
        options={"band": Option(check_band, "query rows per CPU task, default the image where the planes split evenly over the CPUs (backward: the machine's, forward: the threads), else backward k - 1 (whole groups, at least 8), forward about 4 tasks per thread")},
        poisoned=poisoned_outputs,
    )
)
