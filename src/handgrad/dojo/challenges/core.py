"""The coding challenges' machinery (the exercises given alongside "Becoming a Backprop Ninja"): a
challenge as data (file text with blanks, probes, the learner's calls, known wrong variants, hints),
the child-side driver that calls the learner's functions, and the parent-side judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from handgrad.check import autograd_tolerance
from handgrad.dojo import catalogue as K
from handgrad.dojo.judge import Row, _matches, _rel, _shape_text, close
from handgrad.dojo.runner import OutOfTime, describe, learner_error

F64 = torch.float64
MARK = re.compile(r"^# handgrad dojo: challenge (\S+)\s*$", re.M)  # the line naming a file's challenge
BLANK = "None  # TODO"
SLOT = re.compile(r"^( *)@@(\d+)@@\n", re.M)  # where a blank region (or the solution's) goes in the text


@dataclass(frozen=True)
class Variant:
    """A known wrong answer: computed from the probe's inputs and the right answers."""

    key: str
    kind: str  # catalogue.SIGN, ...
    says: str  # in the learner's terms
    fn: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Spec:
    """One graded row: a tensor the learner's code returns, or a behaviour (a verdict, a count)."""

    name: str
    shape: str  # in words, e.g. "(D, H)"; "" for a behaviour
    hints: tuple[str, str, str]  # the rule, then the shapes, then the form (the last gives it away)
    blank: str = ""  # the variable whose `= None  # TODO` line is its blank ('' : the name)


@dataclass
class CProbe:
    name: str
    about: str
    inputs: dict[str, Tensor]  # what the child hands the learner's code (float64)
    refs: dict[str, object]  # row name -> the right tensor, or the expected behaviour


@dataclass(frozen=True)
class Challenge:
    key: str  # as typed: `dojo start linear-tanh`
    letter: str  # its letter in the list
    slug: str  # the file's stem
    title: str
    about: str  # one line for `dojo list`
    text: str  # the file after its mark line, with @@i@@ slots for the blank regions
    blanks: tuple[str, ...]  # the blank region of each slot
    solution: tuple[str, ...]  # the reference region of each slot
    specs: tuple[Spec, ...]
    probes: Callable[[], list[CProbe]]
    drive: Callable[[Recorder, dict, dict[str, Tensor], str], None]  # child side: call the learner's code
    variants: dict[str, tuple[Variant, ...]] = field(default_factory=dict)
    judge: Callable[[Spec, list[CProbe], dict, dict], Row | None] | None = None  # rows that are not tensors


# ---------------------------------------------------------------------------- the file
def render(ch: Challenge, regions: tuple[str, ...] | None = None) -> str:
    """The file `dojo start` writes (regions=None: the blanks; ch.solution: the reference)."""
    regions = ch.blanks if regions is None else regions

    def fill(m: re.Match) -> str:
        pad = m.group(1)
        body = regions[int(m.group(2))]
        return "".join(pad + ln + "\n" if ln.strip() else "\n" for ln in body.rstrip("\n").split("\n"))

    return f"# handgrad dojo: challenge {ch.key}\n" + SLOT.sub(fill, ch.text)


def blank_lines(source: str) -> dict[str, int]:
    """name -> the line of its `name = None  # TODO` blank (or of its first assignment)."""
    out: dict[str, int] = {}
    for i, ln in enumerate(source.splitlines(), 1):
        m = re.match(r"^\s*(\w+)\s*=", ln)
        if m and (m.group(1) not in out or BLANK in ln):
            out[m.group(1)] = i
    return out


# ---------------------------------------------------------------------------- child side
class Skip(Exception):
    """The learner's call failed (recorded): its rows are done for this probe."""


