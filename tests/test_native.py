"""The native C++ CPU kernel (impl "native"): against the float64 reference beyond tests/test_correctness.py's shapes
(several bands and query blocks per row, partial blocks, wide heads, k = 19 and k larger than the image, batch > 1),
layouts, poisoned outputs, thread-count invariance, determinism, low precision, errors, availability and the build.

Every test runs with POISON_OUTPUTS on: an output element the kernel forgets to write stays NaN and fails the
comparison. The extension is compiled once per machine (cached by torch) and loaded once per session.
"""
from __future__ import annotations

import os

import pytest
import torch

import sasa_impls
from sasa_impls.impls import _native_build, native
from sasa_impls.impls.native import native_attention
from sasa_impls.impls.reference import reference_attention

from helpers import grads, on_thread_counts, preset_projection_backend, random_inputs

if not native.native_available(torch.device("cpu"), torch.float64)[0]:
    pytest.skip(f"native CPU kernel unavailable: {native.native_available(torch.device('cpu'), torch.float64)[1]}",
                allow_module_level=True)

NAMES = ("q", "k", "v", "rel_row", "rel_col")


@pytest.fixture(autouse=True)
def poisoned():
    with native.poisoned_outputs():
        yield


def assert_matches_reference(inputs, kernel_size, scale, **options):
    expected = reference_attention(*inputs, kernel_size, scale)
    actual = native_attention(*inputs, kernel_size, scale, **options)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn_like(expected)
    for name, got, want in zip(NAMES, grads(actual, inputs, cotangent), grads(expected, inputs, cotangent)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


# (batch, heads, H, W, D, k, with_rel, scale, band): W = 37 is more than two vectors of 16 lanes (AVX-512) and not a
# multiple of any lane count; H = 20 > the default band (8 at k <= 9), bands of 1 and 3 rows (an odd last group of
# rows), D = 64 and odd D, k = 19 with halo rows beyond every band, k larger than the image, batch > 1 (relative
# gradients summed over batch and bands), one-row and one-column images, one band per plane (its task stores dK, dV),
# and interleaved heads (problem.h's interleaved_heads; in fp64 with 8 lanes: 2 heads of W = 19 and of W = 11, the
# latter in bands of 4 rows whose halo rows are summed, forward and backward; 4 heads of W = 6 and of W = 5 forward).
CASES = [
    (2, 2, 20, 37, 8, 5, True, 0.7, None),
    (1, 1, 20, 37, 64, 19, True, 0.3, None),
    (2, 1, 13, 11, 7, 3, True, 1.2, 3),
    (1, 2, 9, 19, 16, 7, False, 1.0, 1),
    (2, 1, 5, 6, 6, 21, True, 0.9, None),
    (1, 1, 1, 23, 8, 5, True, 1.0, None),
    (1, 1, 17, 1, 5, 7, True, 1.0, 2),
    (2, 2, 12, 21, 8, 9, True, 0.8, 16),
    (2, 4, 9, 6, 8, 5, True, 0.9, None),
    (1, 8, 7, 5, 4, 7, True, 1.1, None),
    (2, 2, 10, 11, 8, 5, True, 0.8, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}_{}x{}_D{}_k{}_rel{}_s{}_band{}".format(*c))
def test_forward_and_all_gradients_match_reference(case):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale, band = case
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, requires_grad=True)
    assert_matches_reference(inputs, kernel_size, scale, band=band)


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out as SASA2d hands them over: a permuted view of a contiguous (B, heads, D, H, W)."""
    return t.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_layouts_give_the_same_bits(dtype):
    """Contiguous (B, heads, H, W, D) and channel-major views are packed alike: bitwise equal results, and the
    output and gradients keep the input's memory format (no copy in SASA2d's head merge)."""
    inputs = random_inputs(2, 2, 11, 19, 16, 5, True, dtype=dtype)
    cotangent = torch.randn(2, 2, 11, 19, 16, dtype=dtype)
    results = []
    for layout in (lambda t: t, channel_major):
        leaves = [layout(t).requires_grad_() if t.dim() == 5 else t.clone().requires_grad_() for t in inputs]
        out = native_attention(*leaves, 5, 0.5)
        assert out.stride() == leaves[0].stride()
        results.append([out, *grads(out, leaves, layout(cotangent))])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def heads_of(product: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """q, k, v as SASA2d hands them over: the channel thirds of one (B, 3 C, H, W) product, split into heads."""
    batch, channels, height, width = product.shape
    return [t.reshape(batch, heads, -1, height, width).permute(0, 1, 3, 4, 2) for t in product.split(channels // 3, 1)]


def test_gradients_of_slices_of_one_product_fill_one_buffer_alike():
    """q, k, v evenly spaced in one tensor: dq, dk, dv are the same slices of one new buffer (the product's
    gradient needs no concatenation), with the reference's values."""
    product = torch.randn(2, 3 * 2 * 8, 9, 13, dtype=torch.float64, requires_grad=True)
    q, k, v = heads_of(product, 2)
    rel = random_inputs(2, 2, 9, 13, 8, 5, True, requires_grad=True)[3:]
    cotangent = torch.randn(2, 2, 9, 13, 8, dtype=torch.float64)
    got = grads(native_attention(q, k, v, *rel, 5, 0.7), (q, k, v), cotangent)
    want = grads(reference_attention(q, k, v, *rel, 5, 0.7), (q, k, v), cotangent)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")
        assert g.stride() == q.stride()
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1
    assert [g.storage_offset() for g in got] == [0, 8 * 2 * 9 * 13, 2 * 8 * 2 * 9 * 13]


