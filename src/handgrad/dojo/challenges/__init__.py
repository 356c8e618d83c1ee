"""The coding challenges given alongside "Becoming a Backprop Ninja" (Karpathy, nn-zero-to-hero): each
a plain Python file with marked blanks (`handgrad dojo start linear-tanh`), graded in a child process
with the mistake named (`handgrad dojo grade FILE`), with three hints per row and a reference solution.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from handgrad.dojo import runner
from handgrad.dojo.challenges import (
    batchnorm,
    checkpoint,
    cross_entropy,
    embedding,
    gradcheck,
    linear_tanh,
)
from handgrad.dojo.challenges.core import MARK, Challenge, blank_lines, drive_job, judge, render
from handgrad.dojo.grade import TIME_LIMIT, Grade, run_child

CHALLENGES: dict[str, Challenge] = {
    c.key: c
    for c in (
        linear_tanh.CHALLENGE,
        cross_entropy.CHALLENGE,
        batchnorm.CHALLENGE,
        gradcheck.CHALLENGE,
        embedding.CHALLENGE,
        checkpoint.CHALLENGE,
    )
}
# The child process calls the learner's code through this driver; the runner runs as __main__
# (`python -m handgrad.dojo.runner`), a module object apart from handgrad.dojo.runner: register in both.
for _mod in (runner, sys.modules.get("__main__")):
    if getattr(getattr(_mod, "__spec__", None), "name", "") == "handgrad.dojo.runner":
        _mod.DRIVERS["challenge"] = drive_job


def find(name: str) -> Challenge | None:
    """The challenge called `name` (its key, letter or file stem), or None."""
    for c in CHALLENGES.values():
        if name in (c.key, c.letter, c.slug, c.slug + ".py"):
            return c
    return None


def get(name: str) -> Challenge:
    c = find(name)
    if c is None:
        raise ValueError(f"no challenge {name!r}; there are: {', '.join(CHALLENGES)}")
    return c


def challenge_of(source: str) -> str | None:
    m = MARK.search(source)
    return m.group(1) if m else None


def start(name: str, directory: str | Path = ".") -> Path:
    """Write the challenge's file into `directory`; FileExistsError if one is there (never overwritten)."""
    c = get(name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{c.slug}.py"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{c.slug}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(c))
        os.link(tmp, path)  # atomic, and fails if the file exists
    finally:
        os.unlink(tmp)
    return path


def solution(name: str) -> str:
    c = get(name)
    return render(c, c.solution)


def hint(name: str, row: str, level: int) -> str:
    """Hint `level` (1: the rule, 2: the shapes, 3: the form) for one row; ValueError names the rows."""
    c = get(name)
    wanted = row if row.startswith("d") or any(s.name == row for s in c.specs) else "d" + row
    for s in c.specs:
        if s.name == wanted:
            return "\n".join(f"hint {i + 1}: {h}" for i, h in enumerate(s.hints[: max(1, min(level, 3))]))
    raise ValueError(f"no row {row!r} in challenge {c.key}; there are: {', '.join(s.name for s in c.specs)}")


# ---------------------------------------------------------------------------- grading
@dataclass
class ChallengeGrade(Grade):
    """A challenge file's grade: the same rows and exit codes as an exercise's."""

    def summary(self) -> str:
        bad = [r for r in self.rows if not r.ok]
        return f"{self.right} of {len(self.rows)} right" + (f"; next: {bad[0].name}" if bad else "; all done")

    def table(self) -> str:
        if self.problem:
            return f"{self.file}: cannot grade: {self.problem}"
        c = get(self.exercise)
        w = max([len(r.name) for r in self.rows] + [4])
        out = [f"{self.file}: challenge {c.key}: {c.title}", f"{'row':<{w}}  {'verdict':<8}  line  diagnosis"]
        for r in self.rows:
            verdict = {"ok": "ok", "wrong": "WRONG", "missing": "missing", "error": "ERROR",
                       "invalid": "INVALID"}[r.status]
            what = r.diagnosis or ("right" if r.ok else "")
            out.append(f"{r.name:<{w}}  {verdict:<8}  {str(r.line or '-'):<4}  {what}")
        out += [f"note: {nt}" for nt in self.notes]
        out += ["", "verdict: float64 probes (random upstream gradients, repeated indices, several shapes)",
                self.summary()]
        return "\n".join(out)


def grade_file(path: str | Path, name: str | None = None, time_limit: float = TIME_LIMIT) -> ChallengeGrade:
    return grade_files([path], name, time_limit)[0]


def grade_files(paths: list, name: str | None = None, time_limit: float = TIME_LIMIT) -> list[ChallengeGrade]:
    """Grade challenge files in one child process (each with its own time limit), in order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _grade_files([Path(p) for p in paths], name, time_limit)
    finally:
        torch.set_num_threads(threads)


def _identify(path: Path, name: str | None) -> ChallengeGrade | tuple[Challenge, str]:
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return ChallengeGrade(str(path), name or "?", problem=f"cannot read it ({e.__class__.__name__}: {e})")
    key = name or challenge_of(source)
    c = find(key) if key else None
    if c is None:
        return ChallengeGrade(str(path), key or "?", problem=(
            f"no challenge {key!r}; there are: {', '.join(CHALLENGES)}" if key else
            "no '# handgrad dojo: challenge NAME' line: start from `handgrad dojo start NAME`"))
    return c, source


def _grade_files(paths: list[Path], name: str | None, time_limit: float) -> list[ChallengeGrade]:
    from safetensors.torch import load_file, save_file

    found = [_identify(p, name) for p in paths]
    done = {i: f for i, f in enumerate(found) if isinstance(f, ChallengeGrade)}
    todo = [(i, paths[i], *f) for i, f in enumerate(found) if not isinstance(f, ChallengeGrade)]
    if not todo:
        return [done[i] for i in range(len(paths))]
    with tempfile.TemporaryDirectory(prefix="dojo-ch-") as tmp:
        jobs, probes_of, inputs_of = [], {}, {}
        for i, path, c, _ in todo:
            if c.key not in probes_of:
                probes_of[c.key] = c.probes()
                inputs_of[c.key] = os.path.join(tmp, f"in-{c.key}.safetensors")
                tensors: dict[str, Tensor] = {
                    f"{p.name}|{k}": t.contiguous() for p in probes_of[c.key] for k, t in p.inputs.items()
                }
                save_file(tensors, inputs_of[c.key])
            jobs.append({"file": str(path.resolve()), "kind": "module", "driver": "challenge",
                         "challenge": c.key, "inputs": inputs_of[c.key],
                         "outputs": os.path.join(tmp, f"out-{i}.safetensors"),
                         "probes": [p.name for p in probes_of[c.key]]})
        results = run_child({"jobs": jobs, "report": os.path.join(tmp, "report.json")}, time_limit)
        for k, (i, path, c, source) in enumerate(todo):
            res = results[k] if k < len(results) else results[-1]
            if not res.get("ok"):
                problem = res.get("problem", "the grader's process failed")
                done[i] = ChallengeGrade(str(path), c.key, problem=problem)
                continue
            rows = judge(c, probes_of[c.key], load_file(jobs[k]["outputs"]), res, blank_lines(source))
            g = ChallengeGrade(str(path), c.key, rows, list(res.get("notes", [])))
            bad = next((r for r in rows if r.status == "invalid"), None)
            if bad is not None:  # a NumPy array, a wrong dtype or device: cannot grade the file as it is
                g.problem = (f"line {bad.line}: " if bad.line else "") + f"{bad.name} is {bad.diagnosis}"
            done[i] = g
    return [done[i] for i in range(len(paths))]


# ---------------------------------------------------------------------------- the CLI's dispatch
def cli(action: str, args, out, err) -> int | None:
    """`handgrad dojo ACTION` for a challenge; None when `args` names no challenge (an exercise's)."""
    if action == "list":
        for c in CHALLENGES.values():
            out(f"{c.letter}  {c.key:<17}  {c.about}")
        return 0
    if action == "start":
        c = find(args.exercise)
        if c is None:
            return None
        try:
            path = start(c.key, args.dir)
        except FileExistsError:
            err(f"{Path(args.dir) / (c.slug + '.py')} exists already and is never overwritten; grade it, "
                "or start in another --dir")
            return 2
        except OSError as e:
            err(f"--dir {args.dir}: {e.strerror or e}")
            return 2
        out(f"wrote {path}: fill in the blanks marked TODO, then run: handgrad dojo grade {path}")
        return 0
    if action in ("grade", "hint"):
        try:
            source = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None  # the exercises' handler says why it cannot be read
        key = getattr(args, "exercise", None) or challenge_of(source)
        if key is None or find(key) is None:
            return None
        if action == "hint":
            try:
                out(hint(key, args.name, args.level))
            except ValueError as e:
                err(f"dojo hint {args.file}: {e}")
                return 2
            return 0
        g = grade_file(args.file, key, args.time_limit)
        if g.problem:
            err(f"dojo grade {args.file}: {g.problem}")
            return 2
        import json

        out(json.dumps(g.to_json(), indent=1) if args.json else g.table())
        return g.exit_code
    if action == "solution":
        c = find(args.exercise)
        if c is None:
            return None
        out(solution(c.key).rstrip("\n"))
        return 0
    return None
