"""Layers with hand-written backward passes: each owns its parameters, returns its cache explicitly
(so forward stays pure) and backpropagates with the pairs in ops.py. The classes follow makemore
Part 3 ("torchify the code") and Part 5 (FlattenConsecutive, batchnorm over leading dims); the
explicit caches follow CS231n `layers.py`.

The protocol every layer (built-in or a user's own) follows:

    params()  -> dict[str, Tensor]   trainable tensors; each name is also an attribute (layer.weight)
    buffers() -> dict[str, Tensor]   non-trainable state (running statistics), same naming rule
    forward(x, training=True) -> (out, cache)      pure: never mutates the layer
    backward(dout, cache) -> (dx, {name: dparam})  dx is None when x is integer indices
    spec()    -> dict                JSON-able constructor arguments, {"type": ..., ...}

Optional: update_buffers(cache) (running statistics after a training step), init_(generator)
(the default random initialisation, drawn in a fixed order).

makemore's zoo (karpathy/makemore, makemore.py) adds sequence layers: (B, T, E) floats in and out,
or (B, T) ids. A composite layer (Block, BoWBlock, Recurrent, ...) holds its children as attributes
and names their tensors "child.name" ("attn.c_attn.weight"; in a Sequential "3.attn.c_attn.weight"),
which set_tensor, checkpoints and check_layer follow. A layer whose output is ids (ContextWindows)
sets INDEX_OUTPUT and must come first: no gradient reaches it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from handgrad import ops


@runtime_checkable
class Layer(Protocol):
    def params(self) -> dict[str, Tensor]: ...
    def buffers(self) -> dict[str, Tensor]: ...
    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]: ...
    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor | None, dict[str, Tensor]]: ...
    def spec(self) -> dict: ...


BUILTIN: dict[str, type] = {}  # class name -> class: the built-in layers, the ones a spec may name


def builtin(cls: type) -> type:
    """Make a layer class built in: specs (checkpoints) may name it, and from_spec builds it."""
    BUILTIN[cls.__name__] = cls
    return cls


class _Base:
    """Defaults for layers without parameters or buffers. PARAMS and BUFFERS name the attributes."""

    PARAMS: tuple[str, ...] = ()
    BUFFERS: tuple[str, ...] = ()

    def params(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.PARAMS if getattr(self, k) is not None}

    def buffers(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.BUFFERS}

    def init_(self, g: torch.Generator) -> None:
        """Nothing random to draw."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------- layers
@builtin
class Embedding(_Base):
    """weight (V, E); x integer indices (N, ...) -> (N, ..., E)."""

    PARAMS = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32):
        self.weight = torch.zeros((num_embeddings, embedding_dim), dtype=dtype)  # (V, E)

    def init_(self, g: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=g))  # makemore: N(0, 1)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.embedding_forward(self.weight, x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[None, dict[str, Tensor]]:
        return None, {"weight": ops.embedding_backward(dout, cache)}

    def spec(self) -> dict:
        V, E = self.weight.shape
        return {"type": "Embedding", "num_embeddings": V, "embedding_dim": E}


