"""Stateless forward/backward pairs: the single home of the gradient math used for training.
References: Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja" (the closed forms) and
Part 5 (batchnorm and linear over leading dimensions, FlattenConsecutive); the pairing style follows
CS231n `layers.py` and llm.c `layernorm_forward`/`layernorm_backward`.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab, C channels (the last dim),
`...` any number of leading dimensions.
Every `*_forward` returns `(out, cache)`; every `*_backward(dout, cache)` unpacks the cache on its
first line and returns one gradient per differentiable input, each with exactly its input's shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

BN_EPS = 1e-5  # the lecture's batchnorm epsilon


# ---------------------------------------------------------------------------- embedding
def embedding_forward(C: Tensor, X: Tensor) -> tuple[Tensor, tuple]:
    """Look up one row of C per context character: emb[n, t] = C[X[n, t]]."""
    emb = C[X]  # (N, T, E)
    return emb, (X, C.shape[0])


def embedding_backward(demb: Tensor, cache: tuple) -> Tensor:
    """dC[v] is the sum of demb over every (n, t) with X[n, t] == v.

    A row used twice must receive both contributions, so we accumulate with index_add_
    (no Python loop, and no overwriting as `dC[X] = demb` would do)."""
    X, V = cache
    E = demb.shape[-1]
    dC = torch.zeros((V, E), dtype=demb.dtype, device=demb.device)  # (V, E)
    dC.index_add_(0, X.reshape(-1), demb.reshape(-1, E))
    return dC


# ---------------------------------------------------------------------------- linear
def linear_forward(x: Tensor, W: Tensor, b: Tensor | None = None) -> tuple[Tensor, tuple]:
    """out = x @ W + b over any leading dimensions (b broadcast; None: no bias)."""
    out = x @ W  # (..., out_features)
    if b is not None:
        out = out + b
    return out, (x, W, b is not None)


def linear_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor | None]:
    """dx = dout @ W^T, dW = x^T @ dout and db = sum of dout, both summed over every leading
    dimension (each row of every leading index is one use of W)."""
    x, W, has_bias = cache
    dx = dout @ W.T  # (..., in_features)
    x2, dout2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])  # views: (M, in) (M, out)
    dW = x2.T @ dout2  # (in_features, out_features)
    db = dout2.sum(0) if has_bias else None  # (out_features,)
    return dx, dW, db


# ---------------------------------------------------------------------------- batchnorm
def _batch_dims(x: Tensor) -> tuple[int, ...]:
    """Batchnorm reduces over every dimension but the last (makemore part 5: (0,) or (0, 1))."""
    return tuple(range(x.dim() - 1))


def batchnorm_forward(
    x: Tensor, bngain: Tensor, bnbias: Tensor, eps: float = BN_EPS
) -> tuple[Tensor, tuple, tuple[Tensor, Tensor]]:
    """Training-mode batchnorm over all dimensions but the last, with the lecture's Bessel-corrected
    (n-1) variance, n the number of rows reduced. Returns (out, cache, (bnmeani, bnvar)); the batch
    statistics are returned so a caller can track running statistics with the same convention."""
    dims = _batch_dims(x)
    n = x.numel() // x.shape[-1]
    bnmeani = x.sum(dims, keepdim=True) / n  # (1, ..., C)
    bndiff = x - bnmeani  # (..., C)
    bnvar = (bndiff**2).sum(dims, keepdim=True) / (n - 1)  # (1, ..., C)  Bessel's n-1
    out, cache = batchnorm_normalise(bndiff, bnvar, bngain, bnbias, eps)  # (..., C)
    return out, cache, (bnmeani, bnvar)


def batchnorm_normalise(bndiff: Tensor, bnvar: Tensor, bngain: Tensor, bnbias: Tensor,
                        eps: float = BN_EPS) -> tuple[Tensor, tuple]:
    """The normalisation given the batch statistics (bndiff = x - bnmeani, bnvar the n-1 variance):
    out = bngain * bndiff / sqrt(bnvar + eps) + bnbias. The synchronized batchnorm of
    engines/parallel.py calls it with statistics over every rank's rows."""
    bnvar_inv = (bnvar + eps) ** -0.5  # (1, ..., C)
    bnraw = bndiff * bnvar_inv  # (..., C)
    out = bngain * bnraw + bnbias  # (..., C)
    return out, (bnraw, bnvar_inv, bngain)


