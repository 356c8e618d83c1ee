"""Challenge g: layernorm's backward in closed form (makemore's transformer, nanoGPT's LayerNorm, llm.c's
layernorm_backward): out = weight * xhat + bias with xhat normalised over the last dim of (B, T, C) or
(N, C), the variance over C with no Bessel correction. dxhat = weight * dout; then
dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), both means over the last dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo.catalogue import Vals, Variant
from handgrad.dojo.challenges import region
from handgrad.dojo.framework import RowSpec
from handgrad.dojo.judge import shape_words

EPS = 1e-5


def normalise(x: Tensor, eps: float = EPS, bessel: bool = False) -> Tensor:
    """xhat: x normalised over its last dim (the population variance, as layernorm has it)."""
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    var = x.var(-1, keepdim=True, unbiased=bessel)  # (..., 1)
    return (x - mean) * (var + eps) ** -0.5  # (..., C)


GRAPH = G.Graph(
    ops=(
        G.Op("xhat", ("x",), normalise),  # (B, T, C)
        G.Op("out", ("weight", "xhat", "bias"), lambda w, xh, b: w * xh + b),  # (B, T, C)
    ),
    grads=("bias", "weight", "xhat", "x"),
    seed="out",
)
SHAPES = {"bias": "(C,)", "weight": "(C,)", "xhat": "(B, T, C)", "x": "(B, T, C)"}

ABOUT = """\
LayerNorm over the last dim, as in makemore's transformer (nanoGPT's LayerNorm, llm.c's layernorm):
each position's C features are normalised with their own mean and variance (the variance divides by
C: no Bessel correction, unlike the lecture's batchnorm), then scaled by weight and shifted by bias.
    out = weight * (x - mean) / sqrt(var + eps) + bias     # x (B, T, C) here; the grader also uses (N, C)
dout is the upstream gradient (loss = (out * dout).sum()). Write it for any leading dims: the
statistics run over the last dim only, and weight and bias are shared by every position."""

SETUP = """\
B, T, C = 4, 5, 8
eps = 1e-5
x = torch.randn(B, T, C, generator=g, dtype=torch.float64) * 2 + 0.5
weight = torch.randn(C, generator=g, dtype=torch.float64)
bias = torch.randn(C, generator=g, dtype=torch.float64)
dout = torch.randn(B, T, C, generator=g, dtype=torch.float64)  # the upstream gradient dloss/dout"""

FORWARD = """\
# Forward pass: layernorm over the last dim
mean = x.mean(-1, keepdim=True)  # (B, T, 1)
xmu = x - mean  # (B, T, C)
var = (xmu**2).mean(-1, keepdim=True)  # (B, T, 1) over C: no Bessel correction
rstd = (var + eps) ** -0.5  # (B, T, 1)
xhat = xmu * rstd  # (B, T, C)
out = weight * xhat + bias  # (B, T, C)
loss = (out * dout).sum()"""

SOLUTION = """\
dbias = dout.reshape(-1, C).sum(0)  # bias is shared by every position
dweight = (dout * xhat).reshape(-1, C).sum(0)
dxhat = weight * dout
dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
"""

ROWS = (
    RowSpec(
        "bias",
        "dbias",
        "dbias",
        "(C,)",
        (
            "bias is added at every position of every sequence: its gradient collects dout from all of them.",
            "dout is (B, T, C) here and (N, C) on another probe; dbias is (C,): sum over every dim but the "
            "last.",
            "dbias = dout.reshape(-1, C).sum(0)",
        ),
    ),
    RowSpec(
        "weight",
        "dweight",
        "dweight",
        "(C,)",
        (
            "out = weight * xhat + bias: weight multiplies xhat at every position, so its gradient sums "
            "xhat times the upstream over all positions.",
            "dout and xhat are (B, T, C) (or (N, C)); dweight is (C,): sum over every dim but the last.",
            "dweight = (dout * xhat).reshape(-1, C).sum(0)",
        ),
    ),
    RowSpec(
        "xhat",
        "dxhat",
        "dxhat",
        "(B, T, C)",
        (
            "out = weight * xhat + bias: the derivative with respect to xhat is the other factor.",
            "weight (C,) broadcasts against dout (B, T, C); dxhat keeps dout's shape.",
            "dxhat = weight * dout",
        ),
    ),
    RowSpec(
        "x",
        "dx",
        "dx",
        "(B, T, C)",
        (
            "x reaches xhat three ways: directly (times rstd), through the mean and through the variance; "
            "the closed form has one term per way, all scaled by rstd. Layernorm's variance divides by C, "
            "so no n/(n-1) factor appears.",
            "rstd is (B, T, 1); the two statistics of dxhat are means over the last dim with "
            "keepdim=True, (B, T, 1), broadcast back over C.",
            "dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, "
            "keepdim=True))",
        ),
    ),
)


