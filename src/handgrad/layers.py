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
"""

from __future__ import annotations

import inspect
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

    def __init__(self, fan_in: int, fan_out: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        self.weight = torch.zeros((fan_in, fan_out), dtype=dtype)  # (in, out)
        self.bias = torch.zeros(fan_out, dtype=dtype) if bias else None  # (out,)

    def init_(self, g: torch.Generator) -> None:
        """makemore: N(0, 1) / sqrt(fan_in), bias zeros."""
        self.weight.copy_(torch.randn(self.weight.shape, generator=g) / self.weight.shape[0] ** 0.5)

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, Any]:
        return ops.linear_forward(x, self.weight, self.bias)

    def backward(self, dout: Tensor, cache: Any) -> tuple[Tensor, dict[str, Tensor]]:
        dx, dW, db = ops.linear_backward(dout, cache)
        return dx, ({"weight": dW} if db is None else {"weight": dW, "bias": db})

    def spec(self) -> dict:
        fan_in, fan_out = self.weight.shape
        return {"type": "Linear", "fan_in": fan_in, "fan_out": fan_out, "bias": self.bias is not None}


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
            if dout is None:  # an integer input (indices) ended the chain
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
    """Replace the parameter or buffer `name` ("2.weight" in a Sequential, "weight" in a layer)."""
    obj, key = model, name
    while "." in key:
        head, key = key.split(".", 1)
        obj = obj.layers[int(head)]
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
    for k, v in args.items():  # JSON scalars only: ints (not bools) for sizes, floats for eps/momentum
        if not isinstance(v, (bool, int, float)) or isinstance(v, float) and not v == v:
            raise SpecError(f"{kind}: argument {k!r:.40} must be a number or boolean, got {v!r:.40}")
        if isinstance(v, int) and not isinstance(v, bool) and not 0 < v <= 1 << 24:
            raise SpecError(f"{kind}: argument {k!r:.40} = {v} is out of range (1 .. {1 << 24})")
    try:
        cls = classes[kind]
        takes_dtype = "dtype" in inspect.signature(cls).parameters
        return cls(**args, dtype=dtype) if takes_dtype else cls(**args)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{kind}: cannot build from {args}: {e}") from None
