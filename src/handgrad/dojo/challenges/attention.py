"""Challenge h: one causal self-attention head's backward (makemore's transformer, nanoGPT's Head): scores
= q @ k^T / sqrt(hs), the causal mask, softmax over each row, y = att @ v. The softmax backward
needs the row-sum term, dmasked = att * (datt - (att * datt).sum(-1)); the masked positions pass no
gradient; the scale 1/sqrt(hs) reaches both dq and dk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo.catalogue import Vals, Variant
from handgrad.dojo.challenges import region
from handgrad.dojo.framework import RowSpec
from handgrad.dojo.judge import shape_words


def _t(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _causal(s: Tensor, tril: Tensor, fill: float = float("-inf")) -> Tensor:
    t = s.shape[-1]
    return s.masked_fill(tril[:t, :t] == 0, fill)  # (B, T, T) position t sees 0..t only


GRAPH = G.Graph(
    ops=(
        G.Op("scores", ("q", "k"), lambda q, k: q @ _t(k) * q.shape[-1] ** -0.5),  # (B, T, T)
        G.Op("masked", ("scores", "tril"), _causal),  # (B, T, T)
        G.Op("att", ("masked",), lambda m: F.softmax(m, dim=-1)),  # (B, T, T)
        G.Op("y", ("att", "v"), lambda a, v: a @ v),  # (B, T, hs)
    ),
    grads=("att", "v", "masked", "scores", "q", "k"),
    seed="y",
)
SHAPES = {
    "att": "(B, T, T)",
    "v": "(B, T, hs)",
    "masked": "(B, T, T)",
    "scores": "(B, T, T)",
    "q": "(B, T, hs)",
    "k": "(B, T, hs)",
}

ABOUT = """\
One head of causal self-attention, as in makemore's transformer (nanoGPT's Head), after the three
projections: q, k, v are (B, T, hs). Each position attends to itself and the positions before it.
    scores = q @ k^T / sqrt(hs)      (B, T, T)
    masked = scores with -inf above the diagonal (the future)
    att = softmax(masked) over the last dim
    y = att @ v                      (B, T, hs)
dy is the upstream gradient (loss = (y * dy).sum())."""

SETUP = """\
B, T, hs = 2, 5, 4
q = torch.randn(B, T, hs, generator=g, dtype=torch.float64)
k = torch.randn(B, T, hs, generator=g, dtype=torch.float64) * 1.5
v = torch.randn(B, T, hs, generator=g, dtype=torch.float64)
tril = torch.tril(torch.ones(T, T, dtype=torch.float64))  # the causal mask: 1 where a position may look
dy = torch.randn(B, T, hs, generator=g, dtype=torch.float64)  # the upstream gradient dloss/dy"""

FORWARD = """\
# Forward pass: one causal attention head
scores = q @ k.transpose(-2, -1) * hs**-0.5  # (B, T, T)
masked = scores.masked_fill(tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
att = F.softmax(masked, dim=-1)  # (B, T, T)
y = att @ v  # (B, T, hs)
loss = (y * dy).sum()"""

SOLUTION = """\
datt = dy @ v.transpose(-2, -1)
dv = att.transpose(-2, -1) @ dy
dmasked = att * (datt - (att * datt).sum(-1, keepdim=True))  # softmax: the row-sum term
dscores = dmasked.masked_fill(tril[:T, :T] == 0, 0.0)  # no gradient through the masked positions
dq = dscores @ k * hs**-0.5
dk = dscores.transpose(-2, -1) @ q * hs**-0.5
"""

