"""The peers: flex (FlexAttention, the full contract) and natten (clamped windows, content-only).

Both run forward only on CPU in torch 2.13 (FlexAttention has no CPU backward) and not in fp64, so their
fp32 output is compared with the float64 reference on the same values; flex's gradients are checked
through a dense evaluation of its own mask_mod and score_mod, and on CUDA (when present) end to end.
Each distinct shape compiles a kernel (seconds on CPU): the shapes below are few on purpose.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import sasa_impls
from sasa_impls.impls import flex
from sasa_impls.impls.reference import reference_attention
from sasa_impls.registry import AttentionSpec

from helpers import grads, random_inputs

FP32_TOLERANCE = 1e-5  # fp32 inputs, fp32 accumulation, against float64 on the same values


def reference_on(inputs, kernel_size, scale, borders="masked"):
    """The float64 reference on exactly the values of ``inputs``."""
    return reference_attention(*(None if t is None else t.double() for t in inputs), kernel_size, scale, borders)


# (batch, heads, H, W, D, k, with_rel, scale, order): 20 x 13 spans 3 blocks so some are skipped and others
# masked; k > image, whose one block is full (no mask applied); content-only; 8 x 16 tiles with padding.
FLEX_SHAPES = [
    (2, 2, 20, 13, 8, 3, True, 0.7, "row_major"),
    (1, 2, 16, 8, 8, 31, True, 1.0, "auto"),
    (1, 2, 9, 11, 8, 5, False, 1.0, "auto"),
    (1, 2, 9, 11, 8, 5, True, 0.5, "tiles"),
]


@pytest.mark.parametrize("shape", FLEX_SHAPES, ids=lambda s: "B{}h{}_{}x{}_D{}_k{}_rel{}_s{}_{}".format(*s))
def test_flex_forward_matches_reference(shape):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale, order = shape
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, dtype=torch.float32)
    with torch.no_grad():
        if order == "auto":
            actual = sasa_impls.local_attention(*inputs, kernel_size, impl="flex", scale=scale)
        else:
            actual = flex.flex_local_attention(*inputs, kernel_size, scale, order=order)
    assert actual.dtype == torch.float32 and actual.shape == inputs[0].shape
    torch.testing.assert_close(actual.double(), reference_on(inputs, kernel_size, scale), rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)


@pytest.mark.parametrize("order", list(flex.TOKEN_ORDERS))
def test_tokens_round_trip_and_coordinates(order):
    x = torch.randn(2, 3, 9, 21, 4)
    tokens = flex.to_tokens(x, order)
    assert tokens.shape[2] == flex.sequence_length(9, 21, order) and tokens.shape[2] % flex.BLOCK == 0
    torch.testing.assert_close(flex.from_tokens(tokens, 9, 21, order), x, rtol=0, atol=0)
    rows, cols = flex.token_coords(9, 21, order, 5, "cpu")
    inside = rows >= 0
    assert int(inside.sum()) == 9 * 21 and bool((cols[inside] >= 0).all())
    # every image token carries the coordinates of the pixel it came from
    torch.testing.assert_close(tokens[0, 0, inside], x[0, 0, rows[inside], cols[inside]], rtol=0, atol=0)
    assert bool((rows[~inside] < -(9 + 21)).all()), "padding tokens must lie far outside every window"


@pytest.mark.parametrize("order", list(flex.TOKEN_ORDERS))
@pytest.mark.parametrize("size,kernel_size", [((20, 13), 3), ((30, 40), 7), ((5, 6), 9), ((16, 8), 31)])
def test_block_pairs_match_the_dense_window_mask(order, size, kernel_size):
    """The pooled block tables equal the block reduction of the dense mask, which equals the window."""
    height, width = size
    rows, cols = flex.token_coords(height, width, order, kernel_size, "cpu")
    length = rows.numel()
    dense = create_mask(flex.window_mask_mod(rows, cols, kernel_size), None, None, length, length, device="cpu")[0, 0]
    inside = (rows >= 0).nonzero()[:, 0]
    r = kernel_size // 2
    window = ((rows[inside, None] - rows[None, inside]).abs() <= r) & ((cols[inside, None] - cols[None, inside]).abs() <= r)
    assert torch.equal(dense[inside][:, inside], window)
    assert not dense[inside][:, rows < 0].any(), "a pixel attends to a padding token"

    # block tables over the image's queries (padding queries' outputs are dropped, whatever they see)
    blocks = length // flex.BLOCK
    query_inside = (rows >= 0)[:, None]
    per_block = (dense & query_inside).reshape(blocks, flex.BLOCK, blocks, flex.BLOCK)
    all_in_window = (dense | ~query_inside).reshape(blocks, flex.BLOCK, blocks, flex.BLOCK)
    partial, full = flex.block_pairs(height, width, kernel_size, order, "cpu")
    assert torch.equal(partial | full, per_block.any(3).any(1))
    assert torch.equal(full, all_in_window.all(3).all(1))
    assert not (partial & full).any()


def test_auto_order_computes_fewest_block_pairs():
    assert flex.resolve_order(56, 56, 7, "auto") == "row_major"
    assert flex.resolve_order(112, 112, 19, "auto") == "tiles"
    assert flex.computed_pairs(112, 112, 19, "tiles") < flex.computed_pairs(112, 112, 19, "row_major")
    with pytest.raises(ValueError, match="order"):
        flex.resolve_order(8, 8, 3, "spiral")


def dense_flex(q, k, v, rel_row, rel_col, kernel_size, scale, order):
    """flex's mask_mod and score_mod evaluated on every (query, key) pair with plain autograd ops."""
    _, _, height, width, _ = q.shape
    rows, cols = flex.token_coords(height, width, order, kernel_size, q.device)
    queries, keys, values = (flex.to_tokens(t, order) for t in (q, k, v))
    row_terms, col_terms = flex.factorized_rel_logits(queries, rel_row, rel_col)
    score_mod = flex.relative_score_mod(row_terms * scale, col_terms * scale, rows, cols, kernel_size)
    length = rows.numel()
    index = torch.arange(length)
    b, h = torch.arange(q.shape[0])[:, None, None, None], torch.arange(q.shape[1])[None, :, None, None]
    scores = score_mod(scale * queries @ keys.transpose(-1, -2), b, h, index[:, None], index[None, :])
    mask = flex.window_mask_mod(rows, cols, kernel_size)(None, None, index[:, None], index[None, :])
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return flex.from_tokens(weights @ values, height, width, order)