def _stats(values: dict) -> dict:
    x = values["x"]
    mean = x.mean(-1, keepdim=True)  # (..., 1)
    xmu = x - mean  # (..., C)
    var = (xmu**2).mean(-1, keepdim=True)  # (..., 1)
    return {"mean": mean, "xmu": xmu, "var": var, "rstd": (var + EPS) ** -0.5}


def _point(name: str, shape: tuple[int, ...], seed: int) -> region.Point:
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    inputs: dict[str, object] = {
        "x": region.randn(g, *shape, scale=2.0, shift=0.5),
        "weight": region.randn(g, c),
        "bias": region.randn(g, c),
        "B": shape[0],
        "T": shape[1] if len(shape) == 3 else 1,
        "C": c,
        "eps": EPS,
    }
    return name, f"x {shape_words(shape)}, random dout", inputs


def points() -> list[region.Point]:
    return [_point("btc", (4, 5, 8), 1), _point("btc2", (3, 6, 5), 2), _point("nc", (7, 6), 3)]


def probes(random: bool = True):
    return region.probes(GRAPH, points(), _stats, random)


# ---------------------------------------------------------------------------- the catalogue
def _dx(
    v: Vals,
    *,
    mean: bool = True,
    var: bool = True,
    k: float = 1.0,
    dims=(-1,),
    reduce="mean",
    rstd: Tensor | None = None,
    xhat: Tensor | None = None,
) -> Tensor:
    """The closed form with one part changed: a term left out, a factor k on the variance term (C/(C-1):
    Bessel), the statistics over other dims, sums for means, another rstd or xhat."""
    d = v.dxhat
    xh = v.xhat if xhat is None else xhat
    r = v.rstd if rstd is None else rstd
    red = (
        (lambda t: t.mean(dims, keepdim=True)) if reduce == "mean" else (lambda t: t.sum(dims, keepdim=True))
    )
    out = d
    if mean:
        out = out - red(d)
    if var:
        out = out - k * xh * red(d * xh)
    return r * out


def _c(v: Vals) -> int:
    return v.x.shape[-1]


def _lead(t: Tensor) -> tuple[int, ...]:
    return tuple(range(t.dim() - 1))


