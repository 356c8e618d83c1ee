"""The side of the dojo that runs a learner's code (in a child process for a file, in the notebook's own
process for a notebook). It judges nothing: it returns the learner's tensors, what went wrong where, and
what changed in place; the grader compares. Karpathy, "Becoming a Backprop Ninja": each gradient line
runs with the right upstream gradients fed in, so one mistake shows once, where it is.

As a child (`python -m handgrad.dojo.runner`, or forked by child.py) it serves JSON requests, one per
line: load a file, run it on the probes (tensors in safetensors files), evaluate edits of its lines.
"""

from __future__ import annotations

import ast
import importlib
import io
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from types import CodeType

import torch
from torch import Tensor

from handgrad.dojo import channel
from handgrad.dojo.framework import BEGIN, END

DEFS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MUTATORS = {
    "append",
    "extend",
    "insert",
    "pop",
    "remove",
    "update",
    "setdefault",
    "add",
    "clear",
    "sort",
    "reverse",
}  # methods that change the object they are called on (as x.op_() does a tensor)
SIZES = ("n", "batch_size", "n_embd", "n_hidden", "block_size", "vocab_size")  # the setup's sizes
FP_K = 6  # numbers in a fingerprint: random projections of a tensor (what an edit's value is compared by)


class OutOfTime(BaseException):
    """Raised by the alarm inside the learner's code (BaseException: `except Exception` cannot eat it)."""


class FileProblem(Exception):
    """The file cannot be graded at all (syntax error, no region, an error before any row): one line."""


# ---------------------------------------------------------------------------- the learner's source
@dataclass
class Stmt:
    """One top-level statement of the learner's region."""

    node: ast.stmt
    code: CodeType
    line: int  # its first line in its file or cell
    where: str  # "line 42", or "In [12] line 3" in a notebook
    writes: set[str]  # names assigned, augmented, subscript-assigned or changed in place (x.add_(...))
    reads: set[str]  # names it loads
    text: str  # its first line, stripped
    filename: str


@dataclass
class Parsed:
    """A learner's file: its definitions (compiled) and its region statements, or the whole module."""

    filename: str
    text: str
    lines: dict[str, list[str]]  # filename -> its lines (a notebook has one per cell)
    defs: CodeType | None = None
    region: list[Stmt] = field(default_factory=list)
    tree: ast.Module | None = None  # call mode: the module, so an edited statement can be put back in it
    region_line: int = 0
    tops: list[tuple[str, str]] = field(default_factory=list)  # a notebook's defs: (their cell's text, label)


def writes_of(node: ast.AST) -> set[str]:
    """The names a statement binds or changes: targets, subscript/attribute bases, x.op_() receivers."""
    out: set[str] = set()

    def base(n: ast.AST) -> ast.AST:
        while isinstance(n, (ast.Subscript, ast.Attribute)):
            n = n.value
        return n

    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            out.add(sub.id)
        elif isinstance(sub, (ast.Subscript, ast.Attribute)) and isinstance(sub.ctx, ast.Store):
            b = base(sub.value)
            if isinstance(b, ast.Name):
                out.add(b.id)
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                out.add(f"self.{sub.attr}")
        elif (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and (sub.func.attr.endswith("_") or sub.func.attr in MUTATORS)
        ):
            b = base(sub.func.value)
            if isinstance(b, ast.Name):
                out.add(b.id)
    return out


