"""A corpus of hand-written backward passes as engineers write them: torch.autograd.Function
subclasses, (forward, backward) pairs and custom ops, correct ones and ones with one realistic
mistake each. Each wrong case says which words a report that names its mistake contains. Used by
tests/test_check_function_corpus.py and benchmarks/gradcheck_side_by_side.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
ALL = (F64, F32, BF16)
EPS = 1e-5
SQRT_2_PI = math.sqrt(2 / math.pi)
GELU_A = 0.044715


def randn(seed: int, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def positive(seed: int, *shape: int) -> torch.Tensor:
    return randn(seed, *shape).abs() + 0.5


# ---------------------------------------------------------------------------- elementwise
class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        h = torch.tanh(x)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, dh):
        (h,) = ctx.saved_tensors
        return dh * (1 - h * h)


class TanhOneMinusH(Tanh):
    @staticmethod
    def backward(ctx, dh):
        (h,) = ctx.saved_tensors
        return dh * (1 - h)  # 1 - h where 1 - h**2 is meant


class TanhAtInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, dh):
        (x,) = ctx.saved_tensors
        return dh * (1 - x * x)  # the derivative's formula evaluated at the input


class TanhKeptAsAttribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        h = torch.tanh(x)
        ctx.h = h  # the output kept outside save_for_backward: an in-place change goes unnoticed
        return h

    @staticmethod
    def backward(ctx, dh):
        return dh * (1 - ctx.h * ctx.h)


class TanhChangesGradInPlace(Tanh):
    @staticmethod
    def backward(ctx, dh):
        (h,) = ctx.saved_tensors
        return dh.mul_(1 - h * h)  # right values, but the incoming gradient is overwritten


class Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return ds * s * (1 - s)


class SigmoidS(Sigmoid):
    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return ds * s


class SigmoidOneMinusS(Sigmoid):
    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return ds * (1 - s)


class SigmoidDetached(torch.autograd.Function):
    """First order right; the backward detaches its input, so a double backward gets no second term."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, ds):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x.detach())
        return ds * s * (1 - s)


class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y


class ExpAtInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * x  # the input where exp(x) is meant


class ExpScratchReused(torch.autograd.Function):
    """The saved tensor doubles as scratch space after it was saved."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        out = y.clone()
        y.mul_(2.0)
        return out

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y


class ExpJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        ctx.y = y
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y

    @staticmethod
    def jvp(ctx, dx):
        return dx * ctx.y


class ExpJvpAtInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(x)
        ctx.x = x
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y

    @staticmethod
    def jvp(ctx, dx):
        return dx * ctx.x  # the tangent through exp taken at the input


class Log(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy / x


class Sqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy / (2 * y)


class SqrtNoHalf(Sqrt):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy / y


class RSqrtNoHalf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x**-0.5
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return -dy * y**3  # d x**-0.5 = -0.5 x**-1.5: the 0.5 dropped


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * 3 * x**2


class CubeExponentKept(Cube):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * 3 * x**3


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * 2 * x


class SquareOneUse(Square):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * x  # one of the two uses of x


class Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * torch.sigmoid(x)


class SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return dy * (s + x * s * (1 - s))


class SiLUOnlyS(SiLU):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * torch.sigmoid(x)  # the product rule's second term missing


class InplaceReLU(torch.autograd.Function):
    """Correct: changes its input in place, marks it dirty and returns it."""

    @staticmethod
    def forward(ctx, x):
        x.clamp_(min=0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * (y > 0).to(dy.dtype)


class DoubleInPlace(torch.autograd.Function):
    """Changes its input in place without marking it dirty."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2.0)
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return 2.0 * dy