def _no_eps(v: Vals) -> Tensor:
    return v.var**-0.5


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "x": (
        Variant(
            "no-mean-term",
            K.MISSING_BRANCH,
            "the mean term - dxhat.mean(-1, keepdim=True) is missing: it is the path through the mean",
            lambda v: _dx(v, mean=False),
        ),
        Variant(
            "no-var-term",
            K.MISSING_BRANCH,
            "the variance term - xhat * (dxhat * xhat).mean(-1, keepdim=True) is missing: it is the path "
            "through the variance",
            lambda v: _dx(v, var=False),
        ),
        Variant(
            "direct-only",
            K.MISSING_BRANCH,
            "only the direct path rstd * dxhat: x also reaches xhat through the mean and the variance",
            lambda v: v.rstd * v.dxhat,
        ),
        Variant(
            "bessel",
            K.BESSEL,
            "a factor C/(C-1) on the variance term, as for a variance divided by C-1: layernorm's variance "
            "divides by C (no Bessel), so the term is xhat * (dxhat * xhat).mean(-1, keepdim=True)",
            lambda v: _dx(v, k=_c(v) / (_c(v) - 1)),
        ),
        Variant(
            "bessel-reversed",
            K.BESSEL,
            "a factor (C-1)/C on the variance term: layernorm's variance divides by C, no correction at all",
            lambda v: _dx(v, k=(_c(v) - 1) / _c(v)),
        ),
        Variant(
            "bessel-everywhere",
            K.BESSEL,
            "both statistics divided by C-1 (Bessel's correction): layernorm's mean and variance divide by C",
            lambda v: (
                v.rstd
                * (
                    v.dxhat
                    - v.dxhat.sum(-1, keepdim=True) / (_c(v) - 1)
                    - v.xhat * (v.dxhat * v.xhat).sum(-1, keepdim=True) / (_c(v) - 1)
                )
            ),
        ),
        Variant(
            "sums",
            K.SCALE_N,
            "sums where the closed form has means: each statistic is over the C features, so divide by C "
            "(.mean(-1, keepdim=True))",
            lambda v: _dx(v, reduce="sum"),
        ),
        Variant(
            "batch-dims",
            K.WRONG_DIM,
            "the statistics taken over the batch (dim 0, as batchnorm has them): layernorm normalises each "
            "position over its last dim, .mean(-1, keepdim=True)",
            lambda v: _dx(v, dims=(0,)),
        ),
        Variant(
            "leading-dims",
            K.WRONG_DIM,
            "the statistics taken over every dim but the last (batchnorm's): layernorm's run over the last "
            "dim, .mean(-1, keepdim=True)",
            lambda v: _dx(v, dims=_lead(v.x)),
        ),
        Variant(
            "no-rstd",
            K.WRONG_FACTOR,
            "rstd is missing in front: xhat = (x - mean) * rstd, so every term is scaled by rstd",
            lambda v: _dx(v, rstd=torch.ones_like(v.rstd)),
        ),
        Variant(
            "no-eps",
            K.EPS_LEFT_OUT,
            "eps left out: rstd = (var + eps) ** -0.5, not var ** -0.5",
            lambda v: _dx(v, rstd=_no_eps(v)),
        ),
        Variant(
            "xmu-for-xhat",
            K.WRONG_FACTOR,
            "xmu (x - mean) where xhat (normalised) was meant in the variance term",
            lambda v: _dx(v, xhat=v.xmu),
        ),
    ),
    "weight": (
        Variant(
            "sum-dim0",
            K.WRONG_DIM,
            "summed over dim 0 only: weight is shared by every position of every sequence, so sum over "
            "every dim but the last (B and T here)",
            lambda v: (v.dout * v.xhat).sum(0),
        ),
        Variant(
            "sum-last",
            K.WRONG_DIM,
            "summed over the last dim (the features): weight has one entry per feature; sum over the others",
            lambda v: (v.dout * v.xhat).sum(-1),
        ),
        Variant(
            "at-x",
            K.INPUT_OUTPUT,
            "multiplied by x, the input; weight multiplies xhat, the normalised x",
            lambda v: (v.dout * v.x).sum(_lead(v.x)),
        ),
        Variant(
            "no-xhat",
            K.WRONG_FACTOR,
            "dout summed without the factor xhat (that is dbias): d(weight * xhat)/dweight = xhat",
            lambda v: v.dout.sum(_lead(v.x)),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the positions; the gradient sums dout * xhat over every dim but the last",
            lambda v: (v.dout * v.xhat).mean(_lead(v.x)),
        ),
    ),
    "bias": (
        Variant(
            "sum-dim0",
            K.WRONG_DIM,
            "summed over dim 0 only: bias is added at every position of every sequence, so sum over every "
            "dim but the last (B and T here)",
            lambda v: v.dout.sum(0),
        ),
        Variant(
            "sum-last",
            K.WRONG_DIM,
            "summed over the last dim (the features): bias has one entry per feature; sum over the others",
            lambda v: v.dout.sum(-1),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the positions; the gradient sums: dout summed over every dim but the last",
            lambda v: v.dout.mean(_lead(v.x)),
        ),
    ),
    "xhat": (
        Variant(
            "times-xhat",
            K.WRONG_FACTOR,
            "multiplied by xhat: in weight * xhat the derivative with respect to xhat is the other factor, "
            "weight",
            lambda v: v.xhat * v.dout,
        ),
    ),
}

TITLE = "layernorm backward in closed form: dbias, dweight, dxhat, dx"
LISTED = "LayerNorm over the last dim of (B, T, C) or (N, C): dx in closed form (no Bessel), dweight, dbias"
PAGE = ("layernorm's backward pass in closed form", ABOUT, SETUP, FORWARD)
ITEM = region.item("layernorm", "g", TITLE, LISTED, PAGE, GRAPH, SHAPES, SOLUTION, ROWS, probes, VARIANTS)
