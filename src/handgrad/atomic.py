"""The lecture's atomic graph (Exercise 1 of Karpathy, "Building makemore Part 4: Becoming a
Backprop Ninja"): the MLP forward broken into its named intermediates, and a hand-written backward
through every one of them. A teaching and checking graph; training uses the closed forms in ops.py.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab.

The backward is written to be bit-exact with PyTorch autograd in float32 and float64, not merely
close. Rounding makes `a*b*c`, `(1/p)*g` and `g/p` different numbers, so every line below uses the
operation, operand order and fusion that autograd's derivative formula uses (torch's
tools/autograd/derivatives.yaml and FunctionsManual.cpp). What mattered, measured on torch 2.13 CPU:

* tanh: autograd's `tanh_backward` kernel computes `grad * (1 - y*y)` with `1 - y*y` fused into one
  multiply-add (one rounding). `(1 - h**2) * dh` rounds twice and was the only local mismatch of
  the lecture's solution, but every gradient below hpreact inherits it (11 of 26 exact).
  `torch.addcmul(1, h, h, value=-1)` is the same fused multiply-add: 26 of 26 exact.
* log: autograd divides, `grad / probs`; `(1.0 / probs) * grad` rounds twice.
* pow(x, k): autograd computes `grad * (k * x**(k-1))`, the scalar multiplied into the power
  first; so `dbnvar = dbnvar_inv * (-0.5 * (bnvar + eps)**-1.5)`, and likewise for `**-1` and `**2`.
* scalar multiplies (`1/n * sum`): the gradient is `grad * (1/n)` with the same Python float, which
  torch rounds to the tensor's dtype exactly as the forward did.
* mean: the seed is negated and divided by n in the tensor's dtype (`-dloss / n`), as autograd
  does. (`-1.0/n` rounded from Python's double happens to agree for every n < 5000 we tried.)
* the lecture's `(1.0 / probs) * dlogprobs` differs from `dlogprobs / probs` in about a quarter of
  the elements for n = 7; for n = 32 the upstream is a power of two and both are exact.
* broadcasting: autograd reduces a broadcast gradient with `sum(dims, keepdim=True)` over the
  broadcast dimensions, in the same order as `.sum(0, keepdim=True)` here.
* matmul: `dA = dout @ B.T`, `dB = A.T @ dout` (autograd's mm backward for row-major operands).
* embedding: autograd accumulates into zeros in row-major order of X, as `index_add_` does.
* a tensor used twice receives two contributions, and `a + b == b + a` exactly, so the order of
  accumulation does not matter here (no intermediate is used three times).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from handgrad import models
from handgrad.ops import BN_EPS


# ---------------------------------------------------------------------------- the lecture's parameters
@dataclass(frozen=True)
class LectureConfig:
    """The exercise graph's sizes (the lecture's notebook: n_hidden 64, batch 32)."""

    vocab_size: int = 27  # V
    block_size: int = 3  # T
    n_embd: int = 10  # E
    n_hidden: int = 64  # H


@dataclass
class Params:
    """The lecture's 7 trainable tensors by their own names. The same class holds their gradients."""

    C: Tensor  # (V, E) embedding table
    W1: Tensor  # (T*E, H)
    b1: Tensor  # (H,)  useless in front of batchnorm, kept as the lecture does ("for fun")
    W2: Tensor  # (H, V)
    b2: Tensor  # (V,)
    bngain: Tensor  # (1, H)
    bnbias: Tensor  # (1, H)

    def items(self) -> list[tuple[str, Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def clone(self) -> Params:
        return Params(*(t.clone() for t in self.tensors()))

    def to(self, dtype: torch.dtype) -> Params:
        return Params(*(t.to(dtype) for t in self.tensors()))


def init_params(cfg: LectureConfig = LectureConfig(), seed: int = 42, dtype: torch.dtype = torch.float32
                ) -> Params:
    """The lecture's initialisation (deliberately non-zero b1/W2/b2 and noisy gain/bias, so a wrong
    backward cannot hide behind zeros): the mlp preset's (models.init_lecture4, drawn in float32 from a
    seeded generator, then cast) of a model with these sizes, by the lecture's names."""
    mcfg = models.preset("mlp", vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_embd=cfg.n_embd,
                         n_hidden=cfg.n_hidden)
    return Params(**models.lecture_tensors(models.build(mcfg, seed, dtype)))


# The 26 tensors whose gradients the lecture compares, in its order (backward order).
GRAD_NAMES: tuple[str, ...] = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)


# ---------------------------------------------------------------------------- forward
@dataclass
class Intermediates:
    """Every tensor of the lecture's forward, in forward order, plus the max's argmax."""

    emb: Tensor  # (N, T, E)
    embcat: Tensor  # (N, T*E)
    hprebn: Tensor  # (N, H)  hidden layer before batchnorm
    bnmeani: Tensor  # (1, H)
    bndiff: Tensor  # (N, H)
    bndiff2: Tensor  # (N, H)
    bnvar: Tensor  # (1, H)  Bessel-corrected (n-1) variance
    bnvar_inv: Tensor  # (1, H)
    bnraw: Tensor  # (N, H)
    hpreact: Tensor  # (N, H)
    h: Tensor  # (N, H)
    logits: Tensor  # (N, V)
    logit_maxes: Tensor  # (N, 1)
    logit_argmax: Tensor  # (N, 1) int64, where each row's max was found (not differentiable)
    norm_logits: Tensor  # (N, V)
    counts: Tensor  # (N, V)
    counts_sum: Tensor  # (N, 1)
    counts_sum_inv: Tensor  # (N, 1)
    probs: Tensor  # (N, V)
    logprobs: Tensor  # (N, V)
    loss: Tensor  # ()

    def differentiable(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) for the 19 intermediates that have a gradient (all but argmax and loss)."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name not in ("logit_argmax", "loss")]


def forward(p: Params, X: Tensor, Y: Tensor, eps: float = BN_EPS) -> Intermediates:
    """The lecture's forward pass, one named tensor per line (training-mode batchnorm)."""
    n = X.shape[0]
    emb = p.C[X]  # (N, T, E)
    embcat = emb.view(n, -1)  # (N, T*E)
    hprebn = embcat @ p.W1 + p.b1  # (N, H)
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)  # (1, H)
    bndiff = hprebn - bnmeani  # (N, H)
    bndiff2 = bndiff**2  # (N, H)
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)  # (1, H)  Bessel's n-1
    bnvar_inv = (bnvar + eps) ** -0.5  # (1, H)
    bnraw = bndiff * bnvar_inv  # (N, H)
    hpreact = p.bngain * bnraw + p.bnbias  # (N, H)
    h = torch.tanh(hpreact)  # (N, H)
    logits = h @ p.W2 + p.b2  # (N, V)
    logit_maxes, logit_argmax = logits.max(1, keepdim=True)  # (N, 1) (N, 1)
    norm_logits = logits - logit_maxes  # (N, V)  subtract the max for numerical stability
    counts = norm_logits.exp()  # (N, V)
    counts_sum = counts.sum(1, keepdim=True)  # (N, 1)
    counts_sum_inv = counts_sum**-1  # (N, 1)
    probs = counts * counts_sum_inv  # (N, V)
    logprobs = probs.log()  # (N, V)
    loss = -logprobs[torch.arange(n, device=X.device), Y].mean()  # ()
    return Intermediates(emb, embcat, hprebn, bnmeani, bndiff, bndiff2, bnvar, bnvar_inv, bnraw,
                         hpreact, h, logits, logit_maxes, logit_argmax, norm_logits, counts,
                         counts_sum, counts_sum_inv, probs, logprobs, loss)