@builtin
class Linear(_Base):
    """out = x @ weight + bias over any leading dims; weight (fan_in, fan_out), bias optional."""

    PARAMS = ("weight", "bias")

    INITS = ("lecture", "torch")

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True, init: str = "lecture",
                 dtype: torch.dtype = torch.float32):
        if init not in self.INITS:
            raise ValueError(f"Linear: init must be one of {', '.join(self.INITS)}, got {init!r:.40}")
        self.init = init
        self.weight = torch.zeros((fan_in, fan_out), dtype=dtype)  # (in, out)
        self.bias = torch.zeros(fan_out, dtype=dtype) if bias else None  # (out,)

    def init_(self, g: torch.Generator) -> None:
        """init "lecture" (makemore part 3): weight N(0, 1) / sqrt(fan_in), bias untouched (zeros).
        init "torch" (nn.Linear's default, makemore.py's zoo): weight and bias U(-k, k), k =
        1/sqrt(fan_in), drawn as nn.Linear draws them: the weight in its (out, in) layout (kaiming_uniform_
        with a = sqrt(5): k = sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(fan_in)), then the bias, so that the
        same generator gives nn.Linear's numbers (makemore_rng)."""
        fan_in, fan_out = self.weight.shape
        if self.init == "lecture":
            self.weight.copy_(torch.randn(self.weight.shape, generator=g) / fan_in**0.5)
            return
        k = math.sqrt(3.0) * math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(fan_in)
        w = torch.empty((fan_out, fan_in), dtype=torch.float32).uniform_(-k, k, generator=g)  # (out, in)
        self.weight.copy_(w.T)
        if self.bias is not None:
            k = 1 / math.sqrt(fan_in)
            self.bias.copy_(torch.empty(fan_out, dtype=torch.float32).uniform_(-k, k, generator=g))

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.linear_forward(x, self.weight, self.bias)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        dx, dW, db = ops.linear_backward(dout, cache)
        return dx, ({"weight": dW} if db is None else {"weight": dW, "bias": db})

    def spec(self) -> dict:
        fan_in, fan_out = self.weight.shape
        spec = {"type": "Linear", "fan_in": fan_in, "fan_out": fan_out, "bias": self.bias is not None}
        return spec if self.init == "lecture" else {**spec, "init": self.init}


@builtin
class BatchNorm1d(_Base):
    """Batchnorm over every dim but the last, Bessel's n-1 variance in training, running statistics
    (same n-1 variance) in eval mode. weight is the gain (bngain), bias the shift (bnbias)."""

    PARAMS = ("weight", "bias")
    BUFFERS = ("running_mean", "running_var")

    def __init__(self, dim: int, eps: float = ops.BN_EPS, momentum: float = 0.1,
                 dtype: torch.dtype = torch.float32):
        self.eps, self.momentum = eps, momentum
        self.weight = torch.ones(dim, dtype=dtype)  # (C,) bngain
        self.bias = torch.zeros(dim, dtype=dtype)  # (C,) bnbias
        self.running_mean = torch.zeros(dim, dtype=dtype)  # (C,)
        self.running_var = torch.ones(dim, dtype=dtype)  # (C,)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        if not training:
            out = ops.batchnorm_inference(x, self.weight, self.bias, self.running_mean, self.running_var,
                                          self.eps)  # (..., C)
            return out, None
        out, cache, stats = ops.batchnorm_forward(x, self.weight, self.bias, self.eps)
        return out, (cache, stats)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if cache is None:
            raise ValueError("BatchNorm1d.backward needs a training-mode forward (eval mode has no cache)")
        bn_cache, _ = cache
        dx, dbngain, dbnbias = ops.batchnorm_backward(dout, bn_cache)
        return dx, {"weight": dbngain, "bias": dbnbias}

    def update_buffers(self, cache: Any) -> None:
        """Exponential moving average of the batch mean and n-1 variance."""
        _, (bnmeani, bnvar) = cache
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(bnmeani.reshape(-1), alpha=m)
        self.running_var.mul_(1 - m).add_(bnvar.reshape(-1), alpha=m)

    def spec(self) -> dict:
        return {"type": "BatchNorm1d", "dim": self.weight.shape[0], "eps": self.eps,
                "momentum": self.momentum}


@builtin
class Tanh(_Base):
    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.tanh_forward(x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.tanh_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "Tanh"}


@builtin
class ReLU(_Base):
    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.relu_forward(x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.relu_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "ReLU"}


