"""SASA2d's fused projection: the 1x1 Q, K, V convolutions' weights stacked into one (sum of d_out, d_in)
matrix and one product for all of them.

Three backends give the same (B, sum d_out, H, W) channel-major result: a 1x1 convolution (oneDNN on CPUs), a
matrix product on the (B, d_in, H W) view (BLAS), and the native extension's matrix product (csrc/cpu/gemm.h,
the widest vectors the CPU has). Which is fastest depends on the shape, the libraries and the machine: the
issue measured the conv and the BLAS product each 2-3x ahead of the other, and on AMD CPUs, where MKL runs
AVX2 code, the native product at 2.6x MKL's rate (Zen 5, 384 x 128 by 128 x 1024: 354 against 134 GFLOP/s).
So each layer shape is timed once with every backend that can run it, at first use, the candidates' calls
interleaved in rounds, and the winner cached per (shape, dtype, device, memory format, training).
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .common import records_autograd
from .impls._native_build import active_cpu_extension, active_cpu_variant, native_available


def _project_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight[:, :, None, None])


def _project_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    if batch == 1:  # one plain GEMM: torch.matmul would compute the transpose and copy it (a third more time)
        return torch.mm(weight, x.reshape(channels, height * width)).view(1, -1, height, width)
    return torch.matmul(weight, x.reshape(batch, channels, height * width)).view(batch, -1, height, width)


def _native_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W X per image with the native extension's matmul (csrc/cpu/gemm.h; the build the op runs,
    _native_build.cpu_variant): (B, d_in, H, W) -> (B, sum d_out, H, W)."""
    batch, _, height, width = x.shape
    out = active_cpu_extension().matmul(weight[None], x.flatten(2), False)  # (B, sum d_out, H W)
    return out.view(batch, -1, height, width)


class _NativeProduct(torch.autograd.Function):
    """:func:`_native_product` and its gradients with the same kernel: dX = W^T dY per image, dW = sum over images
    of dY X^T."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _native_product(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, weight = ctx.saved_tensors
        ext, grad = active_cpu_extension(), grad.flatten(2)  # (B, sum d_out, H W)
        dx = ext.matmul(weight.t()[None], grad, False).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = ext.matmul(grad, x.flatten(2).transpose(1, 2), True) if ctx.needs_input_grad[1] else None
        return dx, dw


def _project_native(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """_NativeProduct where autograd records, else the product alone: Function.apply would save the operands for a
    backward that will not run (10 us of a 0.5 ms product at 32 x 32 in inference)."""
    return _NativeProduct.apply(x, weight) if records_autograd(x, weight) else _native_product(x, weight)


# backend(x, weight): weight (sum d_out, d_in)
PROJECTION_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "conv": _project_conv, "matmul": _project_matmul, "native": _project_native}
_CHOSEN_BACKEND: dict[tuple, str] = {}
# Among backends whose times tie (within TIE of the fastest), the first of these: the extension's matmul allocates
# nothing but its output, where MKL's sgemm took 1 MB more peak memory per call (SASA2d k = 19 forward at 28 x 28,
# batch 1: 2.86 against 1.86 MiB, AMD Zen 4) and the two timed within 1-2% of each other in interleaved rounds.
PREFERENCE, TIE = ("native", "matmul", "conv"), 0.05


def _time_backends(calls: dict[str, Callable[[], object]], device: torch.device, rounds: int = 7) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in ``rounds`` rounds that call each twice, in an order
    rotated every round, and time its second call: drift of the machine then falls on every candidate alike, and
    each timed call finds its operands where its first call left them, not where another candidate's calls did.
    (Timed one after another, six calls each, the matmul backend 20% slower than the native one was picked at
    28 x 28 in one run of two on an AMD Zen 4, and the 1x1 conv at batch 8 in another.)"""
    names, times = list(calls), {name: [] for name in calls}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def fastest_preferred(seconds: dict[str, float]) -> str:
    """The backend of ``seconds`` (name -> seconds per call) to use: the first in PREFERENCE of those within TIE of
    the fastest (timing noise between the VM's passes is larger than that)."""
    fastest = min(seconds.values())
    order = [name for name in PREFERENCE if name in seconds] + [name for name in seconds if name not in PREFERENCE]
    return next(name for name in order if seconds[name] <= (1 + TIE) * fastest)


def _timed_call(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                training: bool) -> Callable[[], object]:
    """One call of the backend ``fn`` on the operands (detached): the forward, or with ``training`` the forward
    and the backward of a random output gradient to the operands that require one."""
    if not training:
        def forward() -> object:
            with torch.no_grad():
                return fn(x.detach(), weight.detach())
        return forward
    xg, wg = x.detach().requires_grad_(x.requires_grad), weight.detach().requires_grad_(weight.requires_grad)
    grad = torch.randn_like(fn(xg.detach(), wg.detach()))

    def step() -> object:
        with torch.enable_grad():
            fn(xg, wg).backward(grad)
        xg.grad = wg.grad = None
    return step