# ---------------------------------------------------------------------------- backward
@dataclass
class Grads:
    """The gradient of the loss for all 26 tensors, in the lecture's (backward) order."""

    dlogprobs: Tensor  # (N, V)
    dprobs: Tensor  # (N, V)
    dcounts_sum_inv: Tensor  # (N, 1)
    dcounts_sum: Tensor  # (N, 1)
    dcounts: Tensor  # (N, V)
    dnorm_logits: Tensor  # (N, V)
    dlogit_maxes: Tensor  # (N, 1)
    dlogits: Tensor  # (N, V)
    dh: Tensor  # (N, H)
    dW2: Tensor  # (H, V)
    db2: Tensor  # (V,)
    dhpreact: Tensor  # (N, H)
    dbngain: Tensor  # (1, H)
    dbnbias: Tensor  # (1, H)
    dbnraw: Tensor  # (N, H)
    dbnvar_inv: Tensor  # (1, H)
    dbnvar: Tensor  # (1, H)
    dbndiff2: Tensor  # (N, H)
    dbndiff: Tensor  # (N, H)
    dbnmeani: Tensor  # (1, H)
    dhprebn: Tensor  # (N, H)
    dembcat: Tensor  # (N, T*E)
    dW1: Tensor  # (T*E, H)
    db1: Tensor  # (H,)
    demb: Tensor  # (N, T, E)
    dC: Tensor  # (V, E)

    def items(self) -> list[tuple[str, Tensor]]:
        """(forward name, gradient) pairs, e.g. ("logprobs", dlogprobs), in the lecture's order."""
        return [(f.name[1:], getattr(self, f.name)) for f in fields(self)]

    def params(self) -> Params:
        """The 7 parameter gradients as a Params (field C holds dC, ...)."""
        return Params(self.dC, self.dW1, self.db1, self.dW2, self.db2, self.dbngain, self.dbnbias)


