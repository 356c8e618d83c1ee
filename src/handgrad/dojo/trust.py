"""What the grader takes from the child that ran a learner's file: its replies checked against what the
grader asked for, field by field, before any of it is used. The child may be the learner's code speaking
(it runs in the same process), so a reply is data, never an instruction or a verdict: tensors only
under the keys the grader expects, floating point, of a bounded size; numbers and names of the kinds
expected; line numbers inside the learner's file, with the line's text and place taken from the
grader's own copy of the file; the learner's own messages kept as text, cut short and escaped.
Anything else is dropped, or ends the grade in one line (ReplyError).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from handgrad.dojo.report import safe_text

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NUMEL = 1 << 22  # elements of any one tensor a child may send (the dojo's largest is ~10^4)
STATUS = ("missing", "value", "notensor", "error")
EVENT_KINDS = ("alias", "forward", "setup")
MSG = 300  # characters of a learner's message kept
NAME = re.compile(r"[A-Za-z_][\w.]{0,79}")


class ReplyError(Exception):
    """A reply the grader cannot use: one line, in words."""


def text(v: object, limit: int = MSG) -> str:
    return safe_text(v, limit) if isinstance(v, str) else ""


def name(v: object) -> str:
    return v if isinstance(v, str) and NAME.fullmatch(v) else ""


def number(v: object) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if isinstance(v, int) and abs(v) < 1 << 53 else float(v) if math.isfinite(v) else None


def scalar(v: object) -> object:
    """A behaviour's value: a bool, a number, a short text, or a short list of numbers."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return number(v)
    if isinstance(v, str):
        return text(v, 60)
    if isinstance(v, list) and len(v) <= 16:
        out = [number(x) for x in v]
        return out if all(x is not None for x in out) else None
    return None


class Lines:
    """The grader's own copy of the learner's file: a line number the child names is checked here, and
    its text and place come from here."""

    def __init__(self, source: str):
        self.lines = source.splitlines()

    def line(self, v: object) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= len(self.lines) else None

    def code(self, line: int | None) -> str:
        return self.lines[line - 1].strip()[:200] if line else ""

    def where(self, line: int | None) -> str:
        return f"line {line}" if line else ""