def reads_of(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def make_stmt(s: ast.stmt, filename: str, lines: list[str], label: str = "") -> Stmt:
    code = compile(ast.Module([s], []), filename, "exec")
    text = lines[s.lineno - 1].strip() if 0 < s.lineno <= len(lines) else ""
    where = f"{label} line {s.lineno}" if label else f"line {s.lineno}"
    return Stmt(s, code, s.lineno, where, writes_of(s), reads_of(s), text, filename)


def syntax_problem(e: SyntaxError, offset: int = 0) -> FileProblem:
    text = f": {e.text.strip()}" if e.text and e.text.strip() else ""
    return FileProblem(f"line {(e.lineno or 0) + offset}: SyntaxError: {e.msg}{text}")


def parse(text: str, filename: str, mode: str) -> Parsed:
    """Compile the file's definitions and its region's statements (mode "region"), or the whole module
    without its `if __name__ == "__main__":` part (mode "call")."""
    try:
        tree = ast.parse(text, filename)
    except SyntaxError as e:
        raise syntax_problem(e) from None
    lines = text.splitlines()
    p = Parsed(filename, text, {filename: lines})
    if mode == "call":
        tree.body = [s for s in tree.body if not _is_main_guard(s)]
        p.tree = tree
        p.defs = compile(tree, filename, "exec")
        return p
    a, b = region_bounds(lines)
    p.defs = compile(
        ast.Module([s for s in tree.body if isinstance(s, DEFS) and not a < s.lineno <= b], []),
        filename,
        "exec",
    )
    # the region's statements, dedented if the region sits in a loop (exercise 4's training loop)
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines[a:b] if ln.strip()), default=0)
    body = "\n".join(ln[indent:] if ln.strip() else "" for ln in lines[a:b])
    try:
        sub = ast.parse(body, filename)
    except SyntaxError as e:  # indentation inside the region, say
        raise syntax_problem(e, a) from None
    ast.increment_lineno(sub, a)
    for node in ast.walk(sub):
        if hasattr(node, "col_offset"):
            node.col_offset += indent
            if getattr(node, "end_col_offset", None) is not None:
                node.end_col_offset += indent
    p.region = [make_stmt(s, filename, lines) for s in sub.body]
    p.region_line = a + 1
    return p


def region_bounds(lines: list[str]) -> tuple[int, int]:
    """(a, b): the region is lines a .. b-1 (0-based), between the first `# >>>` and the next `# <<<`."""
    starts = [i for i, ln in enumerate(lines) if BEGIN.match(ln)]
    if not starts:
        raise FileProblem(
            "the '# >>>' and '# <<<' lines around your code are missing; they mark where the "
            "grader looks (compare with a fresh `handgrad dojo start`)"
        )
    ends = [i for i, ln in enumerate(lines) if END.match(ln) and i > starts[0]]
    if not ends:
        raise FileProblem(
            f"line {starts[0] + 1}: '# >>>' has no '# <<<' after it; the grader runs the lines "
            "between the two"
        )
    return starts[0] + 1, ends[0]


def _is_main_guard(s: ast.stmt) -> bool:
    return (
        isinstance(s, ast.If)
        and isinstance(s.test, ast.Compare)
        and isinstance(s.test.left, ast.Name)
        and s.test.left.id == "__name__"
    )


def learner_error(e: BaseException, p: Parsed) -> dict:
    """'line N: Type: message' from the learner's own frames only (no traceback of the grader)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in p.lines]
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OutOfTime):
        msg = "still running at the time limit (an infinite loop?)"
    frame = frames[-1] if frames else None
    line = frame.lineno if frame else None
    lines = p.lines.get(frame.filename, []) if frame else []
    code = lines[line - 1].strip() if line and 0 < line <= len(lines) else ""
    label = "" if not frame or frame.filename == p.filename else _label(frame.filename)
    where = (f"{label} line {line}" if label else f"line {line}") if line else ""
    text = (
        f"{where + ': ' if where else ''}{type(e).__name__}: {msg}"
        if not isinstance(e, OutOfTime)
        else f"{where + ': ' if where else ''}{msg}"
    )
    out = {"line": line, "where": where, "msg": text, "code": code, "type": type(e).__name__}
    if isinstance(e, NameError) and getattr(e, "name", None):
        out["name"] = e.name
    return out


def _label(filename: str) -> str:
    """A notebook cell's filename `<In [12]>` as the learner knows it: `In [12]`."""
    return filename.strip("<>")


# ---------------------------------------------------------------------------- what a value is
def describe(value: object) -> dict:
    """What a learner's answer is, when it is not a tensor we can grade."""
    if value is None or value is Ellipsis:
        return {"status": "missing"}
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            return {"status": "notensor", "msg": f"a tensor on {value.device}, the grader runs on the CPU"}
        if not value.is_floating_point():
            return {
                "status": "notensor",
                "msg": f"a {str(value.dtype)[6:]} tensor: a gradient is floating point",
            }
        return {"status": "value"}
    kind = type(value).__module__ + "." + type(value).__name__
    if kind.startswith("numpy."):
        return {
            "status": "notensor",
            "numpy": True,
            "msg": f"a NumPy array ({kind}), not a torch tensor: compute it with torch operations on the "
            "given tensors",
        }
    return {"status": "notensor", "msg": f"a {type(value).__name__}, not a torch tensor"}


