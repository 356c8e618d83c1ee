"""Stateless forward/backward pairs: the single home of the gradient math used for training.
References: Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja" (the closed forms) and
Part 5 (batchnorm and linear over leading dimensions, FlattenConsecutive); the pairing style follows
CS231n `layers.py` and llm.c `layernorm_forward`/`layernorm_backward`.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab, C channels (the last dim),
`...` any number of leading dimensions.
Every `*_forward` returns `(out, cache)`; every `*_backward(dout, cache)` unpacks the cache on its
first line and returns one gradient per differentiable input, each with exactly its input's shape.

makemore's zoo (karpathy/makemore, makemore.py) works on whole sequences: B batch of sequences,
T positions, nh heads of hs = E / nh channels each. Its closed forms (layernorm, GELU, attention's
masked softmax, the recurrent cells through time) are derived in each docstring; the layout of the
transformer's passes follows llm.c's `layernorm_backward`, `gelu_backward` and `attention_backward`.
"""

from __future__ import annotations

import math

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


def flatten_last_forward(x: Tensor) -> tuple[Tensor, tuple]:
    """The last two dimensions concatenated, (..., k, C) -> (..., k*C): makemore's MLP joins its k
    context embeddings (torch.cat(embs, -1)) this way, newest first."""
    return x.flatten(-2), (x.shape,)  # (..., k*C)


def flatten_last_backward(dout: Tensor, cache: tuple) -> Tensor:
    """A reshape moves no numbers: dout viewed in the input's shape."""
    (shape,) = cache
    return dout.reshape(shape)  # (..., k, C)


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


# ---------------------------------------------------------------------------- positions
def position_embedding_forward(x: Tensor, wpe: Tensor) -> tuple[Tensor, tuple]:
    """x (B, T, E) token embeddings plus the first T rows of wpe (block_size, E): position t of every
    sequence gets wpe[t] (makemore's `tok_emb + pos_emb`, pos_emb broadcast over the batch)."""
    T, block_size = x.shape[-2], wpe.shape[0]
    if T > block_size:
        raise ValueError(f"a sequence of {T} positions is longer than the block size {block_size} "
                         "(the position embedding has one row per position)")
    return x + wpe[:T], (T, block_size)  # (B, T, E)


def position_embedding_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor]:
    """dx = dout (an addition); dwpe[t] sums dout[:, t] over the batch; the rows past T, which a
    shorter sequence does not use, get 0."""
    T, block_size = cache
    E = dout.shape[-1]
    dwpe = torch.zeros((block_size, E), dtype=dout.dtype, device=dout.device)  # (block_size, E)
    dwpe[:T] = dout.reshape(-1, T, E).sum(0)
    return dout, dwpe


def context_windows(X: Tensor, block_size: int, blank: int) -> Tensor:
    """makemore's MLP over a sequence: for each position t of X (B, T) the ids at t, t-1, ...,
    t-block_size+1 (newest first, as makemore rolls idx one step per embedding), `blank` where the
    position is before the sequence's start. Returns (B, T, block_size) ids; indices have no gradient."""
    B, T = X.shape
    padded = torch.full((B, T + block_size - 1), blank, dtype=X.dtype, device=X.device)  # (B, T+bs-1)
    padded[:, block_size - 1:] = X
    windows = padded.unfold(1, block_size, 1)  # (B, T, bs): window t is X[t-bs+1 .. t]
    return windows.flip(-1)  # (B, T, bs) newest first: X[t], X[t-1], ...


# ---------------------------------------------------------------------------- layernorm
LN_EPS = 1e-5  # nn.LayerNorm's default


def layernorm_forward(x: Tensor, w: Tensor, b: Tensor, eps: float = LN_EPS) -> tuple[Tensor, tuple]:
    """LayerNorm over the last dimension (nn.LayerNorm; Ba et al. 2016): each row normalised with its
    own mean and its biased (1/C, no Bessel) variance, then scaled by w and shifted by b, both (C,)."""
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(-1, keepdim=True)  # (..., 1)  biased, as nn.LayerNorm
    rstd = (var + eps) ** -0.5  # (..., 1)
    xhat = xc * rstd  # (..., C)
    return xhat * w + b, (xhat, rstd, w)  # (..., C)


