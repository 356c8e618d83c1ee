"""`handgrad dojo grade FILE` (parent side): write the probes, run the learner's file in a child process
with a time limit (runner.py), judge what comes back (judge.py) and render the table. The parent never
runs the learner's code. Exit status: 0 all right, 1 something wrong or missing, 2 could not grade.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from handgrad.dojo import exercises as E
from handgrad.dojo.judge import Row, judge_graph
from handgrad.dojo.probes import Probe

TIME_LIMIT = 20.0  # seconds for the learner's code on all probes (a complete file takes well under 1 s)


@dataclass
class Grade:
    """One file's grade: the rows, notes about the file, or the one-line reason it could not be graded."""

    file: str
    exercise: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str = ""  # non-empty: could not grade (exit 2)
    probes: list[str] = field(default_factory=list)  # the verdict probes, in words, for the legend

    @property
    def right(self) -> int:
        return sum(r.ok for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.problem:
            return 2
        return 0 if all(r.ok for r in self.rows) else 1

    def summary(self) -> str:
        """The closing line: "18 of 26 right; next: dbnvar_inv"."""
        bad = [r for r in self.rows if not r.ok]
        nxt = f"; next: {bad[0].target}" if bad else "; all done"
        return f"{self.right} of {len(self.rows)} right{nxt}"

    def table(self) -> str:
        if self.problem:
            return f"{self.file}: cannot grade: {self.problem}"
        w = max([len(r.name) for r in self.rows] + [8])
        sw = max([len(_shape(r.shape)) for r in self.rows if r.grad] + [5])
        out = [
            f"{self.file}: {E.get(self.exercise).title}",
            f"{'gradient':<{w}}  {'shape':<{sw}}  {'verdict':<8}  {'exact':<5}  {'chain':<5}  line  "
            "diagnosis",
        ]
        for r in self.rows:
            name, shape, verdict, exact, chain, line, what = _cells(r)
            out.append(
                f"{name:<{w}}  {shape:<{sw}}  {verdict:<8}  {exact:<5}  {chain:<5}  {line:<4}  {what}"
            )
        out += [f"note: {nt}" for nt in self.notes]
        out += [
            "",
            "verdict: " + "; ".join(self.probes or ["float64 probes"]),
            "exact: float32 bit for bit with autograd; chain: your own chain end to end, nothing fed in",
            self.summary(),
        ]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        """The table as HTML, each verdict coloured (Jupyter shows this for a cell's value)."""
        if self.problem:
            return f"<p><b>{_h(self.file)}: cannot grade:</b> {_h(self.problem)}</p>"
        head = "".join(f"<th>{c}</th>" for c in ("gradient", "shape", "verdict", "exact", "chain", "line",
                                                  "diagnosis"))
        body = []
        for r in self.rows:
            cells = _cells(r)
            colour = COLOURS.get(r.status, "#ffffff")
            tds = "".join(f"<td style='text-align:left'>{_h(c)}</td>" for c in cells)
            body.append(f"<tr style='background:{colour}'>{tds}</tr>")
        notes = "".join(f"<p>note: {_h(nt)}</p>" for nt in self.notes)
        return (
            f"<p><b>{_h(self.file)}</b>: {_h(E.get(self.exercise).title)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}"
            f"<p><small>verdict: {_h('; '.join(self.probes))}</small></p><p><b>{_h(self.summary())}</b></p>"
        )

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "exercise": self.exercise,
            "problem": self.problem,
            "notes": self.notes,
            "rows": [r.to_json() for r in self.rows],
            "summary": "" if self.problem else self.summary(),
            "exit_code": self.exit_code,
        }


VERDICTS = {"ok": "ok", "wrong": "WRONG", "missing": "missing", "error": "ERROR", "invalid": "INVALID"}
COLOURS = {  # the verdict's background in HTML and in the graph picture
    "ok": "#d8f0d8",
    "wrong": "#f8d0d0",
    "missing": "#eeeeee",
    "error": "#f8e0b0",
    "invalid": "#f8e0b0",
}


def _cells(r: Row) -> tuple[str, str, str, str, str, str, str]:
    """One row of the table as text: name, shape, verdict, exact, chain, line, diagnosis."""
    exact = "-" if r.exact is None else ("yes" if r.exact else "no")
    chain = "-" if r.chain is None else ("yes" if r.chain else "no")
    what = r.diagnosis
    if r.ok and r.grad:
        what = "exact (bit for bit with autograd in float32)" if r.exact else "within tolerance"
    shape = _shape(r.shape) if r.grad else "-"
    return r.name, shape, VERDICTS[r.status], exact, chain, str(r.line) if r.line else "-", what


def _h(text: str) -> str:
    return html.escape(str(text))


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


# ---------------------------------------------------------------------------- the child process
def _write_probes(probes: list[Probe], path: str) -> dict:
    """Probe tensors into one safetensors file (`probe|v|name`, `probe|f|name`); scalars returned."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for p in probes:
        scalars[p.name] = {}
        for k, v in p.values.items():
            if isinstance(v, Tensor):
                tensors[f"{p.name}|v|{k}"] = v.detach().clone().contiguous()
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[p.name][k] = v
        if p.feed:
            for k, t in p.feeds.items():
                tensors[f"{p.name}|f|{k}"] = t.detach().clone().contiguous()
    save_file(tensors, path)
    return scalars


def run_child(request: dict, time_limit: float) -> list[dict]:
    """Run the runner on `request`; a child that outlives the limit (plus start-up) is killed."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    request = {**request, "time_limit": time_limit}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "handgrad.dojo.runner"],
            input=json.dumps(request) + "\n",
            capture_output=True,
            text=True,
            timeout=time_limit + 30,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return [{"ok": False, "problem": f"still running after {time_limit:g} s (an infinite loop?)"}]
    try:
        with open(request["report"], encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            {"ok": False, "problem": f"your file ended the grader's process (exit {proc.returncode}): {tail}"}
        ]


