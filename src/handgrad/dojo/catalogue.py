"""The mistake catalogue, as data: for each gradient of each exercise, the named wrong answers a
learner is known to write, each computed from the probe's forward values and the upstream gradients
fed in (a challenge's entries live in its own file). The grader holds a wrong answer against every
entry and names the one it equals. Generic entries (sign, a missing branch of a tensor used twice, the
sum over a broadcast dimension, a scale of 1/n or n/(n-1), ...) are derived for every row, from the
graph where there is one; the tables add each op's wrong local derivatives. Where the catalogue is
silent the edit search (edits.py) reads the learner's own line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from handgrad.dojo.graph import EPS, Graph, Local

# The kinds of mistake a diagnosis names (the test corpus checks these).
SIGN = "sign"
SCALE_N = "1/n"  # a missing or extra 1/n
BESSEL = "bessel"  # n where n-1 was meant, or the reverse
SHAPE = "shape"  # missing keepdim, not broadcast back, not summed over the broadcast dimension
WRONG_DIM = "wrong-dim"  # summed over the wrong dimension
TRANSPOSED = "transposed"
MISSING_BRANCH = "missing-branch"  # a tensor used twice got one contribution only
OVERWRITE = "overwrite"  # repeated indices overwritten instead of accumulated
SOFTMAX_MINUS_ONE = "softmax-minus-one"
TANH = "tanh"  # 1 - h instead of 1 - h**2
INPUT_OUTPUT = "input-output"  # a local derivative taken at the input instead of the output, or the reverse
EPS_LEFT_OUT = "eps"
WRONG_FACTOR = "wrong-factor"  # the derivative of a product taken w.r.t. the wrong factor
NO_UPSTREAM = "no-upstream"  # the local derivative without the upstream gradient (chain rule)
NO_LOCAL = "no-local"  # the upstream gradient passed through without the local derivative
POWER = "power-rule"  # a wrong exponent or missing factor of the power rule
HARDCODED = "hard-coded"  # right at the lecture's sizes only
ROWS = "rows"  # wrong on some rows or columns only
SCALE = "scale"  # scaled by some other constant
NONFINITE = "nonfinite"
ZERO = "zero"
ALIAS = "alias"  # two names for one tensor (no .clone()), so a change through one changes the other
SOFTMAX_ROW_SUM = "softmax-row-sum"  # a softmax backward without (or with a wrong) row-sum term
MASKED = "masked"  # gradient through positions a mask filled with a constant
ATTENTION_SCALE = "attention-scale"  # the 1/sqrt(head size) of the scores missing or wrong in dq or dk
THROUGH_TIME = "through-time"  # the gradient from the next time step not accumulated into dh
TIME_DIRECTION = "time-direction"  # gradient flowing from the wrong time step (forward in time, t-1 for t+1)
OTHER = "other"


class Vals:
    """What a catalogue entry reads: forward values by name (`v.probs`, or `v["x"]`), the upstream
    gradients fed in (`v.dprobs`), the sizes (`v.n`), the right answer of the row being graded (`v.ref`)
    and every row's right answer (`v.refs`)."""

    def __init__(
        self,
        values: Mapping[str, object],
        feeds: Mapping[str, Tensor],
        ref: Tensor | None = None,
        refs: Mapping[str, object] | None = None,
    ):
        self._values, self._feeds, self.ref, self.refs = values, feeds, ref, refs or {}

    def __getattr__(self, k: str):
        if k.startswith("d") and k[1:] in self._feeds:
            return self._feeds[k[1:]]
        if k in self._values:
            return self._values[k]
        raise AttributeError(k)

    def __getitem__(self, k: str):
        return self._values[k]


@dataclass(frozen=True)
class Variant:
    key: str
    kind: str
    says: str  # the diagnosis, in the learner's terms
    fn: Callable[[Vals], Tensor]


def onehot(idx: Tensor, like: Tensor) -> Tensor:
    return F.one_hot(idx, like.shape[1]).to(like.dtype)  # (N, V)


