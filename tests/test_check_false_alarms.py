"""The checker on correct code must pass: ten seeds each of linear, tanh, GELU, softmax, layernorm and
batchnorm (batch 2 and 64, 3-D batchnorm input) in float32 and float64, N(0, 1) upstream gradients,
non-trivial inits. And on wrong code it must say so: batchnorm's eps left out of the backward, in
either dtype, is a formula difference; a tie of two maxima is a point of non-differentiability."""

import math

import pytest
import torch

from handgrad import check, ops

LN_EPS = 1e-5


def linear_forward(x, W, b):
    return x @ W + b, (x, W)  # (N, out)


def linear_backward(dout, cache):
    x, W = cache
    return dout @ W.T, x.T @ dout, dout.sum(0)


def tanh_forward(x):
    t = torch.tanh(x)
    return t, t


def tanh_backward(dout, t):
    return (1 - t * t) * dout


def gelu_forward(x):
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # Phi(x)
    return x * cdf, (x, cdf)


def gelu_backward(dout, cache):
    x, cdf = cache
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # phi(x)
    return dout * (cdf + x * pdf)


def softmax_forward(x):
    e = (x - x.amax(-1, keepdim=True)).exp()
    s = e / e.sum(-1, keepdim=True)  # (N, C)
    return s, s


def softmax_backward(dout, s):
    return s * (dout - (dout * s).sum(-1, keepdim=True))


def layernorm_forward(x, gain, bias):
    xc = x - x.mean(-1, keepdim=True)  # (N, D)
    rstd = ((xc * xc).mean(-1, keepdim=True) + LN_EPS) ** -0.5  # (N, 1)
    xhat = xc * rstd
    return xhat * gain + bias, (xhat, rstd, gain)


def layernorm_backward(dout, cache):
    xhat, rstd, gain = cache
    D = xhat.shape[-1]
    dxhat = dout * gain  # (N, D)
    dx = rstd / D * (D * dxhat - dxhat.sum(-1, keepdim=True) - xhat * (dxhat * xhat).sum(-1, keepdim=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def batchnorm_forward(x, gain, bias):
    out, cache, _ = ops.batchnorm_forward(x, gain, bias)
    return out, cache


def batchnorm_backward_without_eps(dout, cache):
    """The closed form with var_inv recomputed as var**-0.5: the forward's eps left out."""
    bnraw, bnvar_inv, bngain = cache
    dims = tuple(range(dout.dim() - 1))
    n = dout.numel() // dout.shape[-1]
    var_inv = (bnvar_inv**-2 - ops.BN_EPS) ** -0.5  # (1, C) no eps
    raw = bnraw * var_inv / bnvar_inv  # (N, C)
    dbngain = (bnraw * dout).sum(dims, keepdim=True)
    dbnbias = dout.sum(dims, keepdim=True)
    dx = bngain * var_inv / n * (n * dout - dbnbias - n / (n - 1) * raw * (raw * dout).sum(dims, keepdim=True))
    return dx, dbngain.reshape(bngain.shape), dbnbias.reshape(bngain.shape)


def inputs(kind, n, seed, dtype):
    """Non-trivial inputs: shifted, scaled data, gains away from 1, non-zero biases. Drawn from seed
    1000 + seed, so they never repeat the checker's upstream gradient (drawn from seed)."""
    g = torch.Generator().manual_seed(1000 + seed)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "linear":
        d = {"x": 2 * r(n, 6) + 0.5, "W": 1.7 * r(6, 5) / 6**0.5, "b": r(5)}
    elif kind in ("tanh", "gelu", "softmax"):
        d = {"x": 2 * r(n, 5) + 0.3}
    elif kind == "layernorm":
        d = {"x": 3 * r(n, 8) + 1.0, "gain": 1 + 0.5 * r(8), "bias": r(8)}
    elif kind == "batchnorm":
        d = {"x": 3 * r(n, 5) + 1.0, "gain": 1 + 0.5 * r(5), "bias": r(5)}
    else:  # batchnorm over (N, T, C), makemore part 5
        d = {"x": 3 * r(n, 3, 5) + 1.0, "gain": 1 + 0.5 * r(5), "bias": r(5)}
    return {k: v.to(dtype) for k, v in d.items()}


CORRECT = {
    "linear": (linear_forward, linear_backward),
    "tanh": (tanh_forward, tanh_backward),
    "gelu": (gelu_forward, gelu_backward),
    "softmax": (softmax_forward, softmax_backward),
    "layernorm": (layernorm_forward, layernorm_backward),
    "batchnorm": (batchnorm_forward, lambda dout, cache: ops.batchnorm_backward(dout, cache)),
    "batchnorm 3-D": (batchnorm_forward, lambda dout, cache: ops.batchnorm_backward(dout, cache)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(CORRECT))
def test_correct_backward_passes_over_ten_seeds_and_batch_2_to_64(kind, dtype):
    forward, backward = CORRECT[kind]
    for n in (2, 64):
        for seed in range(10):
            report = check.check_backward(forward, backward, inputs(kind, n, seed, dtype), seed=seed)
            assert report.passed, f"false alarm: {kind}, batch {n}, seed {seed}\n{report}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [2, 32])
def test_batchnorm_with_eps_left_out_is_a_formula_difference_not_rounding(n, dtype):
    report = check.check_backward(batchnorm_forward, batchnorm_backward_without_eps,
                                  inputs("batchnorm", n, 0, dtype))
    assert not report.passed
    bad = [r for r in report.failures() if r.name == "x"]
    assert bad, str(report)
    for row in bad:
        assert "rounding-order difference" not in row.diagnosis
    assert all("formula difference" in r.diagnosis or "eps (1e-05) left out" in r.diagnosis for r in bad), str(report)


def max_forward(x):
    return x.amax(-1), x  # (N,)


def max_backward(dout, x):
    """Route each row's upstream gradient to its argmax (the first of tied maxima)."""
    dx = torch.zeros_like(x)
    return dx.scatter(-1, x.argmax(-1, keepdim=True), dout.unsqueeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_tie_of_two_maxima_is_a_point_of_non_differentiability_not_a_failure(dtype):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1, 3] = x[1].max()  # rows 1 and 2 have two equal maxima
    x[2, 0] = x[2].max()
    report = check.check_backward(max_forward, max_backward, {"x": x.to(dtype)})
    assert report.passed, str(report)
    fd = report.sections[-1].rows[0]
    assert fd.kinks == 2 and "not differentiable" in fd.note
    ag = report.row("x")
    assert ag.excused and not ag.allclose and "not differentiable" in ag.note  # autograd splits the tie
    assert "note:" in str(report)


def test_a_wrong_gradient_at_a_tie_still_fails():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1, 3] = x[1].max()

    def doubled(dout, x):
        return 2 * max_backward(dout, x)
    report = check.check_backward(max_forward, doubled, {"x": x})
    assert not report.passed and not report.row("x").excused
