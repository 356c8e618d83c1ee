"""The exercises' computation graphs as data (one Op per forward line, in the lecture's names) and
the probes the grader feeds a learner's backward: forward values, upstream gradients fed in, and the
correct local answer for every gradient, split by consumer (a tensor used twice gets two terms).
Grading code: autograd appears here (the reference), never in the learner's file or in training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5  # the lecture's batchnorm epsilon


@dataclass(frozen=True)
class Op:
    """out = fn(*ins): one line of the forward pass."""

    out: str
    ins: tuple[str, ...]
    fn: Callable[..., Tensor]


@dataclass(frozen=True)
class Graph:
    """A forward pass as a list of ops; `grads` are the tensors whose gradients the learner writes,
    in backward order (the lecture's order). The last op's output is the scalar loss (seed 1) unless
    `seed` names an output whose upstream gradient is given (exercise 3 is fed dhpreact)."""

    ops: tuple[Op, ...]
    grads: tuple[str, ...]
    seed: str = "loss"

    def consumers(self, name: str) -> list[str]:
        return [op.out for op in self.ops if name in op.ins]


def vjp(out: Tensor, dout: Tensor | None) -> Tensor:
    """The scalar whose gradient is the vector-Jacobian product with `dout`: (out * dout).sum(). The
    same numbers as autograd.grad(out, x, dout) (the sum's gradient is ones, and ones * dout is dout),
    without its grad_outputs check, whose first call imports sympy (~2 s of a grade)."""
    return out if dout is None else (out * dout).sum()


def forward(graph: Graph, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every value of the forward pass, no autograd: inputs plus one entry per op."""
    vals = dict(inputs)
    with torch.no_grad():
        for op in graph.ops:
            vals[op.out] = op.fn(*(vals[i] for i in op.ins))
    return vals


def true_grads(
    graph: Graph, vals: Mapping[str, Tensor], seed_grad: Tensor | None = None
) -> dict[str, Tensor]:
    """Autograd's gradient of the seed (the loss, or sum(seed * seed_grad)) for every name in grads."""
    outs = {op.out for op in graph.ops}
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, Tensor) and v.is_floating_point() else v)
        for k, v in vals.items()
        if k not in outs
    }
    with torch.enable_grad():
        live = dict(leaves)
        for op in graph.ops:
            live[op.out] = op.fn(*(live[i] for i in op.ins))
        targets = [live[g] for g in graph.grads]
        out = live[graph.seed]
        gs = torch.autograd.grad(vjp(out, seed_grad), targets, allow_unused=True)
    return {g: (torch.zeros_like(vals[g]) if t is None else t.detach()) for g, t in zip(graph.grads, gs)}


@dataclass
class Local:
    """The correct answer for each gradient given the upstream gradients fed in: one term per
    consumer (`contrib[g][out]`), and for an input broadcast inside an op the gradient before the
    broadcast dimensions are summed (`unreduced[g]`, shaped like that op's output)."""

    contrib: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    unreduced: dict[str, Tensor] = field(default_factory=dict)
    ones: dict[str, Tensor] = field(default_factory=dict)  # the local derivative alone (upstream = 1)

    def total(self, g: str) -> Tensor | None:
        terms = list(self.contrib.get(g, {}).values())
        if not terms:
            return None
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out


def local_vjps(graph: Graph, vals: Mapping[str, Tensor], feeds: Mapping[str, Tensor]) -> Local:
    """For every op, autograd's vector-Jacobian product with the upstream gradient fed for its
    output, w.r.t. each of its inputs whose gradient is graded."""
    loc = Local()
    for op in reversed(graph.ops):
        dout = feeds.get(op.out)
        diff = [i for i in op.ins if i in graph.grads]
        if dout is None or not diff:
            continue
        with torch.enable_grad():
            leaves = [vals[i].detach().clone().requires_grad_(i in diff) for i in op.ins]
            out = op.fn(*leaves)
            gs = torch.autograd.grad(vjp(out, dout), [lf for i, lf in zip(op.ins, leaves) if i in diff])
            ones = (
                torch.autograd.grad(op.fn(*leaves).sum(), [lf for i, lf in zip(op.ins, leaves) if i in diff])
                if out.dim()
                else gs
            )
        for i, g, o in zip(diff, gs, ones):
            loc.contrib.setdefault(i, {})[op.out] = g.detach()
            loc.ones[i] = (loc.ones[i] + o.detach()) if i in loc.ones else o.detach()
            shape = tuple(vals[i].shape)
            if shape != tuple(out.shape) and out.dim() and _broadcasts(shape, tuple(out.shape)):
                u = _unreduced(op, vals, i, dout, tuple(out.shape))
                if u is not None and len(graph.consumers(i)) == 1:
                    loc.unreduced[i] = u
    return loc


