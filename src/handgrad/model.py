"""The makemore MLP (embedding -> linear -> batchnorm -> tanh -> linear -> cross-entropy) with a
hand-written backward pass built from the pairs in ops.py. Reference: Karpathy, "Building makemore
Part 4: Becoming a Backprop Ninja"; the layout echoes nanoGPT `model.py` and llm.c `gpt2_backward`.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from handgrad import ops


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 27  # V: characters including the '.' start/end token
    block_size: int = 3  # T: how many previous characters predict the next one
    n_embd: int = 10  # E: embedding dimension per character
    n_hidden: int = 200  # H: hidden units in the batchnorm/tanh layer
    bn_eps: float = ops.BN_EPS  # batchnorm epsilon
    bn_momentum: float = 0.001  # running-statistics update rate (the lecture's 0.001)
    batchnorm: bool = True  # False drops the batchnorm layer (to show what it protects against)
    w1_scale: float = 1.0  # multiplier on W1's Kaiming init (large values saturate tanh on purpose)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")


# ---------------------------------------------------------------------------- parameters
@dataclass
class Params:
    """The 7 trainable tensors. The same class holds their gradients (`dC`, ... as fields C, ...)."""

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

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors())


@dataclass
class BNStats:
    """Batchnorm statistics used at inference: mean and Bessel-corrected (n-1) variance."""

    mean: Tensor  # (1, H)
    var: Tensor  # (1, H)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    return {"C": (V, E), "W1": (T * E, H), "b1": (H,), "W2": (H, V), "b2": (V,),
            "bngain": (1, H), "bnbias": (1, H)}


def init_params(cfg: ModelConfig, seed: int = 42, dtype: torch.dtype = torch.float32) -> Params:
    """The lecture's initialisation: Kaiming-style gain 5/3 on W1, small random b1/W2/b2
    (deliberately non-zero, so a wrong backward cannot hide behind zeros), gain ~1 and bias ~0
    with noise. Drawn from a seeded torch.Generator in float32, then cast."""
    g = torch.Generator().manual_seed(seed)
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    C = torch.randn((V, E), generator=g)
    W1 = torch.randn((T * E, H), generator=g) * (5 / 3) / (T * E) ** 0.5 * cfg.w1_scale
    b1 = torch.randn(H, generator=g) * 0.1
    W2 = torch.randn((H, V), generator=g) * 0.1
    b2 = torch.randn(V, generator=g) * 0.1
    bngain = torch.randn((1, H), generator=g) * 0.1 + 1.0
    bnbias = torch.randn((1, H), generator=g) * 0.1
    return Params(C, W1, b1, W2, b2, bngain, bnbias).to(dtype)


def init_bn_stats(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> BNStats:
    return BNStats(torch.zeros((1, cfg.n_hidden), dtype=dtype),
                   torch.ones((1, cfg.n_hidden), dtype=dtype))


# ---------------------------------------------------------------------------- forward / backward
@dataclass
class Activations:
    """What forward saves for backward: one field per tensor."""

    X: Tensor  # (N, T) int64 context characters
    embcat: Tensor  # (N, T*E) concatenated embeddings
    bnraw: Tensor | None  # (N, H) normalised pre-activations (None without batchnorm)
    bnvar_inv: Tensor | None  # (1, H) 1/sqrt(var + eps)
    bnmeani: Tensor | None  # (1, H) batch mean (for running statistics)
    bnvar: Tensor | None  # (1, H) batch n-1 variance (for running statistics)
    h: Tensor  # (N, H) tanh output
    logprobs: Tensor  # (N, V) log-softmax of the logits
    Y: Tensor  # (N,) int64 targets


def forward(p: Params, X: Tensor, Y: Tensor, batchnorm: bool = True
            ) -> tuple[Tensor, Activations]:
    """Training-mode forward (batch statistics). Returns (loss, activations).
    With batchnorm=False the layer is skipped (hpreact = hprebn; bngain/bnbias unused)."""
    N = X.shape[0]
    emb, _ = ops.embedding_forward(p.C, X)  # (N, T, E)
    embcat = emb.reshape(N, -1)  # (N, T*E)
    hprebn, _ = ops.linear_forward(embcat, p.W1, p.b1)  # (N, H)
    if batchnorm:
        hpreact, (bnraw, bnvar_inv, _), (bnmeani, bnvar) = ops.batchnorm_forward(
            hprebn, p.bngain, p.bnbias)  # (N, H)
    else:
        hpreact, bnraw, bnvar_inv, bnmeani, bnvar = hprebn, None, None, None, None
    h, _ = ops.tanh_forward(hpreact)  # (N, H)
    logits, _ = ops.linear_forward(h, p.W2, p.b2)  # (N, V)
    loss, (logprobs, _) = ops.cross_entropy_forward(logits, Y)  # ()
    return loss, Activations(X, embcat, bnraw, bnvar_inv, bnmeani, bnvar, h, logprobs, Y)


def backward(p: Params, a: Activations, dloss: float = 1.0) -> Params:
    """Hand-written backward: forward() read in reverse, one op per line, from the loss seed."""
    V, E = p.C.shape
    dlogits = ops.cross_entropy_backward(dloss, (a.logprobs, a.Y))  # (N, V)
    dh, dW2, db2 = ops.linear_backward(dlogits, (a.h, p.W2))  # (N, H) (H, V) (V,)
    dhpreact = ops.tanh_backward(dh, (a.h,))  # (N, H)
    if a.bnraw is not None:
        dhprebn, dbngain, dbnbias = ops.batchnorm_backward(
            dhpreact, (a.bnraw, a.bnvar_inv, p.bngain))  # (N, H) (1, H) (1, H)
    else:  # no batchnorm: the gain and bias get no gradient
        dhprebn, dbngain, dbnbias = dhpreact, torch.zeros_like(p.bngain), torch.zeros_like(p.bnbias)
    dembcat, dW1, db1 = ops.linear_backward(dhprebn, (a.embcat, p.W1))  # (N, T*E) (T*E, H) (H,)
    demb = dembcat.view(a.X.shape[0], a.X.shape[1], E)  # (N, T, E)
    dC = ops.embedding_backward(demb, (a.X, V))  # (V, E)
    return Params(dC, dW1, db1, dW2, db2, dbngain, dbnbias)


def sgd_update(p: Params, grads: Params, lr: float) -> None:
    """Plain SGD in place: p -= lr * grad."""
    for t, g in zip(p.tensors(), grads.tensors()):
        t.add_(g, alpha=-lr)


def update_running(bn: BNStats, a: Activations, momentum: float) -> None:
    """Exponential moving average of the batch statistics (same n-1 variance as training)."""
    bn.mean.mul_(1 - momentum).add_(a.bnmeani, alpha=momentum)
    bn.var.mul_(1 - momentum).add_(a.bnvar, alpha=momentum)


# ---------------------------------------------------------------------------- inference
def hidden_preact(p: Params, X: Tensor) -> Tensor:
    """hprebn for a batch of contexts, no statistics involved."""
    emb, _ = ops.embedding_forward(p.C, X)  # (N, T, E)
    return emb.reshape(X.shape[0], -1) @ p.W1 + p.b1  # (N, H)


def logits_eval(p: Params, bn: BNStats | None, X: Tensor, eps: float = ops.BN_EPS) -> Tensor:
    """Inference-mode forward with fixed batchnorm statistics (bn None: no batchnorm layer).
    Returns logits (N, V)."""
    hpreact = hidden_preact(p, X)  # (N, H)
    if bn is not None:
        hpreact = ops.batchnorm_inference(hpreact, p.bngain, p.bnbias, bn.mean, bn.var, eps)
    return torch.tanh(hpreact) @ p.W2 + p.b2  # (N, V)


def calibrate_bn(p: Params, X: Tensor, chunk: int = 32768) -> BNStats:
    """The lecture's calibration: mean and n-1 variance of hprebn over the whole training set,
    computed in chunks (sum and sum of squared deviations, two passes) to bound memory."""
    n, H = X.shape[0], p.W1.shape[1]
    total = torch.zeros((1, H), dtype=torch.float64)
    for i in range(0, n, chunk):
        total += hidden_preact(p, X[i:i + chunk]).to(torch.float64).sum(0, keepdim=True)
    mean = total / n  # (1, H)
    sq = torch.zeros((1, H), dtype=torch.float64)
    for i in range(0, n, chunk):
        sq += ((hidden_preact(p, X[i:i + chunk]).to(torch.float64) - mean) ** 2).sum(0, keepdim=True)
    var = sq / (n - 1)  # (1, H)  Bessel's n-1, as in training
    return BNStats(mean.to(p.W1.dtype), var.to(p.W1.dtype))


def evaluate(p: Params, bn: BNStats | None, X: Tensor, Y: Tensor, chunk: int = 32768) -> float:
    """Mean cross-entropy over a whole split, in chunks."""
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        logits = logits_eval(p, bn, X[i:i + chunk])  # (n, V)
        loss, _ = ops.cross_entropy_forward(logits, Y[i:i + chunk])
        total += loss.item() * logits.shape[0]
    return total / X.shape[0]


def sample(p: Params, bn: BNStats | None, block_size: int, n: int = 20, seed: int = 2147483657,
           max_len: int = 64) -> list[list[int]]:
    """Draw n sequences of token ids (without the final '.') in parallel, one character at a time,
    each from the softmax of the inference-mode logits. Sequences stop at token 0 or max_len."""
    g = torch.Generator().manual_seed(seed)
    context = torch.zeros((n, block_size), dtype=torch.long)  # (n, T)
    out: list[list[int]] = [[] for _ in range(n)]
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(max_len):
        probs = torch.softmax(logits_eval(p, bn, context).to(torch.float64), dim=1)  # (n, V)
        ix = torch.multinomial(probs, num_samples=1, generator=g)  # (n, 1)
        for i in torch.nonzero(alive).flatten().tolist():
            if ix[i, 0].item() == 0:
                alive[i] = False
            else:
                out[i].append(int(ix[i, 0]))
        if not alive.any():
            break
        context = torch.cat([context[:, 1:], ix], dim=1)  # (n, T)
    return out