def take(value: Tensor) -> Tensor:
    return value.detach().clone().contiguous()


def storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return 0


def fingerprint(value: object, seed: int) -> dict:
    """A value as a few numbers: its shape and FP_K random projections in float64 (the same seed gives
    the same projections in the grader), so many candidate values travel as a few bytes each."""
    d = describe(value)
    if d["status"] != "value":
        return {"status": d["status"]}
    t = value.detach().double().reshape(-1)
    if not bool(torch.isfinite(t).all()):
        return {"status": "value", "shape": list(value.shape), "finite": False}
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(FP_K, t.numel(), generator=g, dtype=torch.float64)
    return {
        "status": "value",
        "shape": list(value.shape),
        "finite": True,
        "fp": (r @ t).tolist(),
        "norm": float(t.norm()),
    }


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New tensors follow the probe: torch.zeros(...) in a learner's line is float64 on a float64 probe,
    as it is float32 in the learner's own float32 run. Warnings stay quiet: the learner's lines run here
    again (and edited), and what they warn about is not the grade."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(before)


# ---------------------------------------------------------------------------- running a region
@dataclass
class RegionRun:
    out: dict[str, Tensor] = field(default_factory=dict)  # row key -> its value at its last line
    meta: dict[str, dict] = field(default_factory=dict)  # row key -> status, line, message
    notes: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # in-place changes, aliases, setup sizes rebound


