"""The child process that runs a learner's file (`python -m handgrad.dojo.runner`): it reads a job list
on stdin, runs the learner's code on the probes the parent wrote (safetensors), and writes back the
learner's tensors (safetensors) and what happened (JSON). It judges nothing: the parent, which never
runs the learner's code, compares. Each gradient statement runs with the correct upstream gradients
fed in (local grading); one run per file also follows the learner's own chain (end to end).
"""

from __future__ import annotations

import ast
import io
import json
import re
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field

import torch
from torch import Tensor

BEGIN = re.compile(r"^\s*# >>>")  # the line before a learner's code region
END = re.compile(r"^\s*# <<<")  # the line after it
DEFS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class OutOfTime(BaseException):
    """Raised by the alarm inside the learner's code (BaseException: `except Exception` cannot eat it)."""


class FileProblem(Exception):
    """The file cannot be graded at all (syntax error, no code region, out of time): one line, exit 2."""


# ---------------------------------------------------------------------------- the learner's file
@dataclass
class Stmt:
    code: object  # a code object compiled with the learner's file name and line numbers
    line: int
    writes: set[str]  # names assigned, augmented, subscript-assigned or mutated in place (x.add_(...))
    text: str


@dataclass
class Parsed:
    filename: str
    lines: list[str]
    defs: object | None  # the file's top-level imports and definitions, compiled
    region: list[Stmt] = field(default_factory=list)
    region_code: object | None = None  # the whole region as one code object (for training loops)
    region_line: int = 0