def _overwrite(C: Tensor, X: Tensor, demb: Tensor) -> Tensor:
    """dC[X] += demb as written with advanced indexing: a repeated index keeps one contribution."""
    dC = torch.zeros_like(C)  # (V, E)
    dC[X] += demb
    return dC


def _last_wins(C: Tensor, X: Tensor, demb: Tensor) -> Tensor:
    """A loop that assigns (=) instead of accumulating (+=): the last use of each row wins."""
    dC = torch.zeros_like(C)  # (V, E)
    flat, rows = X.reshape(-1), demb.reshape(-1, demb.shape[-1])
    for k in range(flat.shape[0]):
        dC[flat[k]] = rows[k]
    return dC


def _arange(x: Tensor) -> Tensor:
    return torch.arange(x.shape[0], device=x.device)


def _minus_one(x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), -1.0, dtype=x.dtype, device=x.device)


def _softmax(x: Tensor) -> Tensor:
    return F.softmax(x, 1)


def _bn_closed(
    v: Vals,
    d: Tensor,
    *,
    bessel: float | None = None,
    gain: bool = True,
    inv: Tensor | None = None,
    raw: Tensor | None = None,
    mean_term: bool = True,
    var_term: bool = True,
    scale: float | None = None,
    mean_dims: tuple[int, ...] = (0,),
    var_dims: tuple[int, ...] = (0,),
) -> Tensor:
    """The closed-form batchnorm backward with one part changed (the variants of exercise 3)."""
    n = v.n
    inv = v.bnvar_inv if inv is None else inv
    raw = v.bnraw if raw is None else raw
    b = n / (n - 1) if bessel is None else bessel
    s = 1 / n if scale is None else scale
    out = n * d
    if mean_term:
        out = out - d.sum(mean_dims, keepdim=True)
    if var_term:
        out = out - b * raw * (d * raw).sum(var_dims, keepdim=True)
    return (v.bngain if gain else 1.0) * inv * s * out


def _var_no_eps(v: Vals) -> Tensor:
    return v.hprebn.var(0, keepdim=True, unbiased=True) ** -0.5  # (1, H)