class Region:
    """Runs a region's statements on one probe. feed=True: right after the last statement that writes a
    row's variable its value is recorded and the right upstream value (feeds[key]) put in its place, so the
    statements below read right upstream gradients; feed=False: the learner's own values flow. Forward
    values and sizes a statement changes are restored (the change is reported), so a right line below is
    never blamed for it; a recorded gradient changed later through another name is reported as an alias."""

    def __init__(
        self,
        p: Parsed,
        base: dict,
        values: dict,
        feeds: dict[str, Tensor],
        rows: dict[str, str],
        feed: bool,
        track: bool = True,
    ):
        self.p, self.feeds, self.rows, self.feed, self.track = p, feeds, rows, feed, track
        self.values = values
        self.last = {
            k: max((i for i, s in enumerate(p.region) if var in s.writes), default=-1)
            for k, var in rows.items()
        }
        self.ns = dict(base)
        self.ns.update(values)
        self.ns["__name__"] = "__dojo__"
        self.run = RegionRun()
        for k in rows:
            self.run.meta[k] = {"status": "missing", "line": None} if self.last[k] < 0 else {}
            if self.last[k] < 0 and feed and k in feeds:
                self.ns[rows[k]] = feeds[k].clone()
        # what must not change: forward values (restored from a pristine copy) and the setup's sizes
        self.pristine = {k: v.clone() for k, v in values.items() if isinstance(v, Tensor)} if track else {}
        self.watch_forward = {k: (v, v._version) for k, v in values.items() if isinstance(v, Tensor)}
        self.watched: dict[str, tuple[Tensor, int, str]] = {}  # key -> (tensor, version, its var)
        self.bound: dict[
            str, tuple[str, int, Stmt]
        ] = {}  # name -> (a name it shares memory with, the memory, where)

    def step(self, i: int, code: CodeType | None = None) -> None:
        st = self.p.region[i]
        try:
            exec(code or st.code, self.ns)  # noqa: S102  the learner's own code, in its own process
        except OutOfTime:
            raise
        except Exception as e:  # theirs: recorded for every row this statement writes
            err = learner_error(e, self.p)
            hit = [k for k, var in self.rows.items() if var in st.writes]
            for k in hit:
                self.run.meta[k].setdefault("error", err)
            if not hit and err["msg"] not in self.run.notes:
                self.run.notes.append(f"{err['msg']} (a line that writes no graded row)")
        if self.track:
            self._after(st)
        for k, var in self.rows.items():
            if self.last[k] != i:
                continue
            self._record(k, self.ns.get(var), st)
            if self.feed and k in self.feeds:
                fed = self.feeds[k].clone()
                self.ns[var] = fed
                if self.track:
                    self.watched[f"fed:{k}"] = (fed, fed._version, var)

    def _record(self, k: str, value: object, st: Stmt) -> None:
        m = self.run.meta[k]
        if "error" in m:
            err = m["error"]
            m.update(
                status="error",
                line=err["line"],
                where=err["where"],
                msg=err["msg"],
                code=err["code"],
                type=err.get("type", ""),
                name=err.get("name", ""),
            )
            return
        d = describe(value)
        d.update(line=st.line, where=st.where)
        m.update(d)
        if d["status"] == "value":
            self.run.out[k] = take(value)
            m["dtype"] = str(value.dtype)[6:]
            if value.requires_grad or value.grad_fn is not None:
                m["autograd"] = True
            if self.track:
                self.watched[k] = (value, value._version, self.rows[k])

    def _after(self, st: Stmt) -> None:
        """What the statement changed that it must not: forward values, sizes, recorded gradients."""
        ns, ev = self.ns, self.run.events
        written = [w for w in st.writes if isinstance(ns.get(w), Tensor)]
        if written:  # which names now share memory with another name (an assignment without .clone())
            ptrs: dict[int, list[str]] = {}
            for k, v in ns.items():
                if isinstance(v, Tensor) and not k.startswith("_"):
                    ptrs.setdefault(storage(v), []).append(k)
            for w in written:
                ptr = storage(ns[w])
                others = [o for o in ptrs.get(ptr, []) if o != w]
                if not others:
                    self.bound.pop(w, None)
                elif w not in self.bound or self.bound[w][1] != ptr:  # keep the line that made the alias
                    self.bound[w] = (others[0], ptr, st)
        for k, (t, ver) in list(self.watch_forward.items()):
            now = ns.get(k)
            if now is t and t._version == ver:
                continue
            changed = now is t  # in place; else the name was bound to something else
            same = (
                isinstance(now, Tensor)
                and now.shape == self.pristine[k].shape
                and bool(torch.equal(now, self.pristine[k]))
            )
            if not same:
                ev.append(
                    {
                        "kind": "forward",
                        "name": k,
                        "line": st.line,
                        "where": st.where,
                        "text": st.text,
                        "inplace": changed,
                        "via": self._via(st, t) if changed else [],
                        "bound": self._bound_of(st, t) if changed else None,
                    }
                )
            fresh = self.pristine[k].clone()
            ns[k] = fresh
            self.watch_forward[k] = (fresh, fresh._version)
        for s in SIZES:
            if s in self.values and ns.get(s) != self.values[s]:
                ev.append(
                    {
                        "kind": "setup",
                        "name": s,
                        "value": repr(ns.get(s))[:40],
                        "want": self.values[s],
                        "line": st.line,
                        "where": st.where,
                        "text": st.text,
                    }
                )
                ns[s] = self.values[s]
        for key, (t, ver, var) in list(self.watched.items()):
            if t._version != ver:
                ev.append(
                    {
                        "kind": "alias",
                        "key": key.removeprefix("fed:"),
                        "var": var,
                        "line": st.line,
                        "where": st.where,
                        "text": st.text,
                        "via": self._via(st, t),
                        "bound": self._bound_of(st, t),
                    }
                )
                self.watched[key] = (t, t._version, var)

    def _via(self, st: Stmt, t: Tensor) -> list[str]:
        """The names this statement changed `t` through (they share its memory)."""
        p = storage(t)
        return sorted(w for w in st.writes if isinstance(self.ns.get(w), Tensor) and storage(self.ns[w]) == p)

    def _bound_of(self, st: Stmt, t: Tensor) -> dict | None:
        """Where the name this statement changed `t` through was made to share its memory."""
        for w in self._via(st, t):
            if w in self.bound:
                other, _, at = self.bound[w]
                return {"name": w, "other": other, "line": at.line, "where": at.where, "text": at.text}
        return None

    def all(self) -> RegionRun:
        for i in range(len(self.p.region)):
            self.step(i)
        return self.run