def test_overlapping_views_get_gradients_of_their_own():
    """q, k, v evenly spaced in one tensor but overlapping (channel windows shifted by one): one buffer laid out
    alike would have the kernel write dq over dk, so each gets its own, and the reference's values."""
    base = torch.randn(1, 2, 7, 10, 10, dtype=torch.float64)
    q, k, v = (base[..., i:i + 8].requires_grad_() for i in range(3))
    cotangent = torch.randn(1, 2, 7, 10, 8, dtype=torch.float64)
    got = grads(native_attention(q, k, v, None, None, 5, 1.0), (q, k, v), cotangent)
    want = grads(reference_attention(q, k, v, None, None, 5, 1.0), (q, k, v), cotangent)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")
    assert len({g.untyped_storage().data_ptr() for g in got}) == 3


def test_sasa2d_uses_native_on_cpu_and_matches_reference():
    layer = sasa_impls.SASA2d(16, 16, kernel_size=5, heads=2, impl="native").double()
    x = torch.randn(2, 16, 9, 12, dtype=torch.float64)
    expected = sasa_impls.SASA2d(16, 16, kernel_size=5, heads=2, impl="reference").double()
    expected.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), expected(x), rtol=1e-10, atol=1e-10)
    assert sasa_impls.registry.auto_candidates("cpu", torch.float32)[0].name == "native"


