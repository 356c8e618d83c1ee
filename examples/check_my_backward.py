"""Check your own hand-written backward passes with handgrad: a softplus and a layernorm, each a
forward/backward pair, compared with autograd and float64 finite differences.

    python examples/check_my_backward.py        # prints two tables; exit code 0 if both pass
"""

import sys

import torch

from handgrad.check import check_backward


def softplus_forward(x):
    out = torch.log1p(torch.exp(x))  # (N, D)  log(1 + e^x)
    return out, (x,)


def softplus_backward(dout, cache):
    (x,) = cache
    return dout * torch.sigmoid(x)  # d softplus / dx = sigmoid(x)


def layernorm_forward(x, w, b, eps=1e-5):
    """Normalise each row over its last dimension (biased variance, as in GPT-2)."""
    mean = x.mean(-1, keepdim=True)  # (N, 1)
    rstd = (((x - mean) ** 2).mean(-1, keepdim=True) + eps) ** -0.5  # (N, 1)
    xhat = (x - mean) * rstd  # (N, D)
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    xhat, rstd, w = cache
    dw = (dout * xhat).sum(0)  # (D,)
    db = dout.sum(0)  # (D,)
    dxhat = dout * w  # (N, D)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdim=True))  # (N, D)
    return dx, dw, db


def main() -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    w = 1.0 + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)  # not ones: a wrong dw cannot hide
    b = 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    reports = [
        check_backward(softplus_forward, softplus_backward, {"x": x}),
        check_backward(layernorm_forward, layernorm_backward, {"x": x, "w": w, "b": b}),
    ]
    for report in reports:
        print(report, end="\n\n")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
