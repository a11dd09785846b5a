"""Bad input gets a ValueError/TypeError that names the argument."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import sasa_impls
from sasa_impls import registry

from helpers import random_inputs


def call(q, k, v, rel_row, rel_col, kernel_size=3, **kwargs):
    return sasa_impls.local_attention(q, k, v, rel_row, rel_col, kernel_size, **kwargs)


@pytest.fixture
def inputs():
    return list(random_inputs(1, 2, 5, 5, 4, 3, True, dtype=torch.float32))


@pytest.mark.parametrize("kernel_size, error", [(4, ValueError), (0, ValueError), (-3, ValueError), (3.0, TypeError), (True, TypeError)])
def test_kernel_size_must_be_odd_positive_int(inputs, kernel_size, error):
    with pytest.raises(error, match="kernel_size"):
        call(*inputs[:3], None, None, kernel_size)


def test_rank_is_checked(inputs):
    inputs[0] = inputs[0][0]
    with pytest.raises(ValueError, match=r"^q: expected rank 5"):
        call(*inputs)


@pytest.mark.parametrize("position, name", [(1, "k"), (2, "v")])
def test_k_v_must_match_q(inputs, position, name):
    inputs[position] = inputs[position][..., :3]
    with pytest.raises(ValueError, match=rf"^{name}: expected the shape of q"):
        call(*inputs)


@pytest.mark.parametrize("position, name", [(3, "rel_row"), (4, "rel_col")])
def test_rel_embedding_shape(inputs, position, name):
    inputs[position] = torch.randn(2, 5, 2)  # built for k = 5, used with k = 3
    with pytest.raises(ValueError, match=rf"^{name}: expected shape \(heads, kernel_size, D part\) = \(2, 3, 2\)"):
        call(*inputs)


def test_rel_embeddings_come_in_pairs(inputs):
    with pytest.raises(ValueError, match="rel_row, rel_col"):
        call(*inputs[:4], None)


def test_mixed_dtypes(inputs):
    inputs[2] = inputs[2].double()
    with pytest.raises(TypeError, match=r"^v: dtype torch.float64 differs from q's torch.float32"):
        call(*inputs)


def test_integer_inputs(inputs):
    inputs[0] = inputs[0].to(torch.int32)
    with pytest.raises(TypeError, match="^q: expected a floating dtype"):
        call(*inputs)


def test_mixed_devices(inputs):
    inputs[1] = inputs[1].to("meta")
    with pytest.raises(ValueError, match=r"^k: on meta but q is on cpu"):
        call(*inputs)


def test_unknown_impl_lists_known(inputs):
    with pytest.raises(ValueError, match=r"impl: unknown implementation 'nope'; known: .*memory_blocks.*unfold"):
        call(*inputs, impl="nope")


def test_unavailable_impl_gives_reason(inputs, monkeypatch):
    never = registry.Impl(name="never", forward=lambda *a: None, description="test", check=lambda device, dtype: (False, "needs a flux capacitor"))
    monkeypatch.setitem(registry._REGISTRY, "never", never)
    with pytest.raises(ValueError, match=r"impl: 'never' is not available on cpu for torch.float32: needs a flux capacitor"):
        call(*inputs, impl="never")


def test_content_only_impl_rejects_rel(inputs, monkeypatch):
    content_only = registry.Impl(name="content_only", forward=lambda *a: None, description="test", supports_rel=False)
    monkeypatch.setitem(registry._REGISTRY, "content_only", content_only)
    with pytest.raises(ValueError, match="no relative-position term"):
        call(*inputs, impl="content_only")


def test_scale_type(inputs):
    with pytest.raises(TypeError, match="^scale"):
        call(*inputs, scale="1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=16, out_channels=12, heads=8), "heads: 8 does not divide out_channels=12"),
        (dict(in_channels=16, out_channels=16, kernel_size=6), "kernel_size"),
        (dict(in_channels=16, out_channels=16, stride=3), "stride"),
        (dict(in_channels=0, out_channels=16), "in_channels"),
    ],
)
def test_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sasa_impls.SASA2d(**kwargs)


def test_layer_rejects_an_unknown_impl_at_construction():
    with pytest.raises(ValueError, match=r"^impl: unknown implementation 'nope'; known: .*unfold"):
        sasa_impls.SASA2d(8, 8, 3, heads=2, impl="nope")


@pytest.mark.parametrize("impl, options, match", [
    ("memory_blocks", {"blok": 4}, r"^options: 'memory_blocks' takes block \(.*\); got 'blok'"),
    ("memory_blocks", {"block": 0}, r"^options: block=0 for 'memory_blocks': expected an int >= 1"),
    ("memory_blocks", "block", r"^options: expected KEY=VALUE, got 'block'"),
    ("unfold", {"block": 4}, r"^options: 'unfold' takes no options; got 'block'"),
    ("auto", {"block": 4}, r"^options: implementation options need an explicit impl"),
])
def test_bad_options_name_the_argument(inputs, impl, options, match):
    with pytest.raises(ValueError, match=match):
        call(*inputs, impl=impl, options=options)
    with pytest.raises(ValueError, match=match):
        sasa_impls.SASA2d(8, 8, 3, heads=2, impl=impl, options=options)


def test_options_reach_the_implementation(monkeypatch):
    """memory_blocks' block edge changes how it computes (not what): the option really is passed on."""
    from sasa_impls.impls import memory_blocks

    seen = []
    original = memory_blocks.memory_blocks_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("block"))
        return original(*args, **kwargs)

    chosen = sasa_impls.get_impl("memory_blocks")
    monkeypatch.setitem(registry._REGISTRY, "memory_blocks", dataclasses.replace(chosen, forward=spy))
    q, k, v, rel_row, rel_col = random_inputs(1, 2, 7, 6, 4, 3, True, dtype=torch.float64)
    expected = sasa_impls.local_attention(q, k, v, rel_row, rel_col, 3, impl="reference")
    got = sasa_impls.local_attention(q, k, v, rel_row, rel_col, 3, impl="memory_blocks", options="block=3")
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2, impl="memory_blocks", options={"block": 2})
    layer(torch.randn(1, 8, 5, 5))
    assert seen == [3, 2]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_auto_respects_training(monkeypatch):
    """impl='auto' picks an implementation that supports the input, gradients included."""
    spec = registry.AttentionSpec(torch.device("cpu"), torch.float32, 1, 2, 5, 5, 4, 3, True, True)
    chosen = registry.resolve_auto(spec)
    assert chosen.supports(spec) == (True, "")
    never_trains = registry.Impl(name="no_backward", forward=lambda *a: None, description="test", auto_priority={"cpu": -1},
                                 limits=lambda s: (not s.requires_grad, "no backward"))
    monkeypatch.setitem(registry._REGISTRY, "no_backward", never_trains)
    assert registry.resolve_auto(spec) is chosen
    assert registry.resolve_auto(dataclasses.replace(spec, requires_grad=False)) is never_trains