ROWS = (
    RowSpec(
        "att",
        "datt",
        "datt",
        "(B, T, T)",
        (
            "y = att @ v: the gradient with respect to one operand of @ is the upstream gradient times the "
            "other operand, transposed so that the shapes fit (batched over B).",
            "dy is (B, T, hs) and v is (B, T, hs); datt is (B, T, T): transpose v's last two dims.",
            "datt = dy @ v.transpose(-2, -1)",
        ),
    ),
    RowSpec(
        "v",
        "dv",
        "dv",
        "(B, T, hs)",
        (
            "y = att @ v: each v[b, s] is read by every row t that attends to it, weighted by att[b, t, s].",
            "att is (B, T, T) and dy is (B, T, hs); dv is (B, T, hs): which of att's two T dims is summed?",
            "dv = att.transpose(-2, -1) @ dy",
        ),
    ),
    RowSpec(
        "masked",
        "dmasked",
        "dmasked",
        "(B, T, T)",
        (
            "att = softmax(masked) per row: every output of a row depends on every input of that row, so "
            "the Jacobian is diag(att) - att att^T; applied to datt it gives att times (datt minus a "
            "per-row weighted sum).",
            "att and datt are (B, T, T); the per-row sum is over the last dim with keepdim=True, (B, T, 1).",
            "dmasked = att * (datt - (att * datt).sum(-1, keepdim=True))",
        ),
    ),
    RowSpec(
        "scores",
        "dscores",
        "dscores",
        "(B, T, T)",
        (
            "masked_fill puts a constant where the mask is 0: those entries do not depend on scores at all; "
            "the others pass their gradient through.",
            "dscores is (B, T, T) like dmasked; tril[:T, :T] == 0 marks the positions that get nothing.",
            "dscores = dmasked.masked_fill(tril[:T, :T] == 0, 0.0)",
        ),
    ),
    RowSpec(
        "q",
        "dq",
        "dq",
        "(B, T, hs)",
        (
            "scores = q @ k^T * hs**-0.5: the other operand times the upstream gradient, and the constant "
            "scale stays in front.",
            "dscores is (B, T, T) and k is (B, T, hs); dq is (B, T, hs).",
            "dq = dscores @ k * hs**-0.5",
        ),
    ),
    RowSpec(
        "k",
        "dk",
        "dk",
        "(B, T, hs)",
        (
            "scores = q @ k^T * hs**-0.5: k enters transposed, so its gradient is the transposed upstream "
            "times q, with the same scale.",
            "dscores is (B, T, T) (rows: queries, columns: keys) and q is (B, T, hs); dk is (B, T, hs).",
            "dk = dscores.transpose(-2, -1) @ q * hs**-0.5",
        ),
    ),
)


def _point(name: str, b: int, t: int, hs: int, seed: int) -> region.Point:
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, object] = {
        "q": region.randn(g, b, t, hs),
        "k": region.randn(g, b, t, hs, scale=1.5),
        "v": region.randn(g, b, t, hs, shift=0.3),
        "tril": torch.tril(torch.ones(t, t, dtype=region.F64)),
        "B": b,
        "T": t,
        "hs": hs,
    }
    return name, f"q, k, v {shape_words((b, t, hs))}, random dy", inputs


def points() -> list[region.Point]:
    return [_point("a", 2, 5, 4, 1), _point("b", 3, 6, 3, 2), _point("square", 2, 4, 4, 3)]


def probes(random: bool = True):
    return region.probes(GRAPH, points(), random=random)


# ---------------------------------------------------------------------------- the catalogue
ROW_SUM = K.SOFTMAX_ROW_SUM
MASK = K.MASKED
SCALE = K.ATTENTION_SCALE


def _s(v: Vals) -> float:
    return v.q.shape[-1] ** -0.5


