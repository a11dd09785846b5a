"""SASA2d and AttentionStem: shapes, stride, parameter counts, and the same output from every impl."""
from __future__ import annotations

import copy

import pytest
import torch

import sasa_impls
from bench.flops import attention_params

from helpers import preset_projection_backend
from test_correctness import masked_impls


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, heads", [(16, 32, 3, 4), (24, 24, 7, 8), (8, 16, 19, 2)])
def test_parameter_count_is_independent_of_k(in_channels, out_channels, kernel_size, heads):
    layer = sasa_impls.SASA2d(in_channels, out_channels, kernel_size, heads)
    assert sum(p.numel() for p in layer.parameters()) == attention_params(in_channels, out_channels, kernel_size)
    assert 3 * in_channels * out_channels + kernel_size * out_channels == attention_params(in_channels, out_channels, kernel_size)


def test_content_only_layer_has_no_embeddings_and_runs_content_only_peers():
    layer = sasa_impls.SASA2d(16, 16, 5, heads=2, relative=False, impl="reference").double()
    assert sum(p.numel() for p in layer.parameters()) == attention_params(16, 16, 5, relative=False) == 3 * 16 * 16
    x = torch.randn(1, 16, 6, 7, dtype=torch.float64)
    with_rel = sasa_impls.SASA2d(16, 16, 5, heads=2, impl="reference").double()
    with_rel.load_state_dict(layer.state_dict(), strict=False)
    assert not torch.allclose(layer(x), with_rel(x))  # the embeddings were really dropped, not ignored
    for impl in sasa_impls.list_impls():
        chosen = sasa_impls.get_impl(impl)
        if not chosen.supports_rel and chosen.available("cpu", torch.float32)[0]:
            peer = sasa_impls.SASA2d(16, 16, 5, heads=2, relative=False, impl=impl)
            with torch.no_grad():  # peers may have no backward on CPU
                assert peer(torch.randn(1, 16, 8, 8)).shape == (1, 16, 8, 8)


@pytest.mark.parametrize("stride, height, width", [(1, 9, 6), (2, 8, 6), (2, 9, 7)])
def test_output_shape_and_stride(stride, height, width):
    layer = sasa_impls.SASA2d(8, 16, 5, heads=4, stride=stride)
    out = layer(torch.randn(2, 8, height, width))
    assert out.shape == (2, 16, height // stride, width // stride)


def test_stride_two_is_average_pool_of_stride_one():
    x = torch.randn(1, 8, 8, 6, dtype=torch.float64)
    strided = sasa_impls.SASA2d(8, 8, 3, heads=2, stride=2).double()
    unstrided = sasa_impls.SASA2d(8, 8, 3, heads=2, stride=1).double()
    unstrided.load_state_dict(strided.state_dict())
    torch.testing.assert_close(strided(x), torch.nn.functional.avg_pool2d(unstrided(x), 2))


def test_layer_applies_the_op_to_its_projections():
    """SASA2d = 1x1 projections, head split, the op with its embeddings: checked against the reference op."""
    from sasa_impls.impls.reference import reference_attention

    layer = sasa_impls.SASA2d(6, 8, 3, heads=2, impl="unfold").double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)

    def heads(t):  # (B, C, H, W) -> (B, heads, H, W, D)
        return t.reshape(2, 2, 4, 5, 4).permute(0, 1, 3, 4, 2)

    q, k, v = heads(layer.query(x)), heads(layer.key(x)), heads(layer.value(x))
    expected = reference_attention(q, k, v, layer.rel.rel_row, layer.rel.rel_col, 3)
    torch.testing.assert_close(layer(x), expected.permute(0, 1, 4, 2, 3).reshape(2, 8, 5, 4))


MODULES = {
    "sasa2d": (lambda: sasa_impls.SASA2d(8, 16, 5, heads=4, impl="reference"), (2, 8, 7, 9)),
    "attention_stem": (lambda: sasa_impls.AttentionStem(3, 8, heads=2, impl="reference"), (1, 3, 8, 12)),
}


@pytest.mark.parametrize("module", list(MODULES))
def test_every_impl_gives_the_same_module_output(module):
    build, input_shape = MODULES[module]
    base = build().double().eval()
    x = torch.randn(*input_shape, dtype=torch.float64)
    expected = base(x)
    for impl in masked_impls("cpu", torch.float64):
        layer = copy.deepcopy(base)
        layer.impl = impl
        torch.testing.assert_close(layer(x), expected, msg=lambda m: f"{impl}: {m}")


