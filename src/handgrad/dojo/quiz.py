"""The dojo's conceptual questions for a learner: `ask` shows a question (and its live experiment),
`answer` grades an answer with the mistake named and the next of three hints, `run_quiz` walks through
all six (in a terminal, or from given answers). Progress is kept in the learner's directory. Nothing
here prints: text and HTML come back as values, and the quiz loop reads and writes through callables.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from handgrad.data import show_path  # as typed when printable, escaped otherwise
from handgrad.dojo import answers as A
from handgrad.dojo.progress import Progress, Record
from handgrad.dojo.questions import QUESTIONS, Question, get

HINTS = 3  # graded hints per part: the rule, the reasoning, the answer
LIST_WIDTH = 16  # the name column of `dojo list`, so the questions line up under the exercises


# ---------------------------------------------------------------------------- showing a question
def question_text(q: Question) -> str:
    """The question, each part with what to type (and its choices)."""
    out = [f"question {q.number} of {len(QUESTIONS)} ({q.slug}): {q.title}", q.text, ""]
    w = max(len(p.name) for p in q.parts)
    for p in q.parts:
        out.append(f"  {p.name:<{w}}  {p.prompt}  [{p.form}]")
        out += [f"  {'':<{w}}    {c.key}) {c.text}" for c in p.choices]
        if p.expression:
            names = "; ".join(f"{k}: {v}" for k, v in p.expression.names.items())
            out.append(f"  {'':<{w}}    names: {names}")
    names = ", ".join(p.name for p in q.parts)
    out += ["", f"answer the {len(q.parts)} parts in this order, separated by ';' ({names}), or some of "
            f"them by name (`{q.parts[-1].name} = ...`)" if len(q.parts) > 1 else ""]
    return "\n".join(out).rstrip()


def list_lines(directory: str | Path | None = ".") -> list[str]:
    """One line per question for `handgrad dojo list`, with the progress kept in `directory` (None:
    without progress)."""
    progress = Progress.load(directory) if directory is not None else Progress(Path(), {})
    w = max([len(q.slug) for q in QUESTIONS.values()] + [LIST_WIDTH])
    lines = []
    for q in QUESTIONS.values():
        status = progress.records[q.key].status() if q.key in progress.records else ""
        lines.append(f"{q.key}  {q.slug:<{w}}  {q.about}" + (f"  [{status}]" if status else ""))
    return lines


@dataclass
class Asked:
    """A question as shown: its text, the learner's record, and what was asked for with it."""

    question: Question
    record: Record
    experiment: object = None  # experiments.Experiment (matplotlib is imported only when one is run)
    hint: str = ""
    explanation: str = ""

    def text(self) -> str:
        out = [question_text(self.question)]
        if self.record.status():
            out.append(f"your progress: {self.record.status()}")
        if self.hint:
            out.append(self.hint)
        if self.explanation:
            out.append(f"explanation: {self.explanation}")
        if self.experiment:
            out.append(self.experiment.text())
        return "\n".join(out)

    __str__ = text

    def _repr_html_(self) -> str:
        parts = [f"<pre>{html.escape(question_text(self.question))}</pre>"]
        for label, v in (("progress", self.record.status()), ("hint", self.hint),
                         ("explanation", self.explanation)):
            if v:
                parts.append(f"<p><b>{label}</b>: {html.escape(v)}</p>")
        if self.experiment:
            parts.append(self.experiment.html())
        return "<div>" + "".join(parts) + "</div>"


def ask(question: object, directory: str | Path = ".", *, experiment: bool = True, hint: bool = False,
        explain: bool = False) -> Asked:
    """Question 1-6 (or its name) with its live experiment; `hint` shows the next hint of the first part
    not yet right (and counts it), `explain` the explanation (noted in the progress)."""
    q = get(question)
    progress = Progress.load(directory)
    record = progress.record(q.key)
    asked = Asked(q, record)
    if hint:
        part = next((p for p in q.parts if not record.parts.get(p.name)), q.parts[0])
        asked.hint = _next_hint(record, part) or f"all {HINTS} hints for {part.name} have been shown"
    if explain:
        asked.explanation = q.explanation
        record.explained = record.explained or not record.solved
    if hint or explain:
        progress.save()
    if experiment:
        from handgrad.dojo import experiments

        asked.experiment = experiments.run(q.number)
    return asked