def _mask(v: Vals) -> Tensor:
    t = v.q.shape[-2]
    return v.tril[:t, :t]


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "att": (
        Variant(
            "transposed",
            K.TRANSPOSED,
            "transposed: v @ dy.transpose(-2, -1) is datt's transpose; datt = dy @ v.transpose(-2, -1)",
            lambda v: v.v @ _t(v.dy),
        ),
        Variant(
            "v-untransposed",
            K.TRANSPOSED,
            "v used untransposed: dy @ v; it must be dy @ v.transpose(-2, -1)",
            lambda v: v.dy @ v.v,
        ),
    ),
    "v": (
        Variant(
            "att-untransposed",
            K.TRANSPOSED,
            "att used untransposed: att @ dy sums over the wrong T dim; dv = att.transpose(-2, -1) @ dy",
            lambda v: v.att @ v.dy,
        ),
        Variant(
            "transposed",
            K.TRANSPOSED,
            "transposed: dy.transpose(-2, -1) @ att is dv's transpose; dv = att.transpose(-2, -1) @ dy",
            lambda v: _t(v.dy) @ v.att,
        ),
    ),
    "masked": (
        Variant(
            "no-row-sum",
            ROW_SUM,
            "att * datt alone: the softmax backward needs the row-sum term, att * (datt - (att * "
            "datt).sum(-1, keepdim=True)), because each row's outputs share one normaliser",
            lambda v: v.att * v.datt,
        ),
        Variant(
            "diagonal",
            ROW_SUM,
            "att * (1 - att) * datt is only the diagonal of the softmax Jacobian: the off-diagonal -att_i "
            "att_j terms give the row sum, att * (datt - (att * datt).sum(-1, keepdim=True))",
            lambda v: v.att * (1 - v.att) * v.datt,
        ),
        Variant(
            "unweighted-row-sum",
            ROW_SUM,
            "the row sum without att's weights: it is (att * datt).sum(-1, keepdim=True)",
            lambda v: v.att * (v.datt - v.datt.sum(-1, keepdim=True)),
        ),
        Variant(
            "row-sum-dim",
            K.WRONG_DIM,
            "the row sum taken over dim -2 (the queries): softmax normalises each row, so sum over the last "
            "dim, .sum(-1, keepdim=True)",
            lambda v: v.att * (v.datt - (v.att * v.datt).sum(-2, keepdim=True)),
        ),
        Variant(
            "row-sum-outside",
            ROW_SUM,
            "the row sum subtracted outside: att * datt - (att * datt).sum(-1, keepdim=True) misses the "
            "factor att on the row-sum term",
            lambda v: v.att * v.datt - (v.att * v.datt).sum(-1, keepdim=True),
        ),
    ),
    "scores": (
        Variant(
            "through-mask",
            MASK,
            "gradient flows through the masked positions: masked_fill put a constant there, so those "
            "entries of dscores are 0 (dmasked.masked_fill(tril[:T, :T] == 0, 0.0))",
            lambda v: v.dmasked.clone(),
        ),
        Variant(
            "mask-inverted",
            MASK,
            "the mask the wrong way round: the positions above the diagonal (the future) get 0, the others "
            "keep dmasked",
            lambda v: v.dmasked * (1 - _mask(v)),
        ),
    ),
    "q": (
        Variant(
            "no-scale",
            SCALE,
            "the 1/sqrt(hs) scale of the scores is missing: dq = dscores @ k * hs**-0.5",
            lambda v: v.dscores @ v.k,
        ),
        Variant(
            "sqrt-hs",
            SCALE,
            "multiplied by sqrt(hs) where the forward divides by it: the scale is hs**-0.5",
            lambda v: v.dscores @ v.k * v.q.shape[-1] ** 0.5,
        ),
        Variant(
            "scale-squared",
            SCALE,
            "divided by hs: the scale 1/sqrt(hs) appears once, hs**-0.5",
            lambda v: v.dscores @ v.k / v.q.shape[-1],
        ),
        Variant(
            "dk-form",
            K.TRANSPOSED,
            "dscores transposed: dscores.transpose(-2, -1) @ k is dk's form; q sits in the rows, so "
            "dq = dscores @ k * hs**-0.5",
            lambda v: _t(v.dscores) @ v.k * _s(v),
        ),
        Variant(
            "q-for-k",
            K.WRONG_FACTOR,
            "multiplied by q: in q @ k^T the derivative with respect to q is the other operand, k",
            lambda v: v.dscores @ v.q * _s(v),
        ),
    ),
    "k": (
        Variant(
            "no-scale",
            SCALE,
            "the 1/sqrt(hs) scale of the scores is missing: dk = dscores.transpose(-2, -1) @ q * hs**-0.5",
            lambda v: _t(v.dscores) @ v.q,
        ),
        Variant(
            "sqrt-hs",
            SCALE,
            "multiplied by sqrt(hs) where the forward divides by it: the scale is hs**-0.5",
            lambda v: _t(v.dscores) @ v.q * v.q.shape[-1] ** 0.5,
        ),
        Variant(
            "scale-squared",
            SCALE,
            "divided by hs: the scale 1/sqrt(hs) appears once, hs**-0.5",
            lambda v: _t(v.dscores) @ v.q / v.q.shape[-1],
        ),
        Variant(
            "dq-form",
            K.TRANSPOSED,
            "dscores not transposed: dscores @ q is dq's form; k enters transposed, so "
            "dk = dscores.transpose(-2, -1) @ q * hs**-0.5",
            lambda v: v.dscores @ v.q * _s(v),
        ),
        Variant(
            "k-for-q",
            K.WRONG_FACTOR,
            "multiplied by k: in q @ k^T the derivative with respect to k is the other operand, q",
            lambda v: _t(v.dscores) @ v.k * _s(v),
        ),
    ),
}

TITLE = "one causal attention head's backward: datt, dv, dmasked (softmax), dscores (mask), dq, dk"
LISTED = "one causal self-attention head: the softmax backward, the mask, the 1/sqrt(hs) scale; dq, dk, dv"
PAGE = ("one causal self-attention head's backward pass", ABOUT, SETUP, FORWARD)
ITEM = region.item("attention", "h", TITLE, LISTED, PAGE, GRAPH, SHAPES, SOLUTION, ROWS, probes, VARIANTS)
