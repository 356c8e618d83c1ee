"""Challenge a: backward through `z = x @ W + b; a = tanh(z); loss = a.sum()` (the lecture's linear
layer and tanh, cf. micrograd): tanh_backward gives dz, linear_backward gives dx, dW, db.
"""

from __future__ import annotations

import torch

from handgrad.dojo import catalogue as K
from handgrad.dojo.catalogue import Variant
from handgrad.dojo.framework import Item, Probe, RowSpec

F64 = torch.float64

TEXT = '''"""Challenge: backprop through a linear layer and a tanh by hand.

    z = x @ W + b      # (N, H)   x (N, D), W (D, H), b (H,)
    a = torch.tanh(z)  # (N, H)
    loss = a.sum()     # so da = torch.ones_like(a); the grader also sends other upstream gradients da

Fill in each `None  # TODO` below, run this file to compare with autograd, then run
    handgrad dojo grade ch_linear_tanh.py
Each function is graded on its own, with the right inputs fed in (a wrong dz does not spoil dW).
"""
import torch


def tanh_backward(z, a, da):
    """a = tanh(z); da is dloss/da (N, H). Return dz (N, H)."""
    @@0@@
    return dz


def linear_backward(x, W, b, dz):
    """z = x @ W + b; dz is dloss/dz (N, H). Return dx (N, D), dW (D, H), db (H,)."""
    @@1@@
    return dx, dW, db


if __name__ == "__main__":
    torch.manual_seed(42)
    N, D, H = 5, 4, 3
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(H, dtype=torch.float64, requires_grad=True)
    z = x @ W + b
    a = torch.tanh(z)
    loss = a.sum()
    loss.backward()  # autograd, only to compare with
    with torch.no_grad():
        dz = tanh_backward(z, a, torch.ones_like(a))
        dx, dW, db = linear_backward(x, W, b, dz)
    for name, mine, ref in (("dx", dx, x.grad), ("dW", dW, W.grad), ("db", db, b.grad)):
        ok = mine is not None and mine.shape == ref.shape and torch.allclose(mine, ref)
        print(f"{name:3s} {'ok' if ok else 'not yet'}")
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = (
    "# >>> your code\ndz = None  # TODO (N, H)\n# <<<",
    "# >>> your code\ndx = None  # TODO (N, D)\ndW = None  # TODO (D, H)\ndb = None  # TODO (H,)\n# <<<",
)
SOLUTION = (
    "# >>> your code\ndz = (1 - a**2) * da  # tanh' written with the output: 1 - tanh(z)**2\n# <<<",
    "# >>> your code\ndx = dz @ W.T\ndW = x.T @ dz\ndb = dz.sum(0)  # b is broadcast over the N rows\n# <<<",
)

ROWS = (
    RowSpec(
        "dz",
        "dz",
        "dz",
        "(N, H)",
        (
            "The chain rule: dz = (local derivative da/dz) * da, element by element.",
            "tanh'(z) = 1 - tanh(z)**2, and tanh(z) is already computed: it is a. Everything here is (N, H).",
            "dz = (1 - a**2) * da",
        ),
    ),
    RowSpec(
        "dx",
        "dx",
        "dx",
        "(N, D)",
        (
            "z = x @ W: each x[i, k] meets every W[k, j]; sum dz[i, j] * W[k, j] over j.",
            "dz is (N, H) and W is (D, H); the answer is (N, D): which product of those two gives (N, D)?",
            "dx = dz @ W.T",
        ),
    ),
    RowSpec(
        "dW",
        "dW",
        "dW",
        "(D, H)",
        (
            "Each W[k, j] is used by every row i: sum x[i, k] * dz[i, j] over the batch.",
            "x is (N, D) and dz is (N, H); the answer is (D, H): contract over N.",
            "dW = x.T @ dz",
        ),
    ),
    RowSpec(
        "db",
        "db",
        "db",
        "(H,)",
        (
            "b is added to every row of x @ W (broadcast), so its gradient collects every row's dz.",
            "dz is (N, H) and b is (H,): the batch dimension must be summed away, not kept.",
            "db = dz.sum(0)",
        ),
    ),
)


def _ref(x, W, b, da):
    z = x @ W + b  # (N, H)
    a = torch.tanh(z)  # (N, H)
    dz = (1 - a**2) * da  # (N, H)
    return z, a, dz, {"dz": dz, "dx": dz @ W.T, "dW": x.T @ dz, "db": dz.sum(0)}


def probes() -> list[Probe]:
    out = []
    for name, (n, d, h), ones, seed in (
        ("ones", (5, 4, 3), True, 1),  # the loss as written: da = 1
        ("random", (7, 3, 6), False, 2),  # random upstream gradient
        ("square", (4, 5, 5), False, 3),  # D == H: a transpose keeps its shape
    ):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=F64)
        W = torch.randn(d, h, generator=g, dtype=F64) * 0.7
        b = torch.randn(h, generator=g, dtype=F64)
        da = torch.ones(n, h, dtype=F64) if ones else torch.randn(n, h, generator=g, dtype=F64)
        z, a, dz, refs = _ref(x, W, b, da)
        about = f"N={n}, D={d}, H={h}, " + ("da = 1" if ones else "random da")
        inputs = {"x": x, "W": W, "b": b, "z": z, "a": a, "da": da, "dz": dz}
        out.append(Probe(name, about, inputs, refs, uses={"db": [(n, h)]}, random=not ones))
    return out


def drive(rec, base, i) -> None:
    """The child's side: call the learner's two functions on one probe's inputs."""
    f = rec.fn(base, "tanh_backward", ["dz"])
    rec.put("dz", rec.call(["dz"], f, i["z"], i["a"], i["da"]))
    rows = ["dx", "dW", "db"]
    f = rec.fn(base, "linear_backward", rows)
    got = rec.unpack(rows, rec.call(rows, f, i["x"], i["W"], i["b"], i["dz"]), 3, "linear_backward")
    for r, v in zip(rows, got):
        rec.put(r, v)


VARIANTS = {
    "dz": (
        Variant(
            "1-a",
            K.TANH,
            "uses 1 - a where tanh' is 1 - a**2 (= 1 - tanh(z)**2)",
            lambda i: (1 - i["a"]) * i["da"],
        ),
        Variant(
            "at-input",
            K.INPUT_OUTPUT,
            "the local derivative 1 - (.)**2 taken at the input z; it needs the output a = tanh(z)",
            lambda i: (1 - i["z"] ** 2) * i["da"],
        ),
        Variant(
            "tanh-of-a",
            K.INPUT_OUTPUT,
            "1 - tanh(a)**2 applies tanh to the output again; a is already tanh(z): 1 - a**2",
            lambda i: (1 - torch.tanh(i["a"]) ** 2) * i["da"],
        ),
        Variant(
            "sigmoid",
            K.WRONG_FACTOR,
            "a * (1 - a) is sigmoid's derivative; tanh's is 1 - a**2",
            lambda i: i["a"] * (1 - i["a"]) * i["da"],
        ),
        Variant(
            "no-upstream",
            K.NO_UPSTREAM,
            "the local derivative 1 - a**2 alone: multiply by da (chain rule)",
            lambda i: 1 - i["a"] ** 2,
        ),
        Variant(
            "no-local",
            K.NO_LOCAL,
            "passes da through unchanged: tanh's local derivative 1 - a**2 is missing",
            lambda i: i["da"].clone(),
        ),
    ),
    "dx": (
        Variant(
            "dz@W",
            K.TRANSPOSED,
            "W used untransposed: dz @ W; it must be dz @ W.T",
            lambda i: i["dz"] @ i["W"],
        ),
        Variant(
            "W@dzT",
            K.TRANSPOSED,
            "transposed: W @ dz.T is (D, N); dx is dz @ W.T (N, D)",
            lambda i: i["W"] @ i["dz"].T,
        ),
    ),
    "dW": (
        Variant(
            "dzT@x",
            K.TRANSPOSED,
            "transposed: dz.T @ x is (H, D); dW is x.T @ dz (D, H)",
            lambda i: i["dz"].T @ i["x"],
        ),
        Variant(
            "x@dz",
            K.TRANSPOSED,
            "x used untransposed: x @ dz; it must be x.T @ dz",
            lambda i: i["x"] @ i["dz"],
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the batch; the loss is a sum, so dW sums: x.T @ dz",
            lambda i: i["x"].T @ i["dz"] / i["x"].shape[0],
        ),
    ),
    "db": (
        Variant(
            "no-sum",
            K.SHAPE,
            "dz not summed over the batch: b is added to each of the N rows, so db "
            "is dz.sum(0) with shape (H,)",
            lambda i: i["dz"].clone(),
        ),
        Variant(
            "keepdim",
            K.SHAPE,
            "summed with keepdim=True: (1, H), but b is (H,)",
            lambda i: i["dz"].sum(0, keepdim=True),
        ),
        Variant(
            "sum-dim1",
            K.WRONG_DIM,
            "summed over dim 1 (the features); the batch is dim 0",
            lambda i: i["dz"].sum(1),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the batch (mean); the loss is a sum: dz.sum(0)",
            lambda i: i["dz"].mean(0),
        ),
        Variant(
            "sum-all",
            K.WRONG_DIM,
            "summed over everything (a number); sum over the batch only",
            lambda i: i["dz"].sum(),
        ),
    ),
}

ITEM = Item(
    "linear-tanh",
    "challenge",
    "ch_linear_tanh",
    "linear + tanh backward: dz, dx, dW, db",
    "z = x @ W + b; a = tanh(z); loss = a.sum(): dW, db, dx by hand",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    VARIANTS,
    alias="a",
)
