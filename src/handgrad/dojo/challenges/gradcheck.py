"""Challenge d: a finite-difference gradient checker (check.py's central differences and gradcheck's
|a - n| <= atol + rtol * |n| rule), graded by feeding it right and planted wrong gradients.
"""

from __future__ import annotations

import torch

from handgrad.dojo import catalogue as K
from handgrad.dojo.framework import Item, Probe, RowSpec
from handgrad.dojo.judge import Row, behaviour
from handgrad.dojo.runner import Recorder, Skip

F64 = torch.float64

TOO_STRICT = "rejects-right"  # a right gradient rejected
FOOLED = "accepts-wrong"  # a wrong gradient accepted

TEXT = '''"""Challenge: write a finite-difference gradient checker.

gradcheck(f, x, analytic) gets a function f of a float64 tensor x that returns a number (a 0-dim
tensor), and a claimed gradient `analytic`. Return True when analytic is the gradient of f at x:
the same shape as x, and every element within atol + rtol * |numeric| of the central difference
(f(x + eps e_i) - f(x - eps e_i)) / (2 eps). Return False otherwise. Leave x as you found it.
Fill in the `None  # TODO`, run this file, then run
    handgrad dojo grade ch_gradcheck.py
"""
import torch


def gradcheck(f, x, analytic, eps=1e-6, rtol=1e-5, atol=1e-7):
    @@0@@
    return verdict


if __name__ == "__main__":
    x = torch.randn(5, dtype=torch.float64)
    print("right gradient accepted:", gradcheck(lambda t: torch.sin(t).sum(), x, torch.cos(x)))
    print("wrong gradient rejected:", not gradcheck(lambda t: torch.sin(t).sum(), x, -torch.cos(x)))
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = ("# >>> your code\nverdict = None  # TODO: True or False\n# <<<",)
SOLUTION = (
    "# >>> your code\n"
    "if not isinstance(analytic, torch.Tensor) or analytic.shape != x.shape:\n"
    "    return False  # a broadcast would hide a wrong shape\n"
    "numeric = torch.zeros_like(x)\n"
    "flat, nflat = x.view(-1), numeric.view(-1)\n"
    "for k in range(flat.numel()):\n"
    "    old = flat[k].item()\n"
    "    flat[k] = old + eps\n"
    "    fp = f(x).item()\n"
    "    flat[k] = old - eps\n"
    "    fm = f(x).item()\n"
    "    flat[k] = old  # restore x\n"
    "    nflat[k] = (fp - fm) / (2 * eps)\n"
    "verdict = bool(((analytic - numeric).abs() <= atol + rtol * numeric.abs()).all())\n"
    "# <<<",
)

_G = torch.Generator().manual_seed(0)
A = torch.randn(3, 3, generator=_G, dtype=F64)  # the matrix case's weights
FUNS = {
    "sin": lambda x: torch.sin(x).sum(),
    "matrix": lambda X: torch.tanh(X @ A).sum(),
    "const": lambda x: 2.5 * x.sum(),
}

# (row, function, what is fed, it must be accepted, kind when the verdict is wrong, words)
CASES = (
    ("accepts right (sin)", "sin", "right", True, TOO_STRICT, "rejected a right gradient of sin(x).sum()"),
    (
        "accepts right (matrix)",
        "matrix",
        "right",
        True,
        TOO_STRICT,
        "rejected a right gradient of tanh(X @ A).sum() (a matrix x: check every element, x.view(-1))",
    ),
    ("rejects sign", "sin", "sign", False, K.SIGN, "accepted a gradient with its sign flipped"),
    (
        "rejects one element",
        "matrix",
        "one",
        False,
        K.ROWS,
        "accepted a gradient with one element off by 1e-3: compare every element (all, not a mean), "
        "within atol + rtol * |n| (rtol 1e-5)",
    ),
    (
        "rejects 3% off",
        "sin",
        "scaled",
        False,
        K.SCALE,
        "accepted a gradient 3% too large (like n/(n-1)): the tolerance is too loose, use atol + rtol * |n|",
    ),
    ("rejects transposed", "matrix", "transposed", False, K.TRANSPOSED, "accepted the transposed gradient"),
    (
        "rejects shape (1, n)",
        "sin",
        "row",
        False,
        K.SHAPE,
        "accepted a (1, 5) gradient for a (5,) x: compare shapes first, allclose and - broadcast",
    ),
    (
        "rejects broadcast (1,)",
        "const",
        "one-number",
        False,
        K.SHAPE,
        "accepted a single number (1,) for a (5,) gradient of 2.5 * x.sum(): compare shapes first",
    ),
)
_HINTS = (
    "Perturb one element of x at a time by +eps and -eps, call f, and difference; then compare each "
    "element with the rule |a - n| <= atol + rtol * |n|.",
    "The numeric gradient has x's shape; a claimed gradient of another shape is wrong even if it broadcasts.",
    "shape check; for k: x.view(-1)[k] +- eps, numeric[k] = (fp - fm) / (2 eps); restore x; compare all",
)
ROWS = tuple(RowSpec(c[0], c[0], "verdict", "", _HINTS, tensor=False) for c in CASES) + (
    RowSpec(
        "x unchanged",
        "x unchanged",
        "verdict",
        "",
        (
            "A checker that moves x and forgets to move it back checks the next element at the wrong point.",
            "Keep the old value of the element (a Python float), and write it back after the two calls.",
            "old = flat[k].item(); ...; flat[k] = old",
        ),
        tensor=False,
    ),
)


def _analytic(fun: str, x, kind: str):
    xr = x.clone().requires_grad_()
    FUNS[fun](xr).backward()
    g = xr.grad.detach()
    if kind == "sign":
        return -g
    if kind == "scaled":
        return g * 1.03
    if kind == "one":
        g = g.clone()
        g.view(-1)[4] += 1e-3
        return g
    if kind == "transposed":
        return g.T.contiguous()
    if kind == "row":
        return g.reshape(1, -1)
    if kind == "one-number":
        return g[:1].clone()
    return g


def probes() -> list[Probe]:
    g = torch.Generator().manual_seed(1)
    xs = {
        "sin": torch.randn(5, generator=g, dtype=F64),
        "matrix": torch.randn(3, 3, generator=g, dtype=F64),
        "const": torch.randn(5, generator=g, dtype=F64),
    }
    inputs: dict = {}
    for k, (_, fun, kind, _, _, _) in enumerate(CASES):
        inputs[f"x{k}"] = xs[fun].clone()
        inputs[f"a{k}"] = _analytic(fun, xs[fun], kind)
    refs: dict = {c[0]: c[3] for c in CASES} | {"x unchanged": True}
    return [Probe("cases", "right and planted wrong gradients", inputs, refs)]


def drive(rec: Recorder, base, i) -> None:
    """The child's side: the learner's checker on each planted case."""
    f = rec.fn(base, "gradcheck", [s.key for s in ROWS])
    unchanged = True
    for k, (row, fun, *_rest) in enumerate(CASES):
        x = i[f"x{k}"].clone()
        try:
            v = rec.call([row], f, FUNS[fun], x, i[f"a{k}"].clone())
        except Skip:
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype == torch.bool:
            v = bool(v)
        if isinstance(v, bool) or v is None:
            rec.put(row, v)
        else:  # not a verdict: judged (and named) as such
            rec.meta[row] = {"status": "value", "scalar": repr(v)[:40]}
        unchanged = unchanged and bool(torch.equal(x, i[f"x{k}"]))
    rec.put(
        "x unchanged",
        unchanged if any(rec.meta.get(c[0], {}).get("status") == "value" for c in CASES) else None,
    )


def _judge(spec: RowSpec, probes, outs, meta, row) -> Row | None:
    if spec.tensor:
        return row
    got = behaviour(spec, probes, meta)
    if isinstance(got, Row):
        return got
    row, vals = got
    v = vals["cases"]
    want = probes[0].refs[spec.key]
    if not isinstance(v, bool):
        row.status, row.kind, row.diagnosis = "wrong", K.OTHER, f"returned {v!r}, not True or False"
    elif v != want:
        case = next((c for c in CASES if c[0] == spec.key), None)
        row.status = "wrong"
        row.kind, row.diagnosis = (
            (case[4], case[5])
            if case
            else (K.OTHER, "x was changed: put each element back after perturbing it")
        )
    return row


ITEM = Item(
    "gradcheck",
    "challenge",
    "ch_gradcheck",
    "a finite-difference gradient checker",
    "gradcheck(f, x, analytic) by central differences: accept right, reject planted wrong gradients",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    {},
    judge=_judge,
    alias="d",
)
