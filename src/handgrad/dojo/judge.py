"""Judge a learner's rows (the grader's side: it runs no learner code): right / wrong / missing / error
per row from the values the learner's code gave on each probe, and for a wrong row the mistake named:
the catalogue entry it equals, else the learner's own line edited (edits.py), else a shape, scale, row
or probe pattern. Verdicts use check.py's tolerances (float64, scaled to the row's and its upstream's
magnitude); the exact column is float32 bitwise equality with autograd, as the lecture's cmp has it.

A right value in a shape that broadcasts exactly as the tensor's own wherever the graph uses it ((64,)
for a (1, 64) tensor) is right, with a shape note (strict mode: wrong). A shape that changes a result
((n,) for (n, 1), which broadcasts to (n, n)) is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from handgrad.check import Tolerance, autograd_tolerance
from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo.framework import Item, Probe, RowSpec

F32_RTOL = 1e-5  # float32: max |yours - autograd's| within this of autograd's largest entry
F64_FLOOR = 1e-10  # float64: a difference below this of the largest entry is rounding of another order of
# operations, not a formula (eps left out differs by ~1e-5 at the lecture's point; the float32 check sees
# a form that rounds badly)
MATCH_RTOL = 1e-8  # an answer "equals" a catalogue entry: float64 rounding sits ~1e7 below this


@dataclass
class Row:
    """One graded row (a gradient, or a behaviour of a challenge)."""

    name: str  # e.g. "dprobs"
    shape: tuple[int, ...]  # the shape it must have
    status: str  # ok | wrong | missing | error | invalid
    diagnosis: str = ""  # why it is wrong, in the learner's terms; the error; the blank's line
    kind: str = ""  # the mistake's kind (catalogue.SIGN, ...), '' when right
    key: str = ""  # the catalogue entry or diagnosis it is, if any
    edit: str = ""  # the edit of the learner's own line that makes it right, in their terms
    note: str = ""  # on a right row: a shape note, float32, an alias, a term that is ~0 here
    mark: str = ""  # "shape": right with a shape note (its own mark, counted as right)
    exact: bool | None = None  # float32 bit-exact with autograd (None: not measured)
    chain: str | None = None  # end to end: "yes", "given" (right given your own wrong upstream), "no"
    line: int | None = None
    where: str = ""  # "line 42", "In [12] line 3"
    max_rel: float = math.nan  # max |yours - right| / max |right| on the first failing probe
    grad: bool = True  # a gradient; False: a behaviour ("loss curve"), named as it is
    yours: str = ""  # the learner's variable, when it is not the row's own name

    @property
    def target(self) -> str:
        """What the summary's "next:" names."""
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
                "edit",
                "note",
                "mark",
                "exact",
                "chain",
                "line",
                "where",
                "max_rel",
                "grad",
                "yours",
            )
        }


@dataclass
class Pending:
    """What the diagnosis of a wrong row reads: the probes it fails on with the learner's value there."""

    spec: RowSpec
    row: Row
    failing: list[tuple[Probe, Tensor]] = field(default_factory=list)
    passing: list[Probe] = field(default_factory=list)
    catalogued: str = ""  # "all": the catalogue named it on every failing probe (no edit search); "some"


# ---------------------------------------------------------------------------- comparing
def upstream_scale(item: Item, key: str, p: Probe) -> float:
    """The magnitude of the upstream gradients a row is made of (a gradient that is ~0 by the maths,
    like db1 under batchnorm, is rounding of sums of upstream-sized terms)."""
    if item.graph is None:
        return 0.0
    out = 0.0
    for c in item.graph.consumers(key):
        f = p.feeds.get(c)
        if isinstance(f, Tensor) and f.dim() and f.numel():  # (the loss's seed, dloss = 1, is no magnitude)
            out = max(out, float(f.abs().max()))
    return out