def run_all(inputs, kernel_size, cotangent):
    out = native_attention(*inputs, kernel_size, 0.8)
    return [out, *grads(out, inputs, cotangent)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_results_do_not_depend_on_the_thread_count(dtype):
    inputs = random_inputs(3, 2, 21, 13, 16, 7, True, dtype=dtype, requires_grad=True)
    cotangent = torch.randn(3, 2, 21, 13, 16, dtype=dtype)
    # 6 planes: the forward's default band is the whole image on 1 thread, 12 rows on 2, 8 on 5
    results = on_thread_counts((1, 2, 5), lambda: run_all(inputs, 7, cotangent))
    for other in results[1:]:
        for name, first, second in zip(("out", *NAMES), results[0], other):
            assert torch.equal(first, second), name


def test_default_backward_band_is_the_plane_with_planes_enough_for_the_machine():
    """With at least 4 (batch, head) planes per CPU of the machine the backward's default band is the whole image
    (one task per plane stores dK and dV); with fewer, bands of k - 1 rows: the bits say which band ran."""
    planes = 4 * os.cpu_count()
    many = random_inputs(planes // 2, 2, 12, 9, 4, 9, True, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(planes // 2, 2, 12, 9, 4, dtype=torch.float64)
    default = grads(native_attention(*many, 9, 0.5), many, cotangent)
    whole = grads(native_attention(*many, 9, 0.5, band=12), many, cotangent)
    banded = grads(native_attention(*many, 9, 0.5, band=8), many, cotangent)
    assert all(torch.equal(a, b) for a, b in zip(default, whole))
    assert not torch.equal(default[1], banded[1])  # dK: halo rows summed across the two bands
    few = [t[:1].detach().requires_grad_() if t.dim() == 5 else t for t in many]
    few_cotangent = cotangent[:1]
    default = grads(native_attention(*few, 9, 0.5), few, few_cotangent)
    banded = grads(native_attention(*few, 9, 0.5, band=8), few, few_cotangent)
    assert all(torch.equal(a, b) for a, b in zip(default, banded))


def test_inference_skips_autograd_and_gives_the_training_bits():
    """Without grad mode (or without an input that requires grad) the forward kernel runs alone, no autograd
    node; with both, FusedSASA records the backward. The bits are the same either way."""
    inputs = random_inputs(1, 2, 9, 11, 8, 5, requires_grad=True)
    recorded = native_attention(*inputs, 5, 0.6)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        inference = native_attention(*inputs, 5, 0.6)
    plain = native_attention(*(t.detach() for t in inputs), 5, 0.6)
    assert inference.grad_fn is None and plain.grad_fn is None
    assert torch.equal(inference, recorded.detach()) and torch.equal(plain, recorded.detach())
    torch.testing.assert_close(plain, reference_attention(*(t.detach() for t in inputs), 5, 0.6), rtol=1e-10, atol=1e-10)


def test_repeated_backward_is_bitwise_deterministic():
    """Calls of one shape reuse each thread's workspace (sasa_cpu.cpp's thread_workspace); a call of another shape
    between them replaces it: the results depend on neither."""
    inputs = random_inputs(2, 2, 10, 9, 8, 5, True, dtype=torch.float32, requires_grad=True)
    cotangent = torch.randn(2, 2, 10, 9, 8)
    first, second = run_all(inputs, 5, cotangent), run_all(inputs, 5, cotangent)
    other = random_inputs(1, 2, 12, 30, 8, 7, True, dtype=torch.float32, requires_grad=True)
    run_all(other, 7, torch.randn(1, 2, 12, 30, 8))
    third = run_all(inputs, 5, cotangent)
    for name, a, b, c in zip(("out", *NAMES), first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c), name


# fp32 accumulation: the error is the output's own rounding (the gradients' relative to their scale).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def assert_close_to_float64(inputs, kernel_size, scale):
    """The kernel in the inputs' dtype against the float64 reference, output and every gradient within the
    dtype's TOLERANCE (gradients relative to their largest element)."""
    dtype = inputs[0].dtype
    exact = [t.detach().double().requires_grad_() for t in inputs]
    actual = native_attention(*inputs, kernel_size, scale)
    expected = reference_attention(*exact, kernel_size, scale)
    assert actual.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)
    cotangent = torch.randn_like(expected)
    for name, got, want in zip(NAMES, grads(actual, inputs, cotangent.to(dtype)), grads(expected, exact, cotangent)):
        assert got.dtype == dtype, name
        magnitude = want.abs().max().item()
        torch.testing.assert_close(got.double() / magnitude, want / magnitude, rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_low_precision_keeps_dtype_and_accumulates_in_fp32(dtype):
    assert_close_to_float64(random_inputs(2, 2, 9, 18, 16, 5, True, dtype=dtype, requires_grad=True), 5, 0.5)


def rising_key_inputs(dtype):
    """Random inputs whose key rows grow down the image (row a times 1 + a): the window's logits rise row by
    row by more than the forward's rescale margin (csrc/cpu/forward.h, kRescaleMargin = 8 in base 2), so
    the online softmax moves its running max and rescales its sums again and again."""
    q, k, v, rel_row, rel_col = random_inputs(1, 2, 12, 21, 8, 7, True)
    k = k * (1 + torch.arange(12.0, dtype=k.dtype)).view(1, 1, 12, 1, 1)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, rel_row, rel_col)]


def test_logits_rising_down_the_window_are_rescaled():
    assert_matches_reference(rising_key_inputs(torch.float64), 7, 1.0)
    assert_close_to_float64(rising_key_inputs(torch.float32), 7, 1.0)


@pytest.mark.skipif("avx2" not in _native_build.cpu_flags().split(), reason="the CPU has no AVX2")
def test_avx2_build_matches_reference():
    """The AVX2 code path (8 fp32 / 4 fp64 lanes, AVX2's masked stores, the exp by exponent bits), built with
    -march=haswell: what an AVX2-only CPU runs, checked here whatever wider ISA this CPU has."""
    with _native_build.cpu_variant("avx2"):
        for batch, heads, height, width, head_dim, kernel_size, with_rel, scale, band in CASES[:3]:
            inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, requires_grad=True)
            assert_matches_reference(inputs, kernel_size, scale, band=band)
        assert_close_to_float64(random_inputs(2, 2, 9, 21, 16, 19, True, dtype=torch.float32, requires_grad=True), 19, 0.5)
        assert _native_build.active_cpu_variant() == "avx2"


