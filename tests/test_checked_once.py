"""local_attention_checked_once (what SASA2d calls): the same results and errors as local_attention, the
arguments checked and the implementation chosen once per kind of call."""
from __future__ import annotations

import pytest
import torch

import sasa_impls
from sasa_impls import functional

from helpers import random_inputs


@pytest.fixture
def checks(monkeypatch) -> list:
    """The calls of check_inputs from here on (each one appended), the cache emptied."""
    calls = []
    real = functional.check_inputs

    def counted(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(functional, "check_inputs", counted)
    monkeypatch.setattr(functional, "_CHECKED", {})
    return calls


def fresh(height: int = 5, dtype: torch.dtype = torch.float32, grad: bool = False) -> list:
    tensors = list(random_inputs(1, 2, height, 5, 4, 3, True, dtype=dtype))
    return [t.requires_grad_(grad) for t in tensors]


def test_each_kind_of_call_is_checked_once_and_computes_what_local_attention_does(checks):
    for kind, count in (({}, 1), ({}, 1), ({"dtype": torch.float64}, 2), ({"height": 6}, 3), ({"grad": True}, 4)):
        inputs = fresh(**kind)
        got = functional.local_attention_checked_once(*inputs, 3, impl="unfold", scale=0.5)
        want = functional.local_attention(*[t.detach() for t in inputs], 3, impl="unfold", scale=0.5)
        assert len(checks) == count + 1  # the reference call above is checked too
        checks.pop()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()  # the last kind records autograd: its gradients reach the inputs
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


def _rel_row_float64(inputs, kwargs):
    inputs[3] = inputs[3].double()


def _k_narrower(inputs, kwargs):
    inputs[1] = inputs[1][..., :3]


def _scale_bool(inputs, kwargs):
    kwargs["scale"] = True


def _q_not_a_tensor(inputs, kwargs):
    inputs[0] = inputs[0].tolist()


def _kernel_size_float(inputs, kwargs):
    kwargs["kernel_size"] = 3.0


def _one_embedding(inputs, kwargs):
    inputs[4] = None


@pytest.mark.parametrize("spoil, error, name", [
    (_rel_row_float64, TypeError, "rel_row"), (_k_narrower, ValueError, "k"), (_scale_bool, TypeError, "scale"),
    (_q_not_a_tensor, TypeError, "q"), (_kernel_size_float, TypeError, "kernel_size"),
    (_one_embedding, ValueError, "rel_row, rel_col")])
def test_bad_input_after_good_calls_gets_the_same_error(checks, spoil, error, name):
    functional.local_attention_checked_once(*fresh(), 3, impl="unfold", scale=1)
    inputs, kwargs = fresh(), {"kernel_size": 3, "impl": "unfold", "scale": 1}
    spoil(inputs, kwargs)
    with pytest.raises(error, match=rf"^{name}:"):
        functional.local_attention_checked_once(*inputs, **kwargs)


def test_sasa2d_checks_its_op_call_once(checks):
    layer = sasa_impls.SASA2d(8, 8, 3, heads=2, impl="unfold")
    with torch.no_grad():
        first, second = (layer(torch.randn(1, 8, 6, 6)) for _ in range(2))
    assert len(checks) == 1 and first.shape == second.shape == (1, 8, 6, 6)