def run_region(
    p: Parsed,
    base: dict,
    values: dict,
    feeds: dict[str, Tensor],
    rows: dict[str, str],
    feed: bool,
    dtype: torch.dtype = torch.float64,
) -> RegionRun:
    """Run the whole region once on one probe (see Region)."""
    with default_dtype(dtype):
        return Region(p, base, values, feeds, rows, feed).all()


def _result(value: object, seed: int, full: bool) -> object:
    """A candidate's value: fingerprinted, or (full) the value itself (None when it is not a tensor)."""
    if full:
        return take(value) if describe(value)["status"] == "value" else None
    return fingerprint(value, seed)


def edit_values(
    p: Parsed,
    base: dict,
    values: dict,
    feeds: dict[str, Tensor],
    rows: dict[str, str],
    key: str,
    index: int,
    sources: list[str],
    dtype: torch.dtype,
    seed: int,
    full: bool = False,
) -> list[object]:
    """Each candidate replaces statement `index` (its source given); the statements after it run up to
    the row's last one, fed as usual: the row's value, fingerprinted (or whole, with full=True). The
    statements before run once."""
    lead = Region(p, base, values, feeds, rows, True, track=False)
    stop = lead.last.get(key, -1)
    later = {w for s in p.region[index : stop + 1] for w in s.writes}  # what the candidates may change
    out = []
    with default_dtype(dtype):
        for i in range(index):
            lead.step(i)
        for src in sources:
            r = Region.__new__(Region)
            r.__dict__.update(lead.__dict__)
            r.ns = {k: (v.clone() if isinstance(v, Tensor) and k in later else v) for k, v in lead.ns.items()}
            r.run = RegionRun(meta={k: {} for k in rows})
            try:
                code = compile(src, p.region[index].filename, "exec")
            except SyntaxError:
                out.append(None if full else {"status": "error"})
                continue
            for i in range(index, stop + 1):
                r.step(i, code if i == index else None)
            if key in r.run.out:
                out.append(_result(r.run.out[key], seed, full))
            else:
                out.append(None if full else {"status": r.run.meta.get(key, {}).get("status", "error")})
    return out


# ---------------------------------------------------------------------------- call mode
class Skip(Exception):
    """The learner's call failed (recorded): its rows are done for this probe."""


class Recorder:
    """Calls the learner's functions for one probe and records each row: a tensor, a behaviour
    (bool/int/float), missing, not a tensor, or their exception with their line."""

    def __init__(self, p: Parsed, probe: str):
        self.p, self.probe = p, probe
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
            err = learner_error(e, self.p)
            for r in rows:
                self.meta.setdefault(
                    r,
                    {
                        "status": "error",
                        "line": err["line"],
                        "where": err["where"],
                        "msg": err["msg"],
                        "code": err["code"],
                    },
                )
            raise Skip() from None

    def unpack(self, rows: list[str], value: object, n: int, what: str) -> tuple:
        if isinstance(value, (tuple, list)) and len(value) == n:
            return tuple(value)
        for r in rows:
            got = type(value).__name__ + (f" of {len(value)}" if isinstance(value, (tuple, list)) else "")
            self.meta.setdefault(
                r,
                {"status": "error", "line": None, "msg": f"{what} must return {n} values; it returned {got}"},
            )
        raise Skip()

    def put(self, row: str, value: object) -> None:
        if row in self.meta:
            return
        if isinstance(value, (bool, int, float)) and not isinstance(value, Tensor):
            self.meta[row] = {"status": "value", "scalar": value}
            return
        d = describe(value)
        if d["status"] == "value":
            self.out[row] = take(value)
            d["dtype"] = str(value.dtype)[6:]
            if value.requires_grad or value.grad_fn is not None:
                d["autograd"] = True
        self.meta[row] = d


