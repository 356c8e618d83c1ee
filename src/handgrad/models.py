"""The makemore models as layer stacks, and what every tool does with a model: the loss and its
hand-written gradients, evaluation, batchnorm calibration and sampling. mlp is Karpathy's
"Building makemore Part 4" net, deep the "torchified" net of Part 3, wavenet the net of Part 5.

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from handgrad import ops
from handgrad.config import FieldError, OneOf, Positive, Range, option, ref, validate
from handgrad.layers import (
    BatchNorm1d,
    Block,
    BoWBlock,
    ContextWindows,
    Embedding,
    FlattenConsecutive,
    FlattenLast,
    LayerNorm,
    Linear,
    PositionEmbedding,
    Recurrent,
    Sequential,
    Tanh,
    set_tensor,
)

SIZE = Range(1, 1 << 20)  # a model dimension


@dataclass(frozen=True)
class Preset:
    """A built-in model described by itself: its name and one line for --model's help, the ModelConfig
    and TrainConfig values that differ from the defaults, its layer stack, its initialisation, fields
    that follow from others (and may not be given), a rule its config must keep, and the kind of data
    it reads. Registering one
    (`register`) is all a new model needs: the CLI, the checkpoint validator and budget read PRESETS."""

    name: str
    doc: str
    model: dict  # ModelConfig values
    train: dict  # TrainConfig values
    layers: Callable[[ModelConfig, torch.dtype], list]  # the stack, parameters not yet drawn
    init: Callable[[Sequential, ModelConfig, torch.Generator], None]  # draws the parameters in place
    derived: dict[str, tuple[Callable[[dict], object], str]] = field(default_factory=dict)  # field ->
    # (its value from the others, why it cannot be given)
    check: Callable[[ModelConfig], tuple[str, str] | None] = lambda cfg: None  # (field, problem) or None
    data: str = "context"  # the data kind it reads (data.KINDS): context windows -> the next character


PRESETS: dict[str, Preset] = {}  # name -> Preset, in registration order (mlp first: the default)


def register(p: Preset) -> Preset:
    PRESETS[p.name] = p
    return p


def help_values() -> dict:
    """What ModelConfig's help texts refer to: each preset's doc (`preset_docs`), the values each sets
    (`preset_values`) and each preset's config (`presets`)."""
    default = ModelConfig().name
    values = {k: ", ".join(f"{a}={b}" for a, b in p.model.items()) or "the defaults"
              for k, p in PRESETS.items()}
    return {"preset_docs": "; ".join(f"{k}: {p.doc}" + (" (default)" if k == default else "")
                                     for k, p in PRESETS.items()),
            "preset_values": "; ".join(f"{k}: {v}" for k, v in values.items()),
            "presets": {k: preset(k) for k in PRESETS}}


@dataclass(frozen=True)
class ModelConfig:
    GROUP = "model"  # the help group of its flags
    name: str = option("mlp", "{preset_docs}", OneOf(PRESETS), flag="--model")  # a registered Preset
    vocab_size: int = option(27, "characters including the '.' start/end token", Range(2, 1 << 20), flag="")
    # V: from the data
    n_embd: int = option(10, "embedding size per character (default {default}; {preset_values})", SIZE)  # E
    n_hidden: int = option(200, "hidden units per layer (default {default})", SIZE)  # H
    block_size: int = option(3, "context length in characters (default {default}; a power of two for "
                             "wavenet)", SIZE)  # T: how many previous characters predict the next one
    n_layers: int = option(1, "hidden blocks of the deep model (default {presets[deep].n_layers}), "
                           "transformer blocks of the zoo's transformer (4)", SIZE)
    # hidden Linear -> BatchNorm -> Tanh blocks (deep); mlp has 1, wavenet log2(T); transformer Blocks
    n_embd2: int = option(64, "hidden size of the makemore zoo's bow, rnn, gru and bengio models (default "
                          "{default})", SIZE)  # H of BoWBlock's MLP, the RNN/GRU state, Bengio's hidden layer
    n_head: int = option(4, "attention heads of the transformer; must divide --n-embd (default {default})",
                         SIZE)
    batchnorm: bool = option(True, "drop the batchnorm layer (for experiments)", flag="--no-batchnorm")
    # False drops every batchnorm layer (to show what it protects against)
    w1_scale: float = option(1.0, "multiply W1's init by this (default {default:g}; large values saturate "
                             "tanh on purpose)", Positive())  # large values saturate tanh on purpose
    bn_eps: float = option(ops.BN_EPS, "batchnorm epsilon", Positive(), flag="")
    bn_momentum: float = option(0.001, "running-statistics update rate (lecture 4: 0.001; parts 3 and 5: "
                                "0.1)", Positive(hi=1), flag="")

    def __post_init__(self) -> None:
        try:
            validate(self)
        except FieldError as e:  # a derived field out of range: name the field it follows from
            p = PRESETS.get(self.name)
            if p is None or e.field not in p.derived or p.check(self) is None:
                raise
            raise FieldError(*p.check(self)) from None
        problem = PRESETS[self.name].check(self)
        if problem is not None:
            raise FieldError(*problem)