@pytest.mark.skipif("avx2" not in _native_build.cpu_flags().split(), reason="the CPU has no AVX2")
def test_cpu_variant_switches_the_op_and_the_projection_product(monkeypatch):
    """Within cpu_variant, SASA2d's native op and its native projection product (forward and both gradients) call
    the variant's build and nothing else; after it (also after an error) the normal build again."""
    built = _native_build.cpu_extension
    called = []
    monkeypatch.setattr(_native_build, "cpu_extension", lambda variant="", *rest: called.append(variant) or built(variant, *rest))
    layer = sasa_impls.SASA2d(8, 8, 5, heads=2, impl="native")
    x = torch.randn(1, 8, 6, 7, requires_grad=True)
    with _native_build.cpu_variant("avx2"):
        assert sasa_impls.projection.backend_key(x, 24, training=True)[-1] == "avx2"
        preset_projection_backend(monkeypatch, x, 24, "native")
        called.clear()
        layer(x).square().sum().backward()
        assert called and set(called) == {"avx2"}
        with pytest.raises(RuntimeError, match="inside"):
            with _native_build.cpu_variant(""):
                assert _native_build.active_cpu_variant() == ""
                raise RuntimeError("inside")
        assert _native_build.active_cpu_variant() == "avx2"
    assert _native_build.active_cpu_variant() == ""
    called.clear()
    native_attention(*random_inputs(1, 2, 5, 5, 4, 3, True), 3)
    assert called == [""]


def error_of(impl, *args, **kwargs) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as caught:
        sasa_impls.local_attention(*args, impl=impl, **kwargs)
    return caught.type, str(caught.value)


def test_bad_input_gets_the_same_errors_as_other_impls():
    q, k, v, rel_row, rel_col = random_inputs(1, 2, 5, 5, 4, 3, dtype=torch.float32)
    bad = [
        ((q, k, v, rel_row, rel_col, 4), {}),  # even kernel size
        ((q, k[..., :3], v, rel_row, rel_col, 3), {}),  # shapes differ
        ((q, k, v, rel_row, None, 3), {}),  # one embedding only
        ((q, k, v, rel_row[:, :2], rel_col, 3), {}),  # embedding shape
        ((q, k.double(), v, rel_row, rel_col, 3), {}),  # dtype mix
        ((q[0], k[0], v[0], rel_row, rel_col, 3), {}),  # rank
        ((q, k, v, rel_row, rel_col, 3), {"scale": "1"}),
        ((q.int(), k.int(), v.int(), None, None, 3), {}),
    ]
    for args, kwargs in bad:
        assert error_of("native", *args, **kwargs) == error_of("unfold", *args, **kwargs)
    for value in (0, -2, 1.5, True, "x"):
        with pytest.raises(ValueError, match="^band: expected a positive int"):
            native_attention(q, k, v, rel_row, rel_col, 3, band=value)
    with pytest.raises(ValueError, match="options: band='0' for 'native'"):
        sasa_impls.local_attention(q, k, v, rel_row, rel_col, 3, impl="native", options="band=0")
    expected = native_attention(q, k, v, rel_row, rel_col, 3, band=2)
    assert torch.equal(sasa_impls.local_attention(q, k, v, rel_row, rel_col, 3, impl="native", options="band=2"), expected)