def test_auto_picks_an_available_full_contract_impl():
    spec = sasa_impls.registry.AttentionSpec(torch.device("cpu"), torch.float32, 1, 2, 5, 5, 4, 3, True, True)
    chosen = sasa_impls.registry.resolve_auto(spec)
    assert chosen.borders == "masked" and chosen.supports_rel and chosen.supports(spec) == (True, "")
    assert chosen.available("cpu", torch.float32)[0]
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2)  # impl="auto"
    assert layer(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)


def test_attention_stem_shapes_and_spatially_aware_values():
    stem = sasa_impls.AttentionStem(3, 16, heads=2, value_mixtures=4, pool=4).double()
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    assert stem(x).shape == (2, 16, 4, 3)
    p = stem.mixture_weights(8, 8)
    assert p.shape == (4, 8, 8)
    torch.testing.assert_close(p.sum(0), torch.ones(8, 8, dtype=torch.float64))
    # aligned with the 4 x 4 pooling windows: the mixture repeats every 4 pixels and varies inside a window
    torch.testing.assert_close(p[:, :4, :4], p[:, 4:, 4:])
    assert not torch.allclose(p[:, 0, 0], p[:, 1, 2])


def test_layer_backward_reaches_every_parameter():
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2, impl="memory_blocks")
    layer(torch.randn(2, 8, 6, 6)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", sorted(sasa_impls.projection.PROJECTION_BACKENDS))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_projection_matches_three_convs(backend, channels_last, batch, monkeypatch):
    """One product of the stacked weights gives the three convs' outputs and gradients, whichever backend runs
    (batch 1 takes the matmul backend's plain GEMM); the outputs are views of that one product (no copies)."""
    if backend == "native" and "native" not in sasa_impls.projection.projection_candidates(torch.randn(1, 12, 5, 7)):
        pytest.skip("the native extension does not build here")
    layer = sasa_impls.SASA2d(12, 16, 3, heads=4)
    x = torch.randn(batch, 12, 5, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    preset_projection_backend(monkeypatch, x, 48, backend if x.is_contiguous() else "conv")
    convs = (layer.query, layer.key, layer.value)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    chosen = dict(sasa_impls.projection._CHOSEN_BACKEND)
    fused = sasa_impls.projection.fused_projection(x1, convs)
    assert sasa_impls.projection._CHOSEN_BACKEND == chosen  # the backend set above ran: nothing was timed
    separate = [conv(x2) for conv in convs]
    assert len({t.untyped_storage().data_ptr() for t in fused}) == 1
    weights = [torch.randn_like(t) for t in separate]
    for out, want in zip(fused, separate):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    fused_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(fused, weights)), [x1, *(c.weight for c in convs)])
    want_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(separate, weights)), [x2, *(c.weight for c in convs)])
    for got, want in zip(fused_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_filling_one_buffer_reach_the_product_without_a_copy(batch):
    """The channel slices' gradients, when they are those slices of one buffer, are that buffer (a view); in
    another order, or from separate tensors, they are concatenated."""
    buffer = torch.randn(batch, 4 + 6 + 2, 3, 5)
    sizes = (4, 6, 2)
    slices = buffer.split(sizes, dim=1)
    joined = sasa_impls.projection.concatenated_channels(slices, buffer.shape, buffer.stride(), sizes)
    assert joined.data_ptr() == buffer.data_ptr() and torch.equal(joined, buffer)
    swapped = (slices[1], slices[0], slices[2])
    joined = sasa_impls.projection.concatenated_channels(swapped, buffer.shape, buffer.stride(), (6, 4, 2))
    assert joined.data_ptr() != buffer.data_ptr() and torch.equal(joined, torch.cat(swapped, 1))
    copies = [t.clone() for t in slices]
    joined = sasa_impls.projection.concatenated_channels(copies, buffer.shape, buffer.stride(), sizes)
    assert torch.equal(joined, buffer) and joined.data_ptr() != buffer.data_ptr()


def test_projection_backend_is_measured_once_per_shape_and_mode(monkeypatch):
    """Training (autograd recording) and inference are timed apart: each picks the backend faster in its mode."""
    monkeypatch.setattr(sasa_impls.projection, "_CHOSEN_BACKEND", {})
    timed = []
    original = sasa_impls.projection._timed_call
    monkeypatch.setattr(sasa_impls.projection, "_timed_call",
                        lambda fn, x, w, training: timed.append(training) or original(fn, x, w, training))
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2)
    layer(torch.randn(1, 8, 6, 6))
    layer(torch.randn(1, 8, 6, 6))
    layer(torch.randn(1, 8, 4, 6))
    with torch.no_grad():
        layer(torch.randn(1, 8, 6, 6))
        layer(torch.randn(1, 8, 6, 6))
    chosen = sasa_impls.projection._CHOSEN_BACKEND
    assert sorted(key[5] for key in chosen) == [False, True, True]  # training
    assert set(chosen.values()) <= set(sasa_impls.projection.PROJECTION_BACKENDS)
    backends = len(sasa_impls.projection.projection_candidates(torch.randn(1, 8, 6, 6)))
    assert timed == [True] * backends * 2 + [False] * backends