def same_broadcast(graph: Graph, vals: Mapping[str, object], g: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` in place of vals[g] gives every op that uses g an output of the same
    shape: then a gradient of that shape is the tensor's own, up to a size-1 dimension."""
    v = vals[g]
    z = torch.zeros(shape, dtype=v.dtype)
    for op in graph.ops:
        if g not in op.ins:
            continue
        try:
            out = op.fn(*(z if i == g else vals[i] for i in op.ins))
        except Exception:  # does not broadcast at all
            return False
        if tuple(out.shape) != tuple(vals[op.out].shape):
            return False
    return True


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the given shapes broadcast to; ValueError when they do not. (torch.broadcast_shapes
    gives the same answer, but its first call imports torch._refs and sympy: ~2 s of a grade.)"""
    n = max((len(s) for s in shapes), default=0)
    out = [1] * n
    for s in shapes:
        for i, d in enumerate((1,) * (n - len(s)) + tuple(s)):
            if d != 1 and out[i] not in (1, d):
                raise ValueError(f"shapes {shapes} do not broadcast")
            out[i] = d if d != 1 else out[i]
    return tuple(out)


def _broadcasts(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    try:
        return broadcast(small, big) == big
    except ValueError:
        return False


def _unreduced(
    op: Op, vals: Mapping[str, Tensor], name: str, dout: Tensor, shape: tuple[int, ...]
) -> Tensor | None:
    """The gradient w.r.t. `name` expanded to the op's output shape (before summing the broadcast)."""
    with torch.enable_grad():
        leaf = vals[name].detach().expand(shape).clone().requires_grad_(True)
        try:
            out = op.fn(*(leaf if i == name else vals[i].detach() for i in op.ins))
        except RuntimeError:
            return None
        if tuple(out.shape) != shape:
            return None
        (u,) = torch.autograd.grad(vjp(out, dout), [leaf])
    return u.detach()


# ---------------------------------------------------------------------------- the graphs
def _bn_train(x: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    """The lecture's batchnorm in one line (exercise 3's hpreact_fast): Bessel's n-1 variance."""
    return (
        gain * (x - x.mean(0, keepdim=True)) / torch.sqrt(x.var(0, keepdim=True, unbiased=True) + EPS) + bias
    )


def _rows(t: Tensor) -> Tensor:
    return torch.arange(t.shape[0], device=t.device)


# Exercise 1: the lecture's forward, one atomic op per line (the same lines as atomic.forward).
LECTURE = Graph(
    ops=(
        Op("emb", ("C", "Xb"), lambda C, Xb: C[Xb]),  # (N, T, E)
        Op("embcat", ("emb",), lambda emb: emb.view(emb.shape[0], -1)),  # (N, T*E)
        Op("hprebn", ("embcat", "W1", "b1"), lambda embcat, W1, b1: embcat @ W1 + b1),  # (N, H)
        Op("bnmeani", ("hprebn",), lambda x: 1 / x.shape[0] * x.sum(0, keepdim=True)),  # (1, H)
        Op("bndiff", ("hprebn", "bnmeani"), lambda x, m: x - m),  # (N, H)
        Op("bndiff2", ("bndiff",), lambda d: d**2),  # (N, H)
        Op("bnvar", ("bndiff2",), lambda d2: 1 / (d2.shape[0] - 1) * d2.sum(0, keepdim=True)),  # (1, H)
        Op("bnvar_inv", ("bnvar",), lambda v: (v + EPS) ** -0.5),  # (1, H)
        Op("bnraw", ("bndiff", "bnvar_inv"), lambda d, vi: d * vi),  # (N, H)
        Op("hpreact", ("bngain", "bnraw", "bnbias"), lambda g, r, b: g * r + b),  # (N, H)
        Op("h", ("hpreact",), torch.tanh),  # (N, H)
        Op("logits", ("h", "W2", "b2"), lambda h, W2, b2: h @ W2 + b2),  # (N, V)
        Op("logit_maxes", ("logits",), lambda lg: lg.max(1, keepdim=True).values),  # (N, 1)
        Op("norm_logits", ("logits", "logit_maxes"), lambda lg, m: lg - m),  # (N, V)
        Op("counts", ("norm_logits",), torch.exp),  # (N, V)
        Op("counts_sum", ("counts",), lambda c: c.sum(1, keepdim=True)),  # (N, 1)
        Op("counts_sum_inv", ("counts_sum",), lambda s: s**-1),  # (N, 1)
        Op("probs", ("counts", "counts_sum_inv"), lambda c, si: c * si),  # (N, V)
        Op("logprobs", ("probs",), torch.log),  # (N, V)
        Op("loss", ("logprobs", "Yb"), lambda lp, Yb: -lp[_rows(lp), Yb].mean()),  # ()
    ),
    grads=(
        "logprobs",
        "probs",
        "counts_sum_inv",
        "counts_sum",
        "counts",
        "norm_logits",
        "logit_maxes",
        "logits",
        "h",
        "W2",
        "b2",
        "hpreact",
        "bngain",
        "bnbias",
        "bnraw",
        "bnvar_inv",
        "bnvar",
        "bndiff2",
        "bndiff",
        "bnmeani",
        "hprebn",
        "embcat",
        "W1",
        "b1",
        "emb",
        "C",
    ),
)

# The compact forward of exercises 2-4 (exercise 4 trains it): cross-entropy and batchnorm fused.
_COMPACT_OPS = (
    Op("emb", ("C", "Xb"), lambda C, Xb: C[Xb]),  # (N, T, E)
    Op("embcat", ("emb",), lambda emb: emb.view(emb.shape[0], -1)),  # (N, T*E)
    Op("hprebn", ("embcat", "W1", "b1"), lambda embcat, W1, b1: embcat @ W1 + b1),  # (N, H)
    Op("hpreact", ("hprebn", "bngain", "bnbias"), _bn_train),  # (N, H)
    Op("h", ("hpreact",), torch.tanh),  # (N, H)
    Op("logits", ("h", "W2", "b2"), lambda h, W2, b2: h @ W2 + b2),  # (N, V)
    Op("loss", ("logits", "Yb"), F.cross_entropy),  # ()
)
CROSS_ENTROPY = Graph(ops=_COMPACT_OPS, grads=("logits",))  # exercise 2
BATCHNORM = Graph(ops=(_COMPACT_OPS[3],), grads=("hprebn",), seed="hpreact")  # exercise 3
TRAINING = Graph(
    ops=_COMPACT_OPS,
    grads=(
        "logits",
        "h",
        "W2",
        "b2",
        "hpreact",
        "bngain",
        "bnbias",
        "hprebn",
        "embcat",
        "W1",
        "b1",
        "emb",
        "C",
    ),
)  # exercise 4


def bn_extras(hprebn: Tensor) -> dict[str, Tensor]:
    """The batchnorm statistics the compact forward names (exercises 3 and 4)."""
    n = hprebn.shape[0]
    bnmeani = hprebn.sum(0, keepdim=True) / n  # (1, H)
    bndiff = hprebn - bnmeani  # (N, H)
    bnvar = (bndiff**2).sum(0, keepdim=True) / (n - 1)  # (1, H)  Bessel's n-1
    bnvar_inv = (bnvar + EPS) ** -0.5  # (1, H)
    return {
        "bnmeani": bnmeani,
        "bnmean": bnmeani,
        "bndiff": bndiff,
        "bnvar": bnvar,
        "bnvar_inv": bnvar_inv,
        "bnraw": bndiff * bnvar_inv,
    }
