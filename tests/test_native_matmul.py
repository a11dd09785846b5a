"""The native extension's matrix product (csrc/cpu/gemm.h), SASA2d's projection backend "native": against a
float64 product on shapes that cut every block short (rows past the 6-row block, columns past the panel, depth
past the 512-deep slab, so that later slabs add onto partial vectors of C), with the strided operands the
projection's gradients pass, summed over images, bitwise independent of the thread count, and in the AVX2 build
(its masked loads and stores) as well as this CPU's."""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from sasa_impls.impls import _native_build

from helpers import on_thread_counts

if not _native_build.native_available(torch.device("cpu"), torch.float32)[0]:
    pytest.skip(f"native CPU kernel unavailable: {_native_build.native_available(torch.device('cpu'), torch.float32)[1]}",
                allow_module_level=True)

# (batch, M, K, N): one full block; tails of every loop; a depth of three slabs; the layer's shape; B's rows an odd
# number of cache lines apart, read in place (208 floats, 200 doubles; 28 x 28 is 784 floats) over two slabs
SHAPES = [(1, 6, 128, 64), (2, 13, 5, 37), (3, 7, 1100, 70), (1, 1, 1, 1), (2, 384, 128, 196), (2, 13, 600, 208),
          (2, 13, 600, 200)]
VARIANTS = [""] + (["avx2"] if "avx2" in _native_build.cpu_flags().split() else [])


@pytest.fixture(params=VARIANTS, ids=lambda v: v or "native")
def variant(request) -> str:
    return request.param


def ext(variant: str = ""):
    return _native_build.cpu_extension(variant)


def tolerance(dtype: torch.dtype, depth: int) -> float:
    return (1e-12 if dtype == torch.float64 else 2e-6) * depth**0.5 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, m, k, n", SHAPES)
def test_product_per_image_matches_float64(batch, m, k, n, dtype, variant):
    b = torch.randn(batch, k, n, dtype=dtype)
    for a in (torch.randn(1, m, k, dtype=dtype), torch.randn(batch, m, k, dtype=dtype),
              torch.randn(1, k, m, dtype=dtype).transpose(1, 2)):  # shared, per image, strided (W^T)
        got = ext(variant).matmul(a, b, False)
        want = a.double() @ b.double()
        assert got.shape == (batch, m, n) and got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= tolerance(dtype, k) * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, m, k, n", SHAPES)
def test_product_summed_over_images_matches_float64(batch, m, k, n, dtype, variant):
    """The weight gradient's form: B read transposed (its columns at a stride), the images summed."""
    a = torch.randn(batch, m, k, dtype=dtype)
    b = torch.randn(batch, n, k, dtype=dtype).transpose(1, 2)
    got = ext(variant).matmul(a, b, True)
    want = (a.double() @ b.double()).sum(0)
    assert got.shape == (m, n)
    assert (got.double() - want).abs().max().item() <= tolerance(dtype, batch * k) * want.abs().max().item()


@pytest.mark.parametrize("reduce", [False, True])
def test_product_bits_do_not_depend_on_the_thread_count(reduce):
    a, b = torch.randn(3, 50, 200), torch.randn(3, 200, 150)
    results = on_thread_counts((1, 2, 3), lambda: ext().matmul(a, b, reduce))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype, n", [(torch.float32, 208), (torch.float64, 200)])
def test_rows_read_in_place_give_the_packed_slabs_bits(dtype, n, variant):
    """B with rows an odd number of 64-byte lines apart is read in place (gemm.h's reads_in_place); the same values
    with rows 16 elements further apart (an even number of lines) are packed first: the same bits."""
    a = torch.randn(2, 13, 600, dtype=dtype)
    wide = torch.randn(2, 600, n + 16, dtype=dtype)
    packed, in_place = wide[..., :n], wide[..., :n].contiguous()
    assert in_place.stride(1) * in_place.element_size() // 64 % 2 == 1 and packed.stride(1) == n + 16
    got = ext(variant).matmul(a, in_place, False)
    assert torch.equal(got, ext(variant).matmul(a, packed, False))
    assert (got.double() - a.double() @ in_place.double()).abs().max() <= tolerance(dtype, 600) * got.abs().max()


def test_empty_depth_gives_zeros():
    got = ext().matmul(torch.randn(1, 4, 0), torch.randn(2, 0, 5), False)
    assert torch.equal(got, torch.zeros(2, 4, 5))


@pytest.mark.parametrize("a, b, message", [
    (torch.randn(4, 3), torch.randn(1, 3, 5), "a, b: expected"),
    (torch.randn(1, 4, 3), torch.randn(1, 2, 5), "a, b: expected"),
    (torch.randn(3, 4, 3), torch.randn(2, 3, 5), "a, b: expected"),
    (torch.randn(1, 4, 3).half(), torch.randn(1, 3, 5).half(), "float32 or float64"),
    (torch.randn(1, 4, 3), torch.randn(1, 3, 5).double(), "one dtype"),
])
def test_bad_operands_are_one_line_errors(a, b, message):
    with pytest.raises(RuntimeError, match=message):
        ext().matmul(a, b, False)


def test_native_projection_backend_gives_the_convs_gradients_in_float64():
    """The layer's projection through the native backend, forward and both gradients, against the three
    1x1 convs in float64 (the fp32 comparison is tests/test_layers.py's)."""
    layer = sasa_impls.SASA2d(10, 12, 3, heads=2).double()
    convs = (layer.query, layer.key, layer.value)
    x = torch.randn(2, 10, 7, 9, dtype=torch.float64, requires_grad=True)
    weight = sasa_impls.projection.stacked_weight(convs)
    fused = sasa_impls.projection.PROJECTION_BACKENDS["native"](x, weight)
    separate = torch.cat([conv(x) for conv in convs], 1)
    torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(separate)
    got = torch.autograd.grad((fused * seed).sum(), [x, *(c.weight for c in convs)])
    want = torch.autograd.grad((separate * seed).sum(), [x, *(c.weight for c in convs)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_native_projection_backend_records_autograd_only_in_training(monkeypatch):
    """The native backend goes through its autograd Function only where autograd records: in inference the product
    runs alone (nothing saved for a backward that will not run), with the same result."""
    applied = []
    original = sasa_impls.projection._NativeProduct.apply
    monkeypatch.setattr(sasa_impls.projection._NativeProduct, "apply", lambda *args: applied.append(1) or original(*args))
    layer = sasa_impls.SASA2d(6, 8, 3, heads=2)
    convs = (layer.query, layer.key, layer.value)
    x = torch.randn(2, 6, 5, 7)
    weight = sasa_impls.projection.stacked_weight(convs)
    project = sasa_impls.projection.PROJECTION_BACKENDS["native"]
    with torch.no_grad():
        inference = project(x, weight)
        want = torch.cat([conv(x) for conv in convs], 1)
    assert applied == []
    torch.testing.assert_close(inference, want, rtol=1e-5, atol=1e-5)
    training = project(x, sasa_impls.projection.stacked_weight(convs))
    assert applied == [1] and training.requires_grad and torch.equal(training.detach(), inference)