# ---------------------------------------------------------------------------- GELU, memory-saving
def _phi(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


class GeluErf(torch.autograd.Function):
    """Saves only x; recomputes Phi and phi in backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * _Phi(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * (_Phi(x) + x * _phi(x))


class GeluErfNoXPhi(GeluErf):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * _Phi(x)


class GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(SQRT_2_PI * (x + GELU_A * x**3)))

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + GELU_A * x**3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + 3 * GELU_A * x * x))


class GeluTanhConstant(GeluTanh):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + GELU_A * x**3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + GELU_A * x * x))  # 3 dropped


class GeluTanhNoSqrt2Pi(GeluTanh):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + GELU_A * x**3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (1 + 3 * GELU_A * x * x))


class GeluTanhErfBackward(GeluTanh):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * (_Phi(x) + x * _phi(x))  # the erf form's derivative for the tanh form


class GeluBuiltin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + GELU_A * x**3))
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t) * SQRT_2_PI * (1 + 3 * GELU_A * x * x))  # 1 - t


# ---------------------------------------------------------------------------- softmax and losses
class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        s = torch.softmax(x, -1)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return s * (ds - (ds * s).sum(-1, keepdim=True))


class SoftmaxDiagonal(Softmax):
    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return s * (1 - s) * ds


class SoftmaxPrimitives(torch.autograd.Function):
    """Softmax written out; the backward forgets the normaliser's dependence on x."""

    @staticmethod
    def forward(ctx, x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        s = e / e.sum(-1, keepdim=True)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return s * ds


class LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.log_softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy - y.exp() * dy.sum(-1, keepdim=True)


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, C) against integer targets (N,), softmax and NLL fused."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp = torch.log_softmax(logits, -1)
        ctx.save_for_backward(logp, targets)
        return -logp[torch.arange(logits.shape[0]), targets].mean()

    @staticmethod
    @once_differentiable  # it reads log-probabilities the forward computed: no graph for a second order
    def backward(ctx, dloss):
        logp, targets = ctx.saved_tensors
        n = logp.shape[0]
        dlogits = logp.exp()
        dlogits[torch.arange(n), targets] -= 1
        return dloss * dlogits / n, None


class CrossEntropyNoMinusOne(CrossEntropy):
    @staticmethod
    def backward(ctx, dloss):
        logp, targets = ctx.saved_tensors
        return dloss * logp.exp() / logp.shape[0], None


class CrossEntropyNoMean(CrossEntropy):
    @staticmethod
    def backward(ctx, dloss):
        logp, targets = ctx.saved_tensors
        dlogits = logp.exp()
        dlogits[torch.arange(logp.shape[0]), targets] -= 1
        return dloss * dlogits, None


class MSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        return ((pred - target) ** 2).mean()

    @staticmethod
    def backward(ctx, dloss):
        pred, target = ctx.saved_tensors
        d = 2 * (pred - target) / pred.numel() * dloss
        return d, -d


# ---------------------------------------------------------------------------- reductions and norms
class RowMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return x.mean(0)

    @staticmethod
    def backward(ctx, dm):
        return dm.expand(ctx.n, -1) / ctx.n


class RowMeanNoOneOverN(RowMean):
    @staticmethod
    def backward(ctx, dm):
        return dm.expand(ctx.n, -1).clone()


class Variance(torch.autograd.Function):
    """Biased variance of each row."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.var(-1, unbiased=False)

    @staticmethod
    def backward(ctx, dv):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        return dv.unsqueeze(-1) * 2 * (x - x.mean(-1, keepdim=True)) / n


class VarianceBessel(Variance):
    @staticmethod
    def backward(ctx, dv):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        return dv.unsqueeze(-1) * 2 * (x - x.mean(-1, keepdim=True)) / (n - 1)


class LayerNorm(torch.autograd.Function):
    """Fused layernorm over the last dim; saves xhat and rstd (so backward is once_differentiable)."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        mean = x.mean(-1, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(-1, keepdim=True)
        rstd = (var + eps) ** -0.5
        xhat = xc * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w + b

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormNoMeanTerm(LayerNorm):
    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        dxhat = dout * w
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormBessel(LayerNorm):
    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        n = dout.shape[-1]
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).sum(-1, keepdim=True) / (n - 1))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormNoEps(torch.autograd.Function):
    """Saves x and recomputes the statistics in backward, without eps there."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        ctx.save_for_backward(x, w)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) * (var + eps) ** -0.5 * w + b

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        rstd = var**-0.5
        xhat = (x - mean) * rstd
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormDifferentiable(torch.autograd.Function):
    """Saves the inputs and recomputes from them: its backward is differentiable again."""

    @staticmethod
    def forward(ctx, x, w, b, eps):
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) * (var + eps) ** -0.5 * w + b

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        rstd = (var + ctx.eps) ** -0.5
        xhat = (x - mean) * rstd
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormSavedNotOnce(torch.autograd.Function):
    """First order right, but saves intermediates and is not marked once_differentiable."""

    forward = LayerNorm.forward

    @staticmethod
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dims = tuple(range(dout.dim() - 1))
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(dims), dout.sum(dims), None


class LayerNormNoNone(LayerNorm):
    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, w = ctx.saved_tensors
        dxhat = dout * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.sum(0)  # no None for eps


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        rrms = (x.pow(2).mean(-1, keepdim=True) + EPS) ** -0.5
        ctx.save_for_backward(x, w, rrms)
        return x * rrms * w

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, w, rrms = ctx.saved_tensors
        xhat = x * rrms
        dxhat = dout * w
        dx = rrms * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dout * xhat).sum(0)


class BatchNorm(torch.autograd.Function):
    """Training-mode batchnorm over the rows (biased variance), gain and bias per column."""

    @staticmethod
    def forward(ctx, x, gain, bias):
        mean = x.mean(0, keepdim=True)
        var = ((x - mean) ** 2).mean(0, keepdim=True)
        rstd = (var + EPS) ** -0.5
        xhat = (x - mean) * rstd
        ctx.save_for_backward(xhat, rstd, gain)
        return xhat * gain + bias

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, gain = ctx.saved_tensors
        dxhat = dout * gain
        dx = rstd * (dxhat - dxhat.mean(0, keepdim=True) - xhat * (dxhat * xhat).mean(0, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.sum(0)


class BatchNormNoEps(BatchNorm):
    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, gain = ctx.saved_tensors
        rstd = (rstd**-2 - EPS) ** -0.5  # the variance's inverse square root without eps
        dxhat = dout * gain
        dx = rstd * (dxhat - dxhat.mean(0, keepdim=True) - xhat * (dxhat * xhat).mean(0, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.sum(0)


# ---------------------------------------------------------------------------- products, several inputs
class Linear(torch.autograd.Function):
    """x @ W.T + b (PyTorch's layout), computing only the gradients needed."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        return x @ W.T + b

    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = dout @ W
        if ctx.needs_input_grad[1]:
            dW = dout.T @ x
        if ctx.needs_input_grad[2]:
            db = dout.sum(0)
        return dx, dW, db


class LinearTransposedW(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W, x.T @ dout, dout.sum(0)


class LinearBiasNotSummed(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W, dout.T @ x, dout


class LinearBiasAveraged(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W, dout.T @ x, dout.mean(0)


class LinearNoneForW(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return dout @ W, None, dout.sum(0)


class LinearNeedsSwapped(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        dx = dW = None
        if ctx.needs_input_grad[1]:  # the index of W guards dx
            dx = dout @ W
        if ctx.needs_input_grad[0]:
            dW = dout.T @ x
        return dx, dW, dout.sum(0)


class LinearFloat32Grad(Linear):
    @staticmethod
    def backward(ctx, dout):
        x, W = ctx.saved_tensors
        return (dout @ W).float(), dout.T @ x, dout.sum(0)


class MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B):
        ctx.save_for_backward(A, B)
        return A @ B

    @staticmethod
    def backward(ctx, dC):
        A, B = ctx.saved_tensors
        return dC @ B.T, A.T @ dC


class MatMulMissingTranspose(MatMul):
    @staticmethod
    def backward(ctx, dC):
        A, B = ctx.saved_tensors
        return dC @ B, A.T @ dC


class Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return dc * b, dc * a


class MulWrongFactor(Mul):
    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return dc * a, dc * a


class Div(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return dc / b, -dc * a / (b * b)


class DivNoSquare(Div):
    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return dc / b, -dc * a / b


class Sub(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, dc):
        return dc, -dc


class SubSignB(Sub):
    @staticmethod
    def backward(ctx, dc):
        return dc, dc


class Scale(torch.autograd.Function):
    """x times a python number, passed through as a non-tensor input."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x * c

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.c, None


class ScaleTwice(Scale):
    @staticmethod
    def backward(ctx, dy):
        return 2 * dy * ctx.c, None


class ScaleGradForC(Scale):
    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.c, 0.0  # a gradient for the python number


class Attention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v for one head: the three inputs differentiated by hand."""

    @staticmethod
    def forward(ctx, q, k, v):
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(q @ k.T * scale, -1)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return p @ v

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        dv = p.T @ do
        dp = do @ v.T
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        return ds @ k * ctx.scale, ds.T @ q * ctx.scale, dv


class AttentionDiagonalSoftmax(Attention):
    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        dv = p.T @ do
        dp = do @ v.T
        ds = p * (1 - p) * dp
        return ds @ k * ctx.scale, ds.T @ q * ctx.scale, dv


class AttentionKeyScaleMissing(Attention):
    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        dv = p.T @ do
        dp = do @ v.T
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        return ds @ k * ctx.scale, ds.T @ q, dv


# ---------------------------------------------------------------------------- indices, several outputs
class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, W):
        ctx.save_for_backward(idx)
        ctx.V = W.shape[0]
        return W[idx]

    @staticmethod
    def backward(ctx, demb):
        (idx,) = ctx.saved_tensors
        dW = torch.zeros(ctx.V, demb.shape[-1], dtype=demb.dtype)
        dW.index_add_(0, idx.reshape(-1), demb.reshape(-1, demb.shape[-1]))
        return None, dW


class EmbeddingOverwrite(Embedding):
    @staticmethod
    def backward(ctx, demb):
        (idx,) = ctx.saved_tensors
        dW = torch.zeros(ctx.V, demb.shape[-1], dtype=demb.dtype)
        dW[idx] = demb  # a repeated index keeps one contribution
        return None, dW


class GatherCols(torch.autograd.Function):
    """out[i, j] = x[i, idx[i, j]] with an integer index input."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return x.gather(1, idx)

    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        return torch.zeros(ctx.shape, dtype=dout.dtype).scatter_add(1, idx, dout), None


class GatherColsOverwrite(GatherCols):
    @staticmethod
    def backward(ctx, dout):
        (idx,) = ctx.saved_tensors
        return torch.zeros(ctx.shape, dtype=dout.dtype).scatter(1, idx, dout), None


class Diff(torch.autograd.Function):
    """Differences of neighbours along the last dim, padded with the first column: (N, D) -> (N, D)."""

    @staticmethod
    def forward(ctx, x):
        return torch.cat([x[:, :1], x[:, 1:] - x[:, :-1]], 1)

    @staticmethod
    def backward(ctx, dout):
        dx = dout.clone()
        dx[:, :-1] -= dout[:, 1:]
        return dx


class DiffLastColumn(Diff):
    @staticmethod
    def backward(ctx, dout):
        dx = dout.clone()
        dx[:, 1:-1] -= dout[:, 2:]  # the boundary column 0 forgets its neighbour's term
        return dx


class MeanVar(torch.autograd.Function):
    """Two outputs: the mean and the biased variance of each row."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.mean(-1), x.var(-1, unbiased=False)

    @staticmethod
    def backward(ctx, dmean, dvar):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        xc = x - x.mean(-1, keepdim=True)
        return dmean.unsqueeze(-1) / n + dvar.unsqueeze(-1) * 2 * xc / n


class MeanVarBessel(MeanVar):
    @staticmethod
    def backward(ctx, dmean, dvar):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        xc = x - x.mean(-1, keepdim=True)
        return dmean.unsqueeze(-1) / n + dvar.unsqueeze(-1) * 2 * xc / (n - 1)


class SinCos(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x), torch.cos(x)

    @staticmethod
    def backward(ctx, ds, dc):
        (x,) = ctx.saved_tensors
        return ds * torch.cos(x) - dc * torch.sin(x)


class SinCosSign(SinCos):
    @staticmethod
    def backward(ctx, ds, dc):
        (x,) = ctx.saved_tensors
        return ds * torch.cos(x) + dc * torch.sin(x)


class SinCosLazy(torch.autograd.Function):
    """Two outputs; unused outputs' gradients arrive as None (set_materialize_grads(False))."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return torch.sin(x), torch.cos(x)

    @staticmethod
    def backward(ctx, ds, dc):
        (x,) = ctx.saved_tensors
        dx = torch.zeros_like(x)
        if ds is not None:
            dx = dx + ds * torch.cos(x)
        if dc is not None:
            dx = dx - dc * torch.sin(x)
        return dx


class MaxWithIndex(torch.autograd.Function):
    """Row maxima and their argmax (an integer output)."""

    @staticmethod
    def forward(ctx, x):
        values, index = x.max(-1)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        ctx.mark_non_differentiable(index)
        return values, index

    @staticmethod
    def backward(ctx, dvalues, dindex):
        (index,) = ctx.saved_tensors
        dx = torch.zeros(ctx.shape, dtype=dvalues.dtype)
        return dx.scatter(-1, index.unsqueeze(-1), dvalues.unsqueeze(-1))


class ScaledAndNormMarked(torch.autograd.Function):
    """Two outputs, the second wrongly marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        norm = (x * x).sum(-1)
        ctx.mark_non_differentiable(norm)
        return 2 * x, norm

    @staticmethod
    def backward(ctx, dy, dnorm):
        return 2 * dy


class Cumsum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.cumsum(-1)

    @staticmethod
    def backward(ctx, dy):
        return dy.flip(-1).cumsum(-1).flip(-1)


class ScaleByWeight(torch.autograd.Function):
    """New-style Function: forward without ctx, setup_context saves what backward needs."""

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy * w, (dy * x).sum(0)


class _WrongExpBackward(torch.autograd.Function):
    """exp(x) whose own backward is wrong: right values, wrong derivative."""

    @staticmethod
    def forward(ctx, x):
        return torch.exp(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


class ExpNestedWrongSecond(torch.autograd.Function):
    """First order right; its backward builds exp(x) with a Function whose backward is wrong, so
    the second order is wrong."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * _WrongExpBackward.apply(x)


class SoftmaxWrongDim(Softmax):
    @staticmethod
    def backward(ctx, ds):
        (s,) = ctx.saved_tensors
        return s * (ds - (ds * s).sum(0, keepdim=True))  # summed over the rows, not the softmax's dim


class LogSoftmaxWrongDim(LogSoftmax):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy - y.exp() * dy.sum(0, keepdim=True)


class ExpNoGrad(Exp):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y  # the local derivative, never multiplied by the incoming gradient


class LeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.leaky_relu(x, 0.1)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.1))


class LeakyReLUNoSlope(LeakyReLU):
    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * (x > 0).to(dy.dtype)


class Normalize(torch.autograd.Function):
    """x / |x| along the last dim; saves the norm, an intermediate, so once_differentiable."""

    @staticmethod
    def forward(ctx, x):
        n = x.norm(dim=-1, keepdim=True)
        ctx.save_for_backward(x, n)
        return x / n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, n = ctx.saved_tensors
        y = x / n
        return (dy - y * (dy * y).sum(-1, keepdim=True)) / n


class NormalizeNoNormTerm(Normalize):
    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, n = ctx.saved_tensors
        return dy / n  # the norm's own dependence on x forgotten


class BatchNormRunningStats(torch.autograd.Function):
    """Training-mode batchnorm that also updates running statistics passed in as float tensors (not
    differentiated: the caller does not mark them requires_grad) and returns None for them."""

    @staticmethod
    def forward(ctx, x, gain, bias, running_mean, running_var):
        mean = x.mean(0, keepdim=True)
        var = ((x - mean) ** 2).mean(0, keepdim=True)
        running_mean.mul_(0.9).add_(0.1 * mean.reshape(-1))
        running_var.mul_(0.9).add_(0.1 * var.reshape(-1))
        rstd = (var + EPS) ** -0.5
        xhat = (x - mean) * rstd
        ctx.save_for_backward(xhat, rstd, gain)
        return xhat * gain + bias

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        xhat, rstd, gain = ctx.saved_tensors
        dxhat = dout * gain
        dx = rstd * (dxhat - dxhat.mean(0, keepdim=True) - xhat * (dxhat * xhat).mean(0, keepdim=True))
        return dx, (dout * xhat).sum(0), dout.sum(0), None, None


class ListGrads(Mul):
    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        return [dc * b, dc * a]  # autograd takes a list as one gradient


class TrailingNones(Tanh):
    @staticmethod
    def backward(ctx, dh):
        (h,) = ctx.saved_tensors
        return dh * (1 - h * h), None, None  # extra trailing Nones: autograd accepts them


class ReluOfAbs(torch.autograd.Function):
    """relu(|x| + c) with c a float tensor input whose gradient is zero wherever |x| + c > 0: None
    for c is then right."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(x)
        return x * x + 0 * c

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return 2 * x * dy, None


def bn_running_inputs(seed):
    x, g, b = bn_inputs(seed)
    return (x.requires_grad_(), g.requires_grad_(), b.requires_grad_(), torch.zeros(4, dtype=torch.float64),
            torch.ones(4, dtype=torch.float64))


class ExpUnderNoGrad(torch.autograd.Function):
    """The forward computes under no_grad (as a kernel would): autograd cannot see through it, so the
    finite differences are the reference."""

    @staticmethod
    def forward(ctx, x):
        with torch.no_grad():
            y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y


class ExpUnderNoGradAtInput(ExpUnderNoGrad):
    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y.log()  # the input x where exp(x) is meant


# ---------------------------------------------------------------------------- (forward, backward) pairs
def tanh_forward(x):
    h = torch.tanh(x)
    return h, h


def tanh_backward(dh, h):
    return dh * (1 - h * h)


def tanh_backward_one_minus_h(dh, h):
    return dh * (1 - h)


def layernorm_forward(x, w, b):
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(-1, keepdim=True)
    rstd = (var + EPS) ** -0.5
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    xhat, rstd, w = cache
    dxhat = dout * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def layernorm_backward_no_mean(dout, cache):
    xhat, rstd, w = cache
    dxhat = dout * w
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def softmax_forward(x):
    s = torch.softmax(x, -1)
    return s, s


def softmax_backward(ds, s):
    return s * (ds - (ds * s).sum(-1, keepdim=True))


def softmax_backward_diagonal(ds, s):
    return s * (1 - s) * ds


def ce_forward(logits, targets):
    logp = torch.log_softmax(logits, -1)
    return -logp[torch.arange(logits.shape[0]), targets].mean(), (logp, targets)


def ce_backward(dloss, cache):
    logp, targets = cache
    d = logp.exp()
    d[torch.arange(logp.shape[0]), targets] -= 1
    return dloss * d / logp.shape[0]


def ce_backward_no_minus_one(dloss, cache):
    logp, _ = cache
    return dloss * logp.exp() / logp.shape[0]


def batchnorm_forward(x, gain, bias):
    mean = x.mean(0, keepdim=True)
    var = x.var(0, keepdim=True, unbiased=False)
    xhat = (x - mean) * (var + EPS) ** -0.5
    return xhat * gain + bias, (xhat, (var + EPS) ** -0.5, gain)


def batchnorm_backward(dout, cache):
    xhat, rstd, gain = cache
    dxhat = dout * gain
    dx = rstd * (dxhat - dxhat.mean(0, keepdim=True) - xhat * (dxhat * xhat).mean(0, keepdim=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def batchnorm_backward_bessel(dout, cache):
    xhat, rstd, gain = cache
    n = dout.shape[0]
    dxhat = dout * gain
    dx = rstd * (dxhat - dxhat.mean(0, keepdim=True) - xhat * (dxhat * xhat).sum(0, keepdim=True) / (n - 1))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def silu_forward(x):
    return x * torch.sigmoid(x), x


def silu_backward(dout, x):
    s = torch.sigmoid(x)
    return dout * (s + x * s * (1 - s))


def silu_backward_only_s(dout, x):
    return dout * torch.sigmoid(x)


# ---------------------------------------------------------------------------- custom ops
_OPS: dict[str, Any] = {}


def custom_ops() -> dict[str, Any]:
    """Registered once per process: softplus with a right and a wrong backward, and a NumPy
    (autograd-opaque) scaled tanh with a wrong sign."""
    if _OPS:
        return _OPS

    @torch.library.custom_op("handgrad_corpus::softplus", mutates_args=())
    def softplus(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x)

    def sp_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def sp_backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * torch.sigmoid(x)
    softplus.register_autograd(sp_backward, setup_context=sp_setup)

    @torch.library.custom_op("handgrad_corpus::softplus_exp", mutates_args=())
    def softplus_exp(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x)

    def spe_backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy * torch.exp(x)  # exp(x) where sigmoid(x) is meant
    softplus_exp.register_autograd(spe_backward, setup_context=sp_setup)

    @torch.library.custom_op("handgrad_corpus::np_tanh", mutates_args=())
    def np_tanh(x: torch.Tensor, scale: float) -> torch.Tensor:
        import numpy as np
        return torch.from_numpy(scale * np.tanh(x.detach().cpu().numpy())).to(x.device)

    def nt_setup(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.scale = inputs[1]

    def nt_backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return -dy * (ctx.scale - y * y / ctx.scale), None  # the sign flipped
    np_tanh.register_autograd(nt_backward, setup_context=nt_setup)

    def nt_backward_right(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * (ctx.scale - y * y / ctx.scale), None

    @torch.library.custom_op("handgrad_corpus::np_tanh_right", mutates_args=())
    def np_tanh_right(x: torch.Tensor, scale: float) -> torch.Tensor:
        import numpy as np
        return torch.from_numpy(scale * np.tanh(x.detach().cpu().numpy())).to(x.device)
    np_tanh_right.register_autograd(nt_backward_right, setup_context=nt_setup)
    _OPS.update(softplus=softplus, softplus_exp=softplus_exp, np_tanh=np_tanh, np_tanh_right=np_tanh_right)
    return _OPS


# ---------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One thing to check. `inputs(seed)` builds float64 inputs (cast to the dtype checked);
    `expect`: words one of which a report naming the mistake contains (empty: a correct case)."""

    name: str
    kind: str  # "function" | "pair" | "op"
    target: Any  # the Function, (forward, backward), or the op's key in custom_ops()
    inputs: Callable[[int], tuple]
    expect: tuple[str, ...] = ()
    klass: str = ""  # the class of mistake
    dtypes: tuple = ALL
    options: dict = field(default_factory=dict)

    @property
    def wrong(self) -> bool:
        return bool(self.expect)


def x45(seed):
    return (randn(seed, 4, 5),)


def pos45(seed):
    return (positive(seed, 4, 5),)


def ln_inputs(seed):
    return randn(seed, 4, 6), 1 + 0.2 * randn(seed + 1, 6), 0.1 * randn(seed + 2, 6), EPS


def bn_inputs(seed):
    return randn(seed, 6, 4, scale=2.0, shift=0.5), 1 + 0.2 * randn(seed + 1, 4), 0.1 * randn(seed + 2, 4)


def linear_inputs(seed):
    return randn(seed, 4, 5), 0.5 * randn(seed + 1, 5, 5), 0.1 * randn(seed + 2, 5)


def linear_rect_inputs(seed):
    return randn(seed, 4, 5), 0.5 * randn(seed + 1, 3, 5), 0.1 * randn(seed + 2, 3)


def two45(seed):
    return randn(seed, 4, 5), randn(seed + 1, 4, 5)


def div_inputs(seed):
    return randn(seed, 4, 5), positive(seed + 1, 4, 5)


def mat_inputs(seed):
    return randn(seed, 3, 4), randn(seed + 1, 4, 4)


def attn_inputs(seed):
    return randn(seed, 5, 4), randn(seed + 1, 6, 4), randn(seed + 2, 6, 3)


def ce_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return randn(seed, 6, 5, scale=2.0), torch.randint(0, 5, (6,), generator=g)


def emb_inputs(seed):
    return torch.tensor([[0, 2, 2], [3, 2, 0]]), randn(seed, 5, 3)


def gather_inputs(seed):
    return randn(seed, 4, 5), torch.tensor([[0, 1, 1], [2, 2, 2], [4, 0, 4], [3, 1, 3]])


def mse_inputs(seed):
    return randn(seed, 4, 5), randn(seed + 1, 4, 5)


def scale_inputs(seed):
    return randn(seed, 4, 5), 2.5


def nt_inputs(seed):
    return randn(seed, 4, 5), 1.5


def sw_inputs(seed):
    return randn(seed, 4, 5), 1 + 0.3 * randn(seed + 1, 5)


FUNC, PAIR, OP = "function", "pair", "op"
NO_BF16 = (F64, F32)

CORRECT: list[Case] = [
    Case("tanh", FUNC, Tanh, x45),
    Case("sigmoid", FUNC, Sigmoid, x45),
    Case("exp", FUNC, Exp, x45),
    Case("exp with jvp", FUNC, ExpJvp, x45),
    Case("log", FUNC, Log, pos45),
    Case("sqrt", FUNC, Sqrt, pos45),
    Case("cube", FUNC, Cube, x45),
    Case("square", FUNC, Square, x45),
    Case("softplus", FUNC, Softplus, x45),
    Case("silu", FUNC, SiLU, x45),
    Case("in-place relu (mark_dirty)", FUNC, InplaceReLU, x45),
    Case("gelu, erf form, memory-saving", FUNC, GeluErf, x45),
    Case("gelu, tanh form, memory-saving", FUNC, GeluTanh, x45),
    Case("softmax", FUNC, Softmax, x45),
    Case("log_softmax", FUNC, LogSoftmax, x45),
    Case("cross-entropy (integer targets)", FUNC, CrossEntropy, ce_inputs),
    Case("mse (two float inputs)", FUNC, MSE, mse_inputs),
    Case("row mean", FUNC, RowMean, x45),
    Case("variance", FUNC, Variance, x45),
    Case("fused layernorm (once_differentiable)", FUNC, LayerNorm, ln_inputs),
    Case("layernorm, differentiable backward", FUNC, LayerNormDifferentiable, ln_inputs),
    Case("rmsnorm", FUNC, RMSNorm, sw_inputs),
    Case("batchnorm", FUNC, BatchNorm, bn_inputs),
    Case("linear (needs_input_grad)", FUNC, Linear, linear_rect_inputs),
    Case("matmul", FUNC, MatMul, mat_inputs),
    Case("mul", FUNC, Mul, two45),
    Case("div", FUNC, Div, div_inputs),
    Case("sub", FUNC, Sub, two45),
    Case("scale by a python number", FUNC, Scale, scale_inputs),
    Case("attention head", FUNC, Attention, attn_inputs),
    Case("embedding (repeated indices)", FUNC, Embedding, emb_inputs),
    Case("gather with an index input", FUNC, GatherCols, gather_inputs),
    Case("neighbour differences", FUNC, Diff, x45),
    Case("mean and variance (two outputs)", FUNC, MeanVar, x45),
    Case("sin and cos (two outputs)", FUNC, SinCos, x45),
    Case("sin and cos, grads not materialized", FUNC, SinCosLazy, x45),
    Case("max with argmax (non-differentiable output)", FUNC, MaxWithIndex, x45),
    Case("cumsum", FUNC, Cumsum, x45),
    Case("leaky relu", FUNC, LeakyReLU, x45),
    Case("l2 normalize", FUNC, Normalize, x45),
    Case("new-style Function (setup_context)", FUNC, ScaleByWeight, sw_inputs),
    Case("batchnorm updating running statistics (float inputs not differentiated)", FUNC, BatchNormRunningStats,
         bn_running_inputs),
    Case("extra trailing Nones", FUNC, TrailingNones, x45),
    Case("exp computed under no_grad (opaque to autograd)", FUNC, ExpUnderNoGrad, x45),
    Case("None for an input whose gradient is zero", FUNC, ReluOfAbs, two45),
    Case("pair: tanh", PAIR, (tanh_forward, tanh_backward), x45),
    Case("pair: layernorm", PAIR, (layernorm_forward, layernorm_backward), lambda s: ln_inputs(s)[:3]),
    Case("pair: softmax", PAIR, (softmax_forward, softmax_backward), x45),
    Case("pair: cross-entropy", PAIR, (ce_forward, ce_backward), ce_inputs),
    Case("pair: batchnorm", PAIR, (batchnorm_forward, batchnorm_backward), bn_inputs),
    Case("pair: silu", PAIR, (silu_forward, silu_backward), x45),
    Case("custom op: softplus", OP, "softplus", x45),
    Case("custom op: NumPy tanh (opaque forward)", OP, "np_tanh_right", nt_inputs, dtypes=NO_BF16),
]

BRANCH_WORDS = ("branch through",)
EPS_WORDS = ("eps (1e-05) left out", "with and without eps (eps left out?)")
WRONG: list[Case] = [
    Case("tanh: 1 - h", FUNC, TanhOneMinusH, x45, ("1 - h instead of 1 - h**2",), "derivative"),
    Case("tanh: 1 - x**2 at the input", FUNC, TanhAtInput, x45, ("1 - x**2 at its input",), "derivative"),
    Case("sigmoid: s", FUNC, SigmoidS, x45, ("taken as s instead of s * (1 - s)",), "derivative"),
    Case("sigmoid: 1 - s", FUNC, SigmoidOneMinusS, x45, ("taken as 1 - s instead",), "derivative"),
    Case("exp at the input", FUNC, ExpAtInput, x45, ("exp's derivative taken at its input",), "derivative"),
    Case("exp under no_grad, at the input", FUNC, ExpUnderNoGradAtInput, x45, ("exp's derivative taken at its input",),
         "derivative"),
    Case("sqrt without its 1/2", FUNC, SqrtNoHalf, pos45, ("without its 1/2",), "constant"),
    Case("x**-0.5 without its 1/2", FUNC, RSqrtNoHalf, pos45, ("factor -0.5 dropped", "without its 1/2"), "constant"),
    Case("x**3: exponent not lowered", FUNC, CubeExponentKept, x45, ("exponent not lowered",), "derivative"),
    Case("x * x: one use", FUNC, SquareOneUse, x45, BRANCH_WORDS + ("factor 2",), "branch"),
    Case("silu: s only", FUNC, SiLUOnlyS, x45, BRANCH_WORDS + ("s only",), "branch"),
    Case("softmax: diagonal only", FUNC, SoftmaxDiagonal, x45, ("diagonal only",), "derivative"),
    Case("softmax: summed over the wrong dim", FUNC, SoftmaxWrongDim, x45, ("over the wrong dim",), "reduction"),
    Case("log_softmax: summed over the wrong dim", FUNC, LogSoftmaxWrongDim, x45, ("over the wrong dim",),
         "reduction"),
    Case("exp: the incoming gradient never multiplied", FUNC, ExpNoGrad, x45, ("upstream gradient dout left out",),
         "derivative"),
    Case("leaky relu: the slope left out", FUNC, LeakyReLUNoSlope, x45, ("negative slope left out",), "derivative"),
    Case("l2 normalize: the norm's branch", FUNC, NormalizeNoNormTerm, x45, BRANCH_WORDS, "branch"),
    Case("softmax in primitives: normaliser's branch", FUNC, SoftmaxPrimitives, x45,
         BRANCH_WORDS + ("without its - sum",), "branch"),
    Case("cross-entropy: without the -1", FUNC, CrossEntropyNoMinusOne, ce_inputs, ("-1",), "derivative"),
    Case("cross-entropy: 1/n left out", FUNC, CrossEntropyNoMean, ce_inputs, ("1/n",), "constant"),
    Case("row mean: 1/n left out", FUNC, RowMeanNoOneOverN, x45, ("1/n", "missing 1/"), "constant"),
    Case("variance: n - 1 for n", FUNC, VarianceBessel, x45, ("n vs n-1", "Bessel"), "reduction"),
    Case("gelu tanh: the constant 3", FUNC, GeluTanhConstant, x45, ("GELU's constant", "factor 3"), "constant"),
    Case("gelu tanh: sqrt(2/pi) left out", FUNC, GeluTanhNoSqrt2Pi, x45, ("sqrt(2/pi)", "0.797885"), "constant"),
    Case("gelu tanh: erf form's derivative", FUNC, GeluTanhErfBackward, x45, ("erf vs tanh form",), "derivative"),
    Case("gelu erf: x phi(x) term left out", FUNC, GeluErfNoXPhi, x45, ("x * phi(x) term", "branch"), "branch"),
    Case("gelu (F.gelu): 1 - t", FUNC, GeluBuiltin, x45, ("1 - t instead of 1 - t**2",), "derivative"),
    Case("layernorm: no mean term", FUNC, LayerNormNoMeanTerm, ln_inputs, ("mean term",) + BRANCH_WORDS, "branch"),
    Case("layernorm: n - 1", FUNC, LayerNormBessel, ln_inputs, ("n-1",), "reduction"),
    Case("layernorm: eps left out", FUNC, LayerNormNoEps, ln_inputs, EPS_WORDS, "eps"),
    Case("batchnorm: eps left out", FUNC, BatchNormNoEps, bn_inputs, EPS_WORDS, "eps"),
    Case("linear: dW transposed", FUNC, LinearTransposedW, linear_inputs, ("transposed",), "transpose"),
    Case("matmul: a transpose missing", FUNC, MatMulMissingTranspose, mat_inputs, ("transpose missing",), "transpose"),
    Case("linear: db not summed", FUNC, LinearBiasNotSummed, linear_rect_inputs, ("not summed",), "shape"),
    Case("linear: db averaged", FUNC, LinearBiasAveraged, linear_rect_inputs, ("averaged", "1/"), "reduction"),
    Case("mul: the wrong factor", FUNC, MulWrongFactor, two45, ("wrong factor",), "derivative"),
    Case("div: b not squared", FUNC, DivNoSquare, div_inputs, ("-a/b instead of -a/b**2",), "derivative"),
    Case("sub: the sign of b", FUNC, SubSignB, two45, ("sign flipped",), "sign"),
    Case("scale: a stray factor 2", FUNC, ScaleTwice, scale_inputs, ("factor 2",), "constant"),
    Case("attention: softmax diagonal only", FUNC, AttentionDiagonalSoftmax, attn_inputs, ("diagonal only",),
         "derivative"),
    Case("attention: dk without its scale", FUNC, AttentionKeyScaleMissing, attn_inputs,
         ("left out of the derivative", "scaled by a constant"), "constant"),
    Case("embedding: overwritten", FUNC, EmbeddingOverwrite, emb_inputs, ("overwritten instead of accumulated",),
         "index"),
    Case("gather: overwritten", FUNC, GatherColsOverwrite, gather_inputs, ("overwritten instead of accumulated",),
         "index"),
    Case("differences: a boundary column", FUNC, DiffLastColumn, x45, ("column",), "columns"),
    Case("mean and variance: n - 1 in the variance", FUNC, MeanVarBessel, x45, ("n vs n-1", "Bessel", "n-1"),
         "multi-output"),
    Case("sin and cos: the sign of cos", FUNC, SinCosSign, x45, ("sign",), "multi-output"),
    Case("scale: a gradient for the python number", FUNC, ScaleGradForC, scale_inputs, ("not a tensor",), "contract"),
    Case("layernorm: no None for eps", FUNC, LayerNormNoNone, ln_inputs, ("gradient(s) for the 4 inputs",),
         "contract"),
    Case("mul: gradients in a list", FUNC, ListGrads, two45, ("returned a list",), "contract"),
    Case("linear: float32 gradient", FUNC, LinearFloat32Grad, linear_inputs, ("dtype",), "contract", dtypes=(F64,)),
    Case("linear: None for W", FUNC, LinearNoneForW, linear_inputs, ("None",), "contract"),
    Case("linear: needs_input_grad swapped", FUNC, LinearNeedsSwapped, linear_rect_inputs, ("needs",), "contract"),
    Case("exp: saved tensor reused as scratch", FUNC, ExpScratchReused, x45, ("after ctx.save_for_backward",),
         "saved"),
    Case("tanh: output kept as a ctx attribute", FUNC, TanhKeptAsAttribute, x45, ("ctx attributes",), "saved"),
    Case("tanh: grad_output changed in place", FUNC, TanhChangesGradInPlace, x45, ("incoming gradient in place",),
         "saved"),
    Case("input changed in place without mark_dirty", FUNC, DoubleInPlace, x45, ("in place",), "contract"),
    Case("a differentiable output marked non-differentiable", FUNC, ScaledAndNormMarked, x45,
         ("marked non-differentiable",), "contract"),
    Case("layernorm: saved intermediates, not once_differentiable", FUNC, LayerNormSavedNotOnce, ln_inputs,
         ("once_differentiable",), "second order"),
    Case("sigmoid: backward detaches its input", FUNC, SigmoidDetached, x45, ("once_differentiable",),
         "second order"),
    Case("exp: second order through a wrong inner Function", FUNC, ExpNestedWrongSecond, x45,
         ("its derivative is not",), "second order"),
    Case("exp: jvp at the input", FUNC, ExpJvpAtInput, x45, ("exp's derivative taken at its input",), "forward mode"),
    Case("pair: tanh 1 - h", PAIR, (tanh_forward, tanh_backward_one_minus_h), x45, ("1 - h instead of 1 - h**2",),
         "derivative"),
    Case("pair: layernorm without the mean term", PAIR, (layernorm_forward, layernorm_backward_no_mean),
         lambda s: ln_inputs(s)[:3], BRANCH_WORDS + ("mean term",), "branch"),
    Case("pair: softmax diagonal only", PAIR, (softmax_forward, softmax_backward_diagonal), x45, ("diagonal only",),
         "derivative"),
    Case("pair: cross-entropy without the -1", PAIR, (ce_forward, ce_backward_no_minus_one), ce_inputs,
         ("-1", "branch through"), "derivative"),
    Case("pair: batchnorm with n - 1", PAIR, (batchnorm_forward, batchnorm_backward_bessel), bn_inputs,
         ("n vs n-1", "Bessel", "n-1"), "reduction"),
    Case("pair: silu s only", PAIR, (silu_forward, silu_backward_only_s), x45, BRANCH_WORDS + ("s only",), "branch"),
    Case("custom op: softplus with exp(x)", OP, "softplus_exp", x45, ("exp(x) instead of sigmoid(x)",), "derivative"),
    Case("custom op: NumPy tanh, sign flipped", OP, "np_tanh", nt_inputs, ("sign flipped",), "sign", dtypes=NO_BF16),
]


def run_case(case: Case, dtype: torch.dtype, seed: int = 0, **options: Any):
    """The handgrad report for a case in a dtype (its float64 inputs cast)."""
    from handgrad.check import check_backward
    from handgrad.functions import check_function, check_op
    raw = case.inputs(seed)
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in raw)
    opts = {**case.options, **options}
    if case.kind == FUNC:
        return check_function(case.target, *args, seed=seed, **opts)
    if case.kind == OP:
        return check_op(custom_ops()[case.target], *args, seed=seed, **opts)
    forward, backward = case.target
    opts.pop("timeout", None)
    return check_backward(forward, backward, list(args), seed=seed, **opts)


def said(report) -> str:
    """Everything the report says about what failed (diagnoses and messages)."""
    return "\n".join(getattr(r, "diagnosis", "") or "" for r in report.failures())