def projection_candidates(x: torch.Tensor) -> list[str]:
    """The backends that can compute the projection of ``x``: the 1x1 conv always; the matrix products on
    contiguous inputs (the (B, d_in, H W) view), the native one on the CPU in fp32 / fp64 where the extension
    builds (on first use: once per machine)."""
    if not x.is_contiguous():
        return ["conv"]
    names = ["conv", "matmul"]
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and native_available(x.device, x.dtype)[0]:
        try:
            active_cpu_extension()
            names.append("native")
        except RuntimeError:  # a failed build: native_available says why from now on
            pass
    return names


def backend_key(x: torch.Tensor, out_channels: int, training: bool) -> tuple:
    """What the fastest backend for ``x`` times a weight of ``out_channels`` rows depends on, _CHOSEN_BACKEND's key:
    the input's shape, the output channels, dtype, device, memory format, training, the native build running
    (_native_build.cpu_variant)."""
    return (tuple(x.shape), out_channels, x.dtype, x.device, x.is_contiguous(), training, active_cpu_variant())


def projection_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The fastest of :func:`projection_candidates` for ``x`` times ``weight`` here (ties broken by
    :func:`fastest_preferred`), measured at first use per :func:`backend_key` and cached. In training (autograd
    recording) the forward and backward are timed together: at batch 8 the 1x1 conv had the faster forward
    and the matmul the faster step. Shape-only runs (meta tensors) and traces take "conv" without timing."""
    if x.device.type == "meta" or torch.jit.is_tracing():
        return "conv"
    training = records_autograd(x, weight)
    key = backend_key(x, weight.shape[0], training)
    if key not in _CHOSEN_BACKEND:
        calls = {name: _timed_call(PROJECTION_BACKENDS[name], x, weight, training) for name in projection_candidates(x)}
        _CHOSEN_BACKEND[key] = fastest_preferred(_time_backends(calls, x.device))
    return _CHOSEN_BACKEND[key]


_STACKED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def stacked_weight(convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """The 1x1 ``convs``' weights stacked, (sum d_out, d_in). Where autograd does not record (inference), the
    stack is kept with the first conv and made again only when a weight changes (its storage or version
    counter): the copy took 40 us of a 2 ms k = 19 layer at 28x28."""
    weights = [conv.weight for conv in convs]
    if records_autograd(*weights):
        # in the graph: the gradient flows to each conv through a view (indexing [:, :, 0, 0] took two
        # select_backward copies per weight: 1.7% of a k = 19 layer's fwd+bwd at 28x28)
        return torch.cat([w.flatten(1) for w in weights])
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device, w.shape) for w in weights)
    cached = _STACKED.get(convs[0])
    if cached is None or cached[0] != key:
        cached = key, torch.cat([w.detach().flatten(1) for w in weights])
        _STACKED[convs[0]] = cached
    return cached[1]


def concatenated_channels(grads: Sequence[torch.Tensor], shape: torch.Size, strides: tuple[int, ...],
                          sizes: Sequence[int]) -> torch.Tensor:
    """``grads`` (the slices of ``sizes`` channels of a tensor of ``shape`` and ``strides``, in order) as one
    tensor: a view of the buffer they already fill where they are those slices of one buffer, with those
    strides (as the native kernel's backward writes them: sasa_cpu.cpp's gradients_like), else their
    concatenation. At batch 8, 28 x 28, concatenating the 10 MB took 0.7 ms of a k = 19 op's fwd+bwd."""
    first = grads[0]
    storage, channel_stride = first.untyped_storage().data_ptr(), strides[1]
    offsets = [first.storage_offset() + sum(sizes[:i]) * channel_stride for i in range(len(sizes))]

    def strided_as_slice(g: torch.Tensor) -> bool:  # a dim of size 1 may have any stride
        return all(n == 1 or a == b for n, a, b in zip(g.shape, g.stride(), strides))
    if all(strided_as_slice(g) and g.storage_offset() == offset and g.untyped_storage().data_ptr() == storage
           for g, offset in zip(grads, offsets)):
        return first.as_strided(shape, strides, first.storage_offset())
    return torch.cat(grads, dim=1)


class _ChannelSplit(torch.autograd.Function):
    """``out.split(sizes, dim=1)`` whose backward is :func:`concatenated_channels` (split's own always copies)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        ctx.geometry = out.shape, out.stride(), sizes
        return out.split(sizes, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        return concatenated_channels(grads, *ctx.geometry), None


def fused_projection(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> list[torch.Tensor]:
    """The outputs of the bias-free 1x1 ``convs`` on ``x`` from one product (their weights stacked), by the
    backend :func:`projection_backend` picks; each output a channel-major view of the product (no copy).
    On meta tensors (shape probes: bench.model_costs counts the convs through their hooks) the convs
    themselves run."""
    if x.device.type == "meta":
        return [conv(x) for conv in convs]
    weight = stacked_weight(convs)
    sizes = tuple(conv.out_channels for conv in convs)
    out = PROJECTION_BACKENDS[projection_backend(x, weight)](x, weight)
    return list(_ChannelSplit.apply(out, sizes) if records_autograd(out) else out.split(sizes, dim=1))
