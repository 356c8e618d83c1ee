"""Challenge e: the embedding backward with repeated indices (the lecture's dC): emb = C[X], so each
row of C collects the gradients of every position that looked it up.
"""

from __future__ import annotations

import torch

from handgrad.dojo import catalogue as K
from handgrad.dojo.catalogue import Variant
from handgrad.dojo.framework import Item, Probe, RowSpec

F64 = torch.float64

TEXT = '''"""Challenge: backprop through an embedding lookup, where indices repeat.

    emb = C[X]   # C (V, E) the embedding table, X (N, T) int64 indices, emb (N, T, E)

demb (N, T, E) is the upstream gradient. Characters repeat in a batch (X holds the same index many
times), and a row of C that nobody looked up gets no gradient. Fill in the `None  # TODO`, run this
file to compare with autograd, then run
    handgrad dojo grade ch_embedding.py
"""
import torch


def embedding_backward(C, X, demb):
    """Return dC (V, E), the gradient of (C[X] * demb).sum() with respect to C."""
    @@0@@
    return dC


if __name__ == "__main__":
    torch.manual_seed(42)
    C = torch.randn(27, 10, dtype=torch.float64, requires_grad=True)
    X = torch.randint(0, 27, (32, 3))
    demb = torch.randn(32, 3, 10, dtype=torch.float64)
    (C[X] * demb).sum().backward()  # autograd, only to compare with
    with torch.no_grad():
        dC = embedding_backward(C, X, demb)
    ok = dC is not None and dC.shape == C.shape and torch.allclose(dC, C.grad)
    print("dC", "ok" if ok else "not yet")
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = ("# >>> your code\ndC = None  # TODO (V, E)\n# <<<",)
SOLUTION = (
    "# >>> your code\n"
    "dC = torch.zeros_like(C)  # (V, E)\n"
    "dC.index_add_(0, X.reshape(-1), demb.reshape(-1, C.shape[1]))  # accumulates repeated indices\n"
    "# <<<",
)

ROWS = (
    RowSpec(
        "dC",
        "dC",
        "dC",
        "(V, E)",
        (
            "Each position (i, t) copied row X[i, t] of C, so that row receives demb[i, t]; a row used k "
            "times receives the sum of k gradients, and an unused row gets zero.",
            "Start from zeros shaped like C (V, E); X flattened is (N*T,), demb flattened is (N*T, E).",
            "dC = torch.zeros_like(C); dC.index_add_(0, X.view(-1), demb.view(-1, E))  (or a loop with +=)",
        ),
    ),
)


def _ref(C, X, demb):
    dC = torch.zeros_like(C)  # (V, E)
    for k in range(X.shape[0]):  # written as the lecture's loop: the reference is plain to read
        for j in range(X.shape[1]):
            dC[X[k, j]] += demb[k, j]
    return dC


def _assign(C, X, demb):
    """dC[X] = demb (or dC[X] += demb): advanced indexing keeps one of the repeated contributions."""
    dC = torch.zeros_like(C)
    dC[X] = demb
    return dC


def probes() -> list[Probe]:
    out = []
    for name, (v, e, n, t), seed in (("lecture", (27, 10, 32, 3), 1), ("small", (6, 4, 9, 2), 2)):
        g = torch.Generator().manual_seed(seed)
        C = torch.randn(v, e, generator=g, dtype=F64)
        X = torch.randint(0, v - 1, (n, t), generator=g)  # the last row of C is never looked up
        X[0, 0] = X[1, 0] = X[2, 1] = 3  # an index used three times, at least
        demb = torch.randn(n, t, e, generator=g, dtype=F64)
        about = f"V={v}, E={e}, X {n}x{t} with repeats, random demb"
        out.append(Probe(name, about, {"C": C, "X": X, "demb": demb}, {"dC": _ref(C, X, demb)}, random=True))
    return out


def drive(rec, base, i) -> None:
    """The child's side: call the learner's function on one probe's inputs."""
    f = rec.fn(base, "embedding_backward", ["dC"])
    rec.put("dC", rec.call(["dC"], f, i["C"], i["X"], i["demb"]))


def _repeated(X) -> set[int]:
    vals, counts = X.reshape(-1).unique(return_counts=True)
    return set(vals[counts > 1].tolist())


VARIANTS = {
    "dC": (
        Variant(
            "overwrite",
            K.OVERWRITE,
            "overwritten instead of accumulated: dC[X] = demb (or "
            "dC[X] += demb, which also keeps one contribution per repeated index); use index_add_ or a "
            "loop with +=",
            lambda i: _assign(i["C"], i["X"], i["demb"]),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged the contributions of a repeated index; they add up",
            lambda i: (
                i.refs["dC"]
                / torch.bincount(i["X"].reshape(-1), minlength=i["C"].shape[0]).clamp(min=1).to(F64)[:, None]
            ),
        ),
    ),
}


def _judge(spec, probes, outs, meta, row):
    """Name overwriting by where it is wrong: only rows of C whose index repeats in X (which of the
    repeated contributions survives an indexed assignment is not specified, so no variant fixes it)."""
    from handgrad.check import autograd_tolerance

    if row is None or row.status != "wrong" or row.kind == K.OVERWRITE:
        return row
    tol = autograd_tolerance(F64)
    for p in probes:
        a, ref = outs.get(f"{p.name}|dC"), p.refs["dC"]
        if a is None or a.shape != ref.shape:
            return row
        bad = ~((a - ref).abs() <= tol.atol + tol.rtol * ref.abs())
        rows = [k for k in range(bad.shape[0]) if bool(bad[k].any())]
        rep = _repeated(p.inputs["X"])
        if rows and set(rows) <= rep:
            row.kind, row.key = K.OVERWRITE, "overwrite-rows"
            row.diagnosis = (
                f"wrong only on rows {', '.join(map(str, rows[:8]))} of dC, each an index "
                "that repeats in X: contributions were overwritten instead of accumulated "
                "(use += in a loop, or index_add_)"
            )
            return row
        unused = set(range(ref.shape[0])) - set(p.inputs["X"].reshape(-1).tolist())
        if rows and set(rows) <= unused:
            row.kind, row.key = K.ROWS, "unused-rows"
            row.diagnosis = (
                f"wrong only on rows {', '.join(map(str, rows[:8]))} of dC, which no position "
                "looked up: they must be zero (start from torch.zeros_like(C), not torch.empty)"
            )
            return row
    return row


ITEM = Item(
    "embedding",
    "challenge",
    "ch_embedding",
    "the embedding backward with repeated indices",
    "dC for emb = C[X] when X repeats indices (accumulate, do not overwrite)",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    VARIANTS,
    judge=_judge,
    alias="e",
)