def layernorm_backward(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Closed form, the same derivation as the lecture's batchnorm with the roles of the axes swapped
    and no Bessel factor. With dxhat = dout * w, per row of C entries:
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (the row's mean and variance depend on every entry of it: the two mean terms);
    dw = sum of dout * xhat and db = sum of dout over every leading dimension."""
    xhat, rstd, w = cache
    C = dout.shape[-1]
    dxhat = dout * w  # (..., C)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dw = (dout * xhat).reshape(-1, C).sum(0)  # (C,)
    db = dout.reshape(-1, C).sum(0)  # (C,)
    return dx, dw, db


# ---------------------------------------------------------------------------- gelu
GELU_C = math.sqrt(2.0 / math.pi)  # the tanh approximation's constants (makemore's NewGELU, GPT-2's)
GELU_K = 0.044715


def gelu_forward(x: Tensor) -> tuple[Tensor, tuple]:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; makemore's NewGELU):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Only x is cached: tanh is recomputed in backward
    (one elementwise pass saves a tensor of 4E per position in a transformer block). No in-place
    ops here: checks run this forward under autograd."""
    t = torch.tanh((x * x * GELU_K + 1.0) * x * GELU_C)  # (..., H)  the same order as backward's
    return 0.5 * x * (1.0 + t), (x,)  # (..., H)


def gelu_backward(dout: Tensor, cache: tuple) -> Tensor:
    """With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u), the product rule on 0.5 x (1 + t):
        d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Computed in place on two temporaries (x^2, then du/dx; t, then the gradient)."""
    (x,) = cache
    x2 = x * x  # (..., H)
    t = torch.tanh_(x2.mul(GELU_K).add_(1.0).mul_(x).mul_(GELU_C))  # (..., H)  recomputed: tanh(u)
    du = x2.mul_(3.0 * GELU_K).add_(1.0).mul_(GELU_C)  # (..., H)  du/dx, in x2's memory
    dx = du.mul_(x).mul_(1.0 - t * t).add_(t).add_(1.0).mul_(0.5)  # (..., H)  dgelu/dx
    return dx.mul_(dout)  # (..., H)


# ---------------------------------------------------------------------------- attention
def causal_softmax_forward(scores: Tensor) -> tuple[Tensor, tuple]:
    """Softmax over the last dimension of scores (..., T, T) after masking the future: row t keeps
    columns 0..t (makemore's `masked_fill(bias == 0, -inf)`), so att[t, s] = 0 for s > t."""
    T = scores.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)  # (T, T) s > t
    att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # (..., T, T)
    return att, (att,)


def causal_softmax_backward(datt: Tensor, cache: tuple) -> Tensor:
    """Softmax backward, row by row: dscores = att * (datt - sum_s datt * att). A masked entry has
    att = 0, so its gradient is exactly 0: the mask needs no backward of its own."""
    (att,) = cache
    return att * (datt - (datt * att).sum(-1, keepdim=True))  # (..., T, T)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, keep_att: bool = True) -> tuple[Tensor, tuple]:
    """Causal scaled dot-product attention (Vaswani et al. 2017; makemore's CausalSelfAttention core)
    for any number of heads at once: q, k, v (..., T, hs) -> y = softmax(mask(q k^T / sqrt(hs))) v,
    (..., T, hs). keep_att=False caches only q, k, v; backward then recomputes the attention matrix
    (T*T per head) instead of holding it."""
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, T)
    att, _ = causal_softmax_forward(scores)  # (..., T, T)
    return att @ v, (q, k, v, att if keep_att else None, scale)  # (..., T, hs)


def attention_backward(dy: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """y = att v: dv = att^T dy and datt = dy v^T; through the masked softmax to dscores; then
    scores = scale q k^T: dq = scale dscores k and dk = scale dscores^T q."""
    q, k, v, att, scale = cache
    if att is None:  # recompute what the forward did not keep
        att, _ = causal_softmax_forward((q @ k.transpose(-2, -1)) * scale)  # (..., T, T)
    dv = att.transpose(-2, -1) @ dy  # (..., T, hs)
    datt = dy @ v.transpose(-2, -1)  # (..., T, T)
    dscores = causal_softmax_backward(datt, (att,)) * scale  # (..., T, T)
    dq = dscores @ k  # (..., T, hs)
    dk = dscores.transpose(-2, -1) @ q  # (..., T, hs)
    return dq, dk, dv


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, E) -> (B, nh, T, hs): head h reads channels h*hs .. (h+1)*hs - 1 (a view)."""
    B, T, E = x.shape
    return x.view(B, T, n_head, E // n_head).transpose(1, 2)  # (B, nh, T, hs)


def merge_heads(y: Tensor) -> Tensor:
    """(B, nh, T, hs) -> (B, T, E): the heads' outputs side by side (split_heads undone)."""
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, E)


