"""AttentionStem is the paper's stem (sec. 3.2, appendix A.1): every pixel attends to the pixels of its own
pool x pool block with spatially-aware values, then max pooling over those blocks and batch norm.

The oracle is the paper's definition written out pixel by pixel in float64, independent of the suite's op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sasa_impls
from sasa_impls import AttentionStem


def paper_stem(stem: AttentionStem, x: torch.Tensor) -> torch.Tensor:
    """The stem's output by the paper's definition, one pixel (i, j) and one head at a time.

    keys: the pixels (a, b) of (i, j)'s block; v_ab = (sum_m p(a, b, m) W_V^m) x_ab with
    p(a, b, m) = softmax_m((emb_row(a mod s) + emb_col(b mod s)) . nu_m); logit = q . k_ab + q_row . rel_row[a - i]
    + q_col . rel_col[b - j] (offsets from -(s - 1)); y_ij = sum softmax(logits) v_ab; then s x s max pool and
    batch norm with the batch's statistics (training mode).
    """
    batch, _, height, width = x.shape
    s, heads, mixtures = stem.pool_size, stem.heads, stem.nu.shape[0]
    w_q, w_k = stem.query.weight[:, :, 0, 0], stem.key.weight[:, :, 0, 0]  # (C, C_in)
    channels = w_q.shape[0]
    w_v = stem.value.weight[:, :, 0, 0].reshape(mixtures, channels, -1)  # (m, C, C_in): the W_V^m
    head_dim = channels // heads
    rows = head_dim // 2
    rel_row, rel_col = stem.rel.rel_row, stem.rel.rel_col

    def value(n: int, a: int, b: int) -> torch.Tensor:
        p = torch.softmax(torch.stack([(stem.emb_row[a % s] + stem.emb_col[b % s]) @ stem.nu[m] for m in range(mixtures)]), 0)
        return sum(p[m] * w_v[m] for m in range(mixtures)) @ x[n, :, a, b]

    pixels = []
    for n in range(batch):
        for i in range(height):
            for j in range(width):
                block = [(a, b) for a in range(i - i % s, i - i % s + s) for b in range(j - j % s, j - j % s + s)]
                q = w_q @ x[n, :, i, j]
                keys = [w_k @ x[n, :, a, b] for a, b in block]
                values = [value(n, a, b) for a, b in block]
                out = []
                for h in range(heads):
                    part = slice(h * head_dim, (h + 1) * head_dim)
                    q_h = q[part]
                    logits = torch.stack([
                        q_h @ key[part] + q_h[:rows] @ rel_row[h, a - i + s - 1] + q_h[rows:] @ rel_col[h, b - j + s - 1]
                        for key, (a, b) in zip(keys, block)
                    ])
                    weights = torch.softmax(logits, 0)
                    out.append(sum(w * v[part] for w, v in zip(weights, values)))
                pixels.append(torch.cat(out))
    y = torch.stack(pixels).reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
    norm = stem.pool[1]
    return F.batch_norm(F.max_pool2d(y, s), None, None, norm.weight, norm.bias, training=True, eps=norm.eps)


def randomised(stem: AttentionStem) -> AttentionStem:
    """Random values for the batch norm's affine parameters too (their defaults are ones and zeros)."""
    with torch.no_grad():
        stem.pool[1].weight.normal_()
        stem.pool[1].bias.normal_()
    return stem


@pytest.mark.parametrize("pool, heads, height, width", [(4, 2, 8, 12), (2, 4, 6, 4)])
def test_stem_matches_the_papers_definition_forward_and_gradients(pool, heads, height, width):
    torch.manual_seed(pool)
    stem = randomised(AttentionStem(3, 8, heads=heads, pool=pool, impl="unfold").double().train())
    x = torch.randn(2, 3, height, width, dtype=torch.float64, requires_grad=True)
    got, expected = stem(x), paper_stem(stem, x)
    assert got.shape == (2, 8, height // pool, width // pool)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn_like(got)
    inputs = [x] + list(stem.parameters())
    names = ["x"] + [name for name, _ in stem.named_parameters()]
    assert {"query.weight", "key.weight", "value.weight", "rel.rel_row", "rel.rel_col", "emb_row", "emb_col", "nu",
            "pool.1.weight", "pool.1.bias"} <= set(names)
    grads, expected_grads = torch.autograd.grad(got, inputs, cotangent), torch.autograd.grad(expected, inputs, cotangent)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert expected_grad.abs().max() > 0, name  # every input really reaches the output
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


def test_a_pixel_sees_only_its_own_block():
    """Perturbing one input pixel changes the pooled output of its own block and of no other block
    (a sliding k x k window would reach the neighbouring blocks)."""
    torch.manual_seed(4)
    stem = randomised(AttentionStem(3, 8, heads=2, impl="reference").double().eval())
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    moved = x.clone()
    moved[0, :, 5, 6] += torch.randn(3, dtype=torch.float64)  # block (1, 1): rows 4..7, columns 4..7
    with torch.no_grad():
        changed = (stem(moved) - stem(x)).abs().amax(1)[0]  # (3, 3): one entry per block
    assert changed[1, 1] > 1e-6
    changed[1, 1] = 0
    assert torch.all(changed == 0), changed


def test_stem_maps_224_to_56():
    with torch.device("meta"):
        stem = AttentionStem(3, 64, heads=8, impl="unfold")
        out = stem(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 64, 56, 56)
    assert stem.kernel_size == 7 and stem.rel.rel_row.shape == (8, 7, 4)  # offsets -3..3 inside a 4 x 4 block


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 30), (1, 3, 7, 7)])
def test_sizes_that_are_not_multiples_of_the_pool_are_refused(shape):
    stem = AttentionStem(3, 8, heads=2)
    with pytest.raises(ValueError, match=r"^x: height and width must be multiples of pool=4 .*got \d+x\d+$"):
        stem(torch.randn(*shape))


@pytest.mark.parametrize("kwargs, name", [({"pool": 0}, "pool"), ({"value_mixtures": 0}, "value_mixtures"),
                                          ({"heads": 3}, "heads"), ({"impl": "nope"}, "impl")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        AttentionStem(3, 8, **{"heads": 2, **kwargs})(torch.randn(1, 3, 8, 8))


def test_stem_is_exported_and_keyword_only():
    assert sasa_impls.AttentionStem is AttentionStem
    with pytest.raises(TypeError):
        AttentionStem(3, 64, 7, 8)  # the old (kernel_size, heads) positions are gone, not silently reinterpreted