def driver_of(path: str) -> Callable:
    """The driver function named "module:function" (a plain import, no registration)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_call(p: Parsed, base: dict, driver: str, inputs: dict[str, Tensor], probe: str) -> Recorder:
    rec = Recorder(p, probe)
    try:
        driver_of(driver)(rec, base, {k: t.clone() for k, t in inputs.items()})
    except Skip:
        pass
    return rec


def call_edit_values(
    p: Parsed,
    base: dict,
    driver: str,
    inputs: dict[str, Tensor],
    probe: str,
    key: str,
    top: int,
    sources: list[str],
    seed: int,
    full: bool = False,
    owners: list[str] | None = None,
) -> list[object]:
    """Each candidate is an edited function (a method of class `owner`, or a module-level function): it
    is defined again in a copy of the module's namespace (a method in a subclass that replaces it), the
    driver runs, and the row's value is fingerprinted."""
    out = []
    for src, owner in zip(sources, owners or [""] * len(sources)):
        ns = dict(base)
        try:
            if owner:
                tmp = dict(base)
                exec(compile(src, p.filename, "exec"), tmp)  # noqa: S102  the learner's edited method
                name = next(n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef))
                ns[owner] = type(owner, (base[owner],), {name: tmp[name]})
            else:
                exec(compile(src, p.filename, "exec"), ns)  # noqa: S102  the learner's edited function
        except OutOfTime:
            raise
        except Exception:
            out.append(None if full else {"status": "error"})
            continue
        rec = run_call(p, ns, driver, inputs, probe)
        if key.startswith("*"):  # behaviours: every row's number or verdict at once
            vals = {
                k: m.get("scalar")
                for k, m in rec.meta.items()
                if m.get("status") == "value" and "scalar" in m
            }
            out.append(vals if full else {"status": "scalars", "values": vals})
            continue
        m = rec.meta.get(key, {})
        if m.get("status") == "value" and key in rec.out:
            out.append(_result(rec.out[key], seed, full))
        else:
            out.append(None if full else {"status": m.get("status", "missing")})
    return out


# ---------------------------------------------------------------------------- the child's requests
def split_probe(tensors: dict[str, Tensor], scalars: dict, probe: str) -> tuple[dict, dict[str, Tensor]]:
    """A probe's namespace values (`probe|v|name`, plus its numbers) and feeds (`probe|f|key`)."""
    values: dict[str, object] = dict(scalars.get(probe, {}))
    feeds: dict[str, Tensor] = {}
    for k, t in tensors.items():
        pr, kind, name = k.split("|", 2)
        if pr == probe:
            (values if kind == "v" else feeds)[name] = t
    return values, feeds


DTYPES = {"float64": torch.float64, "float32": torch.float32}
OPS = ("load", "run", "edits", "train")  # the requests a child answers