def multihead_attention_forward(qkv: Tensor, n_head: int, keep_att: bool = True) -> tuple[Tensor, tuple]:
    """makemore's CausalSelfAttention between its two Linears: qkv (B, T, 3E) is q, k, v side by side;
    each is split into n_head heads, every head attends causally, and the heads are merged: (B, T, E)."""
    E = qkv.shape[-1] // 3
    q, k, v = (split_heads(t, n_head) for t in qkv.split(E, dim=-1))  # (B, nh, T, hs) x 3
    y, att_cache = attention_forward(q, k, v, keep_att)  # (B, nh, T, hs)
    return merge_heads(y), (att_cache, n_head)  # (B, T, E)


def multihead_attention_backward(dout: Tensor, cache: tuple) -> Tensor:
    """The merge undone (a reshape moves no numbers), every head's backward at once, the split undone:
    dqkv (B, T, 3E) is dq, dk, dv side by side."""
    att_cache, n_head = cache
    dq, dk, dv = attention_backward(split_heads(dout, n_head), att_cache)  # (B, nh, T, hs) x 3
    return torch.cat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], dim=-1)  # (B, T, 3E)


# ---------------------------------------------------------------------------- bag of words
def causal_average_forward(x: Tensor) -> tuple[Tensor, tuple]:
    """makemore's CausalBoW: y[:, t] = mean of x[:, 0..t] over the positions of x (B, T, C), what its
    softmax of an all-zero causally masked score matrix computes, here as a running sum over counts."""
    T = x.shape[1]
    counts = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(1, T, 1)  # (1, T, 1)
    return x.cumsum(1) / counts, (counts,)  # (B, T, C)


def causal_average_backward(dy: Tensor, cache: tuple) -> Tensor:
    """x[:, s] is in the average of every t >= s with weight 1/(t+1):
    dx[:, s] = sum_{t >= s} dy[:, t] / (t+1), a running sum from the end. Nothing flows backwards in
    time: dy[:, t] reaches only positions s <= t."""
    (counts,) = cache
    return (dy / counts).flip(1).cumsum(1).flip(1)  # (B, T, C)


# ---------------------------------------------------------------------------- recurrent cells
def sigmoid_forward(x: Tensor) -> tuple[Tensor, tuple]:
    s = torch.sigmoid(x)  # (..., H)
    return s, (s,)


def sigmoid_backward(ds: Tensor, cache: tuple) -> Tensor:
    """d sigmoid(x)/dx = s (1 - s), from the saved output."""
    (s,) = cache
    return ds * s * (1.0 - s)  # (..., H)


def rnn_cell_forward(xt: Tensor, hprev: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, tuple]:
    """makemore's RNNCell (Elman): h_t = tanh([x_t, h_{t-1}] @ W + b); xt (B, E), hprev (B, H),
    W (E+H, H), b (H,)."""
    xh = torch.cat([xt, hprev], dim=1)  # (B, E+H)
    a, lin = linear_forward(xh, W, b)  # (B, H)
    ht, th = tanh_forward(a)  # (B, H)
    return ht, (lin, th, xt.shape[1])