def test_availability_says_why_not(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native.native_available(cpu, torch.float64) == (True, "")
    ok, reason = native.native_available(cpu, torch.int32)
    assert not ok and "dtype torch.int32 not supported" in reason
    ok, reason = native.native_available(torch.device("meta"), torch.float32)
    assert not ok and "no native kernel for device type 'meta'" in reason

    monkeypatch.setattr(torch.version, "cuda", None)
    ok, reason = native.native_available(cuda, torch.float32)
    assert not ok and "CPU-only build" in reason
    with pytest.raises(ValueError, match="impl: 'native' is not available on cuda"):
        spec = sasa_impls.registry.AttentionSpec(cuda, torch.float32, 1, 1, 4, 4, 8, 3, True, False)
        sasa_impls.functional.select_impl("native", spec)

    monkeypatch.setattr(_native_build, "_ninja_on_path", lambda: False)
    ok, reason = native.native_available(cpu, torch.float32)
    assert not ok and "ninja is not installed" in reason

    monkeypatch.setenv("CXX", "no-such-compiler-sasa")
    ok, reason = native.native_available(cpu, torch.float32)
    assert not ok and "no C++ compiler" in reason and "no-such-compiler-sasa" in reason


def test_build_prints_one_line_and_reports_failures(monkeypatch, capsys):
    """A due build announces itself in one stderr line; a failed build raises with the compiler's error lines
    and native_available reports its first error line from then on. (torch's load is faked: no compile.)"""
    from torch.utils import cpp_extension

    monkeypatch.setattr(_native_build, "_FAILURES", {})
    monkeypatch.setattr(_native_build, "_built", lambda name: False)
    monkeypatch.setattr(cpp_extension, "load", lambda **options: options["name"])
    tag, _ = _native_build.source_tree("cpu")
    assert _native_build._build("cpu", "sasa_fake", ()) == f"sasa_fake_{_native_build.environment_tag(tag, {})}"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the native CPU kernel" in err

    def fail(**options):
        raise RuntimeError("Error building extension 'sasa_fake': [1/2] c++ ...\n"
                           "sasa_cpu.cpp:3:1: error: 'nonsense' does not name a type\n"
                           "sasa_cpu.cpp:9:5: error: 'more' was not declared\nninja: build stopped")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.raises(RuntimeError, match="does not name a type\nsasa_cpu.cpp:9:5: error: 'more' was not declared$"):
        _native_build._build("cpu", "sasa_fake", ())
    ok, reason = native.native_available(torch.device("cpu"), torch.float32)
    assert not ok and "build failed" in reason and reason.endswith("error: 'nonsense' does not name a type")


def test_extension_is_built_once_and_named_for_the_isa_and_sources():
    assert _native_build.cpu_extension() is _native_build.cpu_extension()
    tag, root = _native_build.source_tree("cpu")
    name = f"sasa_native_cpu_{_native_build.environment_tag(tag, _native_build.cpu_build_options())}"
    assert _native_build.cpu_extension().__name__ == name
    assert (root / "sasa_index.h").read_bytes() == (_native_build.CSRC / "sasa_index.h").read_bytes()
    assert (root / "cpu" / "forward.h").exists() and not (root / "cuda").exists()
    assert _native_build.source_tree("cuda")[0] != tag


# The CUDA kernels, where a GPU is present (this project's CPU machines compile them only:
# tests/test_native_cuda_compile.py). Inputs rounded to the dtype, the reference in float64 on those values.
CUDA = torch.cuda.is_available() and native.native_available(torch.device("cuda"), torch.float32)[0]
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and the native CUDA kernel")
CUDA_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# (batch, heads, H, W, D, k, with_rel, scale): every padded head dim 8 .. 256 (odd D too), partial tiles,
# k = 19 (several halo chunks), k larger than the image, batch > 1. Deliberately the same layout as
# test_correctness.SHAPES (a table of shapes, other values): `duplicates` lists the pair.
CUDA_CASES = [
    (2, 2, 13, 21, 8, 7, True, 0.7),
    (1, 3, 9, 35, 16, 19, True, 0.4),
    (2, 1, 7, 6, 33, 9, True, 1.0),
    (1, 2, 5, 9, 64, 5, False, 0.3),
    (1, 1, 6, 5, 128, 3, True, 0.2),
    (1, 1, 4, 6, 200, 7, True, 0.1),
    (1, 1, 3, 4, 5, 31, True, 1.0),
]


@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOLERANCE), ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "B{}h{}_{}x{}_D{}_k{}_rel{}_s{}".format(*c))
def test_cuda_forward_and_all_gradients_match_reference(case, dtype):
    batch, heads, height, width, head_dim, kernel_size, with_rel, scale = case
    inputs = random_inputs(batch, heads, height, width, head_dim, kernel_size, with_rel, dtype=dtype, device="cuda",
                           requires_grad=True)
    exact = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in inputs]
    actual = native_attention(*inputs, kernel_size, scale)
    expected = reference_attention(*exact, kernel_size, scale)
    assert actual.dtype == dtype and actual.device.type == "cuda"
    tol = CUDA_TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol, atol=tol)
    cotangent = torch.randn_like(expected)
    got = grads(actual, inputs, cotangent.to(device="cuda", dtype=dtype))
    for name, g, w in zip(NAMES, got, grads(expected, exact, cotangent)):
        scale_of = w.abs().max().item()
        torch.testing.assert_close(g.cpu().double() / scale_of, w / scale_of, rtol=tol, atol=tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@requires_cuda
def test_cuda_gradients_are_deterministic():
    inputs = random_inputs(2, 2, 17, 19, 16, 7, True, dtype=torch.float32, device="cuda", requires_grad=True)
    cotangent = torch.randn(2, 2, 17, 19, 16, device="cuda")
    first, second = run_all(inputs, 7, cotangent), run_all(inputs, 7, cotangent)
    for name, a, b in zip(("out", *NAMES), first, second):
        assert torch.equal(a, b), name