def tensors(got: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """The child's tensors, each under an expected key, floating point and of a bounded size."""
    out = {}
    for k, t in got.items():
        if k not in expected:
            raise ReplyError(f"a tensor the grader did not ask for ({safe_text(k, 60)})")
        if t.dtype not in FLOATS or t.numel() > MAX_NUMEL or t.dim() > 8:
            raise ReplyError(
                f"a tensor the grader refuses ({safe_text(k, 60)}: {t.dtype}, {t.numel():,} elements)"
            )
        out[k] = t
    return out


def info(m: object, lines: Lines) -> dict:
    """One row's record on one probe."""
    if not isinstance(m, dict):
        return {"status": "missing"}
    status = m.get("status") if m.get("status") in STATUS else "error"
    out: dict[str, object] = {"status": status}
    line = lines.line(m.get("line"))
    out.update(line=line, where=lines.where(line), code=lines.code(line))
    if "msg" in m or status in ("error", "notensor"):
        out["msg"] = text(m.get("msg")) or ("an error" if status == "error" else "not a tensor")
    for k in ("type", "name", "dtype"):
        if k in m:
            out[k] = name(m.get(k))
    for k in ("numpy", "autograd"):
        if k in m:
            out[k] = m.get(k) is True
    if "scalar" in m:
        out["scalar"] = scalar(m.get("scalar"))
    return out


def event(ev: object, lines: Lines, rows: set[str]) -> dict | None:
    """An alias, an in-place change of a forward value, or a rebound size, with the grader's own lines."""
    if not isinstance(ev, dict) or ev.get("kind") not in EVENT_KINDS:
        return None
    line = lines.line(ev.get("line"))
    if line is None:
        return None
    out: dict[str, object] = {
        "kind": ev["kind"],
        "line": line,
        "where": lines.where(line),
        "text": lines.code(line),
    }
    if ev["kind"] == "alias":
        if ev.get("key") not in rows or not name(ev.get("var")):
            return None
        out.update(key=ev["key"], var=ev["var"])
    else:
        if not name(ev.get("name")):
            return None
        out["name"] = ev["name"]
    if ev["kind"] == "forward":
        out["inplace"] = ev.get("inplace") is True
    if ev["kind"] == "setup":
        out["value"] = text(ev.get("value"), 40)
        want = number(ev.get("want"))
        if want is None:
            return None
        out["want"] = want
    via = ev.get("via")
    out["via"] = [v for v in via if name(v)][:8] if isinstance(via, list) else []
    b = ev.get("bound")
    if isinstance(b, dict) and name(b.get("name")) and name(b.get("other")) and lines.line(b.get("line")):
        bl = lines.line(b.get("line"))
        out["bound"] = {
            "name": b["name"],
            "other": b["other"],
            "line": bl,
            "where": lines.where(bl),
            "text": lines.code(bl),
        }
    else:
        out["bound"] = None
    return out


def run_reply(
    rep: dict, got: dict[str, Tensor], probes: list[str], rows: list[str], lines: Lines
) -> tuple[dict, dict[str, Tensor]]:
    """A "run" reply: the rows' records per probe, the notes, the in-place events; and the tensors."""
    outs = tensors(got, {f"{p}|{r}" for p in probes for r in rows})
    probes_in = rep.get("probes") if isinstance(rep.get("probes"), dict) else {}
    events_in = rep.get("events") if isinstance(rep.get("events"), dict) else {}
    meta: dict = {"probes": {}, "events": {}, "notes": []}
    for p in probes:
        recs = probes_in.get(p) if isinstance(probes_in.get(p), dict) else {}
        meta["probes"][p] = {r: info(recs[r], lines) for r in rows if r in recs}
        evs = events_in.get(p) if isinstance(events_in.get(p), list) else []
        meta["events"][p] = [e for e in (event(ev, lines, set(rows)) for ev in evs[:200]) if e is not None]
    notes = rep.get("notes") if isinstance(rep.get("notes"), list) else []
    meta["notes"] = [text(nt) for nt in notes[:20] if isinstance(nt, str)]
    return meta, outs


def fingerprint(fp: object) -> dict:
    """A candidate's value as the edit search compares it (runner.fingerprint's fields only)."""
    if not isinstance(fp, dict):
        return {"status": "error"}
    out: dict[str, object] = {
        "status": fp.get("status") if fp.get("status") in (*STATUS, "scalars") else "error"
    }
    shape = fp.get("shape")
    if (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(isinstance(x, int) and 0 <= x < 1 << 31 for x in shape)
    ):
        out["shape"] = shape
    out["finite"] = fp.get("finite") is True
    vals = fp.get("fp")
    if isinstance(vals, list) and len(vals) <= 64 and all(number(x) is not None for x in vals):
        out["fp"] = [float(x) for x in vals]
    elif out["status"] == "value":
        out["finite"] = False
    if isinstance(fp.get("values"), dict):
        out["values"] = {k: scalar(v) for k, v in list(fp["values"].items())[:64] if name(k)}
    return out


def edits_reply(rep: dict, probes: list[str], n: int, full: bool) -> dict[str, list]:
    """An "edits" reply: per probe, n fingerprints (or, full, n flags saying which values came)."""
    res = rep.get("results") if isinstance(rep.get("results"), dict) else {}
    out = {}
    for p in probes:
        got = res.get(p)
        if not isinstance(got, list):
            continue
        got = got[:n]
        out[p] = [x is True for x in got] if full else [fingerprint(x) for x in got]
    return out


def problem(rep: dict) -> str:
    """A child's reason it could not go on (the learner's error, the time limit), as one safe line."""
    return text(rep.get("problem")) or "the grader's child process failed"
