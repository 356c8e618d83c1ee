"""Judge a learner's gradients (parent side): ok / wrong / missing / error per gradient, and for a
wrong one the mistake named: the catalogue entry it equals, else a shape, scale, row or probe pattern.
Verdicts use check.py's float64 tolerance; the exact column is float32 bitwise equality with autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from handgrad.check import Tolerance, autograd_tolerance
from handgrad.dojo import catalogue as K
from handgrad.dojo.graph import Graph
from handgrad.dojo.probes import Probe

F32_RTOL = 1e-5  # float32: max |yours - autograd's| within this of autograd's largest entry
MATCH_RTOL = 1e-8  # an answer "equals" a catalogue entry: float64 rounding sits ~1e7 below this


@dataclass
class Row:
    """One graded gradient (or one graded behaviour of a challenge)."""

    name: str  # the learner's variable, e.g. "dprobs"
    shape: tuple[int, ...]  # the shape it must have
    status: str  # ok | wrong | missing | error | invalid
    diagnosis: str = ""  # why it is wrong, in the learner's terms; the error; the blank's line
    kind: str = ""  # the mistake's kind (catalogue.SIGN, ...), '' when ok
    key: str = ""  # the catalogue entry it equals, if any
    exact: bool | None = None  # float32 bit-exact with autograd (None: not measured)
    chain: bool | None = None  # end to end: the learner's own chain gives the right value here
    line: int | None = None
    max_rel: float = math.nan  # max |yours - right| / max |right| on the first failing probe
    grad: bool = True  # a gradient d<name>; False: a behaviour ("loss curve"), named as it is

    @property
    def target(self) -> str:
        """What the summary's "next:" names: the gradient (dbnvar_inv), or the behaviour (loss curve)."""
        return self.name

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "name",
                "shape",
                "status",
                "diagnosis",
                "kind",
                "key",
                "exact",
                "chain",
                "line",
                "max_rel",
                "grad",
            )
        }


def close(a: Tensor, b: Tensor, tol: Tolerance) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and tol.holds(a, b)


def _matches(a: Tensor, w: Tensor, ref: Tensor, rtol: float = MATCH_RTOL) -> bool:
    """a equals w up to float64 rounding, relative to the size of the numbers involved."""
    if tuple(a.shape) != tuple(w.shape) or not torch.isfinite(w).all():
        return False
    scale = max(
        float(w.abs().max()) if w.numel() else 0.0, float(ref.abs().max()) if ref.numel() else 0.0, 1e-30
    )
    return bool(((a.double() - w.double()).abs() <= rtol * scale).all())


def _rel(a: Tensor, ref: Tensor) -> float:
    if tuple(a.shape) != tuple(ref.shape) or not ref.numel():
        return math.nan
    s = float(ref.abs().max())
    d = float((a.double() - ref.double()).abs().max())
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)


def _fmt(ix: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, ix[:limit])) + (", ..." if len(ix) > limit else "")


# ---------------------------------------------------------------------------- diagnosis
def _variants(graph: Graph, table: dict, g: str, p: Probe) -> list[K.Variant]:
    ref = p.refs[g]
    return list(table.get(g, ())) + K.generic(graph, g, p.values, p.feeds, p.local, ref)


def _catalogue_match(
    graph: Graph, table: dict, g: str, failing: list[tuple[Probe, Tensor]], rtol: float = MATCH_RTOL
) -> tuple[K.Variant, bool, int] | None:
    """The catalogue entry the answer equals on the most failing probes (or minus it)."""
    scores: dict[tuple[str, bool], int] = {}
    first: dict[tuple[str, bool], K.Variant] = {}
    order: list[tuple[str, bool]] = []
    for p, a in failing:
        ref = p.refs[g]
        vals = K.Vals(p.values, p.feeds, ref)
        for v in _variants(graph, table, g, p):
            try:
                w = v.fn(vals)
            except Exception:  # an entry that does not apply at this probe (shapes, say)
                continue
            if not isinstance(w, Tensor) or _matches(w, ref, ref, rtol):
                continue  # not an answer, or the entry equals the right answer here: it tells nothing
            for neg in (False, True):
                if neg and v.kind == K.SIGN:
                    continue
                if _matches(a, -w if neg else w, ref, rtol):
                    key = (v.key, neg)
                    if key not in scores:
                        order.append(key)
                        first[key] = v
                    scores[key] = scores.get(key, 0) + 1
    if not scores:
        return None
    best = max(order, key=lambda k: (scores[k], -k[1]))  # most probes; then the plain entry over its negation
    return first[best], best[1], scores[best]