@pytest.mark.parametrize("order", list(flex.TOKEN_ORDERS))
def test_flex_score_mod_gradients_reach_the_relative_embeddings(order):
    """The relative logits enter through tensors the score_mod captures: their gradients (what
    FlexAttention backpropagates on CUDA) match the reference's, rel_row and rel_col included."""
    inputs = random_inputs(1, 2, 7, 12, 6, 5, True, requires_grad=True)
    expected = reference_attention(*inputs, 5, 0.8)
    actual = dense_flex(*inputs, 5, 0.8, order)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for got, want in zip(grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
def test_flex_cuda_forward_and_gradients():
    inputs = random_inputs(2, 2, 20, 13, 16, 5, True, dtype=torch.float32, device="cuda", requires_grad=True)
    expected = reference_on(inputs, 5, 0.6)
    actual = sasa_impls.local_attention(*inputs, 5, impl="flex", scale=0.6)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4)
    cotangent = torch.randn_like(actual)
    reference_inputs = [t.detach().double().requires_grad_() for t in inputs]
    wanted = grads(reference_attention(*reference_inputs, 5, 0.6), reference_inputs, cotangent.double())
    for got, want in zip(grads(actual, inputs, cotangent), wanted):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


def test_flex_availability_and_cpu_backward_refusal():
    impl = sasa_impls.get_impl("flex")
    assert impl.available("cpu", torch.float32) == (True, "")
    ok, reason = impl.available("cpu", torch.float64)
    assert not ok and "float64" in reason
    inputs = random_inputs(1, 1, 4, 4, 8, 3, True, dtype=torch.float32, requires_grad=True)
    spec = AttentionSpec.of(inputs[0], inputs, 3, relative=True)
    assert spec.requires_grad and not impl.supports(spec)[0] and "no backward on CPU" in impl.supports(spec)[1]
    with pytest.raises(ValueError, match=r"^impl: 'flex' cannot compute gradients on cpu: .*no backward on CPU"):
        sasa_impls.local_attention(*inputs, 3, impl="flex")
    with torch.no_grad():  # the same inputs need no gradients here
        assert impl.supports(AttentionSpec.of(inputs[0], inputs, 3, relative=True)) == (True, "")


@pytest.fixture
def natten_impl():
    pytest.importorskip("natten")
    return sasa_impls.get_impl("natten")


# (batch, heads, H, W, D, k, scale): clamped borders and corners, k equal to the image height, NATTEN's scale
NATTEN_SHAPES = [(2, 2, 9, 11, 8, 5, 1.0), (1, 3, 7, 10, 16, 7, 0.4)]


@pytest.mark.parametrize("shape", NATTEN_SHAPES, ids=lambda s: "B{}h{}_{}x{}_D{}_k{}_s{}".format(*s))
def test_natten_matches_clamped_reference(natten_impl, shape):
    batch, heads, height, width, head_dim, kernel_size, scale = shape
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, False, dtype=torch.float32)
    with torch.no_grad():
        actual = sasa_impls.local_attention(*inputs, kernel_size, impl="natten", scale=scale)
    assert actual.dtype == torch.float32 and actual.shape == inputs[0].shape
    expected = reference_on(inputs, kernel_size, scale, borders="clamped")
    torch.testing.assert_close(actual.double(), expected, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE)
    # and it is not the contract's masked-border op: the corners differ
    assert not torch.allclose(actual.double(), reference_on(inputs, kernel_size, scale), atol=1e-3)


def test_natten_declares_what_it_cannot_do(natten_impl):
    assert natten_impl.borders == "clamped" and not natten_impl.supports_rel
    assert natten_impl.available("cpu", torch.float32) == (True, "")
    assert not natten_impl.available("cpu", torch.float64)[0]
    q, k, v, rel_row, rel_col = random_inputs(1, 2, 5, 6, 8, 7, True, dtype=torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="kernel_size"):
            sasa_impls.local_attention(q, k, v, None, None, 7, impl="natten")
        with pytest.raises(ValueError, match="relative"):
            sasa_impls.local_attention(q, k, v, rel_row, rel_col, 7, impl="natten")
        with pytest.raises(ValueError, match=r"^impl: 'natten' cannot run head_dim 4 on cpu"):
            sasa_impls.local_attention(q[..., :4], k[..., :4], v[..., :4], None, None, 3, impl="natten")
    with pytest.raises(ValueError, match=r"^impl: 'natten' cannot compute gradients on cpu: .*no backward on CPU"):
        sasa_impls.local_attention(q.requires_grad_(), k, v, None, None, 3, impl="natten")
