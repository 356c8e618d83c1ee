"""Challenge b: the cross-entropy backward in one line (the lecture's exercise 2, as a function):
dlogits = (softmax(logits, 1) - onehot(Y)) / n, times the upstream dloss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handgrad.dojo import catalogue as K
from handgrad.dojo.catalogue import Variant
from handgrad.dojo.framework import Item, Probe, RowSpec

F64 = torch.float64

TEXT = '''"""Challenge: the cross-entropy backward as a one-liner.

    loss = F.cross_entropy(logits, Y)   # the mean over the n rows of -log softmax(logits)[i, Y[i]]

logits (n, V) float64, Y (n,) int64 class indices (they repeat). dloss is the upstream gradient of
loss (1.0 when loss is what you minimise; the grader also sends others). Fill in the `None  # TODO`,
run this file to compare with autograd, then run
    handgrad dojo grade ch_cross_entropy.py
"""
import torch
import torch.nn.functional as F


def cross_entropy_backward(logits, Y, dloss):
    """Return dlogits (n, V), the gradient of dloss * F.cross_entropy(logits, Y)."""
    n = logits.shape[0]
    @@0@@
    return dlogits


if __name__ == "__main__":
    torch.manual_seed(42)
    logits = torch.randn(32, 27, dtype=torch.float64, requires_grad=True)
    Y = torch.randint(0, 27, (32,))
    F.cross_entropy(logits, Y).backward()  # autograd, only to compare with
    with torch.no_grad():
        dlogits = cross_entropy_backward(logits, Y, 1.0)
    ok = dlogits is not None and dlogits.shape == logits.shape and torch.allclose(dlogits, logits.grad)
    print("dlogits", "ok" if ok else "not yet")
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = ("# >>> your code: one line\ndlogits = None  # TODO (n, V)\n# <<<",)
SOLUTION = (
    "# >>> your code: one line\n"
    "dlogits = dloss * (F.softmax(logits, 1) - F.one_hot(Y, logits.shape[1]).to(logits.dtype)) / n\n"
    "# <<<",
)

ROWS = (
    RowSpec(
        "dlogits",
        "dlogits",
        "dlogits",
        "(n, V)",
        (
            "The loss is the mean of -log p[i, Y[i]] with p = softmax(logits): each row gets p minus the "
            "one-hot of its target, and the mean divides by n.",
            "softmax is over each row (dim 1), so p is (n, V); the one-hot of Y is (n, V); dloss is a "
            "number.",
            "dlogits = dloss * (F.softmax(logits, 1) - F.one_hot(Y, V)) / n",
        ),
    ),
)


def _softmax(logits, dim=1):
    return F.softmax(logits, dim)


def _onehot(i):
    return F.one_hot(i["Y"], i["logits"].shape[1]).to(F64)


def _ref(logits, Y, dloss):
    n = logits.shape[0]
    return dloss * (_softmax(logits) - F.one_hot(Y, logits.shape[1]).to(F64)) / n  # (n, V)


def probes() -> list[Probe]:
    out = []
    for name, (n, v), dloss, big, seed in (
        ("lecture", (32, 27), 1.0, 0.0, 1),
        ("upstream", (13, 5), -0.37, 0.0, 2),  # another dloss: is the upstream gradient used?
        ("large", (9, 7), 2.5, 800.0, 3),  # logits near 800: exp overflows unless the row max is subtracted
    ):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(n, v, generator=g, dtype=F64) * 2 + big
        Y = torch.randint(0, v, (n,), generator=g)
        Y[1] = Y[0]  # a repeated class at least once
        d = torch.tensor(dloss, dtype=F64)
        about = f"n={n}, V={v}, dloss={dloss:g}" + (", logits near 800" if big else "")
        refs = {"dlogits": _ref(logits, Y, dloss)}
        out.append(Probe(name, about, {"logits": logits, "Y": Y, "dloss": d}, refs, random=dloss != 1.0))
    return out


def drive(rec, base, i) -> None:
    """The child's side: call the learner's function on one probe's inputs."""
    f = rec.fn(base, "cross_entropy_backward", ["dlogits"])
    rec.put("dlogits", rec.call(["dlogits"], f, i["logits"], i["Y"], float(i["dloss"])))


def _n(i):
    return i["logits"].shape[0]


VARIANTS = {
    "dlogits": (
        Variant(
            "no-minus-one",
            K.SOFTMAX_MINUS_ONE,
            "softmax without the -1: subtract the one-hot of Y "
            "(1 at each row's target) from the probabilities",
            lambda i: i["dloss"] * _softmax(i["logits"]) / _n(i),
        ),
        Variant(
            "no-1/n",
            K.SCALE_N,
            "the 1/n of the mean is missing: the loss averages over the n rows",
            lambda i: i["dloss"] * (_softmax(i["logits"]) - _onehot(i)),
        ),
        Variant(
            "softmax-dim0",
            K.WRONG_DIM,
            "softmax over dim 0 (the batch); each row's probabilities are over its V classes: dim 1",
            lambda i: i["dloss"] * (_softmax(i["logits"], 0) - _onehot(i)) / _n(i),
        ),
        Variant(
            "no-dloss",
            K.NO_UPSTREAM,
            "the upstream gradient dloss is not multiplied in (chain rule)",
            lambda i: (_softmax(i["logits"]) - _onehot(i)) / _n(i),
        ),
        Variant(
            "minus-one-all",
            K.SOFTMAX_MINUS_ONE,
            "1 subtracted from every entry; only the target entry of each row gets the -1",
            lambda i: i["dloss"] * (_softmax(i["logits"]) - 1) / _n(i),
        ),
        Variant(
            "log-softmax",
            K.OTHER,
            "log_softmax where the gradient needs softmax (the probabilities)",
            lambda i: i["dloss"] * (F.log_softmax(i["logits"], 1) - _onehot(i)) / _n(i),
        ),
        Variant(
            "mean-over-all",
            K.SCALE_N,
            "divided by n*V (numel); the mean is over the n rows only",
            lambda i: i["dloss"] * (_softmax(i["logits"]) - _onehot(i)) / i["logits"].numel(),
        ),
    ),
}


def _overflow(spec, probes, outs, meta, row):
    """Exp overflow shows only at large logits: name it there before the generic diagnosis."""
    a = outs.get(f"large|{spec.key}")
    if row is not None and row.status == "wrong" and a is not None and not torch.isfinite(a).all():
        row.kind, row.key = K.NONFINITE, "overflow"
        row.diagnosis = (
            "NaN/inf at logits near 800: exp overflowed; subtract each row's max before exp "
            "(softmax does not change), or use F.softmax"
        )
    return row


ITEM = Item(
    "cross-entropy",
    "challenge",
    "ch_cross_entropy",
    "the cross-entropy backward in one line",
    "dlogits of F.cross_entropy(logits, Y) as a one-liner (softmax - onehot) / n",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    VARIANTS,
    judge=_overflow,
    alias="b",
)