def _shape_text(g: str, a: Tensor, ref: Tensor) -> tuple[str, str, Tensor | None]:
    """(kind, words, the answer reshaped to compare its values, or None)."""
    got, want = tuple(a.shape), tuple(ref.shape)
    head = f"shape {got} but {g} is {want}"
    if a.numel() == ref.numel() and [s for s in got if s != 1] == [s for s in want if s != 1]:
        return (
            K.SHAPE,
            (
                f"{head}: a size-1 dimension is missing or extra (keepdim=True forgotten, or added "
                "where the tensor has none); a gradient has exactly its tensor's shape, even where "
                "a broadcast would hide it"
            ),
            a.reshape(want),
        )
    if a.dim() == 2 and ref.dim() == 2 and got == want[::-1]:
        return K.TRANSPOSED, f"{head}: transposed (the operands of @ swapped, or .T missing)", a.T
    try:
        if tuple(torch.broadcast_shapes(got, want)) == want:
            return (
                K.SHAPE,
                (
                    f"{head}: it would broadcast to {want}, but it must be expanded to the full shape "
                    "(every element gets its own gradient, e.g. times torch.ones_like(...))"
                ),
                None,
            )
    except RuntimeError:
        pass
    if a.dim() == ref.dim() and sorted(got) != sorted(want):
        ones_a = [i for i, s in enumerate(got) if s == 1]
        ones_r = [i for i, s in enumerate(want) if s == 1]
        if ones_a and ones_r and ones_a != ones_r:
            return K.WRONG_DIM, f"{head}: summed over dim {ones_a} where it should be dim {ones_r}", None
    if a.dim() == 1 and ref.dim() == 1:
        return K.WRONG_DIM, f"{head}: summed over the wrong dimension?", None
    return K.SHAPE, head, None


def _where(g: str, a: Tensor, p: Probe, tol: Tolerance) -> tuple[str, str]:
    """(kind, words) when the answer is right except on some rows, columns or entries."""
    ref = p.refs[g]
    if tuple(a.shape) != tuple(ref.shape) or ref.dim() < 1:
        return "", ""
    bad = ~((a - ref).abs() <= tol.atol + tol.rtol * ref.abs())  # (same shape as ref)
    if not bad.any() or bad.all():
        return "", ""
    rows = [i for i in range(bad.shape[0]) if bool(bad[i].any())]
    for idx_name in ("Xb", "X"):
        ix = p.values.get(idx_name)
        if g == "C" and isinstance(ix, Tensor):
            vals, counts = ix.reshape(-1).unique(return_counts=True)
            rep = set(vals[counts > 1].tolist())
            if set(rows) <= rep:
                return K.OVERWRITE, (
                    f"wrong only on rows {_fmt(rows)} of d{g}, each an index that repeats in "
                    f"{idx_name}: contributions were overwritten instead of accumulated "
                    "(use += in a loop, or index_add_)"
                )
    if bad.dim() == 2:
        yb = p.values.get("Yb", p.values.get("Y"))
        if (
            isinstance(yb, Tensor)
            and yb.dim() == 1
            and yb.shape[0] == bad.shape[0]
            and bad.shape[1] > int(yb.max())
        ):
            at = torch.zeros_like(bad)
            at[torch.arange(bad.shape[0]), yb] = True
            if bool((bad <= at).all()):
                return K.ROWS, (
                    f"right except at the target entries [range(n), Yb] ({int(bad.sum())} of "
                    f"{bad.shape[0]} rows): the one-hot part (the -1 at each row's target) is off"
                )
        lg = p.values.get("logits")
        if isinstance(lg, Tensor) and tuple(lg.shape) == tuple(bad.shape):
            at = torch.zeros_like(bad)
            at[torch.arange(bad.shape[0]), lg.argmax(1)] = True
            if bool((bad <= at).all()):
                return K.MISSING_BRANCH, (
                    "right except at each row's largest logit: the contribution through "
                    "logit_maxes (max passes its gradient to the argmax) is off or missing"
                )
        cols = [j for j in range(bad.shape[1]) if bool(bad[:, j].any())]
        if len(cols) < bad.shape[1] and len(rows) == bad.shape[0]:
            return K.ROWS, f"wrong only in columns {_fmt(cols)} of {bad.shape[1]} (the rest is right)"
    if len(rows) < bad.shape[0]:
        return K.ROWS, f"wrong only on rows {_fmt(rows)} of {bad.shape[0]} (the other rows are right)"
    return "", ""