# ---------------------------------------------------------------------------- exercise 1
LECTURE_TABLE: dict[str, tuple[Variant, ...]] = {
    "logprobs": (
        Variant(
            "no-mean",
            SCALE_N,
            "-1 at the targets without the 1/n of the mean: the loss averages over the "
            "batch, so each picked entry gets -1/n",
            lambda v: -onehot(v.Yb, v.logprobs),
        ),
        Variant(
            "everywhere",
            OTHER,
            "-1/n in every entry: only the entries logprobs[range(n), Yb] enter the loss; all others get 0",
            lambda v: torch.full_like(v.logprobs, -1.0 / v.n),
        ),
        Variant(
            "transposed-pick",
            OTHER,
            "-1/n placed at [Yb, range(n)] (rows and columns swapped)",
            lambda v: _pick_swapped(v),
        ),
    ),
    "probs": (
        Variant(
            "times",
            INPUT_OUTPUT,
            "dlogprobs * probs: d log(x)/dx = 1/x, so divide by probs (dlogprobs / probs)",
            lambda v: v.dlogprobs * v.probs,
        ),
        Variant(
            "at-output",
            INPUT_OUTPUT,
            "divided by logprobs: the derivative of log is 1/x at its input probs, "
            "not at its output logprobs",
            lambda v: v.dlogprobs / v.logprobs,
        ),
    ),
    "counts_sum_inv": (
        Variant(
            "other-factor",
            WRONG_FACTOR,
            "multiplied by counts_sum_inv: in probs = counts * counts_sum_inv "
            "the derivative w.r.t. counts_sum_inv is the other factor, counts",
            lambda v: (v.dprobs * v.counts_sum_inv).sum(1, keepdim=True),
        ),
    ),
    "counts_sum": (
        Variant(
            "pow-minus-1",
            POWER,
            "-counts_sum**-1: the power rule gives d(x**-1)/dx = -x**-2",
            lambda v: v.dcounts_sum_inv * -(v.counts_sum**-1),
        ),
        Variant(
            "at-output",
            INPUT_OUTPUT,
            "-counts_sum_inv**-2: the derivative -x**-2 must be taken at the input "
            "counts_sum, not at the output counts_sum_inv",
            lambda v: v.dcounts_sum_inv * -(v.counts_sum_inv**-2),
        ),
    ),
    "counts": (
        Variant(
            "other-factor",
            WRONG_FACTOR,
            "dprobs * counts in the branch through probs: in probs = counts * "
            "counts_sum_inv the derivative w.r.t. counts is counts_sum_inv",
            lambda v: v.dprobs * v.counts + v.dcounts_sum,
        ),
    ),
    "norm_logits": (
        Variant(
            "at-input",
            INPUT_OUTPUT,
            "dcounts * norm_logits: the derivative of exp is exp itself, i.e. the "
            "output counts, not the input norm_logits",
            lambda v: v.dcounts * v.norm_logits,
        ),
        Variant(
            "exp-output",
            INPUT_OUTPUT,
            "dcounts * counts.exp(): exp applied to the output again; the "
            "derivative of exp at norm_logits is counts itself",
            lambda v: v.dcounts * v.counts.exp(),
        ),
    ),
    "logits": (
        Variant(
            "max-everywhere",
            OTHER,
            "dlogit_maxes added to every column: the max passes its gradient only to "
            "the position of each row's maximum (one_hot of logits.max(1).indices)",
            lambda v: v.dnorm_logits + v.dlogit_maxes,
        ),
    ),
    "hpreact": (
        Variant(
            "one-minus-h",
            TANH,
            "(1 - h) * dh: the derivative of tanh is 1 - h**2 (h squared)",
            lambda v: (1.0 - v.h) * v.dh,
        ),
        Variant(
            "at-input",
            INPUT_OUTPUT,
            "(1 - hpreact**2) * dh: the derivative of tanh is 1 - tanh(x)**2 = "
            "1 - h**2 at the output h, not 1 - hpreact**2 at the input",
            lambda v: (1.0 - v.hpreact**2) * v.dh,
        ),
        Variant(
            "tanh-of-h",
            INPUT_OUTPUT,
            "(1 - tanh(h)**2) * dh: tanh applied to the output again; 1 - h**2 uses h itself",
            lambda v: (1.0 - torch.tanh(v.h) ** 2) * v.dh,
        ),
        Variant("h-squared", TANH, "h**2 * dh: the derivative of tanh is 1 - h**2", lambda v: v.h**2 * v.dh),
        Variant(
            "one-minus-h-input",
            TANH,
            "(1 - hpreact) * dh: the derivative of tanh is 1 - h**2",
            lambda v: (1.0 - v.hpreact) * v.dh,
        ),
    ),
    "bngain": (
        Variant(
            "other-factor",
            WRONG_FACTOR,
            "multiplied by bngain: in bngain * bnraw the derivative w.r.t. bngain is the other factor, bnraw",
            lambda v: (v.dhpreact * v.bngain).sum(0, keepdim=True),
        ),
        Variant(
            "no-factor",
            WRONG_FACTOR,
            "dhpreact summed without the factor bnraw (that is dbnbias): d(bngain * bnraw)/dbngain = bnraw",
            lambda v: v.dhpreact.sum(0, keepdim=True),
        ),
    ),
    "bnraw": (
        Variant(
            "other-factor",
            WRONG_FACTOR,
            "multiplied by bnraw: in bngain * bnraw the derivative w.r.t. bnraw is the other factor, bngain",
            lambda v: v.dhpreact * v.bnraw,
        ),
        Variant(
            "summed",
            SHAPE,
            "summed over the batch: bnraw is (N, H) like dhpreact, nothing was broadcast, so "
            "nothing is summed",
            lambda v: (v.dhpreact * v.bngain).sum(0, keepdim=True),
        ),
    ),
    "bnvar_inv": (
        Variant(
            "other-factor",
            WRONG_FACTOR,
            "multiplied by bnvar_inv: in bnraw = bndiff * bnvar_inv the "
            "derivative w.r.t. bnvar_inv is the other factor, bndiff",
            lambda v: (v.dbnraw * v.bnvar_inv).sum(0, keepdim=True),
        ),
        Variant(
            "bnraw-factor",
            WRONG_FACTOR,
            "multiplied by bnraw: in bnraw = bndiff * bnvar_inv the derivative w.r.t. bnvar_inv is bndiff",
            lambda v: (v.dbnraw * v.bnraw).sum(0, keepdim=True),
        ),
    ),
    "bnvar": (
        Variant(
            "no-eps",
            EPS_LEFT_OUT,
            "eps left out: bnvar_inv = (bnvar + 1e-5)**-0.5, so the derivative is "
            "-0.5 * (bnvar + 1e-5)**-1.5",
            lambda v: v.dbnvar_inv * (-0.5 * v.bnvar**-1.5),
        ),
        Variant(
            "pow-exponent",
            POWER,
            "-0.5 * (bnvar + eps)**-0.5: the power rule lowers the exponent by one, "
            "d(x**-0.5)/dx = -0.5 * x**-1.5",
            lambda v: v.dbnvar_inv * (-0.5 * (v.bnvar + EPS) ** -0.5),
        ),
        Variant(
            "pow-factor",
            POWER,
            "(bnvar + eps)**-1.5 without the factor -0.5 of the power rule",
            lambda v: v.dbnvar_inv * (v.bnvar + EPS) ** -1.5,
        ),
        Variant(
            "at-output",
            INPUT_OUTPUT,
            "-0.5 * bnvar_inv**-1.5: the derivative -0.5 * x**-1.5 must be taken at "
            "the input bnvar + eps, not at the output bnvar_inv",
            lambda v: v.dbnvar_inv * (-0.5 * v.bnvar_inv**-1.5),
        ),
        Variant(
            "at-output-3",
            INPUT_OUTPUT,
            "-0.5 * bnvar_inv**3 written with the wrong exponent: (bnvar + eps)**-1.5 = bnvar_inv**3",
            lambda v: v.dbnvar_inv * (-0.5 * v.bnvar_inv**2),
        ),
    ),
    "bndiff2": (
        Variant(
            "bessel",
            BESSEL,
            "1/n where bnvar divides by n-1 (Bessel's correction): each element gets dbnvar / (n-1)",
            lambda v: torch.ones_like(v.bndiff2) * v.dbnvar / v.n,
        ),
        Variant(
            "no-scale",
            SCALE_N,
            "the 1/(n-1) of bnvar is missing: bnvar = 1/(n-1) * bndiff2.sum(0)",
            lambda v: torch.ones_like(v.bndiff2) * v.dbnvar,
        ),
        Variant(
            "not-broadcast",
            SHAPE,
            "left at dbnvar's shape (1, H): bndiff2 is (N, H); the sum over the batch "
            "sends dbnvar / (n-1) to every row (multiply by torch.ones_like(bndiff2))",
            lambda v: v.dbnvar / (v.n - 1),
        ),
    ),
    "bndiff": (
        Variant(
            "no-two",
            POWER,
            "bndiff * dbndiff2 in the branch through bndiff2: d(x**2)/dx = 2x, the 2 is missing",
            lambda v: v.dbnraw * v.bnvar_inv + v.bndiff * v.dbndiff2,
        ),
        Variant(
            "bnraw-factor",
            WRONG_FACTOR,
            "dbnraw * bnraw in the branch through bnraw: bnraw = bndiff * "
            "bnvar_inv, so the factor is bnvar_inv",
            lambda v: v.dbnraw * v.bnraw + 2 * v.bndiff * v.dbndiff2,
        ),
        Variant(
            "square-input",
            INPUT_OUTPUT,
            "2 * bndiff2 * dbndiff2: d(x**2)/dx = 2x at the input bndiff, not at the output bndiff2",
            lambda v: v.dbnraw * v.bnvar_inv + 2 * v.bndiff2 * v.dbndiff2,
        ),
    ),
    "hprebn": (
        Variant(
            "mean-no-1/n",
            SCALE_N,
            "the branch through bnmeani lacks the 1/n of the mean: add dbnmeani / n",
            lambda v: v.dbndiff + v.dbnmeani,
        ),
        Variant(
            "mean-bessel",
            BESSEL,
            "the branch through bnmeani divides by n-1: bnmeani is a plain mean (1/n); "
            "only bnvar uses Bessel's n-1",
            lambda v: v.dbndiff + v.dbnmeani / (v.n - 1),
        ),
        Variant(
            "mean-sign",
            SIGN,
            "the branch through bnmeani has its sign flipped: dbnmeani already carries the "
            "minus of bndiff = hprebn - bnmeani; add + dbnmeani / n",
            lambda v: v.dbndiff - v.dbnmeani / v.n,
        ),
    ),
    "emb": (
        Variant(
            "scrambled-view",
            OTHER,
            "viewed as (n, n_embd, block_size): embcat concatenates block_size "
            "embeddings of n_embd each, so view it back as emb.shape = (n, block_size, n_embd)",
            lambda v: v.dembcat.view(v.emb.shape[0], v.emb.shape[2], v.emb.shape[1]),
        ),
        Variant(
            "scrambled-order",
            OTHER,
            "elements in the wrong order: view(n, n_embd, block_size) then "
            "transposed; embcat's columns are [emb[:, 0], emb[:, 1], ...], so dembcat.view(emb.shape) is all",
            lambda v: v.dembcat.view(v.emb.shape[0], v.emb.shape[2], v.emb.shape[1]).transpose(1, 2),
        ),
    ),
    "C": (
        Variant(
            "overwrite",
            OVERWRITE,
            "overwritten instead of accumulated: dC[Xb] += demb keeps only one "
            "contribution where an index repeats in Xb; accumulate (a loop with +=, or dC.index_add_(0, "
            "Xb.view(-1), demb.view(-1, demb.shape[-1])))",
            lambda v: _overwrite(v.C, v.Xb, v.demb),
        ),
        Variant(
            "last-wins",
            OVERWRITE,
            "assigned instead of accumulated: dC[ix] = demb[k, j] in the loop keeps "
            "only the last use of each row; use +=",
            lambda v: _last_wins(v.C, v.Xb, v.demb),
        ),
        Variant(
            "index-transposed",
            OTHER,
            "the index and the gradient are paired in different orders (Xb.T with "
            "demb, or the reverse): pair Xb[k, j] with demb[k, j]",
            lambda v: torch.zeros_like(v.C).index_add_(
                0, v.Xb.T.reshape(-1), v.demb.reshape(-1, v.C.shape[1])
            ),
        ),
    ),
}