def _next_hint(record: Record, part: A.Part) -> str:
    """The next hint for `part` (counted in the record), or '' when all have been shown."""
    level = record.hints.get(part.name, 0) + 1
    if level > HINTS:
        return ""
    record.hints[part.name] = level
    return f"hint {level} of {HINTS} for {part.name}: {part.hints[level - 1]}"


# ---------------------------------------------------------------------------- grading an answer
@dataclass
class Verdict:
    """A graded answer: one result per part answered, the next hint, the explanation once solved."""

    question: Question
    results: list[A.PartResult] = field(default_factory=list)
    problem: str = ""  # the answer could not be graded (bad input): one line
    hint: str = ""
    explanation: str = ""
    done: int = 0  # questions done after this answer
    status: str = ""

    @property
    def right(self) -> bool:
        return not self.problem and bool(self.results) and all(r.ok for r in self.results)

    @property
    def exit_code(self) -> int:
        return 2 if self.problem else 0 if self.right else 1

    def lines(self) -> list[str]:
        q = self.question
        if self.problem:
            return [f"question {q.number} ({q.slug}): cannot grade it: {self.problem}"]
        good = sum(r.ok for r in self.results)
        head = (f"all {len(self.results)} parts right" if self.right and len(self.results) > 1 else
                "right" if self.right else f"{good} of {len(self.results)} parts right")
        out = [f"question {q.number} ({q.slug}): {head}"]
        out += [f"  {r.part.name} = {show_path(r.answer)}: " + ("right" if r.ok else f"WRONG: {r.diagnosis}")
                for r in self.results]
        if self.hint:
            out.append(self.hint)
        if self.explanation:
            out.append(f"why: {self.explanation}")
        out.append(f"progress: {self.status}; {self.done} of {len(QUESTIONS)} questions done")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    __str__ = text

    def to_json(self) -> dict:
        return {"question": self.question.number, "right": self.right, "problem": self.problem,
                "parts": [r.to_json() for r in self.results], "hint": self.hint,
                "explanation": self.explanation, "done": self.done}

    def _repr_html_(self) -> str:
        if self.problem:
            return f"<p><b>cannot grade it</b>: {html.escape(self.problem)}</p>"
        rows = "".join(
            f"<tr><td><code>{html.escape(r.part.name)}</code></td><td><code>{html.escape(r.answer)}</code></td>"
            f"<td style='color:{'#2e7d32' if r.ok else '#c62828'}'>{'right' if r.ok else 'WRONG'}</td>"
            f"<td>{html.escape(r.diagnosis)}</td></tr>" for r in self.results)
        extra = "".join(f"<p>{html.escape(t)}</p>" for t in (self.hint, self.explanation and
                                                              f"why: {self.explanation}") if t)
        return (f"<div><b>question {self.question.number} ({html.escape(self.question.slug)})</b>"
                f"<table>{rows}</table>{extra}<p>{html.escape(self.lines()[-1])}</p></div>")


def grade(question: object, response: object) -> Verdict:
    """Grade without touching the progress (a Verdict with `problem` set for bad input)."""
    q = get(question)
    try:
        return Verdict(q, A.grade(q.parts, response))
    except A.AnswerError as e:
        return Verdict(q, problem=str(e))


def answer(question: object, response: object, directory: str | Path = ".") -> Verdict:
    """Grade an answer to question 1-6 (text with the parts separated by ';', a list in the parts'
    order, or a dict by part name), record it in `directory`'s progress with the next hint after a
    wrong answer, and give the explanation once every part is right."""
    v = grade(question, response)
    if v.problem:
        return v
    progress = Progress.load(directory)
    record(progress, v)
    progress.save()
    return v


def record(progress: Progress, v: Verdict) -> None:
    """Count a graded answer in the progress; set the verdict's hint, explanation and standing."""
    q = v.question
    rec = progress.record(q.key)
    rec.attempts += 1
    for r in v.results:
        rec.parts[r.part.name] = r.ok
    wrong = next((r for r in v.results if not r.ok), None)
    if wrong is not None:
        v.hint = _next_hint(rec, wrong.part) or (f"(all {HINTS} hints for {wrong.part.name} have been "
                                                 "shown; the explanation is there on request)")
    elif all(rec.parts.get(p.name) for p in q.parts):
        rec.solved = True
        v.explanation = q.explanation
    v.done = len([k for k in progress.done() if k in QUESTIONS])
    v.status = f"question {q.number} {rec.status() or 'not answered'}"