def test_layer_names_the_expected_input_rank():
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2, impl="unfold")
    with pytest.raises(ValueError, match=r"^x: expected rank 4 \(B, C, H, W\)"):
        layer(torch.randn(8, 5, 5))


def test_an_empty_batch_gives_an_empty_result_or_a_reason():
    q, k, v, rel_row, rel_col = random_inputs(0, 2, 5, 6, 4, 3, True, dtype=torch.float64, requires_grad=True)
    out = call(q, k, v, rel_row, rel_col, impl="reference")
    assert out.shape == (0, 2, 5, 6, 4)
    grads = torch.autograd.grad(out, (q, k, v, rel_row, rel_col), torch.randn_like(out))
    assert [tuple(g.shape) for g in grads] == [(0, 2, 5, 6, 4)] * 3 + [(2, 3, 2), (2, 3, 2)]
    assert not grads[3].any() and not grads[4].any()  # nothing in the batch: no gradient for the embeddings
    with torch.no_grad(), pytest.raises(ValueError, match=r"^impl: 'flex' cannot run an empty batch \(batch = 0\): "):
        call(*(t.float() for t in (q, k, v, rel_row, rel_col)), impl="flex")


@pytest.mark.parametrize("impl", ["reference", "unfold", "im2col_einsum", "native", pytest.param("memory_blocks", marks=pytest.mark.xfail(
    strict=True, reason="memory_blocks multiplies each query block's whole (b + k - 1)^2 halo of v, out-of-window weights "
                        "being 0: a NaN in v spreads to every query of the blocks whose halo holds it"))])
def test_a_nan_in_v_reaches_only_the_windows_that_hold_it(impl):
    """Masked positions are absent (the contract), not weighted by zero: a NaN value at one pixel makes NaN
    exactly the outputs of that head whose k x k window holds the pixel, borders included."""
    ok, why = sasa_impls.get_impl(impl).available(torch.device("cpu"), torch.float64)
    if not ok:
        pytest.skip(why)
    q, k, v, rel_row, rel_col = random_inputs(2, 2, 9, 11, 8, 5, True, dtype=torch.float64)
    row, col = int(torch.randint(0, 9, ())), int(torch.randint(0, 11, ()))
    if impl == "memory_blocks":  # its known spread, at a pixel where it shows (at 4 of the 99 the block halo is the
        row, col = 4, 5          # window, and the strict xfail would pass by the draw: it did once in CI)
    v[1, 1, row, col, 3] = float("nan")
    out = call(q, k, v, rel_row, rel_col, 5, impl=impl)
    rows, cols = torch.arange(9)[:, None], torch.arange(11)[None, :]
    expected = torch.zeros(2, 2, 9, 11, 8, dtype=torch.bool)
    expected[1, 1, :, :, 3] = ((rows - row).abs() <= 2) & ((cols - col).abs() <= 2)
    assert torch.equal(out.isnan(), expected)
    clean = call(q, k, torch.where(v.isnan(), 0.0, v), rel_row, rel_col, 5, impl="reference")
    torch.testing.assert_close(out[~expected], clean[~expected], rtol=1e-10, atol=1e-10)