def _pick_swapped(v: Vals) -> Tensor:
    out = torch.zeros_like(v.logprobs)
    n = v.logprobs.shape[0]
    rows, cols = v.Yb, torch.arange(n)
    ok = (rows < out.shape[0]) & (cols < out.shape[1])
    out[rows[ok], cols[ok]] = -1.0 / n
    return out


# ---------------------------------------------------------------------------- exercises 2 and 3
CE_TABLE: dict[str, tuple[Variant, ...]] = {
    "logits": (
        Variant(
            "no-minus-one",
            SOFTMAX_MINUS_ONE,
            "softmax without the -1: subtract 1 at each row's target "
            "(dlogits[range(n), Yb] -= 1) before dividing by n",
            lambda v: _softmax(v.logits) / v.n,
        ),
        Variant(
            "no-mean",
            SCALE_N,
            "softmax - one_hot without the 1/n of the mean: divide by n",
            lambda v: _softmax(v.logits) - onehot(v.Yb, v.logits),
        ),
        Variant(
            "minus-one-everywhere",
            SOFTMAX_MINUS_ONE,
            "1 subtracted in every entry: only the target entry of each row gets the -1",
            lambda v: (_softmax(v.logits) - 1) / v.n,
        ),
        Variant(
            "minus-one-no-mean",
            SOFTMAX_MINUS_ONE,
            "softmax without the -1 and without the 1/n",
            lambda v: _softmax(v.logits),
        ),
        Variant(
            "softmax-dim0",
            WRONG_DIM,
            "softmax over dim 0 (the batch): the probabilities are normalised "
            "over each row, F.softmax(logits, 1)",
            lambda v: (F.softmax(v.logits, 0) - onehot(v.Yb, v.logits)) / v.n,
        ),
        Variant(
            "log-softmax",
            OTHER,
            "log_softmax where softmax was meant: dlogits = softmax(logits) - one_hot",
            lambda v: (F.log_softmax(v.logits, 1) - onehot(v.Yb, v.logits)) / v.n,
        ),
        Variant(
            "argmax",
            OTHER,
            "the -1 placed at each row's largest logit instead of at the target Yb",
            lambda v: (_softmax(v.logits) - onehot(v.logits.argmax(1), v.logits)) / v.n,
        ),
        Variant(
            "bessel",
            BESSEL,
            "divided by n-1: the loss is a plain mean over the batch, divide by n",
            lambda v: (_softmax(v.logits) - onehot(v.Yb, v.logits)) / (v.n - 1),
        ),
        Variant(
            "minus-one-assigned",
            SOFTMAX_MINUS_ONE,
            "the target entries set to -1 (= -1) instead of having 1 subtracted (-= 1): at the target "
            "the gradient is softmax - 1",
            lambda v: _softmax(v.logits).index_put((_arange(v.logits), v.Yb), _minus_one(v.logits)) / v.n,
        ),
        Variant(
            "softmax-sum-all",
            WRONG_DIM,
            "the softmax normalised by the sum over the whole batch: each row is normalised by its own "
            "sum, .sum(1, keepdim=True)",
            lambda v: (v.logits.exp() / v.logits.exp().sum() - onehot(v.Yb, v.logits)) / v.n,
        ),
        Variant(
            "sigmoid",
            OTHER,
            "sigmoid(logits) where softmax was meant",
            lambda v: (torch.sigmoid(v.logits) - onehot(v.Yb, v.logits)) / v.n,
        ),
    ),
}

