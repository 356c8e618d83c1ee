"""Challenge c: a BatchNorm1d class (makemore part 3's, with the lecture's Bessel-corrected variance):
forward in training mode (batch statistics, running statistics updated with momentum) and eval mode
(running statistics, nothing updated), and backward returning dx, dgamma, dbeta (exercise 3's closed form).
"""

from __future__ import annotations

import torch

from handgrad.dojo import catalogue as K
from handgrad.dojo.catalogue import Variant
from handgrad.dojo.framework import Item, Probe, RowSpec
from handgrad.dojo.runner import Recorder, Skip

F64 = torch.float64

EPS = 1e-5
NOT_UPDATED = "stats-not-updated"  # the running statistics left as they were in training mode
UPDATED_IN_EVAL = "stats-updated-in-eval"  # changed in eval mode
MOMENTUM = "momentum"  # (1 - m) and m swapped, or the momentum hard-coded
BATCH_IN_EVAL = "batch-stats-in-eval"  # eval mode normalising with the batch's statistics

TEXT = '''"""Challenge: a BatchNorm1d layer with running statistics, and its backward pass by hand.

x is (N, D) float64. gamma, beta, running_mean, running_var are (D,). As in the lecture, the variance
is Bessel-corrected (divide by n-1), both to normalise and for the running statistics.
  training: normalise with the batch's mean and variance, and update
            running = (1 - momentum) * running + momentum * batch statistic
  eval:     normalise with the running statistics and change nothing
backward() reads self.xhat (N, D) and self.var_inv (1, D) that forward stored (the grader sets them
to the right values before calling it, so a mistake in forward does not spoil backward).
Fill in each `None  # TODO`, run this file to compare with autograd, then run
    handgrad dojo grade ch_batchnorm.py
"""
import torch


class BatchNorm1d:
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps, self.momentum, self.training = eps, momentum, True
        self.gamma = torch.ones(dim, dtype=torch.float64)
        self.beta = torch.zeros(dim, dtype=torch.float64)
        self.running_mean = torch.zeros(dim, dtype=torch.float64)
        self.running_var = torch.ones(dim, dtype=torch.float64)

    def __call__(self, x):
        if self.training:
            @@0@@
        else:
            @@1@@
        @@2@@
        return out

    def backward(self, dout):
        """dout (N, D) -> dx (N, D), dgamma (D,), dbeta (D,)."""
        xhat, var_inv, n = self.xhat, self.var_inv, self.xhat.shape[0]
        @@3@@
        return dx, dgamma, dbeta


if __name__ == "__main__":
    torch.manual_seed(42)
    bn = BatchNorm1d(5)
    bn.gamma, bn.beta = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    gamma, beta = bn.gamma.clone().requires_grad_(), bn.beta.clone().requires_grad_()
    xhat = (x - x.mean(0, keepdim=True)) / (x.var(0, keepdim=True) + 1e-5) ** 0.5  # var: n-1
    dout = torch.randn(16, 5, dtype=torch.float64)
    ((gamma * xhat + beta) * dout).sum().backward()  # autograd, only to compare with
    with torch.no_grad():
        out = bn(x)
        dx, dgamma, dbeta = bn.backward(dout) if out is not None else (None, None, None)
    for name, mine, ref in (("dx", dx, x.grad), ("dgamma", dgamma, gamma.grad), ("dbeta", dbeta, beta.grad)):
        ok = mine is not None and mine.shape == ref.shape and torch.allclose(mine, ref)
        print(f"{name:6s} {'ok' if ok else 'not yet'}")
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = (
    "# >>> your code: the batch statistics, and update the running ones\n"
    "xmean = None  # TODO (1, D)\nxvar = None  # TODO (1, D)\n"
    "# TODO: update self.running_mean and self.running_var (each stays (D,))\n# <<<",
    "# >>> your code: the running statistics\nxmean = None  # TODO\nxvar = None  # TODO\n# <<<",
    "# >>> your code: normalise, scale, shift; keep what backward needs\n"
    "self.var_inv = None  # TODO (1, D)\nself.xhat = None  # TODO (N, D)\nout = None  # TODO (N, D)\n# <<<",
    "# >>> your code\ndgamma = None  # TODO (D,)\ndbeta = None  # TODO (D,)\ndx = None  # TODO (N, D)\n# <<<",
)
SOLUTION = (
    "# >>> your code: the batch statistics, and update the running ones\n"
    "xmean = x.mean(0, keepdim=True)\nxvar = x.var(0, keepdim=True)  # Bessel's n-1\n"
    "m = self.momentum\n"
    "self.running_mean = (1 - m) * self.running_mean + m * xmean[0]\n"
    "self.running_var = (1 - m) * self.running_var + m * xvar[0]\n# <<<",
    "# >>> your code: the running statistics\nxmean = self.running_mean\nxvar = self.running_var\n# <<<",
    "# >>> your code: normalise, scale, shift; keep what backward needs\n"
    "self.var_inv = (xvar + self.eps) ** -0.5\nself.xhat = (x - xmean) * self.var_inv\n"
    "out = self.gamma * self.xhat + self.beta\n# <<<",
    "# >>> your code\ndgamma = (xhat * dout).sum(0)\ndbeta = dout.sum(0)\n"
    "dx = self.gamma * var_inv / n * (n * dout - dbeta - n / (n - 1) * xhat * dgamma)\n# <<<",
)

ROWS = (
    RowSpec(
        "out(train)",
        "out(train)",
        "out",
        "(N, D)",
        (
            "Training mode normalises each column with the batch's own mean and variance, then scales by "
            "gamma "
            "and shifts by beta; eps goes inside the square root.",
            "mean and var over dim 0 with keepdim: (1, D); var is Bessel-corrected (n-1), as in the lecture.",
            "out = gamma * (x - x.mean(0, keepdim=True)) * (x.var(0, keepdim=True) + eps) ** -0.5 + beta",
        ),
    ),
    RowSpec(
        "running_mean",
        "running_mean",
        "self.running_mean",
        "(D,)",
        (
            "Each training step moves the running mean a fraction momentum of the way to the batch mean.",
            "running_mean stays (D,): the batch mean is (1, D), take its row [0].",
            "self.running_mean = (1 - momentum) * self.running_mean + momentum * xmean[0]",
        ),
        blank="xmean",
    ),
    RowSpec(
        "running_var",
        "running_var",
        "self.running_var",
        "(D,)",
        (
            "The same exponential moving average for the variance, with the variance used to normalise.",
            "(D,), from the (1, D) batch variance with Bessel's n-1.",
            "self.running_var = (1 - momentum) * self.running_var + momentum * xvar[0]",
        ),
        blank="xvar",
    ),
    RowSpec(
        "dgamma",
        "dgamma",
        "dgamma",
        "(D,)",
        (
            "out = gamma * xhat + beta: gamma multiplies xhat in every row, so its gradient sums over "
            "the batch.",
            "xhat and dout are (N, D); dgamma is (D,).",
            "dgamma = (xhat * dout).sum(0)",
        ),
    ),
    RowSpec(
        "dbeta",
        "dbeta",
        "dbeta",
        "(D,)",
        (
            "beta is added to every row.",
            "dout is (N, D); dbeta is (D,).",
            "dbeta = dout.sum(0)",
        ),
    ),
    RowSpec(
        "dx",
        "dx",
        "dx",
        "(N, D)",
        (
            "x reaches the output three ways: directly, through the mean and through the variance; the "
            "closed "
            "form of the lecture's exercise 3 sums all three.",
            "Everything is (N, D) or (1, D)/(D,) broadcast; the variance's n-1 leaves a factor n/(n-1).",
            "dx = gamma * var_inv / n * (n * dout - dout.sum(0) - n / (n - 1) * xhat * (xhat * dout).sum(0))",
        ),
    ),
    RowSpec(
        "out(eval)",
        "out(eval)",
        "out",
        "(N, D)",
        (
            "Eval mode normalises with the running statistics: the output of one example must not depend on "
            "the rest of the batch.",
            "running_mean and running_var are (D,); they broadcast over the N rows.",
            "xmean, xvar = self.running_mean, self.running_var (then the same normalisation)",
        ),
    ),
    RowSpec(
        "stats(eval)",
        "stats(eval)",
        "self.running_mean",
        "(2, D)",
        (
            "Eval mode reads the running statistics and never writes them.",
            "Nothing to compute here: [running_mean, running_var] after an eval call must equal those "
            "before it.",
            "in the else branch: only xmean = self.running_mean and xvar = self.running_var, no update",
        ),
        blank="xmean",
    ),
)


def _stats(x):
    return x.mean(0, keepdim=True), x.var(0, keepdim=True)  # (1, D), (1, D) Bessel


def _norm(x, mean, var, gamma, beta, eps=EPS):
    return gamma * (x - mean) * (var + eps) ** -0.5 + beta  # (N, D)


def probes() -> list[Probe]:
    out = []
    for name, (n, d), m, seed in (("a", (16, 5), 0.1, 1), ("b", (9, 3), 0.25, 2)):
        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn(n, d, generator=g, dtype=F64) * 2 + 1
        x2 = torch.randn(n // 2 + 1, d, generator=g, dtype=F64) * 3 - 1
        gamma = torch.randn(d, generator=g, dtype=F64)
        beta = torch.randn(d, generator=g, dtype=F64)
        rm = torch.randn(d, generator=g, dtype=F64)
        rv = torch.rand(d, generator=g, dtype=F64) + 0.5
        dout = torch.randn(n, d, generator=g, dtype=F64)
        mean, var = _stats(x1)
        var_inv = (var + EPS) ** -0.5  # (1, D)
        xhat = (x1 - mean) * var_inv  # (N, D)
        rm1, rv1 = (1 - m) * rm + m * mean[0], (1 - m) * rv + m * var[0]
        dgamma, dbeta = (xhat * dout).sum(0), dout.sum(0)
        dx = gamma * var_inv / n * (n * dout - dbeta - n / (n - 1) * xhat * dgamma)
        inputs = {
            "x1": x1,
            "x2": x2,
            "gamma": gamma,
            "beta": beta,
            "rm": rm,
            "rv": rv,
            "dout": dout,
            "xhat": xhat,
            "var_inv": var_inv,
            "rm1": rm1,
            "rv1": rv1,
            "m": torch.tensor(m, dtype=F64),
        }
        refs = {
            "out(train)": _norm(x1, mean, var, gamma, beta),
            "running_mean": rm1,
            "running_var": rv1,
            "dgamma": dgamma,
            "dbeta": dbeta,
            "dx": dx,
            "out(eval)": _norm(x2, rm1, rv1, gamma, beta),
            "stats(eval)": torch.stack([rm1, rv1]),
        }
        uses = {"dgamma": [(n, d)], "dbeta": [(n, d)]}
        out.append(
            Probe(name, f"N={n}, D={d}, momentum {m}, random dout", inputs, refs, uses=uses, random=True)
        )
    return out


def drive(rec: Recorder, base, i) -> None:
    """The child's side: build the learner's layer, train forward, backward, eval forward."""
    cls = rec.fn(base, "BatchNorm1d", [s.key for s in ROWS])
    d = i["x1"].shape[1]
    bn = rec.call([s.key for s in ROWS], cls, d)
    bn.gamma, bn.beta, bn.momentum = i["gamma"].clone(), i["beta"].clone(), float(i["m"])
    bn.running_mean, bn.running_var = i["rm"].clone(), i["rv"].clone()
    rows = ["out(train)", "running_mean", "running_var"]
    try:
        bn.training = True
        out = rec.call(rows, bn, i["x1"].clone())
        rec.put("out(train)", out)
        blank = out is None
        rec.put("running_mean", None if blank else getattr(bn, "running_mean", None))
        rec.put("running_var", None if blank else getattr(bn, "running_var", None))
    except Skip:
        pass
    rows = ["dx", "dgamma", "dbeta"]
    try:  # local grading: backward gets the right forward values
        bn.xhat, bn.var_inv, bn.gamma = i["xhat"].clone(), i["var_inv"].clone(), i["gamma"].clone()
        got = rec.unpack(rows, rec.call(rows, bn.backward, i["dout"].clone()), 3, "backward")
        for r, v in zip(rows, got):
            rec.put(r, v)
    except Skip:
        pass
    rows = ["out(eval)", "stats(eval)"]
    bn.running_mean, bn.running_var = i["rm1"].clone(), i["rv1"].clone()  # the right running statistics
    bn.training = False
    out = rec.call(rows, bn, i["x2"].clone())
    rec.put("out(eval)", out)
    rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    ok = isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and rm.shape == rv.shape
    rec.put("stats(eval)", None if out is None else (torch.stack([rm, rv]) if ok else rm))


def _biased(x):
    return x.var(0, keepdim=True, unbiased=False)


VARIANTS = {
    "out(train)": (
        Variant(
            "biased",
            K.BESSEL,
            "normalised with the variance over n; the lecture's batchnorm divides by "
            "n-1 (Bessel): x.var(0, keepdim=True)",
            lambda i: _norm(i["x1"], i["x1"].mean(0, keepdim=True), _biased(i["x1"]), i["gamma"], i["beta"]),
        ),
        Variant(
            "no-eps",
            K.EPS_LEFT_OUT,
            "eps left out: (var + eps) ** -0.5",
            lambda i: _norm(i["x1"], *_stats(i["x1"]), i["gamma"], i["beta"], 0.0),
        ),
        Variant(
            "running",
            BATCH_IN_EVAL,
            "normalised with the running statistics in training mode; training uses the batch's own",
            lambda i: _norm(i["x1"], i["rm"], i["rv"], i["gamma"], i["beta"]),
        ),
    ),
    "running_mean": (
        Variant(
            "not-updated",
            NOT_UPDATED,
            "not updated in training mode: the running mean must move towards the batch mean",
            lambda i: i["rm"],
        ),
        Variant(
            "momentum-swapped",
            MOMENTUM,
            "momentum the wrong way round: momentum * running + (1 - momentum) * batch",
            lambda i: i["m"] * i["rm"] + (1 - i["m"]) * i["x1"].mean(0),
        ),
        Variant(
            "momentum-0.1",
            MOMENTUM,
            "uses momentum 0.1 whatever self.momentum is",
            lambda i: 0.9 * i["rm"] + 0.1 * i["x1"].mean(0),
        ),
    ),
    "running_var": (
        Variant(
            "not-updated",
            NOT_UPDATED,
            "not updated in training mode: the running variance must move towards the batch variance",
            lambda i: i["rv"],
        ),
        Variant(
            "biased",
            K.BESSEL,
            "updated with the variance over n; use the n-1 variance (Bessel)",
            lambda i: (1 - i["m"]) * i["rv"] + i["m"] * _biased(i["x1"])[0],
        ),
        Variant(
            "momentum-swapped",
            MOMENTUM,
            "momentum the wrong way round: momentum * running + (1 - momentum) * batch",
            lambda i: i["m"] * i["rv"] + (1 - i["m"]) * i["x1"].var(0),
        ),
        Variant(
            "momentum-0.1",
            MOMENTUM,
            "uses momentum 0.1 whatever self.momentum is",
            lambda i: 0.9 * i["rv"] + 0.1 * i["x1"].var(0),
        ),
    ),
    "dgamma": (
        Variant(
            "at-x",
            K.INPUT_OUTPUT,
            "multiplied by x, the input; gamma multiplies xhat: (xhat * dout).sum(0)",
            lambda i: (i["x1"] * i["dout"]).sum(0),
        ),
        Variant(
            "swapped",
            K.WRONG_FACTOR,
            "dout.sum(0) is dbeta's; dgamma also needs xhat",
            lambda i: i["dout"].sum(0),
        ),
        Variant(
            "no-sum",
            K.SHAPE,
            "not summed over the batch: gamma is shared by every row (D,)",
            lambda i: i["xhat"] * i["dout"],
        ),
    ),
    "dbeta": (
        Variant(
            "no-sum",
            K.SHAPE,
            "not summed over the batch: beta is added to every row (D,)",
            lambda i: i["dout"].clone(),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the batch; the gradient sums: dout.sum(0)",
            lambda i: i["dout"].mean(0),
        ),
    ),
    "dx": (
        Variant(
            "biased",
            K.BESSEL,
            "the n/(n-1) factor is missing: the forward variance divides by n-1",
            lambda i: _dx(i, bessel=False),
        ),
        Variant(
            "no-mean-var",
            K.MISSING_BRANCH,
            "only the direct path gamma * var_inv * dout: x also reaches "
            "the output through the mean and the variance",
            lambda i: i["gamma"] * i["var_inv"] * i["dout"],
        ),
        Variant(
            "no-var",
            K.MISSING_BRANCH,
            "the path through the variance is missing (the xhat * dgamma term)",
            lambda i: i["gamma"] * i["var_inv"] * (i["dout"] - i["dout"].mean(0)),
        ),
        Variant(
            "no-mean",
            K.MISSING_BRANCH,
            "the path through the mean is missing (the - dout.sum(0) term)",
            lambda i: _dx(i, mean=False),
        ),
    ),
    "out(eval)": (
        Variant(
            "batch",
            BATCH_IN_EVAL,
            "eval mode used the batch's statistics; it must use the running ones",
            lambda i: _norm(i["x2"], *_stats(i["x2"]), i["gamma"], i["beta"]),
        ),
        Variant(
            "no-eps",
            K.EPS_LEFT_OUT,
            "eps left out: (running_var + eps) ** -0.5",
            lambda i: _norm(i["x2"], i["rm1"], i["rv1"], i["gamma"], i["beta"], 0.0),
        ),
    ),
    "stats(eval)": (
        Variant(
            "updated",
            UPDATED_IN_EVAL,
            "the running statistics changed in eval mode; only training updates them",
            lambda i: torch.stack(
                [
                    (1 - i["m"]) * i["rm1"] + i["m"] * i["x2"].mean(0),
                    (1 - i["m"]) * i["rv1"] + i["m"] * i["x2"].var(0),
                ]
            ),
        ),
    ),
}


def _dx(i, bessel=True, mean=True):
    n = i["dout"].shape[0]
    dgamma = (i["xhat"] * i["dout"]).sum(0)
    k = n / (n - 1) if bessel else 1.0
    return (
        i["gamma"]
        * i["var_inv"]
        / n
        * (n * i["dout"] - (i["dout"].sum(0) if mean else 0) - k * i["xhat"] * dgamma)
    )


def _judge(spec, probes, outs, meta, row):
    """stats(eval): any change in eval mode is the mistake, whatever the values."""
    if (
        row is not None
        and spec.key == "stats(eval)"
        and row.status == "wrong"
        and row.kind not in (UPDATED_IN_EVAL, K.SHAPE)
    ):
        row.kind, row.key = UPDATED_IN_EVAL, "changed"
        row.diagnosis = "the running statistics changed in eval mode; only training updates them"
    return row


ITEM = Item(
    "batchnorm",
    "challenge",
    "ch_batchnorm",
    "a BatchNorm1d class: train and eval forward, running statistics, backward",
    "BatchNorm1d: forward in train/eval mode with running stats (momentum), backward -> dx, dgamma, dbeta",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    VARIANTS,
    judge=_judge,
    alias="c",
)