class Session:
    """The child's state across requests: the learner's file, parsed and defined, and the probes. Each
    request returns (its reply's fields, its tensors): they go back on the channel."""

    def __init__(self, watch: Watch | None = None):
        self.p: Parsed | None = None
        self.base: dict = {}
        self.mode = "region"
        self.driver = ""
        self.tensors: dict[str, Tensor] = {}
        self.scalars: dict = {}
        self.watch = watch

    def load(self, req: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict]:
        self.mode, self.driver = req["mode"], req.get("driver", "")
        self.p = parse(req["source"], req["filename"], self.mode)
        if self.watch is not None:
            self.watch.filename = self.p.filename
        self.base = {"__name__": "__dojo__", "__file__": req["filename"]}
        try:
            exec(self.p.defs, self.base)  # noqa: S102  the learner's imports and definitions
        except OutOfTime:
            raise
        except Exception as e:
            raise FileProblem(
                learner_error(e, self.p)["msg"] + " (in the file's imports or definitions, "
                "before any row is graded)"
            ) from None
        self.tensors = tensors
        self.scalars = req.get("scalars", {})
        return {}, {}

    def run(self, req: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict]:
        out: dict[str, Tensor] = {}
        meta: dict = {"probes": {}, "notes": [], "events": {}}
        for probe in req["probes"]:
            name = probe["name"]
            values, feeds = split_probe(self.tensors, self.scalars, name)
            if self.mode == "region":
                r = run_region(
                    self.p,
                    self.base,
                    values,
                    feeds,
                    req["rows"],
                    probe["feed"],
                    DTYPES[probe.get("dtype", "float64")],
                )
                out.update({f"{name}|{k}": t for k, t in r.out.items()})
                meta["probes"][name] = r.meta
                meta["events"][name] = r.events
                meta["notes"] += [nt for nt in r.notes if nt not in meta["notes"]]
            else:
                with default_dtype(DTYPES[probe.get("dtype", "float64")]):
                    rec = run_call(self.p, self.base, self.driver, _inputs(values), name)
                out.update({f"{name}|{k}": t for k, t in rec.out.items()})
                meta["probes"][name] = rec.meta
            if self.watch is not None:
                self.watch.values(meta["probes"][name])
        return meta, out

    def edits(self, req: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict]:
        """Fingerprints of each candidate's value; with "full", the values themselves as tensors."""
        results: dict[str, list] = {}
        full = bool(req.get("full"))
        out: dict[str, Tensor] = {}
        for probe in req["probes"]:
            name = probe["name"]
            values, feeds = split_probe(self.tensors, self.scalars, name)
            dtype = DTYPES[probe.get("dtype", "float64")]
            if self.mode == "region":
                got = edit_values(
                    self.p,
                    self.base,
                    values,
                    feeds,
                    req["rows"],
                    req["key"],
                    req["index"],
                    req["sources"],
                    dtype,
                    req["seed"],
                    full,
                )
            else:
                with default_dtype(dtype):
                    got = call_edit_values(
                        self.p,
                        self.base,
                        self.driver,
                        _inputs(values),
                        name,
                        req["key"],
                        req["index"],
                        req["sources"],
                        req["seed"],
                        full,
                        req.get("owners"),
                    )
            if full and not req["key"].startswith("*"):
                out.update({f"{name}|{k}": t for k, t in enumerate(got) if t is not None})
                results[name] = [t is not None for t in got]
            else:
                results[name] = got
        return {"results": results}, out

    def train(self, req: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict]:
        from handgrad.dojo.loop import run_training

        out, meta = run_training(self.p, self.base, tensors, req["rows"], float(req["lr"]), run_region)
        return meta, out


def _inputs(values: dict) -> dict[str, Tensor]:
    return {k: v for k, v in values.items() if isinstance(v, Tensor)}


# ---------------------------------------------------------------------------- the child's watch
class Watch:
    """What the learner's own code does while it runs in the child, as it happens: an audit event
    (sys.addaudithook: exec, open, a process, the network, frames, gc; see scan.RUNTIME), autograd
    called, or a value that requires grad, each with the learner's line. It can only add flags to what
    the grader's own reading of the file finds (scan.py), never take one away, and the grader words
    them itself: the child sends an event's name and a line number."""

    def __init__(self):
        from handgrad.dojo import scan

        self.filename: str | None = None
        self.events: list[dict] = []
        self._seen: set[tuple] = set()
        self._busy = False
        self._audit, self._modules = scan.RUNTIME, scan.OUTSIDE_MODULES
        self._ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

    def install(self) -> None:
        sys.addaudithook(self._hook)
        for name in ("backward", "grad"):
            original = getattr(torch.autograd, name)
            setattr(torch.autograd, name, self._wrap(original, f"autograd.{name}"))

    def _wrap(self, fn: Callable, event: str) -> Callable:
        def watched(*args, **kwargs):
            self.add(event, self._line(), "")
            return fn(*args, **kwargs)

        return watched

    def _line(self, direct: bool = False) -> int | None:
        """The learner's line running now, when it is the learner's code that called (not the grader's
        own code: the nearer of the two on the stack decides). `direct`: only when the learner's line
        itself did it (an audit event), not torch's code that the line called (its lazy imports, say)."""
        if self.filename is None:
            return None
        f = sys._getframe(2)
        for _ in range(64):
            if f is None:
                return None
            name = f.f_code.co_filename
            if name == self.filename:
                return f.f_lineno
            if name.startswith(self._ours) or (direct and not name.startswith("<frozen importlib")):
                return None
            f = f.f_back
        return None

    def _hook(self, event: str, args: tuple) -> None:
        if self._busy or (event not in self._audit and event != "import"):
            return
        self._busy = True
        try:
            detail = ""
            if event == "import":
                detail = str(args[0]) if args and isinstance(args[0], str) else ""
                root = detail.split(".")[0]
                if not (root in self._modules or (root == "handgrad" and detail != "handgrad.dojo.setup")):
                    return
            elif event == "object.__getattr__":
                detail = str(args[1]) if len(args) > 1 else ""
            line = self._line(direct=True)
            if line is not None:
                self.add(event, line, detail)
        except Exception:  # noqa: BLE001, S110  a watch that fails must not change what the learner's code does
            pass
        finally:
            self._busy = False

    def add(self, event: str, line: int | None, detail: str) -> None:
        key = (event, line, detail)
        if line is not None and key not in self._seen and len(self.events) < 200:
            self._seen.add(key)
            self.events.append({"event": event, "line": line, "detail": detail[:80]})

    def values(self, meta: dict) -> None:
        """A row's value that required grad (autograd's graph on it) came from autograd."""
        for key, m in meta.items():
            if isinstance(m, dict) and m.get("autograd"):
                self.add("requires_grad", m.get("line"), key)

    def take(self) -> list[dict]:
        out, self.events = self.events, []
        return out