BN_TABLE: dict[str, tuple[Variant, ...]] = {
    "hprebn": (
        Variant(
            "bessel-n",
            BESSEL,
            "the last term lacks the n/(n-1) of Bessel's correction: the forward divides "
            "the variance by n-1, so the term is n/(n-1) * bnraw * (dhpreact * bnraw).sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, bessel=1.0),
        ),
        Variant(
            "bessel-reversed",
            BESSEL,
            "(n-1)/n where n/(n-1) was meant in the last term (Bessel's correction upside down)",
            lambda v: _bn_closed(v, v.dhpreact, bessel=(v.n - 1) / v.n),
        ),
        Variant(
            "bessel-whole",
            BESSEL,
            "1/(n-1) in front where 1/n was meant: the n-1 belongs only to the variance term",
            lambda v: _bn_closed(v, v.dhpreact, scale=1 / (v.n - 1)),
        ),
        Variant(
            "no-mean-term",
            MISSING_BRANCH,
            "the term - dhpreact.sum(0) is missing: it is the path through the batch mean",
            lambda v: _bn_closed(v, v.dhpreact, mean_term=False),
        ),
        Variant(
            "no-var-term",
            MISSING_BRANCH,
            "the term - n/(n-1) * bnraw * (dhpreact * bnraw).sum(0) is "
            "missing: it is the path through the batch variance",
            lambda v: _bn_closed(v, v.dhpreact, var_term=False),
        ),
        Variant(
            "no-gain",
            WRONG_FACTOR,
            "bngain is missing in front: hpreact = bngain * bnraw + bnbias",
            lambda v: _bn_closed(v, v.dhpreact, gain=False),
        ),
        Variant(
            "no-inv",
            WRONG_FACTOR,
            "bnvar_inv is missing in front: bnraw = (hprebn - mean) * bnvar_inv",
            lambda v: _bn_closed(v, v.dhpreact, inv=torch.ones_like(v.bnvar_inv)),
        ),
        Variant(
            "no-eps",
            EPS_LEFT_OUT,
            "eps left out: the variance was inverted as var**-0.5; the forward uses (var + 1e-5)**-0.5",
            lambda v: _bn_closed(v, v.dhpreact, inv=_var_no_eps(v)),
        ),
        Variant(
            "no-eps-both",
            EPS_LEFT_OUT,
            "eps left out of bnvar_inv and bnraw: the forward uses (var + 1e-5)**-0.5",
            lambda v: _bn_closed(
                v, v.dhpreact, inv=_var_no_eps(v), raw=(v.hprebn - v.bnmeani) * _var_no_eps(v)
            ),
        ),
        Variant(
            "raw-is-diff",
            WRONG_FACTOR,
            "bndiff (hprebn - mean) used where bnraw (normalised) was meant in the last term",
            lambda v: _bn_closed(v, v.dhpreact, raw=v.bndiff),
        ),
        Variant(
            "mean-sum-dim1",
            WRONG_DIM,
            "dhpreact.sum(1) in the mean term: the batch statistics run over dim 0 (the rows), .sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, mean_dims=(1,)),
        ),
        Variant(
            "var-sum-dim1",
            WRONG_DIM,
            "(dhpreact * bnraw).sum(1) in the variance term: the batch statistics run over dim 0, .sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, var_dims=(1,)),
        ),
        Variant(
            "mean-sum-all",
            WRONG_DIM,
            "dhpreact.sum() over everything in the mean term: each column has its own mean, .sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, mean_dims=(0, 1)),
        ),
        Variant(
            "var-sum-all",
            WRONG_DIM,
            "(dhpreact * bnraw).sum() over everything in the variance term: each column has its own "
            "variance, .sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, var_dims=(0, 1)),
        ),
        Variant(
            "var-sign",
            SIGN,
            "the sign of the variance term is flipped: ... - n/(n-1) * bnraw * (dhpreact * bnraw).sum(0)",
            lambda v: _bn_closed(v, v.dhpreact, bessel=-v.n / (v.n - 1)),
        ),
    ),
}