def rnn_cell_backward(dht: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dxt, dhprev, dW, db): tanh, then the Linear, then the concatenation split back."""
    lin, th, E = cache
    da = tanh_backward(dht, th)  # (B, H)
    dxh, dW, db = linear_backward(da, lin)  # (B, E+H)
    return dxh[:, :E], dxh[:, E:], dW, db


def gru_cell_forward(xt: Tensor, hprev: Tensor, Wz: Tensor, bz: Tensor, Wr: Tensor, br: Tensor,
                     Wh: Tensor, bh: Tensor) -> tuple[Tensor, tuple]:
    """makemore's GRUCell (Cho et al. 2014): r = sigmoid([x, h] Wr + br) resets h,
    hbar = tanh([x, r h] Wh + bh) is the candidate, z = sigmoid([x, h] Wz + bz) switches:
    h_t = (1 - z) h_{t-1} + z hbar. xt (B, E), hprev (B, H), each W (E+H, H), each b (H,)."""
    xh = torch.cat([xt, hprev], dim=1)  # (B, E+H)
    ra, lin_r = linear_forward(xh, Wr, br)  # (B, H)
    r, sig_r = sigmoid_forward(ra)  # (B, H)
    xhr = torch.cat([xt, r * hprev], dim=1)  # (B, E+H)  the reset previous state
    ha, lin_h = linear_forward(xhr, Wh, bh)  # (B, H)
    hbar, th = tanh_forward(ha)  # (B, H)
    za, lin_z = linear_forward(xh, Wz, bz)  # (B, H)
    z, sig_z = sigmoid_forward(za)  # (B, H)
    ht = (1.0 - z) * hprev + z * hbar  # (B, H)
    return ht, (hprev, r, z, hbar, lin_r, sig_r, lin_h, th, lin_z, sig_z, xt.shape[1])


def gru_cell_backward(dht: Tensor, cache: tuple) -> tuple[Tensor, ...]:
    """-> (dxt, dhprev, dWz, dbz, dWr, dbr, dWh, dbh), the forward in reverse. h_{t-1} reaches h_t
    four ways: directly through (1 - z), through the gate z, through r h inside hbar, and through the
    gate r; x_t through z, hbar and r."""
    hprev, r, z, hbar, lin_r, sig_r, lin_h, th, lin_z, sig_z, E = cache
    dz = dht * (hbar - hprev)  # (B, H)
    dhbar = dht * z  # (B, H)
    dxh_z, dWz, dbz = linear_backward(sigmoid_backward(dz, sig_z), lin_z)  # (B, E+H)
    dxhr, dWh, dbh = linear_backward(tanh_backward(dhbar, th), lin_h)  # (B, E+H)
    dhr = dxhr[:, E:]  # (B, H)  d(r * hprev)
    dr = dhr * hprev  # (B, H)
    dxh_r, dWr, dbr = linear_backward(sigmoid_backward(dr, sig_r), lin_r)  # (B, E+H)
    dxh = dxh_z + dxh_r  # (B, E+H)  [x, h] feeds both gates
    dxt = dxhr[:, :E] + dxh[:, :E]  # (B, E)
    dhprev = dht * (1.0 - z) + dhr * r + dxh[:, E:]  # (B, H)
    return dxt, dhprev, dWz, dbz, dWr, dbr, dWh, dbh


# A cell by name: its forward and its backward (both take the cell's weights after (xt, hprev)).
CELLS = {
    "rnn": (rnn_cell_forward, rnn_cell_backward),
    "gru": (gru_cell_forward, gru_cell_backward),
}


def recurrence_forward(x: Tensor, start: Tensor, cell: str, *params: Tensor) -> tuple[Tensor, tuple]:
    """A cell unrolled over the sequence x (B, T, E) from the learned start state (1, H), expanded over
    the batch (makemore's RNN). Returns every hidden state (B, T, H) and one cache per position."""
    forward = CELLS[cell][0]
    B, T, _ = x.shape
    h = start.expand(B, -1)  # (B, H)
    hiddens, caches = [], []
    for t in range(T):
        h, c = forward(x[:, t], h, *params)  # (B, H)
        hiddens.append(h)
        caches.append(c)
    return torch.stack(hiddens, 1), (cell, caches)  # (B, T, H)


def recurrence_backward(dhidden: Tensor, cache: tuple) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Backpropagation through time (Werbos 1990): from the last position back, each state's gradient
    is what the loss sends it directly (dhidden[:, t]) plus what it sends through the next state; the
    cell's parameter gradients sum over the positions, and the start state's over the batch.
    Returns (dx (B, T, E), dstart (1, H), [one gradient per cell parameter])."""
    cell, caches = cache
    backward = CELLS[cell][1]
    B, T, H = dhidden.shape
    dh = torch.zeros((B, H), dtype=dhidden.dtype, device=dhidden.device)  # (B, H) from position t+1
    dxs: list[Tensor] = []
    dparams: list[Tensor] = []
    for t in reversed(range(T)):
        dxt, dh, *dps = backward(dhidden[:, t] + dh, caches[t])  # (B, E) (B, H) ...
        dxs.append(dxt)
        dparams = dps if not dparams else [a + b for a, b in zip(dparams, dps)]
    return torch.stack(dxs[::-1], 1), dh.sum(0, keepdim=True), dparams  # (B, T, E) (1, H)

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