def serve(rfd: int, wfd: int) -> None:
    """Answer requests (one frame each) until "quit" or the end of input. Each request gets the time
    limit it names; the learner's prints are not the grader's output, and the learner's exit() is one
    line, as an exception is."""
    torch.set_num_threads(1)
    sys.dont_write_bytecode = True
    watch = Watch()
    watch.install()
    session = Session(watch)
    reader = channel.Reader(rfd)

    def alarm(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGALRM, alarm)
    while True:
        try:
            req, tensors = reader.read()
        except (EOFError, channel.ChannelError):
            break
        if req.get("op") == "quit":
            break
        sink = io.StringIO()
        out: dict[str, Tensor] = {}
        try:
            if req.get("op") not in OPS:
                op = str(req.get("op"))[:20]
                raise FileProblem(f"the grader asked for {op!r}, which a child does not do")
            signal.setitimer(signal.ITIMER_REAL, float(req.get("time_limit", 20.0)))
            with redirect_stdout(sink), redirect_stderr(sink):
                fields, out = getattr(session, req["op"])(req, tensors)
            reply = {"ok": True, **fields}
        except FileProblem as e:
            reply = {"ok": False, "problem": str(e)}
        except OutOfTime as e:
            err = learner_error(e, session.p) if session.p else {"msg": "still running at the time limit"}
            reply = {
                "ok": False,
                "problem": f"{err['msg']} (time limit {float(req.get('time_limit', 20)):g} s)",
            }
        except (SystemExit, KeyboardInterrupt) as e:  # the learner's exit(), or a KeyboardInterrupt raised
            err = learner_error(e, session.p) if session.p else {}
            where = f"{err['where']}: " if err.get("where") else ""
            reply = {
                "ok": False,
                "problem": f"{where}your file calls exit() or raises {type(e).__name__}, which ends a "
                "program: the grader cannot grade past it",
            }
        except Exception as e:  # the grader's own failure on this file: one line, never a traceback
            err = learner_error(e, session.p) if session.p else {"msg": f"{type(e).__name__}: {e}"}
            reply = {"ok": False, "problem": err["msg"]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        reply["id"] = req.get("id")
        reply["watch"] = watch.take()
        try:
            channel.send(wfd, reply, out)
        except (ValueError, TypeError, RuntimeError):  # a reply that cannot be framed: say so instead
            said = {"ok": False, "problem": "the child could not send its reply", "id": req.get("id")}
            channel.send(wfd, said)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """The same alarm in this process (a notebook's), where a signal can be had (the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise OutOfTime()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main() -> int:
    """The child as its own process (under bubblewrap): its channel is the two descriptors the grader
    names in HANDGRAD_DOJO_FDS; every other descriptor but 0-2 (/dev/null) is closed first."""
    rfd, wfd = (int(x) for x in os.environ.get("HANDGRAD_DOJO_FDS", "0,1").split(","))
    if wfd == 1:  # run by hand: replies on a copy of stdout, the learner's prints nowhere
        wfd = os.dup(1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = []
    for fd in fds:
        if fd > 2 and fd not in (rfd, wfd):
            try:
                os.close(fd)
            except OSError:
                pass
    serve(rfd, wfd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