# Exercise 4 grades the compact graph: the closed forms of exercises 2 and 3 plus the lecture's lines.
TRAINING_TABLE: dict[str, tuple[Variant, ...]] = {
    **{k: LECTURE_TABLE[k] for k in ("hpreact", "bngain", "emb", "C")},
    "logits": CE_TABLE["logits"],
    "hprebn": BN_TABLE["hprebn"],
    "bnbias": (),
}


# ---------------------------------------------------------------------------- generic entries
def _size_names(n: int) -> list[tuple[str, float, str, str]]:
    """(key, factor, kind, words) for the constants a gradient is wrongly scaled by, n the batch size
    (the key names the factor in n, so one mistake has one key at every batch size)."""
    return [
        ("n", n, SCALE_N, "n times too large: a 1/n is missing (the mean over the batch?)"),
        ("1/n", 1 / n, SCALE_N, "n times too small: an extra 1/n (divided by n once too often?)"),
        (
            "n/(n-1)",
            n / (n - 1),
            BESSEL,
            "n/(n-1) times too large: divides by n-1 where n was meant (Bessel's n-1 belongs "
            "only to the variance)",
        ),
        ("(n-1)/n", (n - 1) / n, BESSEL, "(n-1)/n times too small: divides by n where Bessel's n-1 is meant"),
        ("n-1", n - 1, SCALE_N, "n-1 times too large: a 1/(n-1) is missing"),
        ("1/(n-1)", 1 / (n - 1), SCALE_N, "n-1 times too small: an extra 1/(n-1)"),
        ("2", 2.0, POWER, "2 times too large: a stray factor 2"),
        ("1/2", 0.5, POWER, "half the right value: a missing factor 2 (as in d(x**2)/dx = 2x)"),
    ]