def batchnorm_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form batchnorm backward (the lecture's Exercise 3), sums over every dimension but
    the last (batchnorm_sums, then batchnorm_dx). dbngain and dbnbias get bngain's shape."""
    bnraw, bnvar_inv, bngain = cache
    n = dout.numel() // dout.shape[-1]
    dbngain, dbnbias = batchnorm_sums(dout, bnraw)  # (1, ..., C) (1, ..., C)
    dx = batchnorm_dx(dout, cache, n, dbngain, dbnbias)  # (..., C)
    return dx, dbngain.reshape(bngain.shape), dbnbias.reshape(bngain.shape)


def batchnorm_sums(dout: Tensor, bnraw: Tensor) -> tuple[Tensor, Tensor]:
    """dbngain = sum(dout * bnraw) and dbnbias = sum(dout) over every dimension but the last."""
    dims = _batch_dims(dout)
    return (bnraw * dout).sum(dims, keepdim=True), dout.sum(dims, keepdim=True)  # (1, ..., C) x 2


def batchnorm_dx(dout: Tensor, cache: tuple, n: int, dbngain: Tensor, dbnbias: Tensor) -> Tensor:
    """The closed form of dx, n the rows of the batch and dbngain, dbnbias its sums (over every rank's
    rows in the synchronized batchnorm):

        dx = gain * var_inv / n * (n * dout - sum(dout) - n/(n-1) * bnraw * sum(dout * bnraw))

    The n/(n-1) comes from the Bessel-corrected variance."""
    bnraw, bnvar_inv, bngain = cache
    return bngain * bnvar_inv / n * (n * dout - dbnbias - n / (n - 1) * bnraw * dbngain)  # (..., C)


def batchnorm_inference(x: Tensor, bngain: Tensor, bnbias: Tensor, bnmean: Tensor,
                        bnvar: Tensor, eps: float = BN_EPS) -> Tensor:
    """Batchnorm with fixed statistics (bnvar is the n-1 variance, as in training):
    bngain * (x - bnmean) * (bnvar + eps)**-0.5 + bnbias, in place on one new tensor."""
    out = x - bnmean  # (..., C)
    return out.mul_(bngain).mul_((bnvar + eps) ** -0.5).add_(bnbias)  # (..., C)


# ---------------------------------------------------------------------------- tanh, relu
def tanh_forward(x: Tensor) -> tuple[Tensor, tuple]:
    h = torch.tanh(x)  # (..., H)
    return h, (h,)


def tanh_backward(dh: Tensor, cache: tuple) -> Tensor:
    """d tanh(x)/dx = 1 - tanh(x)^2, computed from the saved output."""
    (h,) = cache
    return (1.0 - h**2) * dh  # (..., H)


def relu_forward(x: Tensor) -> tuple[Tensor, tuple]:
    out = torch.relu(x)  # (..., H)
    return out, (out,)


def relu_backward(dout: Tensor, cache: tuple) -> Tensor:
    """d relu(x)/dx = 1 where x > 0, else 0 (autograd's choice at x = 0); read from the output."""
    (out,) = cache
    return dout * (out > 0).to(dout.dtype)  # (..., H)


# ---------------------------------------------------------------------------- flatten
def flatten_consecutive_forward(x: Tensor, n: int) -> tuple[Tensor, tuple]:
    """makemore part 5's FlattenConsecutive: concatenate each n consecutive positions,
    (N, T, C) -> (N, T/n, C*n), and drop the middle dimension when it becomes 1. On contiguous
    row-major memory this is a reinterpretation (a view), not a copy."""
    N, T, C = x.shape
    out = x.reshape(N, T // n, C * n)  # (N, T/n, C*n)
    if out.shape[1] == 1:
        out = out.squeeze(1)  # (N, C*n)
    return out, (x.shape,)


def flatten_consecutive_backward(dout: Tensor, cache: tuple) -> Tensor:
    """A reshape moves no numbers: the gradient is dout viewed in the input's shape."""
    (shape,) = cache
    return dout.reshape(shape)  # (N, T, C)


# ---------------------------------------------------------------------------- cross-entropy
def cross_entropy_forward(logits: Tensor, Y: Tensor) -> tuple[Tensor, tuple]:
    """Mean negative log-likelihood of the targets under softmax(logits); softmax and NLL fused.
    The row max is subtracted first for numerical stability (it does not change the result)."""
    n = logits.shape[0]
    norm_logits = logits - logits.max(1, keepdim=True).values  # (N, V)
    logprobs = norm_logits - norm_logits.exp().sum(1, keepdim=True).log()  # (N, V)
    loss = -logprobs[torch.arange(n, device=logits.device), Y].mean()  # ()
    return loss, (logprobs, Y)


def cross_entropy_backward(dloss: Tensor | float, cache: tuple) -> Tensor:
    """Closed-form cross-entropy backward (the lecture's Exercise 2):
    dlogits = (softmax(logits) - one_hot(Y)) / n, times the upstream dloss."""
    logprobs, Y = cache
    n = logprobs.shape[0]
    dlogits = logprobs.exp()  # (N, V)  the softmax, recomputed from the saved logprobs
    dlogits[torch.arange(n, device=dlogits.device), Y] -= 1.0
    dlogits *= dloss / n
    return dlogits


# ---------------------------------------------------------------------------- masked sequence cross-entropy
IGNORE = -1  # a target that is not counted (makemore's padding after a name's end token)


def cross_entropy_masked_forward(logits: Tensor, Y: Tensor) -> tuple[Tensor, tuple]:
    """Mean negative log-likelihood over the counted positions of a batch of sequences: logits
    (..., V), targets Y (...) with IGNORE where nothing is predicted (F.cross_entropy's
    ignore_index=-1, as makemore uses it). The mean is over the counted positions only."""
    V = logits.shape[-1]
    flat, y = logits.reshape(-1, V), Y.reshape(-1)  # (M, V), (M,)
    keep = y != IGNORE  # (M,)
    count = keep.sum().to(logits.dtype)  # ()  0 makes the loss NaN, as torch's
    norm_logits = flat - flat.max(1, keepdim=True).values  # (M, V)
    logprobs = norm_logits - norm_logits.exp().sum(1, keepdim=True).log()  # (M, V)
    picked = logprobs.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (M,) an ignored row picks class 0 ...
    loss = -(picked * keep).sum() / count  # () ... and is multiplied away
    return loss, (logprobs, y, keep, count, logits.shape)


def cross_entropy_masked_backward(dloss: Tensor | float, cache: tuple) -> Tensor:
    """dlogits = (softmax(logits) - one_hot(Y)) / count at a counted position, 0 at an ignored one,
    times the upstream dloss; in the logits' shape."""
    logprobs, y, keep, count, shape = cache
    dlogits = logprobs.exp()  # (M, V) the softmax, recomputed from the saved logprobs
    rows = keep.nonzero()[:, 0]  # (counted,)
    dlogits[rows, y[rows]] -= 1.0
    dlogits *= keep[:, None].to(dlogits.dtype) * (dloss / count)
    return dlogits.reshape(shape)  # (..., V)


# The loss pair by the targets' rank: next characters (N,) of context windows, or sequences (N, T) of
# next characters with IGNORE after each word's end (the makemore zoo).
LOSSES = {1: (cross_entropy_forward, cross_entropy_backward),
          2: (cross_entropy_masked_forward, cross_entropy_masked_backward)}


def loss_pair(Y: Tensor):
    """(forward, backward) of the training loss for targets Y: LOSSES by Y's rank."""
    if Y.dim() not in LOSSES:
        raise ValueError(f"targets must be (N,) or (N, T), got shape {tuple(Y.shape)}")
    return LOSSES[Y.dim()]
