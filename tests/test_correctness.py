"""Every implementation against the float64 reference, and the reference against a per-pixel loop."""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from sasa_impls.impls.reference import reference_attention

from helpers import grads, random_inputs

# (batch, heads, H, W, D, k, with_rel, scale): borders and corners at every k, k = 1, k larger than the
# image (and much larger), non-square images, odd D, several heads, partial memory blocks (11 x 10).
SHAPES = [
    (2, 2, 5, 7, 4, 3, True, 1.0),
    (1, 3, 4, 3, 5, 7, True, 0.5),
    (1, 1, 6, 6, 3, 1, False, 1.0),
    (2, 2, 9, 6, 6, 5, False, 0.3),
    (1, 2, 3, 4, 2, 9, True, 1.3),
    (1, 2, 11, 10, 8, 5, True, 1.0),
    (1, 1, 1, 1, 4, 3, True, 1.0),
]


def masked_impls(device: str, dtype: torch.dtype) -> list[str]:
    """Implementations meeting the full contract (masked borders) that can run here."""
    return [
        name for name in sasa_impls.list_impls()
        if name != "reference"
        and sasa_impls.get_impl(name).borders == "masked"
        and sasa_impls.get_impl(name).available(device, dtype)[0]
    ]


@pytest.mark.parametrize("impl", masked_impls("cpu", torch.float64))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}_{}x{}_D{}_k{}_rel{}_s{}".format(*s))
def test_matches_reference_forward_and_gradients(impl, shape):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale = shape
    if with_rel and not sasa_impls.get_impl(impl).supports_rel:
        pytest.skip(f"{impl} has no relative logits")
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, requires_grad=True)
    expected = reference_attention(*inputs, kernel_size, scale)
    actual = sasa_impls.local_attention(*inputs, kernel_size, impl=impl, scale=scale)
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)

    cotangent = torch.randn_like(expected)
    for got, want in zip(grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# Low precision: inputs rounded to the dtype, compared with the reference on those same rounded values in
# float64. Implementations accumulate in fp32, so the error is about the output's own rounding.
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOLERANCE), ids=str)
@pytest.mark.parametrize("impl", masked_impls("cpu", torch.bfloat16))
def test_low_precision_within_tolerance(impl, dtype):
    if not sasa_impls.get_impl(impl).available("cpu", dtype)[0]:
        pytest.skip(f"{impl} does not run {dtype} on cpu")
    kernel_size = 5
    inputs = random_inputs(2, 2, 9, 7, 8, kernel_size, True, dtype=dtype)
    actual = sasa_impls.local_attention(*inputs, kernel_size, impl=impl)
    assert actual.dtype == dtype
    expected = reference_attention(*(t.double() for t in inputs), kernel_size)
    tol = LOW_PRECISION_TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def brute_force(q, k, v, rel_row, rel_col, kernel_size, scale):
    """The equation of docs/design.md, pixel by pixel, with Python loops over the window."""
    batch, heads, height, width, head_dim = q.shape
    r, rows = kernel_size // 2, head_dim // 2
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(height):
                for j in range(width):
                    query = q[b, h, i, j]
                    logits, values = [], []
                    for a in range(i - r, i + r + 1):
                        for c in range(j - r, j + r + 1):
                            if not (0 <= a < height and 0 <= c < width):
                                continue  # outside the image: excluded from the softmax
                            logit = query @ k[b, h, a, c]
                            if rel_row is not None:
                                logit = logit + query[:rows] @ rel_row[h, a - i + r] + query[rows:] @ rel_col[h, c - j + r]
                            logits.append(scale * logit)
                            values.append(v[b, h, a, c])
                    weights = torch.softmax(torch.stack(logits), dim=0)
                    out[b, h, i, j] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("shape", [(1, 2, 4, 5, 3, 3, True, 0.7), (2, 1, 3, 3, 4, 5, False, 1.0), (1, 1, 5, 2, 2, 1, True, 1.0)])
def test_reference_matches_per_pixel_loop(shape):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale = shape
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, requires_grad=True)
    expected = brute_force(*inputs, kernel_size, scale)
    actual = reference_attention(*inputs, kernel_size, scale)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(expected)
    for got, want in zip(grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_clamped_windows_shift_inward():
    """borders='clamped' (NATTEN's semantics): a corner query attends to the k x k block at the corner."""
    q, k, v, _, _ = random_inputs(1, 1, 5, 6, 3, 3, with_rel=False)
    out = reference_attention(q, k, v, None, None, 3, borders="clamped")
    weights = torch.softmax((k[0, 0, :3, :3] @ q[0, 0, 0, 0]).flatten(), dim=0)
    expected = weights @ v[0, 0, :3, :3].reshape(9, 3)
    torch.testing.assert_close(out[0, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="kernel_size"):
        reference_attention(q, k, v, None, None, 7, borders="clamped")


def test_masked_borders_differ_from_zero_padded_keys():
    """The contract excludes outside positions from the softmax: a corner output is not what zero keys give."""
    q, k, v, _, _ = random_inputs(1, 1, 4, 4, 3, 3, with_rel=False)
    out = reference_attention(q, k, v, None, None, 3)
    keys, values = k[0, 0, :2, :2].reshape(4, 3), v[0, 0, :2, :2].reshape(4, 3)
    inside_only = torch.softmax(keys @ q[0, 0, 0, 0], dim=0) @ values
    torch.testing.assert_close(out[0, 0, 0, 0], inside_only)
    with_zero_keys = torch.softmax(torch.cat((keys @ q[0, 0, 0, 0], torch.zeros(5, dtype=q.dtype))), dim=0)[:4] @ values
    assert not torch.allclose(out[0, 0, 0, 0], with_zero_keys)


@pytest.mark.parametrize("block", [1, 2, 3, 5, 16])
def test_memory_blocks_any_block_size(block):
    """Every block edge gives the reference result: partial blocks at the bottom/right, blocks larger than the image."""
    from sasa_impls.impls.memory_blocks import memory_blocks_attention

    inputs = random_inputs(1, 2, 11, 7, 6, 5, True, requires_grad=True)
    expected = reference_attention(*inputs, 5, 0.8)
    actual = memory_blocks_attention(*inputs, 5, 0.8, block=block)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for got, want in zip(grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