# ---------------------------------------------------------------------------- the quiz
COMMANDS = "answer, or: ? (a hint), explain, skip, quit"


@dataclass
class QuizRun:
    asked: list[str] = field(default_factory=list)  # question keys gone through
    solved: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.asked and self.solved == self.asked else 1


def run_quiz(read: Callable[[str], str | None], write: Callable[[str], None], directory: str | Path = ".",
             answers: Mapping[object, object] | None = None, png_dir: str | Path | None = None,
             again: bool = False, experiments: bool = True) -> QuizRun:
    """Walk through the questions. With `answers` (question -> answer) grade those and read nothing
    (every answer is graded before any is recorded, so one that cannot be graded raises AnswerError
    and changes nothing); else ask each question not yet done (all with `again`) part by part through
    `read(prompt)` (None: end of input). A right answer shows the explanation and the experiment's
    numbers (its picture in `png_dir`)."""
    progress = Progress.load(directory)
    run = QuizRun()
    if answers is not None:
        _scripted(progress, answers, write, run, png_dir, experiments)
    else:
        for q in QUESTIONS.values():
            if progress.record(q.key).solved and not again:
                write(f"question {q.number} ({q.slug}): done already")
                continue
            run.asked.append(q.key)
            outcome = _interactive(progress, q, read, write)
            if outcome == "right":
                run.solved.append(q.key)
                _show(q, write, png_dir, experiments)
            if outcome == "quit":
                break
    done = len([k for k in progress.done() if k in QUESTIONS])
    write(f"quiz: {len(run.solved)} of {len(run.asked)} question(s) right this time; {done} of "
          f"{len(QUESTIONS)} done ({progress.path})")
    return run


def _scripted(progress: Progress, answers: Mapping[object, object], write, run: QuizRun, png_dir,
              experiments: bool) -> None:
    graded = []
    for key, response in answers.items():
        v = grade(key, response)
        if v.problem:
            raise A.AnswerError(f"question {v.question.number}: {v.problem}")
        graded.append(v)
    for v in sorted(graded, key=lambda v: v.question.number):
        record(progress, v)
        progress.save()
        run.asked.append(v.question.key)
        write(v.text())
        if v.right:
            run.solved.append(v.question.key)
            _show(v.question, write, png_dir, experiments)


def _interactive(progress: Progress, q: Question, read, write) -> str:
    """One question part by part: 'right', 'skip' or 'quit'."""
    write("")
    write(question_text(q))
    write(f"({COMMANDS})")
    rec = progress.record(q.key)
    for part in q.parts:
        if rec.parts.get(part.name) and not rec.solved:
            write(f"{part.name}: right before")
            continue
        while True:
            text = read(f"{part.name}> ")
            if text is None or text.strip().lower() in ("quit", "exit", "q"):
                progress.save()
                return "quit"
            cmd = text.strip().lower()
            if cmd in ("?", "hint"):
                write(_next_hint(rec, part) or f"all {HINTS} hints for {part.name} have been shown; "
                      "'explain' gives the explanation")
                progress.save()
                continue
            if cmd == "explain":
                rec.explained = rec.explained or not rec.solved
                progress.save()
                write(f"explanation: {q.explanation}")
                return "skip"
            if cmd in ("skip", ""):
                return "skip"
            v = _grade_one(q, part, text)
            if v.problem:
                write(f"  cannot grade it: {v.problem}")
                continue
            record(progress, v)
            progress.save()
            r = v.results[0]
            write("  right" if r.ok else f"  WRONG: {r.diagnosis}")
            if not r.ok:
                write(v.hint)
                continue
            break
    if rec.solved or all(rec.parts.get(p.name) for p in q.parts):
        rec.solved = True
        progress.save()
        write(f"why: {q.explanation}")
        return "right"
    return "skip"


def _grade_one(q: Question, part: A.Part, text: str) -> Verdict:
    """One part's answer as typed at its prompt (a leading `name =` is dropped)."""
    try:
        given = A.split((part,), text)
        return Verdict(q, [A.grade_part(part, given[part.name])])
    except A.AnswerError as e:
        return Verdict(q, problem=str(e))


def _show(q: Question, write, png_dir, experiments: bool) -> None:
    if not experiments and png_dir is None:
        return
    from handgrad.dojo.experiments import run

    e = run(q.number)
    write(e.text())
    if png_dir is not None:
        path = e.write_png(Path(png_dir) / f"q{q.number}-{q.slug}.png")
        write(f"  picture: {path}")
