"""The makemore models as layer stacks, and what every tool does with a model: the loss and its
hand-written gradients, evaluation, batchnorm calibration and sampling. mlp is Karpathy's
"Building makemore Part 4" net, deep the "torchified" net of Part 3, wavenet the net of Part 5.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from handgrad import ops
from handgrad.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Sequential, Tanh, set_tensor

MODELS = ("mlp", "deep", "wavenet")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # "mlp" (lecture 4), "deep" (part 3, torchified) or "wavenet" (part 5)
    vocab_size: int = 27  # V: characters including the '.' start/end token
    block_size: int = 3  # T: how many previous characters predict the next one
    n_embd: int = 10  # E: embedding dimension per character
    n_hidden: int = 200  # H: hidden units per layer
    n_layers: int = 1  # hidden Linear -> BatchNorm -> Tanh blocks (deep); mlp has 1, wavenet log2(T)
    bn_eps: float = ops.BN_EPS  # batchnorm epsilon
    bn_momentum: float = 0.001  # running-statistics update rate (lecture 4: 0.001; parts 3 and 5: 0.1)
    batchnorm: bool = True  # False drops every batchnorm layer (to show what it protects against)
    w1_scale: float = 1.0  # multiplier on the first Linear's init (large values saturate tanh on purpose)

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"name must be one of {MODELS}, got {self.name!r}")
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 20:
                raise ValueError(f"{name} must be an integer from 1 to {1 << 20}, got {v!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.name == "wavenet" and (self.block_size < 2 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two for wavenet (it is halved by each "
                             f"FlattenConsecutive(2)), got {self.block_size}")
        for name in ("bn_eps", "bn_momentum", "w1_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if self.bn_momentum > 1:
            raise ValueError(f"bn_momentum must be at most 1, got {self.bn_momentum}")


# Each model's defaults, as data: makemore part 3 (deep) and part 5 (wavenet) hyperparameters.
PRESETS: dict[str, dict] = {
    "mlp": {},
    "deep": {"n_hidden": 100, "n_layers": 5, "bn_momentum": 0.1},
    "wavenet": {"block_size": 8, "n_embd": 24, "n_hidden": 128, "n_layers": 3, "bn_momentum": 0.1},
}


def preset(name: str, **overrides) -> ModelConfig:
    """The model's defaults with `overrides` applied; wavenet's n_layers follows its block size."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    values = {**PRESETS[name], **overrides, "name": name}
    if name == "wavenet":
        values["n_layers"] = int(values.get("block_size", 8)).bit_length() - 1  # log2(T)
    return ModelConfig(**values)


# ---------------------------------------------------------------------------- building
def _block(fan_in: int, cfg: ModelConfig, dtype: torch.dtype, bias: bool) -> list:
    """Linear -> BatchNorm1d -> Tanh (the batchnorm dropped when cfg.batchnorm is False)."""
    bn = [BatchNorm1d(cfg.n_hidden, cfg.bn_eps, cfg.bn_momentum, dtype)] if cfg.batchnorm else []
    return [Linear(fan_in, cfg.n_hidden, bias=bias, dtype=dtype), *bn, Tanh()]


