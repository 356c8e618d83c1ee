"""Grading in the lecture's own notebook: `from handgrad import dojo; dojo.grade(1, globals())` reads the
notebook's names (C ... bnbias, Xb, Yb and dlogprobs ... dC, Karpathy's "Becoming a Backprop Ninja")
and grades each gradient against its own step given the learner's upstream gradients, so one mistake
shows once, where it is, as with a file. Only values are read: no learner code runs here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from handgrad.check import Tolerance
from handgrad.dojo import exercises as E
from handgrad.dojo import graph as G
from handgrad.dojo.grade import Grade
from handgrad.dojo.judge import Row, diagnose
from handgrad.dojo.probes import Probe

INPUTS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias", "Xb", "Yb")  # the notebook's names
NB_RTOL = 1e-5  # a float32 answer: max |yours - right| within this of max |right| (the lecture's cmp)
CHECKED = ("hprebn", "logits", "loss")  # the notebook's own forward values, held against the recomputed
NB_MATCH_RTOL = 2e-5  # equals a catalogue entry, float32 rounding allowed


class NotebookError(ValueError):
    """The namespace cannot be graded (a forward input is missing or not a tensor): one line."""


def _tensor(ns: Mapping[str, object], k: str) -> Tensor:
    v = ns.get(k)
    if not isinstance(v, Tensor):
        what = "missing" if v is None else f"a {type(v).__name__}"
        raise NotebookError(f"{k} is {what}: run the notebook's setup and forward cells first")
    return v.detach()


def _tol(ref: Tensor, upstream: float = 0.0) -> Tolerance:
    """Float32 answers: within NB_RTOL of the larger of the answer's and its upstream gradient's largest
    entry (a gradient that is ~0 by the maths, like db1 under batchnorm, is float32 rounding of sums of
    upstream-sized terms)."""
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, upstream)
    return Tolerance(rtol=NB_RTOL, atol=max(NB_RTOL * scale, 1e-12))


def _forward(ex: E.Exercise, ns: Mapping[str, object], dtype: torch.dtype) -> dict[str, object]:
    """Every forward value the exercise's graph and catalogue read, recomputed from the notebook's
    parameters and batch (so a forward edited by hand cannot skew the grade)."""
    ins = {k: _tensor(ns, k) for k in INPUTS}
    ins = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ins.items()}
    full = G.LECTURE if ex.graph is G.LECTURE else G.CROSS_ENTROPY
    vals: dict[str, object] = G.forward(full, ins)
    if full is G.CROSS_ENTROPY:
        vals.update(G.bn_extras(vals["hprebn"]))
        vals["hpreact_fast"] = vals["hpreact"]
    n = ins["Xb"].shape[0]
    vals.update(
        n=n,
        batch_size=n,
        n_embd=ins["C"].shape[1],
        n_hidden=ins["W1"].shape[1],
        block_size=ins["Xb"].shape[1],
        vocab_size=ins["C"].shape[0],
    )
    return vals


def _seed(ex: E.Exercise, vals: dict, ns: Mapping[str, object]) -> Tensor | None:
    """Exercise 3 starts from dhpreact: the notebook's own (from exercise 1), else autograd's."""
    if ex.graph.seed == "loss":
        return None
    mine = ns.get(f"d{ex.graph.seed}")
    want = vals[ex.graph.seed]
    if isinstance(mine, Tensor) and tuple(mine.shape) == tuple(want.shape):
        return mine.detach().to(want.dtype)
    full = G.forward(G.LECTURE, {k: vals[k] for k in INPUTS})
    return G.true_grads(G.LECTURE, full)[ex.graph.seed]


def grade(exercise: int | str, namespace: Mapping[str, object], *, quiet: bool = False) -> Grade:
    """Grade the gradients a notebook holds (`globals()`): prints the table unless quiet, and returns
    the report (shown as an HTML table when it is a cell's value in Jupyter)."""
    ex = E.get(str(exercise))
    g = Grade("notebook", ex.key, probes=[
        "your notebook's own values, each gradient held against its step given your upstream gradients "
        f"(float64, to {NB_RTOL:g} of its largest entry: your values are float32)"
    ])
    if ex.kind == "training":  # after the loop the parameters are a step past the gradients it holds
        g.problem = (
            f"exercise {ex.key} is graded by its training run, from a file: handgrad dojo start {ex.key}, "
            f"then handgrad dojo grade {ex.slug}.py"
        )
    else:
        try:
            g.rows, g.notes = _rows(ex, namespace)
        except NotebookError as e:
            g.problem = str(e)
    if not quiet:
        print(g.table())
    return g


def _learner(ns: Mapping[str, object], name: str, want: Tensor) -> tuple[str, Tensor | None, str]:
    """(status, value in float64, words) for the notebook's d<name>."""
    v = ns.get(name)
    if v is None:
        return "missing", None, f"{name} is not defined yet"
    if not isinstance(v, Tensor):
        kind = type(v).__module__ + "." + type(v).__name__
        return "invalid", None, f"a {kind}, not a torch tensor"
    if not v.is_floating_point():
        return "invalid", None, f"a {str(v.dtype)[6:]} tensor: a gradient is floating point"
    return "value", v.detach().cpu().to(torch.float64), ""


def _rows(ex: E.Exercise, ns: Mapping[str, object]) -> tuple[list[Row], list[str]]:
    vals = _forward(ex, ns, torch.float64)
    seed = _seed(ex, vals, ns)
    if ex.graph is G.BATCHNORM:
        vals.update(G.forward(ex.graph, vals))
    truth = G.true_grads(ex.graph, vals, seed)
    vals32 = _forward(ex, ns, torch.float32)
    if ex.graph is G.BATCHNORM:
        vals32.update(G.forward(ex.graph, vals32))
    truth32 = G.true_grads(ex.graph, vals32, None if seed is None else seed.float())
    mine: dict[str, tuple[str, Tensor | None, str]] = {
        g: _learner(ns, f"d{g}", truth[g]) for g in ex.grads
    }
    # the upstream gradients fed to each step: the learner's own where usable, else the right ones
    feeds: dict[str, Tensor] = {}
    for g in ex.grads:
        st, a, _ = mine[g]
        feeds[g] = a if st == "value" and tuple(a.shape) == tuple(truth[g].shape) else truth[g]
    feeds[ex.graph.seed] = seed if seed is not None else torch.ones((), dtype=torch.float64)
    loc = G.local_vjps(ex.graph, vals, feeds)
    refs = {g: loc.total(g) for g in ex.grads}
    refs = {g: (truth[g] if r is None else r) for g, r in refs.items()}
    probe = Probe("notebook", "your notebook's values", dict(vals), feeds, refs, loc)
    if ex.graph.seed != "loss":
        probe.values[f"d{ex.graph.seed}"] = feeds[ex.graph.seed]
    notes = [
        f"your {k} is not the forward pass of your parameters and batch (the grade uses the lecture's "
        "forward, recomputed): run the forward cell again after changing them"
        for k in CHECKED
        if isinstance(ns.get(k), Tensor)
        and not (
            tuple(ns[k].shape) == tuple(vals[k].shape)
            and torch.allclose(ns[k].detach().double().cpu(), vals[k], rtol=1e-4, atol=1e-5)
        )
    ]
    rows = []
    for g in ex.grads:
        st, a, words = mine[g]
        row = Row(f"d{g}", tuple(truth[g].shape), "missing")
        rows.append(row)
        if st != "value":
            row.status = "missing" if st == "missing" else "invalid"
            row.diagnosis = words
            continue
        raw = ns[f"d{g}"]
        row.exact = bool(raw.dtype == torch.float32 and tuple(raw.shape) == tuple(truth32[g].shape)
                         and torch.equal(raw.detach().cpu(), truth32[g]))
        up = max((float(feeds[c].abs().max()) for c in ex.graph.consumers(g) if c in feeds), default=0.0)
        tol = _tol(refs[g], up)
        row.chain = tuple(a.shape) == tuple(truth[g].shape) and _tol(truth[g], up).holds(a, truth[g])
        if tuple(a.shape) == tuple(refs[g].shape) and tol.holds(a, refs[g]):
            row.status = "ok"
            continue
        row.status = "wrong"
        row.kind, row.key, row.diagnosis = diagnose(
            ex.graph, ex.table, g, [(probe, a)], [], tol=tol, match_rtol=NB_MATCH_RTOL
        )
    return rows, notes