def _scale(a: Tensor, ref: Tensor, fit_tol: float = 1e-6) -> str:
    rr = float((ref.double() ** 2).sum())
    if rr <= 0:
        return ""
    k = float((a.double() * ref.double()).sum()) / rr
    fit = float((a.double() - k * ref.double()).norm()) / max(float(a.double().norm()), 1e-300)
    if fit > fit_tol or abs(k - 1) < fit_tol:
        return ""
    return f"your answer is {k:.6g} times the right one: a constant factor is wrong"


def diagnose(
    graph: Graph,
    table: dict,
    g: str,
    failing: list[tuple[Probe, Tensor]],
    passing: list[str],
    tol: Tolerance | None = None,
    match_rtol: float = MATCH_RTOL,
) -> tuple[str, str, str]:
    """(kind, key, words) for a wrong gradient; `failing` holds (probe, the learner's value) where it
    fails, `passing` the names of the probes where it is right. The defaults are for float64 answers;
    float32 ones (a notebook's) pass a looser `tol` and `match_rtol`."""
    p0, a0 = failing[0]
    tol = autograd_tolerance(torch.float64) if tol is None else tol
    hit = _catalogue_match(graph, table, g, failing, match_rtol)
    if hit is not None:
        v, neg, score = hit
        words = ("sign flipped, and " + v.says) if neg else v.says
        if score < len(failing):
            words += f" (on the {' and '.join(p.name for p, _ in failing[:1])} probe)"
        return v.kind, v.key + ("-negated" if neg else ""), words
    ref = p0.refs[g]
    if tuple(a0.shape) != tuple(ref.shape):
        kind, words, reshaped = _shape_text(g, a0, ref)
        if reshaped is not None:
            if close(reshaped, ref, tol):
                return kind, "shape", words + "; the values are right"
            sub = diagnose(
                graph,
                table,
                g,
                [
                    (p, (a.reshape(ref.shape) if a.numel() == ref.numel() else a))
                    for p, a in failing
                    if a.numel() == ref.numel()
                ],
                passing,
                tol,
                match_rtol,
            )
            return kind, "shape+" + sub[1], words + "; besides, " + sub[2]
        return kind, "shape", words
    if not torch.isfinite(a0).all():
        return K.NONFINITE, "nonfinite", "contains NaN or inf (an overflow, or a division by zero?)"
    if not a0.any() and ref.any():
        return K.ZERO, "zero", "all zeros: nothing was written into it (or the upstream gradient was lost)"
    names = [p.name for p, _ in failing]
    if "lecture" in passing and names == ["trained"]:
        return (
            K.HARDCODED,
            "hard-coded",
            (
                "right at the lecture's batch of 32 but wrong for a batch of 24: a "
                "size is hard-coded (write n, vocab_size, ... instead of 32, 27)"
            ),
        )
    if "lecture" in passing and names and all(nm in ("random", "trained") for nm in names):
        users = graph.consumers(g)
        return (
            K.OTHER,
            "only-true-upstream",
            (
                "right for the lecture's upstream gradient but wrong for a random one: the answer does not "
                f"follow {' and '.join('d' + u for u in users) or 'the upstream gradient'} "
                "(a shortcut that only holds at the lecture's values, or a term whose upstream is ~0 there)"
            ),
        )
    kind, where = _where(g, a0, p0, tol)
    if where:
        return kind, "where", where
    sc = _scale(a0, ref, max(1e-6, 10 * match_rtol))
    if sc:
        return K.SCALE, "scale", sc
    return (
        K.OTHER,
        "",
        (
            f"values differ (max relative error {_rel(a0, ref):.2g}); it matches none of the known "
            f"mistakes for d{g}; `handgrad dojo hint` explains the rule"
        ),
    )


# What an exception on a learner's line shows, as rules: (words in the message, words in the line,
# words the line must lack, the kind, what to say). The first rule that fits names the mistake.
ERROR_RULES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "must match the size",
        "one_hot(",
        "num_classes",
        K.SHAPE,
        "F.one_hot(Yb) without num_classes has max(Yb) + 1 columns; pass num_classes=vocab_size",
    ),
    (
        "must match the size",
        ".sum(",
        "keepdim",
        K.SHAPE,
        "a .sum() without keepdim=True? a reduced tensor keeps its size-1 dimension to broadcast back "
        "against the full one",
    ),
    (
        "must match the size",
        "",
        "",
        K.SHAPE,
        "the shapes on this line do not broadcast: compare them with the shapes in the blanks' comments",
    ),
    (
        "shapes cannot be multiplied",
        "",
        "",
        K.TRANSPOSED,
        "the operands of @ swapped, or a .T missing? dX = dout @ W.T, dW = X.T @ dout",
    ),
)