def layers_for(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Sequential:
    """The layer stack of a model config (parameters not yet initialised)."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    if cfg.name == "mlp":  # lecture 4: b1 kept in front of batchnorm, as the lecture does ("for fun")
        return Sequential([Embedding(V, E, dtype), FlattenConsecutive(T), *_block(T * E, cfg, dtype, True),
                           Linear(H, V, dtype=dtype)])
    if cfg.name == "deep":  # part 3: no biases, a batchnorm after the output layer too
        hidden = [layer for i in range(cfg.n_layers)
                  for layer in _block(T * E if i == 0 else H, cfg, dtype, False)]
        last_bn = [BatchNorm1d(V, cfg.bn_eps, cfg.bn_momentum, dtype)] if cfg.batchnorm else []
        return Sequential([Embedding(V, E, dtype), FlattenConsecutive(T), *hidden,
                           Linear(H, V, bias=False, dtype=dtype), *last_bn])
    # wavenet, part 5: pairs of positions merged log2(T) times
    stages = [layer for i in range(cfg.n_layers)
              for layer in [FlattenConsecutive(2), *_block(2 * (E if i == 0 else H), cfg, dtype, False)]]
    return Sequential([Embedding(V, E, dtype), *stages, Linear(H, V, dtype=dtype)])


def _first_linear(model: Sequential) -> Linear:
    return next(layer for layer in model.layers if isinstance(layer, Linear))


def init_lecture4(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """Lecture 4's initialisation, drawn in its order (C, W1, b1, W2, b2, bngain, bnbias): Kaiming
    gain 5/3 on W1, small non-zero b1/W2/b2 (so a wrong backward cannot hide behind zeros), gain ~1
    and bias ~0 with noise."""
    emb, w1, w2 = model.layers[0], model.layers[2], model.layers[-1]
    T, E, H, V = cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.vocab_size
    draws: list[tuple[Tensor, Callable[[], Tensor]]] = [
        (emb.weight, lambda: torch.randn((V, E), generator=g)),
        (w1.weight, lambda: torch.randn((T * E, H), generator=g) * (5 / 3) / (T * E) ** 0.5 * cfg.w1_scale),
        (w1.bias, lambda: torch.randn(H, generator=g) * 0.1),
        (w2.weight, lambda: torch.randn((H, V), generator=g) * 0.1),
        (w2.bias, lambda: torch.randn(V, generator=g) * 0.1),
    ]
    bn = model.layers[3] if cfg.batchnorm else BatchNorm1d(H)  # drawn either way: same stream
    draws += [(bn.weight, lambda: torch.randn((1, H), generator=g).reshape(H) * 0.1 + 1.0),
              (bn.bias, lambda: torch.randn((1, H), generator=g).reshape(H) * 0.1)]
    for t, draw in draws:
        t.copy_(draw())


def init_makemore(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """Parts 3 and 5: each layer's default init in layer order (embedding N(0,1), Linear
    N(0,1)/sqrt(fan_in), batchnorm gain 1 bias 0), then part 3's tanh gain 5/3 on the hidden Linears
    and its last batchnorm gain x0.1, or part 5's last Linear weight x0.1."""
    model.init_(g)
    linears = [layer for layer in model.layers if isinstance(layer, Linear)]
    with torch.no_grad():
        _first_linear(model).weight.mul_(cfg.w1_scale)
        if cfg.name == "deep":
            for layer in linears[:-1]:
                layer.weight.mul_(5 / 3)
            last = model.layers[-1]
            (last.weight if isinstance(last, BatchNorm1d) else linears[-1].weight).mul_(0.1)
        else:
            linears[-1].weight.mul_(0.1)


def build(cfg: ModelConfig, g: torch.Generator | int = 42, dtype: torch.dtype = torch.float32) -> Sequential:
    """A freshly initialised model. Parameters are drawn in float32 from `g` (a generator, or a
    seed for a new one), then cast, so float64 runs start from the same numbers."""
    g = torch.Generator().manual_seed(g) if isinstance(g, int) else g
    model = layers_for(cfg, torch.float32)
    (init_lecture4 if cfg.name == "mlp" else init_makemore)(model, cfg, g)
    return cast(model, dtype)


def cast(model, dtype: torch.dtype):
    """The model with every parameter and buffer in `dtype` (in place; returns the model)."""
    for name, t in {**model.params(), **model.buffers()}.items():
        set_tensor(model, name, t.to(dtype))
    return model


def with_buffers(model, buffers: dict[str, Tensor]):
    """A copy of `model` sharing its parameters, with these buffers (e.g. calibrated statistics)."""
    other = copy.copy(model)
    if isinstance(model, Sequential):
        other.layers = [copy.copy(layer) for layer in model.layers]
    for name, t in buffers.items():
        set_tensor(other, name, t)
    return other


def dtype_of(model) -> torch.dtype:
    return next(iter(model.params().values())).dtype


# ---------------------------------------------------------------------------- loss and gradients
@dataclass
class Step:
    """One training-mode forward/backward: the loss, every parameter's gradient, the caches."""

    loss: Tensor  # ()
    grads: dict[str, Tensor]  # name -> gradient, each with its parameter's shape
    caches: list  # per layer, for update_buffers


def loss_and_grads(model, X: Tensor, Y: Tensor, dloss: float = 1.0) -> Step:
    """Forward in training mode, mean cross-entropy, hand-written backward from the loss seed."""
    logits, caches = model.forward(X, training=True)  # (N, V)
    loss, ce_cache = ops.cross_entropy_forward(logits, Y)  # ()
    dlogits = ops.cross_entropy_backward(dloss, ce_cache)  # (N, V)
    _, grads = model.backward(dlogits, caches)
    return Step(loss, grads, caches)