@builtin
class FlattenConsecutive(_Base):
    """(N, T, C) -> (N, T/n, C*n), squeezing a middle dimension of 1 (makemore part 5)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"FlattenConsecutive: n must be a positive integer, got {n}")
        self.n = n

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        if x.dim() != 3 or x.shape[1] % self.n:
            raise ValueError(f"FlattenConsecutive({self.n}) needs (N, T, C) input with T divisible by "
                             f"{self.n}, got shape {tuple(x.shape)}")
        return ops.flatten_consecutive_forward(x, self.n)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.flatten_consecutive_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "FlattenConsecutive", "n": self.n}


# ---------------------------------------------------------------------------- makemore's zoo
# Layers of makemore.py's sequence models (karpathy/makemore): inputs (B, T, E) float or (B, T) ids.
# Initialisation follows PyTorch's defaults for the corresponding nn modules.
@builtin
class PositionEmbedding(_Base):
    """x (B, T, E) -> x + weight[:T]: a learned vector per position (makemore's wpe, added to the
    token embeddings); weight (block_size, E), N(0, 1) as nn.Embedding."""

    PARAMS = ("weight",)

    def __init__(self, block_size: int, n_embd: int, dtype: torch.dtype = torch.float32):
        self.weight = torch.zeros((block_size, n_embd), dtype=dtype)  # (block_size, E)

    def init_(self, g: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=g))

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence("PositionEmbedding", x, self.weight.shape[1])
        return ops.position_embedding_forward(x, self.weight)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        dx, dwpe = ops.position_embedding_backward(dout, cache)
        return dx, {"weight": dwpe}

    def spec(self) -> dict:
        block_size, n_embd = self.weight.shape
        return {"type": "PositionEmbedding", "block_size": block_size, "n_embd": n_embd}


def _need_sequence(who: str, x: Tensor, n_embd: int | None, block_size: int | None = None) -> None:
    """A sequence layer's input is (B, T, n_embd) floats (any width when n_embd is None) with
    1 <= T <= block_size; else one ValueError."""
    wrong_width = n_embd is not None and x.dim() == 3 and x.shape[-1] != n_embd
    if x.dim() != 3 or wrong_width or not x.is_floating_point() or x.shape[1] == 0:
        width = "C" if n_embd is None else n_embd
        raise ValueError(f"{who} needs a float (B, T, {width}) input with T >= 1, got {str(x.dtype)[6:]} "
                         f"shape {tuple(x.shape)}")
    if block_size is not None and x.shape[1] > block_size:
        raise ValueError(f"{who}: a sequence of {x.shape[1]} positions is longer than the block size "
                         f"{block_size}")


@builtin
class LayerNorm(_Base):
    """nn.LayerNorm over the last dim: weight (dim,) ones, bias (dim,) zeros; closed-form backward."""

    PARAMS = ("weight", "bias")

    def __init__(self, dim: int, eps: float = ops.LN_EPS, dtype: torch.dtype = torch.float32):
        self.eps = eps
        self.weight = torch.ones(dim, dtype=dtype)  # (C,)
        self.bias = torch.zeros(dim, dtype=dtype)  # (C,)

    def init_(self, g: torch.Generator) -> None:
        """nn.LayerNorm: weight 1, bias 0 (nothing drawn)."""
        self.weight.fill_(1.0)
        self.bias.zero_()

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        if x.dim() < 1 or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"LayerNorm({self.weight.shape[0]}) normalises a last dimension of "
                             f"{self.weight.shape[0]}, got shape {tuple(x.shape)}")
        return ops.layernorm_forward(x, self.weight, self.bias, self.eps)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        dx, dw, db = ops.layernorm_backward(dout, cache)
        return dx, {"weight": dw, "bias": db}

    def spec(self) -> dict:
        return {"type": "LayerNorm", "dim": self.weight.shape[0], "eps": self.eps}


@builtin
class GELU(_Base):
    """GELU, tanh approximation (makemore's NewGELU)."""

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.gelu_forward(x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.gelu_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "GELU"}


@builtin
class CausalBoW(_Base):
    """makemore's CausalBoW: position t becomes the average of positions 0..t. No parameters."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence("CausalBoW", x, None, self.block_size)
        return ops.causal_average_forward(x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.causal_average_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "CausalBoW", "block_size": self.block_size}


@builtin
class FlattenLast(_Base):
    """(..., k, E) -> (..., k*E): makemore's MLP concatenates its k context embeddings. `size`, when
    given, is the k*E it expects (a shape check with a clear error)."""

    def __init__(self, size: int | None = None):
        self.size = size

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        if x.dim() < 2 or self.size is not None and x.shape[-1] * x.shape[-2] != self.size:
            want = "at least 2 dimensions" if self.size is None else f"(..., k, E) with k*E = {self.size}"
            raise ValueError(f"FlattenLast needs {want}, got shape {tuple(x.shape)}")
        return ops.flatten_last_forward(x)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return ops.flatten_last_backward(dout, cache), {}

    def spec(self) -> dict:
        return {"type": "FlattenLast"} if self.size is None else {"type": "FlattenLast", "size": self.size}


@builtin
class ContextWindows(_Base):
    """Integer (B, T) -> integer (B, T, block_size): for each position t the ids at t, t-1, ...,
    t-block_size+1, `blank` before the start (makemore's MLP, whose blank is the id vocab_size, one
    row past the vocabulary in an Embedding(vocab_size + 1, E)). Indices in, indices out: it has no
    gradient, so it comes first, and the Embedding after it ends the backward chain."""

    INDEX_OUTPUT = True  # its output is indices: Sequential.backward stops before it

    def __init__(self, block_size: int, blank: int):
        if block_size < 1 or blank < 0:
            raise ValueError(f"ContextWindows: block_size must be >= 1 and blank >= 0, got {block_size} "
                             f"and {blank}")
        self.block_size, self.blank = block_size, blank

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        if x.dim() != 2 or x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(f"ContextWindows needs integer ids (B, T), got {str(x.dtype)[6:]} shape "
                             f"{tuple(x.shape)}")
        return ops.context_windows(x, self.block_size, self.blank), None

    def backward(self, dout: Tensor | None, cache: Any) -> tuple[None, dict[str, Tensor]]:
        return None, {}

    def spec(self) -> dict:
        return {"type": "ContextWindows", "block_size": self.block_size, "blank": self.blank}


# ---------------------------------------------------------------------------- composite layers
class _Composite(_Base):
    """A layer made of named child layers (CHILDREN: attribute names) and perhaps parameters of its
    own (PARAMS): a child's tensors are named "child.name" ("attn.c_attn.weight"), which set_tensor,
    checkpoints and check_layer follow attribute by attribute."""

    CHILDREN: tuple[str, ...] = ()

    def children(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in self.CHILDREN}

    def params(self) -> dict[str, Tensor]:
        nested = {f"{c}.{k}": t for c, child in self.children().items() for k, t in child.params().items()}
        return {**super().params(), **nested}

    def buffers(self) -> dict[str, Tensor]:
        nested = {f"{c}.{k}": t for c, child in self.children().items() for k, t in child.buffers().items()}
        return {**super().buffers(), **nested}

    def init_(self, g: torch.Generator) -> None:
        """Each child's own init, in CHILDREN order."""
        for child in self.children().values():
            child.init_(g)


def _prefixed(prefix: str, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in grads.items()}


@dataclass
class AttentionCache:
    c_attn: tuple  # the Linear's input x (B, T, E)
    heads: tuple  # q, k, v (B, nh, T, hs): views of c_attn's output (B, T, 3E); att (B, nh, T, T) or None
    c_proj: tuple  # the Linear's input: the heads merged (B, T, E)


@builtin
class CausalSelfAttention(_Composite):
    """makemore's CausalSelfAttention: c_attn Linear(E, 3E) -> q, k, v split into n_head heads ->
    causal softmax(q k^T / sqrt(hs)) v per head -> heads merged -> c_proj Linear(E, E).
    recompute=True keeps no attention matrix (B, nh, T, T) for backward: it is recomputed there."""

    CHILDREN = ("c_attn", "c_proj")

    def __init__(self, n_embd: int, n_head: int, block_size: int, recompute: bool = False,
                 dtype: torch.dtype = torch.float32):
        if n_head < 1:
            raise ValueError(f"n_head must be at least 1, got {n_head}")
        if n_embd % n_head:
            raise ValueError(f"n_head {n_head} does not divide n_embd {n_embd}: each head takes n_embd / "
                             "n_head channels")
        self.n_head, self.block_size, self.recompute = n_head, block_size, recompute
        self.c_attn = Linear(n_embd, 3 * n_embd, init="torch", dtype=dtype)
        self.c_proj = Linear(n_embd, n_embd, init="torch", dtype=dtype)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence("CausalSelfAttention", x, self.c_proj.weight.shape[1], self.block_size)
        qkv, c_attn = self.c_attn.forward(x)  # (B, T, 3E)
        y, heads = ops.multihead_attention_forward(qkv, self.n_head, keep_att=not self.recompute)  # (B, T, E)
        out, c_proj = self.c_proj.forward(y)  # (B, T, E)
        return out, AttentionCache(c_attn, heads, c_proj)

    def backward(self, dout: Tensor, cache: AttentionCache) -> tuple[Tensor, dict[str, Tensor]]:
        dy, g_proj = self.c_proj.backward(dout, cache.c_proj)  # (B, T, E)
        dqkv = ops.multihead_attention_backward(dy, cache.heads)  # (B, T, 3E)
        dx, g_attn = self.c_attn.backward(dqkv, cache.c_attn)  # (B, T, E)
        return dx, {**_prefixed("c_attn", g_attn), **_prefixed("c_proj", g_proj)}

    def spec(self) -> dict:
        spec = {"type": "CausalSelfAttention", "n_embd": self.c_proj.weight.shape[0], "n_head": self.n_head,
                "block_size": self.block_size}
        return {**spec, "recompute": True} if self.recompute else spec


@dataclass
class FeedForwardCache:
    c_fc: tuple  # the first Linear's input (B, T, E)
    act: tuple  # the activation's cache: its input (B, T, H)
    c_proj: tuple  # the second Linear's input: the activation's output (B, T, H)


@builtin
class FeedForward(_Composite):
    """The position-wise MLP of makemore's blocks: c_fc Linear(E, H) -> act -> c_proj Linear(H, E);
    act "gelu" (the transformer's Block, H = 4E) or "tanh" (BoWBlock, H = n_embd2)."""

    CHILDREN = ("c_fc", "act", "c_proj")
    ACTS = {"gelu": GELU, "tanh": Tanh}

    def __init__(self, n_embd: int, n_hidden: int, act: str = "gelu", dtype: torch.dtype = torch.float32):
        if act not in self.ACTS:
            raise ValueError(f"FeedForward: act must be one of {', '.join(self.ACTS)}, got {act!r:.40}")
        self.act_name = act
        self.c_fc = Linear(n_embd, n_hidden, init="torch", dtype=dtype)
        self.act = self.ACTS[act]()
        self.c_proj = Linear(n_hidden, n_embd, init="torch", dtype=dtype)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        h, c_fc = self.c_fc.forward(x)  # (B, T, H)
        a, act = self.act.forward(h)  # (B, T, H)
        out, c_proj = self.c_proj.forward(a)  # (B, T, E)
        return out, FeedForwardCache(c_fc, act, c_proj)

    def backward(self, dout: Tensor, cache: FeedForwardCache) -> tuple[Tensor, dict[str, Tensor]]:
        da, g_proj = self.c_proj.backward(dout, cache.c_proj)  # (B, T, H)
        dh, _ = self.act.backward(da, cache.act)  # (B, T, H)
        dx, g_fc = self.c_fc.backward(dh, cache.c_fc)  # (B, T, E)
        return dx, {**_prefixed("c_fc", g_fc), **_prefixed("c_proj", g_proj)}

    def spec(self) -> dict:
        E, H = self.c_fc.weight.shape
        return {"type": "FeedForward", "n_embd": E, "n_hidden": H, "act": self.act_name}


@dataclass
class BlockCache:
    ln_1: tuple  # LayerNorm's: xhat (B, T, E), rstd (B, T, 1)
    attn: AttentionCache
    ln_2: tuple  # LayerNorm's, of the stream after attention
    mlp: FeedForwardCache


@builtin
class Block(_Composite):
    """makemore's transformer Block (pre-norm, GPT-2): x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)),
    mlp = c_fc Linear(E, 4E), GELU, c_proj Linear(4E, E). The residual stream needs no cache: an
    addition passes its gradient to both branches."""

    CHILDREN = ("ln_1", "attn", "ln_2", "mlp")

    def __init__(self, n_embd: int, n_head: int, block_size: int, recompute: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.ln_1 = LayerNorm(n_embd, dtype=dtype)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, recompute, dtype=dtype)
        self.ln_2 = LayerNorm(n_embd, dtype=dtype)
        self.mlp = FeedForward(n_embd, 4 * n_embd, "gelu", dtype=dtype)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence("Block", x, self.ln_1.weight.shape[0], self.attn.block_size)
        a, ln_1 = self.ln_1.forward(x)  # (B, T, E)
        y, attn = self.attn.forward(a)  # (B, T, E)
        x = x + y  # (B, T, E)
        m, ln_2 = self.ln_2.forward(x)  # (B, T, E)
        f, mlp = self.mlp.forward(m)  # (B, T, E)
        return x + f, BlockCache(ln_1, attn, ln_2, mlp)

    def backward(self, dout: Tensor, cache: BlockCache) -> tuple[Tensor, dict[str, Tensor]]:
        dm, g_mlp = self.mlp.backward(dout, cache.mlp)  # (B, T, E)
        dx_ln2, g_ln_2 = self.ln_2.backward(dm, cache.ln_2)  # (B, T, E)
        dx = dout + dx_ln2  # (B, T, E)  the residual and the mlp branch
        da, g_attn = self.attn.backward(dx, cache.attn)  # (B, T, E)
        dx_ln1, g_ln_1 = self.ln_1.backward(da, cache.ln_1)  # (B, T, E)
        grads = {**_prefixed("ln_1", g_ln_1), **_prefixed("attn", g_attn), **_prefixed("ln_2", g_ln_2),
                 **_prefixed("mlp", g_mlp)}
        return dx + dx_ln1, grads

    def activation_bytes(self, B: int, T: int) -> int:
        """Bytes of the activations forward caches for backward, for a (B, T, E) input:
        16 B T E (ln_1's xhat and output, q k v, the merged heads, ln_2's xhat and output, GELU's input
        and output of 4E each) + 2 B T (the two rstd) + nh B T T (the attention matrix, unless
        recompute) elements of the layer's dtype. activation_bytes(layer, x) measures the same."""
        E, nh = self.ln_1.weight.shape[0], self.attn.n_head
        att = 0 if self.attn.recompute else nh * B * T * T
        return (16 * B * T * E + 2 * B * T + att) * self.ln_1.weight.element_size()

    def spec(self) -> dict:
        attn = self.attn.spec()
        return {**attn, "type": "Block"}


@dataclass
class BoWBlockCache:
    cbow: tuple  # the counts (1, T, 1)
    mlp: FeedForwardCache


@builtin
class BoWBlock(_Composite):
    """makemore's BoWBlock: x = x + cbow(x); x = x + c_proj(tanh(c_fc(x))), c_fc Linear(E, H),
    c_proj Linear(H, E) (the parameters "mlp.c_fc.weight" ...)."""

    CHILDREN = ("cbow", "mlp")

    def __init__(self, n_embd: int, n_embd2: int, block_size: int, dtype: torch.dtype = torch.float32):
        self.cbow = CausalBoW(block_size)
        self.mlp = FeedForward(n_embd, n_embd2, "tanh", dtype=dtype)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence("BoWBlock", x, self.mlp.c_fc.weight.shape[0], self.cbow.block_size)
        y, cbow = self.cbow.forward(x)  # (B, T, E)
        x = x + y  # (B, T, E)
        f, mlp = self.mlp.forward(x)  # (B, T, E)
        return x + f, BoWBlockCache(cbow, mlp)

    def backward(self, dout: Tensor, cache: BoWBlockCache) -> tuple[Tensor, dict[str, Tensor]]:
        dx_mlp, g_mlp = self.mlp.backward(dout, cache.mlp)  # (B, T, E)
        dx = dout + dx_mlp  # (B, T, E)
        dx_cbow, _ = self.cbow.backward(dx, cache.cbow)  # (B, T, E)
        return dx + dx_cbow, _prefixed("mlp", g_mlp)

    def spec(self) -> dict:
        E, H = self.mlp.c_fc.weight.shape
        return {"type": "BoWBlock", "n_embd": E, "n_embd2": H, "block_size": self.cbow.block_size}


@builtin
class Recurrent(_Composite):
    """makemore's RNN body: a cell ("rnn" or "gru") unrolled over x (B, T, E) from a learned start
    state `start` (1, H) (zeros, as makemore), giving every hidden state (B, T, H); backward is
    backpropagation through time. The cell's Linears read [x_t, h_{t-1}] (E + H inputs):
    rnn: xh_to_h; gru: xh_to_z, xh_to_r, xh_to_hbar (ops.gru_cell_forward)."""

    PARAMS = ("start",)
    LINEARS = {"rnn": ("xh_to_h",), "gru": ("xh_to_z", "xh_to_r", "xh_to_hbar")}  # in the op's order

    def __init__(self, cell: str, n_embd: int, n_embd2: int, dtype: torch.dtype = torch.float32):
        if cell not in self.LINEARS:
            raise ValueError(f"Recurrent: cell must be one of {', '.join(self.LINEARS)}, got {cell!r:.40}")
        self.cell, self.CHILDREN = cell, self.LINEARS[cell]
        self.start = torch.zeros((1, n_embd2), dtype=dtype)  # (1, H)
        for name in self.CHILDREN:
            setattr(self, name, Linear(n_embd + n_embd2, n_embd2, init="torch", dtype=dtype))

    def init_(self, g: torch.Generator) -> None:
        """start zeros (makemore), each Linear as nn.Linear."""
        self.start.zero_()
        super().init_(g)

    def _weights(self) -> list[Tensor]:
        return [t for c in self.children().values() for t in (c.weight, c.bias)]  # the ops' order

    def _n_embd(self) -> int:
        return getattr(self, self.CHILDREN[0]).weight.shape[0] - self.start.shape[1]  # E + H inputs

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        _need_sequence(f"Recurrent({self.cell})", x, self._n_embd())
        return ops.recurrence_forward(x, self.start, self.cell, *self._weights())  # (B, T, H)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        dx, dstart, dws = ops.recurrence_backward(dout, cache)  # (B, T, E) (1, H)
        grads = {"start": dstart}
        for i, name in enumerate(self.CHILDREN):
            grads.update({f"{name}.weight": dws[2 * i], f"{name}.bias": dws[2 * i + 1]})
        return dx, grads

    def spec(self) -> dict:
        H = self.start.shape[1]
        return {"type": "Recurrent", "cell": self.cell, "n_embd": self._n_embd(), "n_embd2": H}


# ---------------------------------------------------------------------------- activation memory
def _cache_tensors(cache: Any) -> Iterator[Tensor]:
    """Every tensor in a cache: tuples, lists, dicts and dataclasses walked."""
    if isinstance(cache, Tensor):
        yield cache
    elif isinstance(cache, (tuple, list)):
        for c in cache:
            yield from _cache_tensors(c)
    elif isinstance(cache, dict):
        for c in cache.values():
            yield from _cache_tensors(c)
    elif is_dataclass(cache) and not isinstance(cache, type):
        for f in fields(cache):
            yield from _cache_tensors(getattr(cache, f.name))


def activation_bytes(layer: Any, x: Tensor, training: bool = True) -> int:
    """Measured: the bytes of the tensors layer.forward(x) keeps in its cache for backward, each
    storage counted once (q, k, v are views of one tensor), the layer's parameters and buffers (which
    Linear caches reference) not counted."""
    with torch.no_grad():
        _, cache = layer.forward(x, training)
    own = {t.untyped_storage().data_ptr() for t in {**layer.params(), **layer.buffers()}.values()}
    seen: dict[int, int] = {}
    for t in _cache_tensors(cache):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------- Sequential
class Sequential(_Base):
    """Layers applied in order; parameters and buffers named by position ("2.weight"), backward
    walks the layers in reverse."""

    def __init__(self, layers: list):
        for i, layer in enumerate(layers):
            missing = [m for m in ("params", "buffers", "forward", "backward")
                       if not callable(getattr(layer, m, None))]
            if missing:
                raise TypeError(f"layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}()")
        self.layers = list(layers)

    def params(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": t for i, layer in enumerate(self.layers) for k, t in layer.params().items()}

    def buffers(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": t for i, layer in enumerate(self.layers) for k, t in layer.buffers().items()}

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, list]:
        caches = []
        for layer in self.layers:
            x, cache = layer.forward(x, training)
            caches.append(cache)
        return x, caches

    def backward(self, dout: Tensor, caches: list) -> tuple[Tensor | None, dict[str, Tensor]]:
        grads: dict[str, Tensor] = {}
        for i in reversed(range(len(self.layers))):
            if dout is None and not getattr(self.layers[i], "INDEX_OUTPUT", False):  # indices ended the chain
                raise ValueError(f"layer {i} ({type(self.layers[i]).__name__}) comes after a layer with "
                                 "integer input; only the first layer may take indices")
            dout, g = self.layers[i].backward(dout, caches[i])
            grads.update({f"{i}.{k}": v for k, v in g.items()})
        return dout, grads

    def update_buffers(self, caches: list) -> None:
        for layer, cache in zip(self.layers, caches):
            if hasattr(layer, "update_buffers"):
                layer.update_buffers(cache)

    def init_(self, g: torch.Generator) -> None:
        for layer in self.layers:
            if hasattr(layer, "init_"):
                layer.init_(g)

    def spec(self) -> dict:
        return {"type": "Sequential", "layers": [layer.spec() for layer in self.layers]}

    def __repr__(self) -> str:
        return "Sequential(\n" + "".join(f"  ({i}) {layer!r}\n" for i, layer in enumerate(self.layers)) + ")"


# ---------------------------------------------------------------------------- named tensors
def set_tensor(model, name: str, value: Tensor) -> None:
    """Replace the parameter or buffer `name`: "weight" in a layer, "2.weight" in a Sequential,
    "attn.c_attn.weight" in a composite layer (its child attributes), "3.attn.c_attn.weight" nested."""
    *path, key = name.split(".")
    obj = model
    for part in path:
        obj = obj.layers[int(part)] if part.isdigit() and hasattr(obj, "layers") else getattr(obj, part)
    setattr(obj, key, value)


def numel(model) -> int:
    return sum(t.numel() for t in model.params().values())


# ---------------------------------------------------------------------------- from a spec
class SpecError(ValueError):
    """A layer spec that cannot be built; the message is one line for the user."""


def from_spec(spec: Any, dtype: torch.dtype = torch.float32, extra: dict[str, type] | None = None):
    """Build a layer (or a Sequential) from its spec. Only classes named in BUILTIN or `extra` are
    built: a spec from an untrusted file runs no code of its own."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise SpecError(f"a layer spec must be an object with a string 'type', got {spec!r:.80}")
    kind, args = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    if kind == "Sequential":
        layers = args.get("layers")
        if not isinstance(layers, list) or not layers:
            raise SpecError("a Sequential spec needs a non-empty list 'layers'")
        return Sequential([from_spec(s, dtype, extra) for s in layers])
    classes = {**BUILTIN, **(extra or {})}
    if kind not in classes:
        raise SpecError(f"unknown layer type {kind!r:.40}; known: {', '.join(sorted(classes))} (a layer of "
                        "your own is passed to the loader as layer_types={'Name': Class})")
    cls = classes[kind]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a class whose signature cannot be read: no names, no dtype
        params = {}  # type: ignore[assignment]
    for k, v in args.items():  # JSON scalars only: ints (not bools) for sizes, floats for eps/momentum,
        # and short strings where the class takes a choice by name (a cell, an init), which it checks
        if isinstance(v, str) and len(v) <= 16 and k in params and params[k].annotation in ("str", str):
            continue
        if not isinstance(v, (bool, int, float)) or isinstance(v, float) and not v == v:
            raise SpecError(f"{kind}: argument {k!r:.40} must be a number or boolean, got {v!r:.40}")
        if isinstance(v, int) and not isinstance(v, bool) and not 0 < v <= 1 << 24:
            raise SpecError(f"{kind}: argument {k!r:.40} = {v} is out of range (1 .. {1 << 24})")
    try:
        takes_dtype = "dtype" in params
        return cls(**args, dtype=dtype) if takes_dtype else cls(**args)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{kind}: cannot build from {args}: {e}") from None
