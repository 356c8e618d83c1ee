"""Every forward/backward pair in ops.py over random shapes (hypothesis), against autograd and float64
finite differences through handgrad.check; and one hand-computable case per op."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from handgrad import ops
from handgrad.check import check_backward

PROPS = settings(max_examples=25, deadline=None, derandomize=True)
sizes = st.integers(1, 7)
seeds = st.integers(0, 2**31 - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def assert_passed(report):
    assert report.passed, str(report)


# ---------------------------------------------------------------------------- properties
@PROPS
@given(V=st.integers(1, 9), N=sizes, T=sizes, E=sizes, seed=seeds)
def test_embedding_backward_matches_autograd_and_finite_differences(V, N, T, E, seed):
    g = gen(seed)
    X = torch.randint(0, V, (N, T), generator=g)  # repeats are likely: dC must accumulate
    assert_passed(check_backward(ops.embedding_forward, ops.embedding_backward, {"C": randn(g, V, E), "X": X}))


@PROPS
@given(N=sizes, D=sizes, O=sizes, seed=seeds)
def test_linear_backward_matches_autograd_and_finite_differences(N, D, O, seed):
    g = gen(seed)
    inputs = {"x": randn(g, N, D), "W": randn(g, D, O), "b": randn(g, O, scale=0.1)}
    assert_passed(check_backward(ops.linear_forward, ops.linear_backward, inputs, seed=seed))


@PROPS
@given(N=st.integers(2, 9), H=sizes, seed=seeds, spread=st.sampled_from([0.1, 1.0, 10.0]))
def test_batchnorm_backward_matches_autograd_and_finite_differences(N, H, seed, spread):
    g = gen(seed)
    inputs = {"x": randn(g, N, H, scale=spread, shift=0.5), "bngain": randn(g, 1, H, scale=0.1, shift=1.0),
              "bnbias": randn(g, 1, H, scale=0.1)}
    assert_passed(check_backward(ops.batchnorm_forward, ops.batchnorm_backward, inputs, seed=seed))


@PROPS
@given(N=sizes, H=sizes, seed=seeds, scale=st.sampled_from([0.5, 2.0, 5.0]))
def test_tanh_backward_matches_autograd_and_finite_differences(N, H, seed, scale):
    g = gen(seed)
    assert_passed(check_backward(ops.tanh_forward, ops.tanh_backward, {"x": randn(g, N, H, scale=scale)},
                                 seed=seed))


@PROPS
@given(N=sizes, V=st.integers(2, 9), seed=seeds, scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_cross_entropy_backward_matches_autograd_and_finite_differences(N, V, seed, scale):
    g = gen(seed)
    inputs = {"logits": randn(g, N, V, scale=scale), "Y": torch.randint(0, V, (N,), generator=g)}
    assert_passed(check_backward(ops.cross_entropy_forward, ops.cross_entropy_backward, inputs, seed=seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_op_pair_passes_in_both_dtypes_on_the_lectures_shapes(dtype):
    g = gen(0)
    N, T, E, H, V = 32, 3, 10, 64, 27

    def r(*shape, **kw):
        return randn(g, *shape, **kw).to(dtype)
    X, Y = torch.randint(0, V, (N, T), generator=g), torch.randint(0, V, (N,), generator=g)
    pairs = [
        (ops.embedding_forward, ops.embedding_backward, {"C": r(V, E), "X": X}),
        (ops.linear_forward, ops.linear_backward, {"x": r(N, T * E), "W": r(T * E, H), "b": r(H, scale=0.1)}),
        (ops.batchnorm_forward, ops.batchnorm_backward,
         {"x": r(N, H), "bngain": r(1, H, scale=0.1, shift=1.0), "bnbias": r(1, H, scale=0.1)}),
        (ops.tanh_forward, ops.tanh_backward, {"x": r(N, H)}),
        (ops.cross_entropy_forward, ops.cross_entropy_backward, {"logits": r(N, V), "Y": Y}),
    ]
    for forward, backward, inputs in pairs:
        assert_passed(check_backward(forward, backward, inputs))


# ---------------------------------------------------------------------------- by hand
def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_embedding_backward_by_hand_adds_both_uses_of_a_row():
    X = torch.tensor([[0, 0, 2]])  # row 0 used twice, row 1 never
    demb = t([[[1.0, 2.0], [10.0, 20.0], [5.0, 6.0]]])  # (1, 3, 2)
    dC = ops.embedding_backward(demb, (X, 3))
    assert torch.equal(dC, t([[11.0, 22.0], [0.0, 0.0], [5.0, 6.0]]))


def test_linear_backward_by_hand():
    x, W, b = t([[1.0, 2.0]]), t([[3.0], [4.0]]), t([0.5])
    out, cache = ops.linear_forward(x, W, b)
    assert out.item() == 11.5
    dx, dW, db = ops.linear_backward(t([[2.0]]), cache)
    assert torch.equal(dx, t([[6.0, 8.0]])) and torch.equal(dW, t([[2.0], [4.0]])) and torch.equal(db, t([2.0]))


def test_batchnorm_backward_by_hand_for_two_samples():
    # n = 2, eps = 0: x = (1, 3) gives mean 2, Bessel variance 2, bnraw = (-1, 1)/sqrt(2) whatever x is,
    # so the output does not depend on x at all and dx = 0; dbngain = sum(dout * bnraw), dbnbias = sum(dout)
    out, cache, (mean, var) = ops.batchnorm_forward(t([[1.0], [3.0]]), t([[1.5]]), t([[0.0]]), eps=0.0)
    assert mean.item() == 2.0 and var.item() == 2.0
    dx, dbngain, dbnbias = ops.batchnorm_backward(t([[1.0], [0.0]]), cache)
    assert dx.abs().max().item() < 1e-15
    assert dbngain.item() == pytest.approx(-1 / math.sqrt(2)) and dbnbias.item() == 1.0


def test_tanh_backward_by_hand():
    x = t([[0.0, math.atanh(0.5)]])
    h, cache = ops.tanh_forward(x)
    dx = ops.tanh_backward(t([[3.0, 2.0]]), cache)
    torch.testing.assert_close(dx, t([[3.0, 1.5]]))  # 1 - 0^2 = 1, 1 - 0.5^2 = 0.75


def test_cross_entropy_backward_by_hand_for_uniform_logits():
    logits, Y = torch.zeros(2, 4, dtype=torch.float64), torch.tensor([1, 3])
    loss, cache = ops.cross_entropy_forward(logits, Y)
    assert loss.item() == pytest.approx(math.log(4))
    dlogits = ops.cross_entropy_backward(1.0, cache)  # (softmax - onehot) / n
    torch.testing.assert_close(dlogits, t([[0.125, -0.375, 0.125, 0.125], [0.125, 0.125, 0.125, -0.375]]))
