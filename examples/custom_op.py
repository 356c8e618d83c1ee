"""A custom op with a registered backward (torch.library.custom_op + register_autograd), checked with
handgrad's check_op.

RMSNorm as one op, the way a fused kernel would be registered: autograd sees an opaque
`handgrad_examples::rms_norm`, and the backward below is all it knows about its derivative:
    xhat = x * rrms,  rrms = (mean(x**2) + eps)**-1/2
    dx = rrms * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dout * weight,  dweight = sum(dout * xhat)
The backward recomputes rrms from the saved inputs with torch ops, so it is differentiable again.

    python examples/custom_op.py    # the reports in float64, float32 and bfloat16; exit 0 if all pass
"""

import sys

import torch

from handgrad.functions import check_op


@torch.library.custom_op("handgrad_examples::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rrms = (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5  # (..., 1)
    return x * rrms * weight  # (..., D)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def backward(ctx, dout):
    x, weight = ctx.saved_tensors
    lead = tuple(range(dout.dim() - 1))
    rrms = (x.pow(2).mean(-1, keepdim=True) + ctx.eps) ** -0.5  # (..., 1) recomputed: cheap
    xhat = x * rrms  # (..., D)
    dxhat = dout * weight
    dx = rrms * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, (dout * xhat).sum(lead), None  # None for eps


rms_norm.register_autograd(backward, setup_context=setup_context)


def main() -> int:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, 16, generator=g), 1 + 0.1 * torch.randn(16, generator=g)
    reports = [
        check_op(torch.ops.handgrad_examples.rms_norm, x.to(dtype), w.to(dtype), 1e-6)
        for dtype in (torch.float64, torch.float32, torch.bfloat16)
    ]
    for report in reports:
        print(report, end="\n\n")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