def tolerance(ref: Tensor, answer: Tensor, upstream: float = 0.0, f32: bool = False) -> Tolerance:
    """check.py's tolerance against autograd for the answer's dtype (float32 where the learner's line
    made float32 values, or says float32: f32), at the larger of the row's and its upstream's magnitude."""
    dt = (
        answer.dtype
        if answer.is_floating_point() and torch.finfo(answer.dtype).eps > torch.finfo(ref.dtype).eps
        else ref.dtype
    )
    if f32 and torch.finfo(dt).eps < torch.finfo(torch.float32).eps:
        dt = torch.float32
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, upstream)
    scale = scale if math.isfinite(scale) else 0.0
    tol = autograd_tolerance(dt, torch.tensor([scale]))
    if dt == torch.float64:
        tol = Tolerance(tol.rtol, max(tol.atol, F64_FLOOR * scale), tol.level, tol.source)
    return tol


def close(a: Tensor, b: Tensor, tol: Tolerance) -> bool:
    return tuple(a.shape) == tuple(b.shape) and tol.holds(a.to(b.dtype), b)


def squeezed(s: tuple[int, ...]) -> list[int]:
    return [d for d in s if d != 1]


def broadcasts_alike(item: Item, key: str, p: Probe, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` in place of the row's tensor gives the same shapes wherever it is
    used: in every consumer op of the graph, or against the shapes the probe lists for the row."""
    ref = p.refs[key]
    if item.graph is not None and key in p.inputs:
        return G.same_broadcast(item.graph, p.inputs, key, shape)
    uses = p.uses.get(key)
    if not uses:
        return False
    try:
        return all(G.broadcast(shape, u) == G.broadcast(tuple(ref.shape), u) for u in uses)
    except ValueError:
        return False


def compare(item: Item, key: str, p: Probe, a: Tensor, f32: bool = False) -> str:
    """ "ok", "shape" (right values in a shape that broadcasts alike), or "fail". f32: the learner's line
    holds a float32 value, so float32's precision is all it can have."""
    ref = p.refs[key]
    tol = tolerance(ref, a, upstream_scale(item, key, p), f32)
    if tuple(a.shape) == tuple(ref.shape):
        return "ok" if tol.holds(a.to(ref.dtype), ref) else "fail"
    if a.numel() == ref.numel() and squeezed(tuple(a.shape)) == squeezed(tuple(ref.shape)):
        if tol.holds(a.reshape(ref.shape).to(ref.dtype), ref) and broadcasts_alike(
            item, key, p, tuple(a.shape)
        ):
            return "shape"
    return "fail"


def rel(a: Tensor, ref: Tensor) -> float:
    if tuple(a.shape) != tuple(ref.shape) or not ref.numel():
        return math.nan
    s = float(ref.abs().max())
    d = float((a.double() - ref.double()).abs().max())
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)


def _fmt(ix: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, ix[:limit])) + (", ..." if len(ix) > limit else "")


def shape_words(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


# ---------------------------------------------------------------------------- judging the rows
def judge_rows(
    item: Item,
    probes: list[Probe],
    outs: dict[str, Tensor],
    meta: dict,
    vars_: dict[str, str],
    strict: bool = False,
    skip: set[tuple[str, str]] | None = None,
    f32: set[str] | None = None,
) -> tuple[list[Row], list[Pending]]:
    """Every row's verdict (not yet the diagnosis of a wrong one: see diagnose). `skip` holds (probe,
    row key) pairs that do not count (a notebook's line that reads a name another cell made); `f32` the
    rows whose lines make a float32 value on purpose."""
    rows, pending = [], []
    for spec in item.rows:
        if not spec.tensor:
            row = item.judge(spec, probes, outs, meta, None) if item.judge else None
            if row is not None:
                rows.append(row)
                continue
        row, pend = judge_tensor(
            item,
            spec,
            probes,
            outs,
            meta,
            vars_.get(spec.key, spec.var),
            strict,
            skip,
            spec.key in (f32 or ()),
        )
        rows.append(row)
        if pend is not None and row.status == "wrong" and not row.diagnosis:
            pending.append(pend)
    return rows, pending


def _infos(spec: RowSpec, probes: list[Probe], meta: dict) -> dict[str, dict]:
    return {
        p.name: meta.get("probes", {}).get(p.name, {}).get(spec.key, {"status": "missing"}) for p in probes
    }


def judge_tensor(
    item: Item,
    spec: RowSpec,
    probes: list[Probe],
    outs: dict[str, Tensor],
    meta: dict,
    var: str,
    strict: bool = False,
    skip: set | None = None,
    f32: bool = False,
) -> tuple[Row, Pending | None]:
    skip = skip or set()
    graded = [p for p in probes if p.verdict and (p.name, spec.key) not in skip]
    first = graded[0] if graded else next(p for p in probes if p.verdict)
    ref0 = first.refs[spec.key]
    row = Row(
        spec.name,
        tuple(ref0.shape) if isinstance(ref0, Tensor) else (),
        "missing",
        yours=var if var != spec.var else "",
    )
    infos = _infos(spec, probes, meta)
    info0 = infos[first.name]
    row.line, row.where = info0.get("line"), info0.get("where", "")
    for p in graded:
        info = infos[p.name]
        if info.get("status") == "error":
            row.status, row.diagnosis = "error", info.get("msg", "")
            row.line, row.where = info.get("line"), info.get("where", "")
            row.kind, words = _error_kind(row.diagnosis, info.get("code", ""))
            row.diagnosis += words
            return row, None
        if info.get("status") == "notensor":
            row.status, row.diagnosis = "invalid", info.get("msg", "")
            row.key = "numpy" if info.get("numpy") else "notensor"
            return row, None
    if all(infos[p.name].get("status") == "missing" for p in graded):
        row.diagnosis = "still blank" if row.where or row.line else f"no line assigns {var}"
        return row, None
    pend = Pending(spec, row)
    marks = set()
    for p in graded:
        a = outs.get(f"{p.name}|{spec.key}")
        if a is None:
            row.status, row.kind, row.key = "wrong", K.OTHER, "none"
            row.diagnosis = f"None on the {p.name} probe ({p.about}) but a tensor elsewhere"
            return row, None
        verdict = compare(item, spec.key, p, a)
        if verdict == "fail" and f32:
            verdict = compare(item, spec.key, p, a, f32=True)
            marks.add("float32" if verdict != "fail" else "")
        if verdict == "fail":
            pend.failing.append((p, a))
        else:
            pend.passing.append(p)
            marks.add(verdict)
            if a.dtype != p.refs[spec.key].dtype:
                marks.add("float32")
    ex = next((p for p in probes if p.exact), None)
    if ex is not None:
        a = outs.get(f"{ex.name}|{spec.key}")
        r = ex.refs[spec.key]
        row.exact = bool(
            a is not None and a.dtype == r.dtype and tuple(a.shape) == tuple(r.shape) and torch.equal(a, r)
        )
    if pend.failing:
        row.status = "wrong"
        row.max_rel = rel(pend.failing[0][1], pend.failing[0][0].refs[spec.key])
        return row, pend
    if ex is not None and not row.exact:  # right in float64: is it right in float32, where the learner runs?
        a = outs.get(f"{ex.name}|{spec.key}")
        r = ex.refs[spec.key]
        scale = max(float(r.abs().max()) if r.numel() else 0.0, upstream_scale(item, spec.key, ex), 1e-30)
        e = (
            float((a.reshape(r.shape).double() - r.double()).abs().max()) / scale
            if a is not None and a.numel() == r.numel()
            else math.inf
        )
        if not e <= F32_RTOL:
            row.status, row.kind, row.key, row.max_rel = "wrong", K.OTHER, "float32", e
            row.diagnosis = (
                f"right in float64 but off by {e:.2g} of its largest entry in float32 (autograd's float32 "
                "is within 1e-5): a numerically unstable form (exp without subtracting the max? a "
                "difference of large, nearly equal terms?)"
            )
            return row, None
    row.status = "ok"
    if "shape" in marks:
        got = next(
            tuple(outs[f"{p.name}|{spec.key}"].shape)
            for p in graded
            if tuple(outs[f"{p.name}|{spec.key}"].shape) != tuple(p.refs[spec.key].shape)
        )
        note = (
            f"shape {shape_words(got)} where {spec.key} is {shape_words(row.shape)}: the values are "
            "right and it "
            "broadcasts the same way wherever it is used"
        )
        if strict:
            row.status, row.kind, row.key = "wrong", K.SHAPE, "shape-strict"
            row.diagnosis = note + f"; strict mode wants exactly {shape_words(row.shape)}"
            return row, None
        row.mark, row.note = "shape", note + f" (strict mode wants {shape_words(row.shape)})"
    if "float32" in marks:
        row.note = "; ".join(
            x
            for x in (
                row.note,
                "your line makes a float32 value (dtype=torch.float32?): right to "
                "float32's precision, which is all the float64 probes can ask of it",
            )
            if x
        )
    return row, None


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
        "against the "
        "full one",
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
    (
        "is not defined",
        "",
        "",
        K.OTHER,
        "a name the grader does not have here: is it made in another cell, or spelled differently?",
    ),
)


def _error_kind(msg: str, code: str) -> tuple[str, str]:
    for in_msg, in_code, not_in_code, kind, words in ERROR_RULES:
        if in_msg in msg and in_code in code and not (not_in_code and not_in_code in code):
            return kind, f" ({words})"
    return K.OTHER, ""


# ---------------------------------------------------------------------------- diagnosis
def _matches(a: Tensor, w: Tensor, ref: Tensor, rtol: float = MATCH_RTOL) -> bool:
    """a equals w up to rounding, relative to the size of the numbers involved."""
    if tuple(a.shape) != tuple(w.shape) or not torch.isfinite(w).all():
        return False
    scale = max(
        float(w.abs().max()) if w.numel() else 0.0, float(ref.abs().max()) if ref.numel() else 0.0, 1e-30
    )
    return bool(((a.double() - w.double()).abs() <= rtol * scale).all())


def _variants(item: Item, key: str, p: Probe) -> list[K.Variant]:
    ref = p.refs[key]
    return list(item.variants.get(key, ())) + K.generic(key, p.inputs, p.feeds, ref, item.graph, p.local)


def catalogue_match(
    item: Item, key: str, failing: list[tuple[Probe, Tensor]], rtol: float = MATCH_RTOL
) -> tuple[K.Variant, bool, int] | None:
    """The catalogue entry the answer equals on the most failing probes (or minus it)."""
    scores: dict[tuple[str, bool], int] = {}
    first: dict[tuple[str, bool], K.Variant] = {}
    order: list[tuple[str, bool]] = []
    for p, a in failing:
        ref = p.refs[key]
        if a.dtype != ref.dtype:
            a = a.to(ref.dtype)
        vals = K.Vals(p.inputs, p.feeds, ref, p.refs)
        for v in _variants(item, key, p):
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
                    k = (v.key, neg)
                    if k not in scores:
                        order.append(k)
                        first[k] = v
                    scores[k] = scores.get(k, 0) + 1
    if not scores:
        return None
    best = max(order, key=lambda k: (scores[k], -k[1]))  # most probes; then the plain entry over its negation
    return first[best], best[1], scores[best]


def shape_text(g: str, a: Tensor, ref: Tensor) -> tuple[str, str, Tensor | None]:
    """(kind, words, the answer reshaped to compare its values, or None)."""
    got, want = tuple(a.shape), tuple(ref.shape)
    head = f"shape {shape_words(got)} but {g} is {shape_words(want)}"
    if a.numel() == ref.numel() and squeezed(got) == squeezed(want):
        try:
            spread = G.broadcast(got, want)
        except ValueError:
            spread = None
        how = (
            f": {shape_words(got)} against {shape_words(want)} broadcasts to {shape_words(spread)}, so "
            "it changes "
            "the results where it is used"
            if spread and spread != want
            else ": used in its place it would not broadcast the same way"
        )
        return (
            K.SHAPE,
            f"{head}{how}; keep the size-1 dimension (keepdim=True) where the tensor has one",
            a.reshape(want),
        )
    if a.dim() == 2 and ref.dim() == 2 and got == want[::-1]:
        return K.TRANSPOSED, f"{head}: transposed (the operands of @ swapped, or .T missing)", a.T
    try:
        if G.broadcast(got, want) == want:
            return (
                K.SHAPE,
                (
                    f"{head}: it would broadcast to {shape_words(want)}, but every element gets its own "
                    "gradient: expand it to the full shape (e.g. times torch.ones_like(...))"
                ),
                None,
            )
    except ValueError:
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
    bad = ~((a - ref).abs() <= tol.atol + tol.rtol * ref.abs())
    if not bad.any() or bad.all():
        return "", ""
    rows = [i for i in range(bad.shape[0]) if bool(bad[i].any())]
    for idx_name in ("Xb", "X"):
        ix = p.inputs.get(idx_name)
        if g == "C" and isinstance(ix, Tensor):
            vals, counts = ix.reshape(-1).unique(return_counts=True)
            rep = set(vals[counts > 1].tolist())
            if set(rows) <= rep:
                return K.OVERWRITE, (
                    f"wrong only on rows {_fmt(rows)} of d{g}, each an index that repeats in "
                    f"{idx_name}: contributions were overwritten instead of accumulated (use += in a "
                    "loop, or index_add_)"
                )
    if bad.dim() == 2:
        yb = p.inputs.get("Yb", p.inputs.get("Y"))
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
            cols = sorted(set(yb.tolist()))
            if bool((bad[:, cols].any(0)).all()) and not bool(
                bad[:, [j for j in range(bad.shape[1]) if j not in cols]].any()
            ):
                return K.ROWS, (
                    f"wrong only in the columns Yb names ({len(cols)} of {bad.shape[1]}), in every row: "
                    "an index [:, Yb] picks whole columns; [range(n), Yb] picks one entry per row"
                )
        lg = p.inputs.get("logits")
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


def _size_factor(k: float, n: int) -> str:
    """k as a formula in the batch size n ('n/(n-1)'), or ''."""
    for words, v in (
        ("n", n),
        ("1/n", 1 / n),
        ("n/(n-1)", n / (n - 1)),
        ("(n-1)/n", (n - 1) / n),
        ("n-1", n - 1),
        ("1/(n-1)", 1 / (n - 1)),
        ("n/(n-2)", n / (n - 2)),
        ("(n+1)/n", (n + 1) / n),
        ("n/(n+1)", n / (n + 1)),
        ("2", 2.0),
        ("1/2", 0.5),
        ("n**2", n * n),
        ("1/n**2", 1 / (n * n)),
    ):
        if abs(abs(k) - v) <= 1e-6 * v:
            return ("-" if k < 0 else "") + words
    return ""


def _scale(failing: list[tuple[Probe, Tensor]], key: str, fit_tol: float = 1e-6) -> str:
    ks = []
    for p, a in failing:
        ref = p.refs[key]
        if tuple(a.shape) != tuple(ref.shape):
            return ""
        rr = float((ref.double() ** 2).sum())
        if rr <= 0:
            return ""
        k = float((a.double() * ref.double()).sum()) / rr
        fit = float((a.double() - k * ref.double()).norm()) / max(float(a.double().norm()), 1e-300)
        if fit > fit_tol or abs(k - 1) < fit_tol:
            return ""
        n = p.inputs.get("n")
        ks.append((k, _size_factor(k, n) if isinstance(n, int) and n > 2 else ""))
    if not ks:
        return ""
    k, named = ks[0]
    if named and all(nm == named for _, nm in ks):
        return (
            f"your answer is {named} times the right one (n the batch size: {k:.6g} at n = "
            f"{failing[0][0].inputs.get('n')}): a factor of {named} is wrong"
        )
    return f"your answer is {k:.6g} times the right one: a constant factor is wrong"


NEAR_ZERO = (
    "at the true upstream gradient this term is ~0 in this graph (or the shortcut holds there), so the "
    "lecture's cmp and your own chain column cannot see it; the formula is wrong for any other upstream"
)


def diagnose(item: Item, pend: Pending, match_rtol: float = MATCH_RTOL) -> tuple[str, str, str]:
    """(kind, key, words) for a wrong row, without the edit search (see with_edit)."""
    key = pend.spec.key
    failing, passing = pend.failing, pend.passing
    p0, a0 = failing[0]
    ref = p0.refs[key]
    g = key
    near_zero = all(p.random for p, _ in failing) and any(not p.random for p in passing)
    hit = catalogue_match(item, key, failing, match_rtol)
    if hit is not None:
        v, neg, score = hit
        pend.catalogued = "all" if score == len(failing) else "some"
        words = ("sign flipped, and " + v.says) if neg else v.says
        if score < len(failing):
            words += f" (on the {failing[0][0].name} probe)"
        if near_zero:
            words += f"; {NEAR_ZERO}"
        return v.kind, v.key + ("-negated" if neg else ""), words
    if tuple(a0.shape) != tuple(ref.shape):
        kind, words, reshaped = shape_text(g, a0, ref)
        if reshaped is not None:
            tol = tolerance(ref, a0, upstream_scale(item, key, p0))
            if close(reshaped, ref, tol):
                return kind, "shape", words + "; the values are right"
            sub = Pending(
                pend.spec,
                pend.row,
                [(p, a.reshape(p.refs[key].shape)) for p, a in failing if a.numel() == p.refs[key].numel()],
                passing,
            )
            if sub.failing:
                k2, key2, w2 = diagnose(item, sub, match_rtol)
                return kind, "shape+" + key2, words + "; besides, " + w2
        return kind, "shape", words
    if not torch.isfinite(a0).all():
        return K.NONFINITE, "nonfinite", "contains NaN or inf (an overflow, or a division by zero?)"
    if not a0.any() and ref.any():
        if near_zero:
            users = item.graph.consumers(key) if item.graph else []
            up = " and ".join("d" + u for u in users) or "the upstream gradient"
            return (
                K.ZERO,
                "zero-near-zero",
                (
                    f"all zeros: at the true upstream d{g} is ~0 in this graph (batchnorm "
                    "subtracts the batch mean), so the lecture's cmp and your chain column "
                    f"call zeros right; but given {up} it is not zero for any other "
                    "upstream: the formula is wrong"
                ),
            )
        return K.ZERO, "zero", "all zeros: nothing was added into it (or the upstream gradient was lost)"
    sizes = {p.inputs.get("n") for p in passing}
    if passing and not any(p.inputs.get("n") in sizes for p, _ in failing):
        return (
            K.HARDCODED,
            "hard-coded",
            (
                f"right at a batch of {passing[0].inputs.get('n')} but wrong for a batch "
                f"of {p0.inputs.get('n')}: a size is hard-coded (write n, vocab_size, ... "
                "instead of 32, 27)"
            ),
        )
    if near_zero:
        users = item.graph.consumers(key) if item.graph else []
        return (
            K.OTHER,
            "only-true-upstream",
            (
                "right for the true upstream gradient but wrong for a random one: the answer does not follow "
                f"{' and '.join('d' + u for u in users) or 'the upstream gradient'}; {NEAR_ZERO}"
            ),
        )
    tol = tolerance(ref, a0, upstream_scale(item, key, p0))
    kind, where = _where(g, a0.to(ref.dtype), p0, tol)
    if where:
        return kind, "where", where
    sc = _scale(failing, key, max(1e-6, 10 * match_rtol))
    if sc:
        return K.SCALE, "scale", sc
    return (
        K.OTHER,
        "",
        (
            f"values differ (max relative error {rel(a0, ref):.2g}); no known mistake and no small "
            f"edit of your line explains it; `handgrad dojo hint` explains the rule"
        ),
    )


def with_edit(kind: str, key: str, words: str, edit_words: str) -> tuple[str, str, str]:
    """The diagnosis with the edit search's finding: it replaces the words when nothing else named the
    mistake, and follows them otherwise."""
    if not edit_words:
        return kind, key, words
    if key == "":
        return K.OTHER, "edit", edit_words
    return kind, key, f"{words}; {edit_words}"


# ---------------------------------------------------------------------------- behaviours
def behaviour(spec: RowSpec, probes: list[Probe], meta: dict) -> tuple[Row, dict[str, object]] | Row:
    """For a row whose answer is a bool or a number: the row when some probe errored, gave no value or is
    blank; else (a right row to judge further, probe -> the value)."""
    row = Row(spec.name, (), "missing", grad=False)
    got = _infos(spec, probes, meta)
    for info in got.values():
        if info.get("status") == "error":
            row.status, row.diagnosis = "error", info.get("msg", "")
            row.line, row.where = info.get("line"), info.get("where", "")
            return row
        if info.get("status") == "notensor":
            row.status, row.diagnosis = "invalid", info.get("msg", "")
            return row
    if all(i.get("status") == "missing" for i in got.values()):
        row.diagnosis = "still blank"
        return row
    row.status = "ok"
    return row, {k: v.get("scalar") for k, v in got.items()}