def grade_file(path: str | Path, exercise: str | None = None, time_limit: float = TIME_LIMIT) -> Grade:
    """Grade one learner file. The exercise is read from the file's `# handgrad dojo: exercise K` line
    unless given."""
    return grade_files([path], exercise, time_limit)[0]


def _identify(path: Path, exercise: str | None) -> Grade | E.Exercise:
    """The file's exercise, or a Grade that says why it cannot be graded."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return Grade(str(path), exercise or "?", problem=f"cannot read it ({e.__class__.__name__}: {e})")
    key = exercise or E.exercise_of(source)
    if key is None:
        return Grade(
            str(path),
            "?",
            problem="no '# handgrad dojo: exercise K' line: start from a file that "
            "`handgrad dojo start` wrote, or pass --exercise",
        )
    try:
        return E.get(key)
    except ValueError as e:
        return Grade(str(path), key, problem=str(e))


def grade_files(
    paths: list[str | Path], exercise: str | None = None, time_limit: float = TIME_LIMIT
) -> list[Grade]:
    """Grade several files in one child process (each with its own time limit), in order. The probes
    are small: one torch thread (on a busy machine OpenMP's waiting made them 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _grade_files(paths, exercise, time_limit)
    finally:
        torch.set_num_threads(threads)


def _grade_files(paths: list[str | Path], exercise: str | None, time_limit: float) -> list[Grade]:
    found = [_identify(Path(p), exercise) for p in paths]
    done: dict[int, Grade] = {i: f for i, f in enumerate(found) if isinstance(f, Grade)}
    todo = [(i, Path(paths[i]), f) for i, f in enumerate(found) if isinstance(f, E.Exercise)]
    if todo:
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(prefix="dojo-") as tmp:
            jobs, probes_of, inputs_of, train_of = [], {}, {}, {}
            for i, path, ex in todo:
                if ex.key not in probes_of:
                    probes_of[ex.key] = ex.probes()
                    inputs_of[ex.key] = os.path.join(tmp, f"in-{ex.key}.safetensors")
                    scalars = _write_probes(probes_of[ex.key], inputs_of[ex.key])
                job = {
                        "file": str(path.resolve()),
                        "kind": ex.kind,
                        "inputs": inputs_of[ex.key],
                        "outputs": os.path.join(tmp, f"out-{i}.safetensors"),
                        "scalars": scalars,
                        "grads": list(ex.graph.grads),
                        "probes": [{"name": p.name, "feed": p.feed} for p in probes_of[ex.key]],
                }
                if ex.kind == "training":
                    job.update(_training_job(tmp, train_of))
                jobs.append(job)
            results = run_child({"jobs": jobs, "report": os.path.join(tmp, "report.json")}, time_limit)
            for k, (i, path, ex) in enumerate(todo):
                res = results[k] if k < len(results) else results[-1]
                if not res.get("ok"):
                    done[i] = Grade(
                        str(path), ex.key, problem=res.get("problem", "the grader's process failed")
                    )
                    continue
                done[i] = _judge(path, ex, probes_of[ex.key], load_file(jobs[k]["outputs"]), res)
                if ex.kind == "training" and not done[i].problem:
                    done[i].rows += _judge_training(load_file(jobs[k]["outputs"]), res, train_of)
    return [done[i] for i in range(len(paths))]


def _training_job(tmp: str, cache: dict) -> dict:
    """The training run's inputs (written once per grading) and its settings, for the child."""
    from safetensors.torch import save_file

    from handgrad.dojo import loop

    if not cache:
        cache["tensors"] = loop.training_inputs(E.TRAIN_STEPS, E.TRAIN_SEED)
        cache["path"] = os.path.join(tmp, "train.safetensors")
        save_file(cache["tensors"], cache["path"])
    return {"train_inputs": cache["path"], "lr": E.TRAIN_LR}


def _judge_training(outs: dict[str, Tensor], res: dict, cache: dict) -> list[Row]:
    from handgrad.dojo import loop

    if "ref" not in cache:
        cache["ref"] = loop.reference_losses(cache["tensors"], E.TRAIN_LR)
    mine = outs.get("train|losses", torch.zeros(0, dtype=torch.float64))
    stop = res.get("training", {}).get("stop", "")
    return loop.judge_training(mine, cache["ref"], stop, E.CURVE_STEPS)


def _judge(path: Path, ex: E.Exercise, probes: list[Probe], outs: dict[str, Tensor], res: dict) -> Grade:
    rows = judge_graph(ex.graph, ex.table, probes, outs, res)
    from handgrad.dojo.hints import LEVELS, used

    about = [p.about for p in probes if p.verdict]
    g = Grade(str(path), ex.key, rows, list(res.get("notes", [])), probes=about)
    shown = used(path)
    if shown:
        counts = ", ".join(f"{k} ({v} of {len(LEVELS)})" for k, v in sorted(shown.items()))
        g.notes.append(f"hints used: {counts}")
    bad = next((r for r in rows if r.status == "invalid"), None)
    if bad is not None:  # a NumPy array, a wrong dtype or device: cannot grade the file as it is
        where = f"line {bad.line}: " if bad.line else ""
        g.problem = f"{where}{bad.name} is {bad.diagnosis}"
    return g