def sgd_update(model, grads: dict[str, Tensor], lr: float) -> None:
    """Plain SGD in place: p -= lr * grad, for every named parameter."""
    for name, p in model.params().items():
        p.add_(grads[name], alpha=-lr)


# ---------------------------------------------------------------------------- inference
def logits_eval(model, X: Tensor) -> Tensor:
    """Inference-mode forward (batchnorm with its fixed statistics). Returns logits (N, V)."""
    logits, _ = model.forward(X, training=False)
    if logits.dim() != 2:
        raise ValueError(f"the model's output must be logits (N, V), got shape {tuple(logits.shape)}")
    return logits


def evaluate(model, X: Tensor, Y: Tensor, chunk: int = 32768) -> float | None:
    """Mean cross-entropy over a whole split, in chunks; None for an empty split."""
    if X.shape[0] == 0:
        return None
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        loss, _ = ops.cross_entropy_forward(logits_eval(model, X[i:i + chunk]), Y[i:i + chunk])
        total += loss.item() * min(chunk, X.shape[0] - i)
    return total / X.shape[0]


def calibrate(model: Sequential, X: Tensor, chunk: int = 32768) -> dict[str, Tensor]:
    """The lecture's calibration, layer by layer: each batchnorm's mean and n-1 variance of its input
    over the whole training set, with the batchnorms before it already calibrated (each one's
    statistics depend on those before it). In float64, one pass per batchnorm in chunks to bound
    memory, each chunk's mean and squared deviations merged exactly into the running ones.
    Returns the calibrated buffers by name; the model itself is not changed."""
    stats: dict[str, Tensor] = {}
    current = model
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, BatchNorm1d):
            continue
        head = Sequential(current.layers[:i])

        n, mean, m2 = 0, 0.0, 0.0  # rows so far, their mean (C,) and sum of squared deviations (C,)
        for j in range(0, X.shape[0], chunk):  # one pass, chunks merged exactly (Chan et al., 1979)
            x, _ = head.forward(X[j:j + chunk], training=False)
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (rows, C)
            var_b, mean_b = torch.var_mean(x, dim=0, correction=0)  # (C,), (C,)
            n_b = x.shape[0]
            delta = mean_b - mean
            m2 = m2 + var_b * n_b + delta**2 * (n * n_b / (n + n_b))
            mean = mean + delta * (n_b / (n + n_b))
            n += n_b
        var = m2 / max(n - 1, 1)  # (C,) Bessel's n-1
        dtype = layer.running_mean.dtype
        stats[f"{i}.running_mean"], stats[f"{i}.running_var"] = mean.to(dtype), var.to(dtype)
        current = with_buffers(current, {f"{i}.running_mean": stats[f"{i}.running_mean"],
                                         f"{i}.running_var": stats[f"{i}.running_var"]})
    return stats


def sample(model, block_size: int, n: int = 20, seed: int = 2147483657, max_len: int = 64
           ) -> list[list[int]]:
    """Draw n sequences of token ids (without the final '.') in parallel, one character at a time,
    each from the softmax of the inference-mode logits. Sequences stop at token 0 or max_len."""
    g = torch.Generator().manual_seed(seed)
    context = torch.zeros((n, block_size), dtype=torch.long)  # (n, T)
    drawn = torch.zeros((n, max_len), dtype=torch.long)  # (n, max_len)
    alive = torch.ones(n, dtype=torch.bool)  # (n,)
    for t in range(max_len):
        live = alive.nonzero()[:, 0]  # (n_alive,) only unfinished sequences are run through the model
        logits = logits_eval(model, context[live]).to(torch.float64)  # (n_alive, V)
        probs = torch.zeros((n, logits.shape[1]), dtype=torch.float64)  # (n, V)
        probs[:, 0] = 1.0  # finished rows draw '.', which is ignored; every row draws, as before
        probs[live] = torch.softmax(logits, dim=1)
        ix = torch.multinomial(probs, num_samples=1, generator=g)  # (n, 1)
        drawn[:, t] = ix[:, 0]
        alive &= ix[:, 0] != 0
        if not alive.any():
            break
        context = torch.cat([context[:, 1:], ix], dim=1)  # (n, T)
    out = []
    for row in drawn.tolist():  # each sequence up to its first '.' (token 0)
        out.append(row[:row.index(0)] if 0 in row else row)
    return out


def config_fields() -> list[str]:
    return [f.name for f in fields(ModelConfig)]


def with_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    return replace(cfg, vocab_size=vocab_size)
