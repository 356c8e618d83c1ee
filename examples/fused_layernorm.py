"""A fused LayerNorm as a torch.autograd.Function, checked with handgrad.

The forward saves xhat and rstd (what llm.c's layernorm_forward keeps) instead of letting autograd
save every intermediate; the backward is the closed form
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * w.
It reads saved intermediates, which carry no autograd graph, so it is @once_differentiable: a double
backward raises instead of silently returning a wrong second derivative.

    python examples/fused_layernorm.py      # a report per dtype; exit code 0 if all pass
"""

import sys

import torch
from torch.autograd.function import once_differentiable

from handgrad.functions import check_function


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean = x.mean(-1, keepdim=True)  # (..., 1)
        xc = x - mean  # (..., D)
        var = (xc * xc).mean(-1, keepdim=True)  # (..., 1) biased, as GPT-2's layernorm
        rstd = (var + eps) ** -0.5  # (..., 1)
        xhat = xc * rstd  # (..., D)
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight + bias

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, weight = ctx.saved_tensors
        lead = tuple(range(dout.dim() - 1))  # every leading dim is one use of weight and bias
        dxhat = dout * weight  # (..., D)
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dweight = (dout * xhat).sum(lead) if ctx.needs_input_grad[1] else None  # (D,)
        dbias = dout.sum(lead) if ctx.needs_input_grad[2] else None  # (D,)
        return dx, dweight, dbias, None  # None for eps, a python number


def inputs(dtype: torch.dtype, shape=(4, 3, 16)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)  # not ones: a wrong dweight cannot hide
    b = 0.1 * torch.randn(shape[-1], generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype), 1e-5


def main() -> int:
    reports = [
        check_function(LayerNormFunction, *inputs(dtype))
        for dtype in (torch.float64, torch.float32, torch.bfloat16)
    ]
    for report in reports:
        print(report, end="\n\n")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