def preset(name: str, **overrides) -> ModelConfig:
    """The model's defaults with `overrides` applied; a derived field (wavenet's n_layers) follows
    the others and may not be overridden."""
    if name not in PRESETS:
        raise FieldError("name", f"must be one of {tuple(PRESETS)}, got {name!r}")
    p = PRESETS[name]
    for k, (_, why) in p.derived.items():
        if k in overrides:
            raise FieldError(k, why)
    values = {**p.model, **overrides, "name": name}
    values.update({k: rule(values) for k, (rule, _) in p.derived.items()})
    return ModelConfig(**values)


def layers_for(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Sequential:
    """The layer stack of a model config (parameters not yet initialised)."""
    return Sequential(PRESETS[cfg.name].layers(cfg, dtype))


def build(cfg: ModelConfig, g: torch.Generator | int = 42, dtype: torch.dtype = torch.float32) -> Sequential:
    """A freshly initialised model. Parameters are drawn in float32 from `g` (a generator, or a
    seed for a new one), then cast, so float64 runs start from the same numbers."""
    g = torch.Generator().manual_seed(g) if isinstance(g, int) else g
    model = layers_for(cfg, torch.float32)
    PRESETS[cfg.name].init(model, cfg, g)
    return cast(model, dtype)


# ---------------------------------------------------------------------------- the presets
def _block(fan_in: int, cfg: ModelConfig, dtype: torch.dtype, bias: bool) -> list:
    """Linear -> BatchNorm1d -> Tanh (the batchnorm dropped when cfg.batchnorm is False)."""
    bn = [BatchNorm1d(cfg.n_hidden, cfg.bn_eps, cfg.bn_momentum, dtype)] if cfg.batchnorm else []
    return [Linear(fan_in, cfg.n_hidden, bias=bias, dtype=dtype), *bn, Tanh()]


# The lecture MLP's 7 tensors by the lecture's names, and where they sit in the mlp preset's layers
# (Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear): the one home of that layout.
LECTURE_LAYERS = (Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear)
LECTURE_NAMES = {"C": "0.weight", "W1": "2.weight", "b1": "2.bias", "W2": "5.weight", "b2": "5.bias",
                 "bngain": "3.weight", "bnbias": "3.bias"}


def lecture_tensors(model) -> dict[str, Tensor] | None:
    """The lecture MLP's 7 tensors by the lecture's names (C, W1, b1, W2, b2, bngain (1, H), bnbias
    (1, H)), sharing the model's memory, when the model has the lecture's layers with both biases;
    else None."""
    if tuple(type(layer) for layer in getattr(model, "layers", ())) != LECTURE_LAYERS:
        return None
    params = model.params()
    if not all(name in params for name in LECTURE_NAMES.values()):
        return None
    t = {lecture: params[name] for lecture, name in LECTURE_NAMES.items()}
    H = t["bngain"].shape[0]
    return {**t, "bngain": t["bngain"].view(1, H), "bnbias": t["bnbias"].view(1, H)}


def mlp_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """Lecture 4: b1 kept in front of batchnorm, as the lecture does ("for fun")."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    return [Embedding(V, E, dtype), FlattenConsecutive(T), *_block(T * E, cfg, dtype, True),
            Linear(H, V, dtype=dtype)]


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


def deep_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """Part 3: no biases, a batchnorm after the output layer too."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    hidden = [layer for i in range(cfg.n_layers)
              for layer in _block(T * E if i == 0 else H, cfg, dtype, False)]
    last_bn = [BatchNorm1d(V, cfg.bn_eps, cfg.bn_momentum, dtype)] if cfg.batchnorm else []
    return [Embedding(V, E, dtype), FlattenConsecutive(T), *hidden, Linear(H, V, bias=False, dtype=dtype),
            *last_bn]