def _writes(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            out.add(sub.id)
        elif isinstance(sub, (ast.Subscript, ast.Attribute)) and isinstance(sub.ctx, ast.Store):
            base = sub.value
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
        elif (
            isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr.endswith("_")
        ):
            base = sub.func.value
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
    return out


def parse(source: str, filename: str, region: bool) -> Parsed:
    """Compile the file's definitions, and the statements of its `# >>>` ... `# <<<` region."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as e:
        raise FileProblem(
            f"line {e.lineno}: SyntaxError: {e.msg}" + (f": {e.text.strip()}" if e.text else "")
        ) from None
    lines = source.splitlines()
    p = Parsed(filename, lines, None)
    if not region:
        body = [s for s in tree.body if not _is_main_guard(s)]
        p.defs = compile(ast.Module(body, []), filename, "exec")
        return p
    starts = [i for i, ln in enumerate(lines) if BEGIN.match(ln)]
    ends = [i for i, ln in enumerate(lines) if END.match(ln)]
    if not starts or not ends or ends[0] < starts[0]:
        raise FileProblem(
            "the '# >>>' and '# <<<' lines around your code are missing; they mark where the "
            "grader looks (compare with a fresh `handgrad dojo start`)"
        )
    a, b = starts[0] + 1, ends[0]  # region lines a .. b-1 (0-based)
    p.defs = compile(
        ast.Module([s for s in tree.body if isinstance(s, DEFS) and not (a < s.lineno <= b)], []),
        filename,
        "exec",
    )
    text = textwrap.dedent("\n".join(lines[a:b]))
    try:
        sub = ast.parse(text, filename)
    except SyntaxError as e:  # indentation inside the region, say
        raise FileProblem(f"line {(e.lineno or 0) + a}: SyntaxError: {e.msg}") from None
    ast.increment_lineno(sub, a)
    p.region_code = compile(sub, filename, "exec")
    p.region_line = a + 1
    for s in sub.body:
        p.region.append(
            Stmt(
                compile(ast.Module([s], []), filename, "exec"),
                s.lineno,
                _writes(s),
                lines[s.lineno - 1].strip(),
            )
        )
    return p


def _is_main_guard(s: ast.stmt) -> bool:
    return (
        isinstance(s, ast.If)
        and isinstance(s.test, ast.Compare)
        and isinstance(s.test.left, ast.Name)
        and s.test.left.id == "__name__"
    )


def learner_error(e: BaseException, filename: str, lines: list[str]) -> dict:
    """'line N: Type: message' from the learner's own frames only."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OutOfTime):
        msg = "still running at the time limit (an infinite loop?)"
    line = frames[-1].lineno if frames else None
    code = lines[line - 1].strip() if line and 0 < line <= len(lines) else ""
    where = f"line {line}: " if line else ""
    text = f"{where}{type(e).__name__}: {msg}" if not isinstance(e, OutOfTime) else f"{where}{msg}"
    return {"line": line, "msg": text, "code": code}


# ---------------------------------------------------------------------------- running a region
def describe(value: object) -> dict:
    """What a learner's answer is, when it is not a tensor we can grade."""
    if value is None:
        return {"status": "missing"}
    if isinstance(value, Tensor):
        return {"status": "value"}
    kind = type(value).__module__ + "." + type(value).__name__
    if kind.startswith("numpy."):
        return {
            "status": "notensor",
            "msg": f"a NumPy array ({kind}), not a torch tensor: compute it with torch "
            "operations on the given tensors",
        }
    if value is Ellipsis:
        return {"status": "missing"}
    return {"status": "notensor", "msg": f"a {type(value).__name__}, not a torch tensor"}


def _take(value: Tensor) -> Tensor:
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.clone().contiguous()


def run_region(
    p: Parsed, base: dict, values: dict, feeds: dict[str, Tensor], grads: list[str], feed: bool
) -> tuple[dict[str, Tensor], dict[str, dict], list[str]]:
    """Run the region statement by statement in a namespace holding `values`. With feed=True, right
    after the last statement that writes d<g> its value is recorded and replaced by feeds[g], so the
    statements below read correct upstream gradients (local grading). With feed=False the learner's
    own values flow (end to end) and the values at the end are recorded."""
    ns = dict(base)
    ns.update(values)
    ns["__name__"] = "__dojo__"
    last = {g: max((i for i, s in enumerate(p.region) if f"d{g}" in s.writes), default=-1) for g in grads}
    for g in grads:
        if last[g] < 0 and feed and g in feeds:
            ns[f"d{g}"] = feeds[g].clone()
    forward = {k: (v, v._version) for k, v in values.items() if isinstance(v, Tensor)}
    out: dict[str, Tensor] = {}
    meta: dict[str, dict] = {g: {"status": "missing", "line": None} if last[g] < 0 else {} for g in grads}
    notes: list[str] = []
    versions: dict[str, tuple[Tensor, int, int]] = {}
    for i, st in enumerate(p.region):
        try:
            exec(st.code, ns)  # noqa: S102  the learner's own code, in this child process only
        except OutOfTime:
            raise
        except Exception as e:  # their exception: recorded for every gradient this statement writes
            err = learner_error(e, p.filename, p.lines)
            hit = [g for g in grads if f"d{g}" in st.writes]
            for g in hit:
                meta[g].setdefault("error", err)
            if not hit:
                notes.append(f"{err['msg']} (a line that writes no gradient)")
        for k, (t, ver) in forward.items():
            if t._version != ver:  # the statement changed a forward tensor in place: restore it
                notes.append(
                    f"line {st.line} changed the forward tensor {k} in place; it was restored "
                    "(write the gradient into a new tensor, not into the forward value)"
                )
                fresh = values[k].clone()
                values[k], ns[k] = fresh, fresh
                forward[k] = (fresh, fresh._version)
        for g in grads:
            if last[g] != i:
                continue
            _record(g, ns.get(f"d{g}"), meta, out, st.line)
            if feed and g in feeds:
                ns[f"d{g}"] = feeds[g].clone()
            elif isinstance(ns.get(f"d{g}"), Tensor):
                versions[g] = (ns[f"d{g}"], ns[f"d{g}"]._version, st.line)
    if not feed:  # end to end: the values at the end, and anything changed after its last line
        for g, (t, ver, line) in versions.items():
            if t._version != ver and ns.get(f"d{g}") is t:
                notes.append(
                    f"d{g} was changed in place after its last line ({line}): another gradient "
                    f"shares its memory (write `.clone()` where one gradient starts from another)"
                )
                _record(g, t, meta, out, line)
    return out, meta, notes


def _record(g: str, value: object, meta: dict, out: dict, line: int) -> None:
    if "error" in meta[g]:
        err = meta[g]["error"]
        meta[g].update(status="error", line=err["line"], msg=err["msg"], code=err.get("code", ""))
        return
    d = describe(value)
    d["line"] = line
    meta[g].update(d)
    if d["status"] == "value":
        out[g] = _take(value)
        if value.device.type != "cpu":
            meta[g].update(status="notensor", msg=f"a tensor on {value.device}, the grader runs on the CPU")


# ---------------------------------------------------------------------------- jobs
def _load(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _save(tensors: dict[str, Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def split_probe(tensors: dict[str, Tensor], scalars: dict, probe: str) -> tuple[dict, dict[str, Tensor]]:
    values: dict[str, object] = dict(scalars.get(probe, {}))
    feeds: dict[str, Tensor] = {}
    for k, t in tensors.items():
        pr, kind, name = k.split("|")
        if pr != probe:
            continue
        (values if kind == "v" else feeds)[name] = t
    return values, feeds


def run_graph_job(job: dict, p: Parsed, base: dict) -> tuple[dict[str, Tensor], dict]:
    tensors = _load(job["inputs"])
    out: dict[str, Tensor] = {}
    meta: dict = {"probes": {}, "notes": []}
    for probe in job["probes"]:
        values, feeds = split_probe(tensors, job["scalars"], probe["name"])
        vals, m, notes = run_region(p, base, values, feeds, job["grads"], probe["feed"])
        out.update({f"{probe['name']}|{g}": t for g, t in vals.items()})
        meta["probes"][probe["name"]] = m
        meta["notes"] += [nt for nt in notes if nt not in meta["notes"]]
    return out, meta


DRIVERS: dict[str, Callable[[dict, Parsed, dict, dict], tuple[dict[str, Tensor], dict]]] = {}


def run_job(job: dict) -> dict:
    """One learner file: parse, run, write the outputs; returns the job's JSON report."""
    with open(job["file"], encoding="utf-8") as fh:
        source = fh.read()
    p = parse(source, job["file"], job["kind"] != "module")
    base: dict = {"__name__": "__dojo__", "__file__": job["file"]}
    try:
        exec(p.defs, base)  # noqa: S102  the learner's imports and definitions
    except OutOfTime:
        raise
    except Exception as e:
        raise FileProblem(
            learner_error(e, p.filename, p.lines)["msg"] + " (in the file's imports or "
            "definitions, before any gradient is graded)"
        ) from None
    out: dict[str, Tensor] = {}
    meta: dict = {}
    if job["kind"] in ("graph", "training"):
        out, meta = run_graph_job(job, p, base)
    if job["kind"] == "training":
        from handgrad.dojo.loop import run_training

        o2, m2 = run_training(job, p, base, _load(job["train_inputs"]))
        out.update(o2)
        meta.update(m2)
    if job.get("driver"):
        from handgrad.dojo import challenges  # noqa: F401  registers the drivers

        o2, m2 = DRIVERS[job["driver"]](job, p, base, _load(job["inputs"]))
        out.update(o2)
        meta.update(m2)
    _save(out, job["outputs"])
    return meta


def main() -> int:
    torch.set_num_threads(1)
    request = json.loads(sys.stdin.readline())
    reports = []
    deadline = float(request.get("time_limit", 20.0))

    def alarm(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGALRM, alarm)
    for job in request["jobs"]:  # each file gets the whole time limit
        sink = io.StringIO()
        try:
            signal.setitimer(signal.ITIMER_REAL, deadline)
            with redirect_stdout(sink):  # the learner's prints are not the grader's output
                reports.append({"ok": True, **run_job(job)})
        except FileProblem as e:
            reports.append({"ok": False, "problem": str(e)})
        except OutOfTime as e:
            err = learner_error(e, job["file"], open(job["file"], encoding="utf-8").read().splitlines())
            reports.append({"ok": False, "problem": f"{err['msg']} (time limit {deadline:g} s)"})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    with open(request["report"], "w", encoding="utf-8") as fh:
        json.dump(reports, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
