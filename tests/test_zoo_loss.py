"""The masked sequence cross-entropy (ops.cross_entropy_masked_forward/backward) against
F.cross_entropy(ignore_index=-1) and its autograd gradient, and against float64 finite differences;
an ignored position gets exactly zero gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from handgrad import ops


def _batch(B, T, V, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, T, V), generator=g, dtype=dtype) * 3  # (B, T, V)
    Y = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # (B,) counted positions per row
    Y[torch.arange(T)[None, :] >= lengths[:, None]] = ops.IGNORE
    return logits, Y


@pytest.mark.parametrize("B, T, V, seed", [(1, 1, 2, 0), (4, 16, 27, 1), (3, 5, 7, 2), (32, 16, 27, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_cross_entropy_matches_torch_and_autograd(B, T, V, seed, dtype):
    logits, Y = _batch(B, T, V, seed, dtype)
    loss, cache = ops.cross_entropy_masked_forward(logits, Y)
    leaf = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(leaf.view(-1, V), Y.view(-1), ignore_index=-1)
    (dref,) = torch.autograd.grad(ref * 0.7, leaf)
    dlogits = ops.cross_entropy_masked_backward(0.7, cache)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-15)}[dtype]
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(dlogits, dref, **tol)
    ignored = Y == ops.IGNORE
    assert (dlogits[ignored] == 0).all()


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_masked_cross_entropy_backward_matches_finite_differences(seed):
    logits, Y = _batch(3, 6, 5, seed)
    dlogits = ops.cross_entropy_masked_backward(1.0, ops.cross_entropy_masked_forward(logits, Y)[1])
    h = 1e-6
    numeric = torch.zeros_like(logits)
    for i in range(logits.numel()):
        plus, minus = logits.clone().view(-1), logits.clone().view(-1)
        plus[i] += h
        minus[i] -= h
        numeric.view(-1)[i] = (ops.cross_entropy_masked_forward(plus.view_as(logits), Y)[0]
                               - ops.cross_entropy_masked_forward(minus.view_as(logits), Y)[0]) / (2 * h)
    assert ((dlogits - numeric).abs() <= 1e-8 + 1e-6 * numeric.abs()).all()


def test_masked_cross_entropy_by_hand():
    """Two positions counted, one ignored: uniform logits over V=4 give log 4 at each counted one."""
    logits = torch.zeros((1, 3, 4), dtype=torch.float64)
    Y = torch.tensor([[2, 0, -1]])
    loss, cache = ops.cross_entropy_masked_forward(logits, Y)
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-15)
    d = ops.cross_entropy_masked_backward(1.0, cache)
    assert d[0, 0].tolist() == [0.125, 0.125, -0.375, 0.125]  # (1/4 - onehot) / 2
    assert d[0, 2].tolist() == [0.0] * 4


def test_an_ignored_position_does_not_change_the_loss():
    logits, Y = _batch(4, 8, 6, 7)
    loss, _ = ops.cross_entropy_masked_forward(logits, Y)
    other = logits.clone()
    other[Y == ops.IGNORE] = 1e3  # anything at an ignored position
    assert ops.cross_entropy_masked_forward(other, Y)[0].item() == loss.item()