class Recorder:
    """Calls the learner's functions for one probe and records each row: a tensor, a behaviour
    (bool/int/float), missing, not a tensor, or their exception with their line."""

    def __init__(self, parsed, probe: str):
        self.p, self.probe = parsed, probe
        self.out: dict[str, Tensor] = {}
        self.meta: dict[str, dict] = {}

    def fn(self, base: dict, name: str, rows: list[str]) -> Callable:
        f = base.get(name)
        if not callable(f):
            for r in rows:
                msg = f"no function or class {name} in the file (the template defines it; keep its name)"
                self.meta.setdefault(r, {"status": "error", "line": None, "msg": msg})
            raise Skip()
        return f

    def call(self, rows: list[str], f: Callable, *args, **kw):
        try:
            return f(*args, **kw)
        except OutOfTime:
            raise
        except Exception as e:
            err = learner_error(e, self.p.filename, self.p.lines)
            for r in rows:
                self.meta.setdefault(r, {"status": "error", "line": err["line"], "msg": err["msg"]})
            raise Skip() from None

    def unpack(self, rows: list[str], value: object, n: int, what: str) -> tuple:
        if isinstance(value, (tuple, list)) and len(value) == n:
            return tuple(value)
        for r in rows:
            got = type(value).__name__ + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")
            msg = f"{what} must return {n} values; it returned {got}"
            self.meta.setdefault(r, {"status": "error", "line": None, "msg": msg})
        raise Skip()

    def put(self, row: str, value: object) -> None:
        if row in self.meta:
            return
        if isinstance(value, (bool, int, float)) and not isinstance(value, Tensor):
            self.meta[row] = {"status": "value", "scalar": value}
            return
        d = describe(value)
        if d["status"] == "value":
            if value.device.type != "cpu":
                d = {"status": "notensor", "msg": f"a tensor on {value.device}, the grader runs on the CPU"}
            else:
                self.out[f"{self.probe}|{row}"] = value.detach().clone().contiguous()
        self.meta[row] = d


def drive_job(job: dict, p, base: dict, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """The runner's driver for a challenge file: each probe's inputs to the challenge's drive()."""
    from handgrad.dojo.challenges import get

    ch = get(job["challenge"])
    out: dict[str, Tensor] = {}
    meta: dict = {"probes": {}, "notes": []}
    for probe in job["probes"]:
        inputs = {k.split("|", 1)[1]: t for k, t in tensors.items() if k.split("|", 1)[0] == probe}
        rec = Recorder(p, probe)
        try:
            ch.drive(rec, base, {k: t.clone() for k, t in inputs.items()}, probe)
        except Skip:
            pass
        out.update(rec.out)
        meta["probes"][probe] = rec.meta
    return out, meta


# ---------------------------------------------------------------------------- parent side
def generic(ref: Tensor) -> list[Variant]:
    """Mistakes that any gradient can have: the sign, a missing or extra 1/n, transposed."""
    out = [Variant("sign", K.SIGN, "sign flipped", lambda i, r: -ref)]
    if ref.dim() >= 1 and ref.shape[0] > 1:
        n = ref.shape[0]
        out += [
            Variant("extra-1/n", K.SCALE_N, f"divided by n={n} once too often (the loss is a sum here, "
                    "not a mean)", lambda i, r: ref / n),
            Variant("missing-1/n", K.SCALE_N, f"the 1/n (n={n}) is missing", lambda i, r: ref * n),
        ]
    if ref.dim() == 2:
        out.append(Variant("transposed", K.TRANSPOSED, "transposed (the operands of @ swapped, or .T "
                           "missing)", lambda i, r: ref.T))
    return out


def diagnose(ch: Challenge, spec: Spec, failing: list[tuple[CProbe, Tensor]]) -> tuple[str, str, str]:
    """(kind, key, words) for a wrong tensor: the known variant it equals on the most probes, else
    its shape, the rows where it is wrong, a constant factor."""
    scores: dict[str, int] = {}
    first: dict[str, Variant] = {}
    for p, a in failing:
        ref = p.refs[spec.name]
        for v in tuple(ch.variants.get(spec.name, ())) + tuple(generic(ref)):
            try:
                w = v.fn(p.inputs, p.refs)
            except Exception:  # a variant that does not apply at this probe's shapes
                continue
            if isinstance(w, Tensor) and not _matches(w, ref, ref) and _matches(a, w, ref):
                scores[v.key] = scores.get(v.key, 0) + 1
                first.setdefault(v.key, v)
    if scores:
        best = max(scores, key=lambda k: scores[k])  # dicts keep order: the table's first entry wins ties
        v = first[best]
        more = "" if scores[best] == len(failing) else f" (on {scores[best]} of {len(failing)} probes)"
        return v.kind, v.key, v.says + more
    p0, a0 = failing[0]
    ref = p0.refs[spec.name]
    if tuple(a0.shape) != tuple(ref.shape):
        kind, words, _ = _shape_text(spec.name[1:] if spec.name.startswith("d") else spec.name, a0, ref)
        return kind, "shape", words
    if not torch.isfinite(a0).all() and torch.isfinite(ref).all():
        return K.NONFINITE, "nonfinite", "contains NaN or inf (an overflow, or a division by zero?)"
    if not a0.any() and ref.any():
        return K.ZERO, "zero", "all zeros: nothing was written into it"
    tol = autograd_tolerance(F64)
    bad = ~((a0 - ref).abs() <= tol.atol + tol.rtol * ref.abs())
    if ref.dim() >= 1 and 0 < int(bad.sum()) and not bool(bad.all()):
        rows = [i for i in range(bad.shape[0]) if bool(bad[i].any())]
        if len(rows) < bad.shape[0]:
            return K.ROWS, "rows", f"wrong only on rows {_fmt(rows)} of {bad.shape[0]} (the others are right)"
        if bad.dim() == 2:
            cols = [j for j in range(bad.shape[1]) if bool(bad[:, j].any())]
            return K.ROWS, "cols", f"wrong only in columns {_fmt(cols)} of {bad.shape[1]} (the rest is right)"
    rr = float((ref**2).sum())
    if rr > 0:
        k = float((a0 * ref).sum()) / rr
        if float((a0 - k * ref).norm()) <= 1e-8 * float(a0.norm()):
            return K.SCALE, "scale", f"{k:.6g} times the right answer: a constant factor is wrong"
    return K.OTHER, "", (
        f"values differ (max relative error {_rel(a0, ref):.2g}); it matches none of the known mistakes; "
        "`handgrad dojo hint` explains the rule"
    )


def _fmt(ix: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, ix[:limit])) + (", ..." if len(ix) > limit else "")


