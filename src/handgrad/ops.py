"""Stateless forward/backward pairs for the makemore MLP: the single home of the gradient math
used for training. Reference: Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja";
the pairing style follows CS231n `layers.py` and llm.c `layernorm_forward`/`layernorm_backward`.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab.
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
def linear_forward(x: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, tuple]:
    """out = x @ W + b (b broadcast over rows)."""
    out = x @ W + b  # (N, out_features)
    return out, (x, W)


def linear_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """dx = dout @ W^T, dW = x^T @ dout, db = sum of dout over the batch."""
    x, W = cache
    dx = dout @ W.T  # (N, in_features)
    dW = x.T @ dout  # (in_features, out_features)
    db = dout.sum(0)  # (out_features,)
    return dx, dW, db


# ---------------------------------------------------------------------------- batchnorm
def batchnorm_forward(
    x: Tensor, bngain: Tensor, bnbias: Tensor, eps: float = BN_EPS
) -> tuple[Tensor, tuple, tuple[Tensor, Tensor]]:
    """Training-mode batchnorm over the batch dimension, with the lecture's Bessel-corrected
    (n-1) variance. Returns (out, cache, (bnmeani, bnvar)); the batch statistics are returned
    so a caller can track running statistics with the same variance convention."""
    n = x.shape[0]
    bnmeani = x.sum(0, keepdim=True) / n  # (1, H)
    bndiff = x - bnmeani  # (N, H)
    bnvar = (bndiff**2).sum(0, keepdim=True) / (n - 1)  # (1, H)  Bessel's n-1
    bnvar_inv = (bnvar + eps) ** -0.5  # (1, H)
    bnraw = bndiff * bnvar_inv  # (N, H)
    out = bngain * bnraw + bnbias  # (N, H)
    return out, (bnraw, bnvar_inv, bngain), (bnmeani, bnvar)


def batchnorm_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form batchnorm backward (the lecture's Exercise 3):

        dx = gain * var_inv / n * (n * dout - sum(dout) - n/(n-1) * bnraw * sum(dout * bnraw))

    The sums run over the batch; the n/(n-1) comes from the Bessel-corrected variance."""
    bnraw, bnvar_inv, bngain = cache
    n = dout.shape[0]
    dbngain = (bnraw * dout).sum(0, keepdim=True)  # (1, H)
    dbnbias = dout.sum(0, keepdim=True)  # (1, H)
    dx = bngain * bnvar_inv / n * (n * dout - dbnbias - n / (n - 1) * bnraw * dbngain)  # (N, H)
    return dx, dbngain, dbnbias


def batchnorm_inference(x: Tensor, bngain: Tensor, bnbias: Tensor, bnmean: Tensor,
                        bnvar: Tensor, eps: float = BN_EPS) -> Tensor:
    """Batchnorm with fixed statistics (bnvar is the n-1 variance, as in training)."""
    return bngain * (x - bnmean) * (bnvar + eps) ** -0.5 + bnbias  # (N, H)


# ---------------------------------------------------------------------------- tanh
def tanh_forward(x: Tensor) -> tuple[Tensor, tuple]:
    h = torch.tanh(x)  # (N, H)
    return h, (h,)


def tanh_backward(dh: Tensor, cache: tuple) -> Tensor:
    """d tanh(x)/dx = 1 - tanh(x)^2, computed from the saved output."""
    (h,) = cache
    return (1.0 - h**2) * dh  # (N, H)


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