def test_backends_within_the_tie_take_the_preferred_one():
    pick = sasa_impls.projection.fastest_preferred
    assert pick({"conv": 1.0, "matmul": 0.98, "native": 1.02}) == "native"  # a tie: the extension's matmul
    assert pick({"conv": 1.0, "matmul": 0.9, "native": 1.0}) == "matmul"  # 10% faster is no tie
    assert pick({"conv": 0.5, "matmul": 1.0}) == "conv"  # native not a candidate (non-contiguous x, fp16, ...)
    assert pick({"conv": 1.0, "matmul": 1.04}) == "matmul"
    assert pick({"matmul": 1.0, "new": 0.5}) == "new"  # a backend PREFERENCE does not name still wins outright


def test_backend_choice_interleaves_its_candidates(monkeypatch):
    """On a machine that slows down while it times (each call costs 5% more than the last), candidates timed one
    after another look faster the earlier they come; timed in rounds, the truly faster one wins."""
    clock, slowdown = [0.0], [1.0]

    def call(cost):
        def fn():
            clock[0] += cost * slowdown[0]
            slowdown[0] *= 1.05
        return fn
    monkeypatch.setattr(sasa_impls.projection.time, "perf_counter", lambda: clock[0])
    calls = {"first": call(1.0), "second": call(0.8)}  # "second" is 20% faster
    seconds = sasa_impls.projection._time_backends(calls, torch.device("cpu"))
    assert min(seconds, key=seconds.get) == "second"
    slowdown[0], sequential = 1.0, {}
    for name, fn in calls.items():  # all calls of one candidate, then the other's
        start = clock[0]
        for _ in range(7):
            fn()
        sequential[name] = clock[0] - start
    assert min(sequential, key=sequential.get) == "first"  # the drift that misleads sequential timing


@pytest.mark.parametrize("layer", [sasa_impls.SASA2d(8, 8, 3, heads=2), sasa_impls.AttentionStem(3, 8, heads=2, pool=2)],
                         ids=["SASA2d", "AttentionStem"])
@pytest.mark.parametrize("shape", [(8, 6, 6), (1, 1, 8, 6, 6)])
def test_input_of_another_rank_is_one_line_error(layer, shape):
    with pytest.raises(ValueError, match=r"^x: expected rank 4 \(B, C, H, W\), got shape " + str(shape).replace("(", r"\(").replace(")", r"\)")):
        layer(torch.randn(shape))


def test_inference_projection_follows_weight_updates():
    """Outside autograd the stacked weight is cached: an in-place update (an optimizer step) or a loaded
    state_dict must still reach the next call."""
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2, impl="unfold")
    x = torch.randn(1, 8, 5, 5)
    convs = (layer.query, layer.key, layer.value)
    with torch.no_grad():
        before = sasa_impls.projection.fused_projection(x, convs)[1].clone()
        layer.key.weight.mul_(-2.0)
        after = sasa_impls.projection.fused_projection(x, convs)[1]
        torch.testing.assert_close(after, -2.0 * before, rtol=1e-5, atol=1e-5)
        layer.load_state_dict({name: torch.randn_like(t) for name, t in layer.state_dict().items()})
        loaded = sasa_impls.projection.fused_projection(x, convs)
        for out, conv in zip(loaded, convs):
            torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