def judge(ch: Challenge, probes: list[CProbe], outs: dict[str, Tensor], meta: dict, lines: dict) -> list[Row]:
    rows = []
    for spec in ch.specs:
        row = ch.judge(spec, probes, outs, meta) if ch.judge else None
        if row is None:
            row = judge_tensor(ch, spec, probes, outs, meta)
        if row.line is None:
            row.line = lines.get(spec.blank or spec.name)
        rows.append(row)
    return rows


def infos(spec: Spec, probes: list[CProbe], meta: dict) -> dict[str, dict]:
    return {p.name: meta["probes"].get(p.name, {}).get(spec.name, {"status": "missing"}) for p in probes}


def early(spec: Spec, probes: list[CProbe], meta: dict, shape: tuple = ()) -> Row | None:
    """The row when some probe errored, gave no tensor, or every probe is blank; else None."""
    row = Row(spec.name, shape, "missing")
    got = infos(spec, probes, meta)
    for info in got.values():
        if info.get("status") == "error":
            row.status, row.diagnosis, row.line = "error", info.get("msg", ""), info.get("line")
            return row
        if info.get("status") == "notensor":
            row.status, row.diagnosis = "invalid", info.get("msg", "")
            return row
    if all(i.get("status") == "missing" for i in got.values()):
        row.diagnosis = "still blank"
        return row
    return None


def judge_tensor(ch: Challenge, spec: Spec, probes: list[CProbe], outs: dict[str, Tensor], meta: dict) -> Row:
    tol = autograd_tolerance(F64)
    shape = tuple(probes[0].refs[spec.name].shape)
    row = early(spec, probes, meta, shape)
    if row is not None:
        return row
    row = Row(spec.name, shape, "ok")
    failing = []
    for p in probes:
        a = outs.get(f"{p.name}|{spec.name}")
        ref = p.refs[spec.name]
        if a is None:
            row.status, row.kind = "wrong", K.OTHER
            row.diagnosis = f"None on the probe '{p.about}' but a tensor elsewhere"
            return row
        if a.dtype != ref.dtype:
            row.status = "invalid"
            row.diagnosis = (f"a {str(a.dtype)[6:]} tensor where the inputs are {str(ref.dtype)[6:]}: make "
                             "new tensors with zeros_like/ones_like or dtype=..., so they follow the input")
            return row
        if not close(a, ref, tol):
            failing.append((p, a))
    if failing:
        row.status = "wrong"
        row.max_rel = _rel(failing[0][1], failing[0][0].refs[spec.name])
        row.kind, row.key, row.diagnosis = diagnose(ch, spec, failing)
        if len(failing) < len(probes) and "probe" not in row.diagnosis:
            row.diagnosis += f" (wrong on: {'; '.join(p.about for p, _ in failing)})"
    return row


def behaviour(spec: Spec, probes: list[CProbe], meta: dict) -> tuple[Row, dict[str, object]] | Row:
    """For a row whose answer is a bool or a number: the early row, or (row, probe -> value)."""
    row = early(spec, probes, meta)
    if row is not None:
        return row
    got = infos(spec, probes, meta)
    return Row(spec.name, (), "ok"), {k: v.get("scalar") for k, v in got.items()}


def nan_if_missing(x: float | None) -> float:
    return math.nan if x is None else x