def generic(
    key: str,
    values: Mapping[str, object],
    feeds: Mapping[str, Tensor],
    ref: Tensor,
    graph: Graph | None = None,
    loc: Local | None = None,
) -> list[Variant]:
    """Entries every row gets: a sign flip, a transpose, a scale of 1/n, n/(n-1), 2 (n the batch size,
    else the answer's first dimension); and from the graph, where there is one, each missing branch of a
    tensor used twice, the local derivative without the upstream, the upstream without the local
    derivative, the sum over a broadcast dimension done wrong."""
    out: list[Variant] = []
    if graph is not None and loc is not None:
        out += _graph_variants(graph, key, feeds, loc, ref)
    out.append(
        Variant("sign", SIGN, "sign flipped: your answer is exactly minus the right one", lambda v: -v.ref)
    )
    if ref.dim() == 2:
        out.append(
            Variant(
                "transposed",
                TRANSPOSED,
                f"transposed: your d{key}.T is the right answer (x.T @ dout "
                "where dout.T @ x was meant, or the operands of @ swapped)",
                lambda v: v.ref.T,
            )
        )
    n = values.get("n")
    if not isinstance(n, int):
        n = ref.shape[0] if ref.dim() else 0
    if n > 2:
        for k, factor, kind, words in _size_names(n):
            out.append(Variant(f"scale-{k}", kind, words, lambda v, f=factor: v.ref * f))
    return out