def _error_kind(msg: str, code: str) -> tuple[str, str]:
    """(kind, words) for the mistake behind an exception, where its message and line show it."""
    for in_msg, in_code, not_in_code, kind, words in ERROR_RULES:
        if in_msg in msg and in_code in code and not (not_in_code and not_in_code in code):
            return kind, f" ({words})"
    return K.OTHER, ""


# ---------------------------------------------------------------------------- rows
def judge_graph(
    graph: Graph, table: dict, probes: list[Probe], outputs: dict[str, Tensor], meta: dict
) -> list[Row]:
    rows = []
    for g in graph.grads:
        rows.append(_judge_one(graph, table, g, probes, outputs, meta))
    return rows


def _judge_one(
    graph: Graph, table: dict, g: str, probes: list[Probe], outputs: dict[str, Tensor], meta: dict
) -> Row:
    tol = autograd_tolerance(torch.float64)
    first = next(p for p in probes if p.verdict)
    row = Row(f"d{g}", tuple(first.refs[g].shape), "missing")
    graded = [p for p in probes if p.verdict]
    infos = {p.name: meta["probes"].get(p.name, {}).get(g, {"status": "missing"}) for p in probes}
    row.line = infos[first.name].get("line")
    for p in graded:
        info = infos[p.name]
        if info.get("status") == "error":
            row.status, row.diagnosis, row.line = "error", info.get("msg", ""), info.get("line")
            row.chain = False
            row.kind, words = _error_kind(row.diagnosis, info.get("code", ""))
            row.diagnosis += words
            return row
        if info.get("status") == "notensor":
            row.status, row.diagnosis = "invalid", info.get("msg", "")
            return row
    if all(infos[p.name].get("status") == "missing" for p in graded):
        row.diagnosis = f"still blank (line {row.line})" if row.line else f"no line assigns d{g}"
        return row
    failing, passing = [], []
    for p in graded:
        info = infos[p.name]
        a = outputs.get(f"{p.name}|{g}")
        if a is None:
            row.status, row.kind = "wrong", K.OTHER
            row.diagnosis = f"None on the {p.name} probe ({p.about}) but a tensor elsewhere"
            return row
        if a.dtype != p.refs[g].dtype:
            row.status = "invalid"
            row.diagnosis = (
                f"a {str(a.dtype)[6:]} tensor where the forward values are {str(p.refs[g].dtype)[6:]}: "
                "make new tensors with zeros_like/ones_like or dtype=..., so they follow the input"
            )
            return row
        (passing if close(a, p.refs[g], tol) else failing).append(
            (p, a) if not close(a, p.refs[g], tol) else p.name
        )
        del info
    ex = next((p for p in probes if p.exact), None)
    if ex is not None:
        a = outputs.get(f"{ex.name}|{g}")
        row.exact = bool(
            a is not None
            and a.dtype == ex.refs[g].dtype
            and tuple(a.shape) == tuple(ex.refs[g].shape)
            and torch.equal(a, ex.refs[g])
        )
    ch = next((p for p in probes if not p.feed), None)
    if ch is not None:
        a = outputs.get(f"{ch.name}|{g}")
        row.chain = bool(a is not None and close(a, ch.refs[g], tol))
    if not failing and ex is not None and not row.exact:
        a = outputs.get(f"{ex.name}|{g}")
        rel = _rel(a, ex.refs[g]) if a is not None else math.inf
        if not rel <= F32_RTOL:  # right in float64, but float32 loses it: a numerically unstable form
            row.status, row.kind, row.key, row.max_rel = "wrong", K.OTHER, "float32", rel
            row.diagnosis = (
                f"right in float64 but off by {rel:.2g} of its largest entry in float32 (autograd's float32 "
                "is within 1e-5): a numerically unstable form (exp without subtracting the max? a "
                "difference of large, nearly equal terms?)"
            )
            return row
    if not failing:
        row.status = "ok"
        return row
    row.status = "wrong"
    row.max_rel = _rel(failing[0][1], failing[0][0].refs[g])
    row.kind, row.key, row.diagnosis = diagnose(graph, table, g, failing, passing)
    return row
