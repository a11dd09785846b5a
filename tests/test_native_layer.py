"""SASA2d as one native autograd node (sasa_impls/native_layer.py, csrc/cpu/sasa_cpu.cpp's LayerStep): taken where
the op's implementation and the projection's backend are native, the general path's bits forward and for every
gradient (borders, k larger than the image, with and without relative logits, stride 2, fp32 and fp64, inference),
the float64 reference's values, and weights changed between steps seen."""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from sasa_impls.impls import native
from sasa_impls.native_layer import native_layer_band

from helpers import preset_projection_backend

if not native.native_available(torch.device("cpu"), torch.float64)[0]:
    pytest.skip(f"native CPU kernel unavailable: {native.native_available(torch.device('cpu'), torch.float64)[1]}",
                allow_module_level=True)

CASES = [  # (dtype, relative, stride, channels, heads, k, batch, height, width)
    (torch.float32, True, 1, 16, 4, 7, 2, 9, 13),
    (torch.float64, True, 1, 16, 2, 15, 1, 9, 13),  # k larger than the image
    (torch.float64, False, 2, 8, 2, 5, 2, 10, 6),
    (torch.float32, False, 1, 32, 8, 19, 1, 28, 28),
]


def layers(dtype, relative, stride, channels, heads, k, monkeypatch) -> tuple[sasa_impls.SASA2d, sasa_impls.SASA2d]:
    """Two SASA2d with the same parameters: the first as SASA2d runs it, the second held to the general path."""
    fused = sasa_impls.SASA2d(channels, channels, k, heads, stride=stride, impl="native", relative=relative).to(dtype)
    general = sasa_impls.SASA2d(channels, channels, k, heads, stride=stride, impl="native", relative=relative).to(dtype)
    general.load_state_dict(fused.state_dict())
    monkeypatch.setattr(general, "_native_band", lambda *args: None)
    return fused, general


def node_names(output: torch.Tensor) -> set[str]:
    names, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(node.name())
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-rel{int(c[1])}-s{c[2]}-k{c[5]}-{c[7]}x{c[8]}")
def test_one_node_gives_the_general_paths_bits(case, monkeypatch):
    """Forward, the input's, the projections' and the embeddings' gradients, and inference: equal bits (the same
    kernels on the same operands), on poisoned outputs (an element left unwritten stays NaN and fails)."""
    dtype, relative, stride, channels, heads, k, batch, height, width = case
    fused, general = layers(dtype, relative, stride, channels, heads, k, monkeypatch)
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    preset_projection_backend(monkeypatch, x, 3 * channels, "native", (True, False))
    leaves = x.clone().requires_grad_(), x.clone().requires_grad_()
    with native.poisoned_outputs():
        outputs = fused(leaves[0]), general(leaves[1])
        assert any("LayerStep" in name for name in node_names(outputs[0]))
        assert not any("LayerStep" in name for name in node_names(outputs[1]))
        cotangent = torch.randn_like(outputs[0])
        for out in outputs:
            out.backward(cotangent)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(leaves[0].grad, leaves[1].grad)
        for (name, p), q in zip(fused.named_parameters(), general.parameters()):
            assert torch.equal(p.grad, q.grad), name
        with torch.no_grad():
            assert torch.equal(fused(x), general(x))
    assert not torch.isnan(outputs[0]).any() and not torch.isnan(leaves[0].grad).any()