def _graph_variants(
    graph: Graph, g: str, feeds: Mapping[str, Tensor], loc: Local, ref: Tensor
) -> list[Variant]:
    out: list[Variant] = []
    users = graph.consumers(g)
    terms = loc.contrib.get(g, {})
    if len(terms) >= 2:
        both = " and ".join(terms)
        for c, t in terms.items():
            others = [o for o in terms if o != c]
            out.append(
                Variant(
                    f"missing-{c}",
                    MISSING_BRANCH,
                    f"missing the contribution through {c}: {g} is used by {both}, so d{g} is the sum "
                    f"of one term per use (you have only the one through {', '.join(others)})",
                    lambda v, t=t: v.ref - t,
                )
            )
    if g in loc.ones and len(users) == 1:
        out.append(
            Variant(
                "no-upstream",
                NO_UPSTREAM,
                f"the local derivative alone: it must be multiplied by the "
                f"upstream gradient d{users[0]} (chain rule)",
                lambda v, o=loc.ones[g]: o,
            )
        )
    for c in users:
        fed = feeds.get(c)
        if fed is not None and fed.dim() and tuple(fed.shape) == tuple(ref.shape):
            out.append(
                Variant(
                    f"passthrough-{c}",
                    NO_LOCAL,
                    f"d{c} passed through unchanged: the local "
                    f"derivative of {c} with respect to {g} is missing",
                    lambda v, f=fed: f,
                )
            )
    u = loc.unreduced.get(g)
    if u is not None:
        out += _reduction_variants(g, users[0], u, ref)
    return out


def _reduction_variants(g: str, user: str, u: Tensor, ref: Tensor) -> list[Variant]:
    """The sum over the dimensions where `g` was broadcast inside `user`, done wrong."""
    want = tuple(ref.shape)
    kept = [i for i in range(u.dim()) if i >= u.dim() - len(want) and want[i - (u.dim() - len(want))] != 1]
    summed = [i for i in range(u.dim()) if i not in kept]
    out = [
        Variant(
            "not-summed",
            SHAPE,
            f"not summed over the broadcast dimension: {g} has shape {want} and was "
            f"broadcast to {tuple(u.shape)} in {user}, so sum the gradient over dim {summed} "
            f"(.sum({summed[0] if len(summed) == 1 else tuple(summed)}, keepdim=True) where {g} keeps a "
            "size-1 dimension)",
            lambda v, u=u: u,
        )
    ]
    for dims in ([i] for i in range(u.dim())):
        for keep in (True, False):
            t = u.sum(dims, keepdim=keep)
            if tuple(t.shape) == want:
                continue
            if dims == summed:
                what = (
                    f"missing keepdim: .sum({dims[0]}) gives {tuple(t.shape)}, but {g} is {want}; use "
                    f".sum({dims[0]}, keepdim=True)"
                    if not keep
                    else f"keepdim=True gives {tuple(t.shape)}, but {g} is {want}: use .sum({dims[0]})"
                )
                out.append(Variant(f"keepdim-{dims[0]}-{keep}", SHAPE, what, lambda v, t=t: t))
            else:
                out.append(
                    Variant(
                        f"sum-dim-{dims[0]}-{keep}",
                        WRONG_DIM,
                        f"summed over the wrong dimension: .sum({dims[0]}) where {g} was broadcast "
                        f"along dim {summed[0] if len(summed) == 1 else summed} (it has shape {want})",
                        lambda v, t=t: t,
                    )
                )
    return out