def wavenet_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """Part 5: pairs of positions merged log2(T) times."""
    V, E, H = cfg.vocab_size, cfg.n_embd, cfg.n_hidden
    stages = [layer for i in range(cfg.n_layers)
              for layer in [FlattenConsecutive(2), *_block(2 * (E if i == 0 else H), cfg, dtype, False)]]
    return [Embedding(V, E, dtype), *stages, Linear(H, V, dtype=dtype)]


def _linears(model: Sequential) -> list[Linear]:
    return [layer for layer in model.layers if isinstance(layer, Linear)]


def _init_makemore(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> list[Linear]:
    """Parts 3 and 5: each layer's default init in layer order (embedding N(0,1), Linear
    N(0,1)/sqrt(fan_in), batchnorm gain 1 bias 0), the first Linear times w1_scale. Returns the Linears."""
    model.init_(g)
    linears = _linears(model)
    with torch.no_grad():
        linears[0].weight.mul_(cfg.w1_scale)
    return linears


def init_deep(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """Part 3: then the tanh gain 5/3 on the hidden Linears, and the last batchnorm's gain x0.1 (the
    output Linear's weight x0.1 without batchnorm)."""
    linears = _init_makemore(model, cfg, g)
    with torch.no_grad():
        for layer in linears[:-1]:
            layer.weight.mul_(5 / 3)
        last = model.layers[-1]
        (last.weight if isinstance(last, BatchNorm1d) else linears[-1].weight).mul_(0.1)


def init_wavenet(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """Part 5: then the last Linear's weight x0.1."""
    linears = _init_makemore(model, cfg, g)
    with torch.no_grad():
        linears[-1].weight.mul_(0.1)


def _power_of_two(cfg: ModelConfig) -> tuple[str, str] | None:
    T = cfg.block_size
    if T >= 2 and not T & (T - 1):
        return None
    return "block_size", (f"must be a power of two for wavenet (2, 4, 8, ...: it is halved by each "
                          f"FlattenConsecutive(2)), got {T}")


# makemore parts 3 and 5 decay at 150k and evaluate with the running statistics (momentum 0.1).
register(Preset("mlp", "lecture 4's MLP", {}, {}, mlp_layers, init_lecture4))
register(Preset("deep", "makemore part 3's 5-layer batchnorm net",
                {"n_hidden": 100, "n_layers": 5, "bn_momentum": 0.1},
                {"lr_decay_step": 150_000, "bn_stats": "running"}, deep_layers, init_deep))
register(Preset("wavenet", "makemore part 5's hierarchical net",
                {"block_size": 8, "n_embd": 24, "n_hidden": 128, "n_layers": 3, "bn_momentum": 0.1},
                {"lr_decay_step": 150_000, "bn_stats": "running"}, wavenet_layers, init_wavenet,
                derived={"n_layers": (lambda v: int(v.get("block_size", 8)).bit_length() - 1,
                                      f"wavenet's depth follows {ref('block_size')} (log2 of it); give "
                                      f"{ref('block_size')}")},
                check=_power_of_two))


# ---------------------------------------------------------------------------- the makemore zoo
# karpathy/makemore's models on whole names as sequences (data kind "sequence"), with makemore.py's
# defaults: n_embd 64, n_embd2 64, 4 layers of 4 heads, block size 16 (names.txt's longest name + its
# start token), AdamW lr 5e-4, betas (0.9, 0.99), eps 1e-8, weight decay 0.01 on every parameter,
# batch 32, seed 3407, a constant learning rate; the test loss evaluated every 500 steps; init, batches and
# evaluations drawn as makemore.py draws them (handgrad.makemore).
ZOO_MODEL = {"block_size": 16, "n_embd": 64, "n_embd2": 64, "n_layers": 4, "n_head": 4}
ZOO_TRAIN = {"optimizer": "adamw", "lr": 5e-4, "lr_decayed": 5e-4, "lr_decay_step": 10**12, "beta1": 0.9,
             "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.01, "batch_size": 32, "seed": 3407,
             "split_seed": 3407, "steps": 20_000, "eval_every": 500, "chunk_steps": 500,
             "makemore_rng": True}
MAX_ZOO_VOCAB = 4096  # characters: the bigram's table is V x V


def _zoo_check(cfg: ModelConfig) -> tuple[str, str] | None:
    """What every zoo model refuses: a vocabulary beyond MAX_ZOO_VOCAB (it comes from --data)."""
    if cfg.vocab_size > MAX_ZOO_VOCAB:
        return "data", (f"has {cfg.vocab_size - 1:,} distinct characters; the makemore zoo's {cfg.name} "
                        f"takes at most {MAX_ZOO_VOCAB - 1:,} (a character-level model)")
    return None


def bigram_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """makemore's Bigram: a (V, V) table of next-character logits, indexed by the current character."""
    return [Embedding(cfg.vocab_size, cfg.vocab_size, dtype)]


def init_zeros(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """makemore's Bigram starts from a table of zeros (a uniform guess)."""
    for p in model.params().values():
        p.zero_()


def zoo(name: str, doc: str, layers, init, model: dict | None = None, check=_zoo_check) -> Preset:
    """A makemore zoo preset: ZOO_MODEL and ZOO_TRAIN with `model`'s values on top."""
    return register(Preset(name, doc, {**ZOO_MODEL, **(model or {})}, dict(ZOO_TRAIN), layers, init,
                           check=check, data="sequence"))


def bow_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """makemore's BoW: token and position embeddings, one BoWBlock (causal average + tanh MLP), lm_head."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_embd2
    return [Embedding(V, E, dtype), PositionEmbedding(T, E, dtype), BoWBlock(E, H, T, dtype),
            Linear(E, V, init="torch", dtype=dtype)]


def bengio_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """makemore's MLP (Bengio et al. 2003) over sequences: at each position the block_size ids up to it
    (a blank id V before the start) embedded in an Embedding(V + 1, E), concatenated, tanh hidden layer."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_embd2
    return [ContextWindows(T, V), Embedding(V + 1, E, dtype), FlattenLast(),
            Linear(T * E, H, init="torch", dtype=dtype), Tanh(), Linear(H, V, init="torch", dtype=dtype)]


def recurrent_layers(cell: str):
    """makemore's RNN with an "rnn" or "gru" cell: embeddings, the cell unrolled from a learned start
    state, lm_head on every hidden state."""
    def layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
        V, E, H = cfg.vocab_size, cfg.n_embd, cfg.n_embd2
        return [Embedding(V, E, dtype), Recurrent(cell, E, H, dtype), Linear(H, V, init="torch", dtype=dtype)]
    return layers


def transformer_layers(cfg: ModelConfig, dtype: torch.dtype) -> list:
    """makemore's Transformer (GPT-2's layout): token + position embeddings, n_layers Blocks, a final
    LayerNorm, lm_head without bias."""
    V, T, E = cfg.vocab_size, cfg.block_size, cfg.n_embd
    return [Embedding(V, E, dtype), PositionEmbedding(T, E, dtype),
            *(Block(E, cfg.n_head, T, dtype=dtype) for _ in range(cfg.n_layers)), LayerNorm(E, dtype=dtype),
            Linear(E, V, bias=False, init="torch", dtype=dtype)]


def init_torch(model: Sequential, cfg: ModelConfig, g: torch.Generator) -> None:
    """PyTorch's default inits as makemore.py leaves them, layer by layer in order: embeddings N(0, 1),
    Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm 1 and 0, the recurrent start state zeros."""
    model.init_(g)


def _heads_check(cfg: ModelConfig) -> tuple[str, str] | None:
    if cfg.n_embd % cfg.n_head:
        return "n_head", (f"{cfg.n_head} does not divide {ref('n_embd')} {cfg.n_embd}: each head takes "
                          f"n_embd / n_head channels")
    return _zoo_check(cfg)


zoo("bigram", "makemore's bigram table (whole names as sequences, AdamW)", bigram_layers, init_zeros)
zoo("bow", "makemore's causal bag of words", bow_layers, init_torch)
zoo("bengio", "makemore's MLP (Bengio et al. 2003) on sequences", bengio_layers, init_torch)
zoo("rnn", "makemore's vanilla RNN", recurrent_layers("rnn"), init_torch)
zoo("gru", "makemore's GRU", recurrent_layers("gru"), init_torch)
zoo("transformer", "makemore's GPT-2-style transformer", transformer_layers, init_torch, check=_heads_check)


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
    """Forward in training mode, mean cross-entropy (over the counted positions of sequences),
    hand-written backward from the loss seed."""
    forward, backward = ops.loss_pair(Y)
    logits, caches = model.forward(X, training=True)  # (N, V) or (N, T, V)
    loss, ce_cache = forward(logits, Y)  # ()
    dlogits = backward(dloss, ce_cache)  # (N, V) or (N, T, V)
    _, grads = model.backward(dlogits, caches)
    return Step(loss, grads, caches)


# ---------------------------------------------------------------------------- inference
def logits_eval(model, X: Tensor) -> Tensor:
    """Inference-mode forward (batchnorm with its fixed statistics). Returns logits (N, V), or
    (N, T, V) for sequences X (N, T) of a sequence model."""
    logits, _ = model.forward(X, training=False)
    if logits.dim() != 2 and not (logits.dim() == 3 and logits.shape[:2] == X.shape):
        raise ValueError(f"the model's output must be logits (N, V), got shape {tuple(logits.shape)}")
    return logits


def evaluate(model, X: Tensor, Y: Tensor, chunk: int = 32768) -> float | None:
    """Mean cross-entropy over a whole split (every counted position of sequences), in chunks of
    `chunk` targets; None for an empty split."""
    if X.shape[0] == 0:
        return None
    forward, _ = ops.loss_pair(Y)
    rows = max(1, chunk // (Y.shape[1] if Y.dim() == 2 else 1))
    total, counted = 0.0, 0
    for i in range(0, X.shape[0], rows):
        y = Y[i:i + rows]
        n = int((y != ops.IGNORE).sum()) if Y.dim() == 2 else y.shape[0]
        loss, _ = forward(logits_eval(model, X[i:i + rows]), y)
        total, counted = total + loss.item() * n, counted + n
    return total / counted


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


def sample_sequences(model, block_size: int, n: int = 20, seed: int = 2147483657) -> list[list[int]]:
    """Sampling a sequence model (makemore's generate): every sequence starts with the start token 0;
    each step runs the model on the sequences so far, (n_alive, t), and draws the next token from the
    softmax of the last position's logits, until token 0 or block_size tokens in all. Returns the
    tokens of each sequence without the start token and the end token."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.zeros((n, 1), dtype=torch.long)  # (n, t)
    alive = torch.ones(n, dtype=torch.bool)  # (n,)
    for _ in range(block_size - 1):
        live = alive.nonzero()[:, 0]  # (n_alive,)
        logits = logits_eval(model, seqs[live])[:, -1].to(torch.float64)  # (n_alive, V)
        probs = torch.zeros((n, logits.shape[1]), dtype=torch.float64)  # (n, V)
        probs[:, 0] = 1.0  # finished rows draw the end token, which is ignored
        probs[live] = torch.softmax(logits, dim=1)
        ix = torch.multinomial(probs, num_samples=1, generator=g)  # (n, 1)
        seqs = torch.cat([seqs, ix], dim=1)  # (n, t + 1)
        alive &= ix[:, 0] != 0
        if not alive.any():
            break
    out = []
    for row in seqs[:, 1:].tolist():
        out.append(row[:row.index(0)] if 0 in row else row)
    return out


# How each kind of data is sampled (Preset.data): context windows slide; sequences grow from the start.
SAMPLERS = {"context": sample, "sequence": sample_sequences}


def kind(cfg: ModelConfig | None) -> str:
    """The data kind a model config reads (a user's own model: context windows)."""
    return "context" if cfg is None else PRESETS[cfg.name].data


def config_fields() -> list[str]:
    return [f.name for f in fields(ModelConfig)]


def with_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    return replace(cfg, vocab_size=vocab_size)