def test_one_node_matches_the_float64_reference(monkeypatch):
    """The node's output and gradients against SASA2d on the reference op (the general path), float64."""
    fused = sasa_impls.SASA2d(12, 12, 9, 3, impl="native").double()
    reference = sasa_impls.SASA2d(12, 12, 9, 3, impl="reference").double()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, 7, 11, dtype=torch.float64)
    preset_projection_backend(monkeypatch, x, 3 * 12, "native", (True, False))
    leaves = x.clone().requires_grad_(), x.clone().requires_grad_()
    outputs = fused(leaves[0]), reference(leaves[1])
    assert any("LayerStep" in name for name in node_names(outputs[0]))
    cotangent = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(cotangent)
    pairs = [(outputs[0], outputs[1]), (leaves[0].grad, leaves[1].grad),
             *((p.grad, q.grad) for p, q in zip(fused.parameters(), reference.parameters()))]
    for got, want in pairs:
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_only_what_needs_a_gradient_gets_one(monkeypatch):
    """An input without grad gets none (its product gradient is skipped), frozen projections get none, and the
    others still get the general path's bits."""
    fused, general = layers(torch.float64, True, 1, 8, 2, 5, monkeypatch)
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64)
    preset_projection_backend(monkeypatch, x, 3 * 8, "native", (True, False))
    for layer in (fused, general):
        layer(x).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(fused.parameters(), general.parameters()))
    for layer in (fused, general):
        layer.zero_grad(set_to_none=True)
        layer.key.weight.requires_grad_(False)
    leaves = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(leaves[0]).sum().backward()
    general(leaves[1]).sum().backward()
    assert fused.key.weight.grad is None and torch.equal(leaves[0].grad, leaves[1].grad)
    assert torch.equal(fused.query.weight.grad, general.query.weight.grad)


def test_weights_changed_between_steps_are_seen(monkeypatch):
    """A training step stacks the weights anew: a change through .data (which the version counter does not see)
    shows in the next step, as in the general path; in inference an in-place update does."""
    fused, general = layers(torch.float64, True, 1, 8, 2, 5, monkeypatch)
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64, requires_grad=True)
    preset_projection_backend(monkeypatch, x, 3 * 8, "native", (True, False))
    before = fused(x)
    for layer in (fused, general):
        layer.value.weight.data.mul_(-2.0)
    after = fused(x)
    assert not torch.allclose(before, after) and torch.equal(after, general(x))
    with torch.no_grad():
        first = fused(x)
        for layer in (fused, general):
            layer.query.weight.add_(0.5)
        assert not torch.equal(first, fused(x)) and torch.equal(fused(x), general(x))


def test_the_general_path_where_the_node_cannot_run(monkeypatch):
    """Another implementation, another projection backend, a dtype the native product does not take: the general
    path (no LayerStep node); nor on another device than the CPU."""
    x = torch.randn(1, 8, 6, 7, requires_grad=True)
    assert not any("LayerStep" in n for n in node_names(sasa_impls.SASA2d(8, 8, 5, 2, impl="unfold")(x)))
    preset_projection_backend(monkeypatch, x, 24, "conv", (True, False))
    assert not any("LayerStep" in n for n in node_names(sasa_impls.SASA2d(8, 8, 5, 2, impl="native")(x)))
    half = sasa_impls.SASA2d(8, 8, 5, 2, impl="native").to(torch.bfloat16)
    assert not any("LayerStep" in n for n in node_names(half(x.detach().to(torch.bfloat16).requires_grad_())))
    layer = sasa_impls.SASA2d(8, 8, 5, 2, impl="native")
    convs = (layer.query, layer.key, layer.value)
    assert native_layer_band(torch.empty(1, 8, 6, 7, device="meta"), convs, None, None, 2, 5, "native", None,
                             False) is None


def test_bad_input_still_names_the_argument():
    """Channels that are not the layer's: the general path's error, not the node's."""
    with pytest.raises((ValueError, RuntimeError)) as caught:
        sasa_impls.SASA2d(8, 8, 5, 2, impl="native")(torch.randn(1, 6, 6, 7))
    assert "LayerStep" not in str(caught.value)


def test_a_retained_graph_runs_backward_again_and_double_backward_is_refused(monkeypatch):
    """The node lets its product go after the op's backward only where the graph is not kept: a second backward
    through a retained graph gives the same gradients; create_graph raises instead of differentiating wrongly."""
    fused, _ = layers(torch.float64, True, 1, 8, 2, 5, monkeypatch)
    x = torch.randn(1, 8, 6, 7, dtype=torch.float64, requires_grad=True)
    preset_projection_backend(monkeypatch, x, 3 * 8, "native", (True, False))
    out = fused(x)
    cotangent = torch.randn_like(out)
    out.backward(cotangent, retain_graph=True)
    first = [x.grad.clone(), *(p.grad.clone() for p in fused.parameters())]
    x.grad = None
    fused.zero_grad(set_to_none=True)
    out.backward(cotangent)
    assert all(torch.equal(a, b) for a, b in zip(first, [x.grad, *(p.grad for p in fused.parameters())]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)