def backward(p: Params, X: Tensor, Y: Tensor, f: Intermediates, dloss: Tensor | float = 1.0,
             eps: float = BN_EPS) -> Grads:
    """forward() read in reverse, one local derivative per line, from the loss seed `dloss`.
    Each line follows the order autograd evaluates that derivative in (see the module docstring)."""
    n, V = f.logits.shape
    dloss = torch.as_tensor(dloss, dtype=f.loss.dtype, device=f.loss.device)  # ()
    # loss = -mean(logprobs[range(n), Y]): neg, then mean divides by n, then the pick scatters
    dlogprobs = torch.zeros_like(f.logprobs)  # (N, V)
    dlogprobs[torch.arange(n, device=X.device), Y] = -dloss / n
    # logprobs = log(probs): divide (not multiply by 1/probs)
    dprobs = dlogprobs / f.probs  # (N, V)
    # probs = counts * counts_sum_inv: the broadcast factor's gradient is summed over dim 1
    dcounts_sum_inv = (dprobs * f.counts).sum(1, keepdim=True)  # (N, 1)
    dcounts = dprobs * f.counts_sum_inv  # (N, V)  first of two contributions
    # counts_sum_inv = counts_sum**-1: grad * (-1 * x**-2), the scalar into the power first
    dcounts_sum = dcounts_sum_inv * (-1.0 * f.counts_sum**-2)  # (N, 1)
    # counts_sum = counts.sum(1): broadcast back over the row
    dcounts = dcounts + dcounts_sum  # (N, V)
    # counts = exp(norm_logits): the derivative is the output itself
    dnorm_logits = dcounts * f.counts  # (N, V)
    # norm_logits = logits - logit_maxes
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)  # (N, 1)
    # logit_maxes = max(logits): the gradient goes to the position max returned (ties: one only)
    onehot = F.one_hot(f.logit_argmax[:, 0], V).to(f.logits.dtype)  # (N, V)
    dlogits = dnorm_logits + onehot * dlogit_maxes  # (N, V)
    # logits = h @ W2 + b2
    dh = dlogits @ p.W2.T  # (N, H)
    dW2 = f.h.T @ dlogits  # (H, V)
    db2 = dlogits.sum(0)  # (V,)
    # h = tanh(hpreact): 1 - h*h as one fused multiply-add, as autograd's tanh_backward kernel
    dhpreact = torch.addcmul(torch.ones_like(f.h), f.h, f.h, value=-1.0) * dh  # (N, H)
    # hpreact = bngain * bnraw + bnbias
    dbngain = (dhpreact * f.bnraw).sum(0, keepdim=True)  # (1, H)
    dbnbias = dhpreact.sum(0, keepdim=True)  # (1, H)
    dbnraw = dhpreact * p.bngain  # (N, H)
    # bnraw = bndiff * bnvar_inv
    dbnvar_inv = (dbnraw * f.bndiff).sum(0, keepdim=True)  # (1, H)
    dbndiff = dbnraw * f.bnvar_inv  # (N, H)  first of two contributions
    # bnvar_inv = (bnvar + eps)**-0.5: grad * (-0.5 * x**-1.5)
    dbnvar = dbnvar_inv * (-0.5 * (f.bnvar + eps) ** -1.5)  # (1, H)
    # bnvar = 1/(n-1) * bndiff2.sum(0): the same Python scalar, then broadcast back over the batch
    dbndiff2 = (dbnvar * (1 / (n - 1))).expand_as(f.bndiff2)  # (N, H)
    # bndiff2 = bndiff**2: grad * (2 * bndiff)
    dbndiff = dbndiff + dbndiff2 * (2.0 * f.bndiff)  # (N, H)
    # bndiff = hprebn - bnmeani
    dbnmeani = (-dbndiff).sum(0, keepdim=True)  # (1, H)
    # bnmeani = 1/n * hprebn.sum(0): scale, then broadcast back over the batch
    dhprebn = dbndiff + dbnmeani * (1 / n)  # (N, H)
    # hprebn = embcat @ W1 + b1
    dembcat = dhprebn @ p.W1.T  # (N, T*E)
    dW1 = f.embcat.T @ dhprebn  # (T*E, H)
    db1 = dhprebn.sum(0)  # (H,)
    # embcat = emb.view(n, -1)
    demb = dembcat.view(f.emb.shape)  # (N, T, E)
    # emb = C[X]: a row used several times accumulates every use (index_add_, never overwrite)
    dC = torch.zeros_like(p.C).index_add_(0, X.reshape(-1), demb.reshape(-1, demb.shape[-1]))  # (V, E)
    return Grads(dlogprobs, dprobs, dcounts_sum_inv, dcounts_sum, dcounts, dnorm_logits,
                 dlogit_maxes, dlogits, dh, dW2, db2, dhpreact, dbngain, dbnbias, dbnraw,
                 dbnvar_inv, dbnvar, dbndiff2.contiguous(), dbndiff, dbnmeani, dhprebn, dembcat,
                 dW1, db1, demb, dC)
