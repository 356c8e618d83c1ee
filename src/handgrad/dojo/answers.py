"""The answer forms of the dojo's questions and how each is graded: a number (an arithmetic expression
is fine: `1 - 0.9**2`), a choice (its letter or a word for it), or a PyTorch expression run on random
tensors and held against autograd (the lecture's `cmp`, shape-strict). A wrong answer is named by the
typical mistake it equals, else by check.diagnose (shape, sign, scale, transpose, repeated rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from handgrad import check
from handgrad.dojo import expression as X


class AnswerError(ValueError):
    """An answer that cannot be graded as given (does not parse, not one of the choices, the wrong
    number of parts): one line, bad input (exit 2)."""


# ---------------------------------------------------------------------------- the forms
@dataclass(frozen=True)
class Choice:
    key: str  # "a", as typed
    text: str
    right: bool = False
    why: str = ""  # what is wrong with it, in the learner's terms (a wrong choice's diagnosis)
    aliases: tuple[str, ...] = ()  # other words that pick it ("good", "bad")


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: a number, or an expression run on the same probes as the learner's."""

    answer: str | float
    diagnosis: str


@dataclass
class Probe:
    """One random problem an expression answer is run on, with autograd's gradient for it."""

    label: str  # "x (1, 6) broadcast to (5, 6), as bngain"
    env: dict[str, object]  # what the answer's names hold
    reference: Tensor  # autograd's gradient (float64)
    sizes: dict[str, int] = field(default_factory=dict)  # names for a constant factor ({"n": 32})
    index: tuple[Tensor, ...] = ()  # index tensors, for check.diagnose's "repeated rows overwritten"


@dataclass(frozen=True)
class ExpressionForm:
    grad: str  # the gradient it computes ("dx"), as the diagnosis calls it
    names: dict[str, str]  # variable -> what it holds, for the learner
    probes: Callable[[], list[Probe]]  # the random problems (autograd references), built once
    mask: bool = False  # a boolean answer is held against `reference != 0` (which positions)


@dataclass(frozen=True)
class NumberForm:
    value: float
    atol: float = 1e-9  # absolute tolerance (plus 1e-9 relative)
    names: dict[str, float] = field(default_factory=dict)  # constants an answer may use ({"n": 32})


@dataclass(frozen=True)
class Part:
    """One thing a question asks, in one form (or a choice that may also be given as an expression)."""

    name: str  # "mul.da", as a named answer gives it
    prompt: str  # "y = a * b, dy = 5: da ="
    hints: tuple[str, str, str]  # graded: the rule, the reasoning, the answer
    right: tuple[str, ...]  # every accepted way of writing the answer (the tests try each)
    number: NumberForm | None = None
    choices: tuple[Choice, ...] = ()
    expression: ExpressionForm | None = None
    mistakes: tuple[Mistake, ...] = ()

    @property
    def form(self) -> str:
        """What to type, in words."""
        forms = []
        if self.choices:
            forms.append("one of " + ", ".join(c.key for c in self.choices))
        if self.number:
            forms.append("a number" + (f" (you may use {', '.join(self.number.names)})" if self.number.names
                                       else ""))
        if self.expression:
            forms.append("a PyTorch expression in " + ", ".join(self.expression.names))
        return " or ".join(forms)

    @cached_property
    def probes(self) -> list[Probe]:
        return self.expression.probes() if self.expression else []

    @cached_property
    def mistake_outcomes(self) -> list[list[object]]:
        """Each expression mistake's values on the probes ([] for a number mistake)."""
        if not self.expression:
            return [[] for _ in self.mistakes]
        return [[_run(X.parse(m.answer, self.expression.names), p) for p in self.probes]
                if isinstance(m.answer, str) else [] for m in self.mistakes]


@dataclass
class PartResult:
    part: Part
    answer: str  # as the learner wrote it
    ok: bool
    diagnosis: str = ""  # why it is wrong ('' when right)

    def to_json(self) -> dict:
        return {"part": self.part.name, "answer": self.answer, "right": self.ok, "diagnosis": self.diagnosis}


# ---------------------------------------------------------------------------- grading one part
def grade_part(part: Part, answer: object) -> PartResult:
    """Grade one part's answer (text, or a number for a number part). Raises AnswerError when it
    cannot be graded as given."""
    text = _text(answer)
    m = ASSIGNED.match(text)
    if m:  # `dx = dy.expand_as(x)`: the learner's own name for the gradient
        text = m.group(1).strip()
    if not text:
        raise AnswerError(f"{part.name}: the answer is empty; give {part.form}")
    choice = _pick(part, text)
    if choice is not None:
        return PartResult(part, text, choice.right, "" if choice.right else f"({choice.key}) {choice.why}")
    if part.number is not None:
        return _grade_number(part, text)
    if part.expression is not None:
        return _grade_expression(part, text)
    keys = ", ".join(c.key for c in part.choices)
    words = sorted({a for c in part.choices for a in c.aliases})
    also = f" (or {', '.join(words)})" if words else ""
    raise AnswerError(f"{part.name}: {text!r} is not one of the choices {keys}{also}")


def _text(answer: object) -> str:
    if isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, (int, float)):
        return repr(answer)
    if isinstance(answer, str):
        return answer.strip()
    raise AnswerError(f"an answer is text or a number, not a {type(answer).__name__}")


ASSIGNED = re.compile(r"^\s*[A-Za-z_]\w*\s*=(?!=)(.*)$", re.S)
CHOICE_RE = re.compile(r"^\(?\s*([A-Za-z][\w-]*)\s*[).:]?$")


def _pick(part: Part, text: str) -> Choice | None:
    """The choice `text` names: its key ("b", "(b)", "b)") or one of its words, in any case."""
    m = CHOICE_RE.match(text.strip())
    word = (m.group(1) if m else text.strip()).lower()
    for c in part.choices:
        if word == c.key.lower() or word in (a.lower() for a in c.aliases):
            return c
    return None


def _grade_number(part: Part, text: str) -> PartResult:
    form = part.number
    value = _number(part, text)
    if _close(value, form.value, form.atol):
        return PartResult(part, text, True)
    for m in part.mistakes:
        if not isinstance(m.answer, str) and _close(value, float(m.answer), form.atol):
            return PartResult(part, text, False, m.diagnosis)
    return PartResult(part, text, False, _number_diagnosis(value, form.value, form.atol))


def _number(part: Part, text: str) -> float:
    try:
        expr = X.parse(text, part.number.names)
        v = X.evaluate(expr, part.number.names)
    except (X.ExpressionError, X.EvaluationError) as e:
        raise AnswerError(f"{part.name}: {e}; give {part.form}") from None
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AnswerError(f"{part.name}: {text!r} is not a number; give {part.form}")
    return float(v)


def _close(a: float, b: float, atol: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= atol + 1e-9 * abs(b)


def _number_diagnosis(value: float, want: float, atol: float) -> str:
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if want != 0 and _close(-value, want, atol):
        return f"{value:g} has the wrong sign"
    if want != 0 and value != 0:
        k = value / want
        for label, r in (("twice", 2.0), ("half", 0.5)):
            if abs(k - r) < 1e-9:
                return f"{value:g} is {label} the right size"
    return f"{value:g} is not it"


def _grade_expression(part: Part, text: str) -> PartResult:
    form = part.expression
    try:
        expr = X.parse(text, form.names)
    except X.ExpressionError as e:
        raise AnswerError(f"{part.name}: {e}") from None
    outcomes = [_run(expr, p) for p in part.probes]
    refused = [o for o in outcomes if isinstance(o, X.ExpressionError)]
    if refused:
        raise AnswerError(f"{part.name}: {refused[0]}")
    ok = [_agrees(o, p, form.mask) for o, p in zip(outcomes, part.probes)]
    if all(ok):
        return PartResult(part, text, True)
    return PartResult(part, text, False, _expression_diagnosis(part, outcomes, ok))


def _run(expr: X.Expression, probe: Probe) -> object:
    """The answer's value on one probe (a float64 tensor or a boolean mask), the torch error it
    raised, or the ExpressionError of an answer that asks for too much."""
    env = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in probe.env.items()}
    try:
        v, lowest = X.evaluate_with_precision(expr, env)
    except (X.ExpressionError, X.EvaluationError) as e:
        return e
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = torch.tensor(float(v), dtype=torch.float64)
    if not isinstance(v, Tensor):
        return X.EvaluationError(f"it gives a {type(v).__name__}, not a tensor")
    if v.is_complex() or v.device.type != "cpu":
        return X.EvaluationError(f"it gives a {v.dtype} tensor on {v.device}, not a real tensor")
    if lowest is not None and v.is_floating_point() and torch.finfo(lowest).eps > torch.finfo(v.dtype).eps:
        v = v.to(lowest)  # graded at the precision it was computed in (see _tolerance)
    return v


def _tolerance(v: Tensor, reference: Tensor) -> check.Tolerance:
    """The lecture's cmp at the answer's own precision: float32 arithmetic in an answer (torch.ones
    makes float32) is not a mistake."""
    dtype = v.dtype if v.is_floating_point() else torch.float64
    return check.autograd_tolerance(dtype, reference)


def _agrees(v: object, probe: Probe, mask: bool) -> bool:
    if not isinstance(v, Tensor) or tuple(v.shape) != tuple(probe.reference.shape):
        return False
    if v.dtype == torch.bool:
        return mask and bool(torch.equal(v, probe.reference != 0))
    return _tolerance(v, probe.reference).holds(v.double(), probe.reference)


def _same(a: object, b: object) -> bool:
    """Two answers' values on one probe are the same (for naming a known mistake)."""
    if isinstance(a, X.EvaluationError) and isinstance(b, X.EvaluationError):
        return True
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    if (a.dtype == torch.bool) != (b.dtype == torch.bool):
        return False
    a, b = a.double(), b.double()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    return bool(((a - b).abs() <= 1e-5 * scale).all()) and bool((torch.isnan(a) == torch.isnan(b)).all())


def _expression_diagnosis(part: Part, outcomes: list, ok: list[bool]) -> str:
    for m, theirs in zip(part.mistakes, part.mistake_outcomes):
        if theirs and all(_same(a, b) for a, b in zip(outcomes, theirs)):
            return m.diagnosis
    wrong = [i for i, k in enumerate(ok) if not k]
    shaped = [i for i in wrong if isinstance(outcomes[i], Tensor)
              and tuple(outcomes[i].shape) != tuple(part.probes[i].reference.shape)]
    right = [p.label for p, k in zip(part.probes, ok) if k]
    first = wrong[0]
    head = f"right on {'; '.join(right)}, but on {part.probes[first].label}" if right else \
        f"On {part.probes[first].label}"
    text = f"{head}: {_why(part, part.probes[first], outcomes[first])}"
    if shaped and shaped[0] != first:  # a wrong shape elsewhere says more
        k = shaped[0]
        text += f"; and on {part.probes[k].label}: {_why(part, part.probes[k], outcomes[k])}"
    return text


def _why(part: Part, probe: Probe, v: object) -> str:
    grad, ref = part.expression.grad, probe.reference
    if isinstance(v, X.EvaluationError):
        return f"it raises an error: {v}"
    if v.dtype == torch.bool:
        if not part.expression.mask:
            return f"it gives a boolean tensor; {grad} holds numbers"
        if tuple(v.shape) != tuple(ref.shape):
            return f"a mask of shape {tuple(v.shape)}, but {grad} is {tuple(ref.shape)}"
        wrong = int((v != (ref != 0)).sum())
        return f"the mask differs from where {grad} is non-zero in {wrong} of {v.numel()} positions"
    text = check.diagnose(v.double(), ref, _tolerance(v, ref), probe.sizes, probe.index)
    return _learner_terms(text, grad)


LEARNER_TERMS = (  # check.diagnose's words -> the quiz's
    ("the tensor is", "{grad} is"), ("manual.T", "yours.T"), ("manual.reshape", "yours.reshape"),
    ("manual expanded", "yours expanded"), ("manual equals", "yours equals"), ("manual =", "yours ="),
    ("the reference", "autograd's"), ("reference.permute", "autograd's.permute"),
    ("x reference", "x autograd's"), ("-reference", "-autograd's"), ("the gradient", "your answer"),
)


def _learner_terms(text: str, grad: str) -> str:
    for old, new in LEARNER_TERMS:
        text = text.replace(old, new.format(grad=grad))
    return text


# ---------------------------------------------------------------------------- a whole answer
SEPARATORS = (";\n", ";\n,")
NAMED = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(:|=(?!=))\s*(.+)$", re.S)  # `mul.da = 15`, `sum: ...`


def split(parts: tuple[Part, ...], answer: object) -> dict[str, object]:
    """The answer for each part: from a dict (part -> answer), a list in the parts' order, or text with
    the parts separated by ';' (or ',' or spaces), each either positional or named (`mul.da = 15`);
    a leading `dx =` that names no part is dropped. Named parts may be a subset. Raises AnswerError."""
    names = [p.name for p in parts]
    if isinstance(answer, Mapping):
        unknown = [k for k in answer if k not in names]
        if unknown:
            raise AnswerError(f"no part {unknown[0]!r}; the parts are {', '.join(names)}")
        return dict(answer)
    if isinstance(answer, (list, tuple)):
        items = list(answer)
    else:
        text = _text(answer)
        _balanced(text)
        items = _items(text, len(parts))
    named: dict[str, object] = {}
    positional: list[object] = []
    for item in items:
        m = NAMED.match(item) if isinstance(item, str) else None
        if m and m.group(1) in names:
            if m.group(1) in named:
                raise AnswerError(f"{m.group(1)} is answered twice")
            named[m.group(1)] = m.group(3).strip()
        else:
            positional.append(item)
    rest = [n for n in names if n not in named]
    if positional and len(positional) != len(rest):
        want = f"{len(rest)} answer{'s' if len(rest) != 1 else ''} ({', '.join(rest)})"
        raise AnswerError(f"this question takes {want}, separated by ';'; got {len(positional)}")
    if not positional and not named:
        raise AnswerError("the answer is empty")
    named.update(zip(rest, positional))
    return {n: named[n] for n in names if n in named}


def _items(text: str, n: int) -> list[str]:
    """Split at top-level separators (not inside brackets): ';' and newlines first, then also ',',
    then whitespace (for a row of numbers or letters: `5 5 15 10`)."""
    items = [text]
    for seps in SEPARATORS:
        items = _split_top(text, seps)
        if len(items) >= n:
            return items
    words = text.split()
    if len(words) == n and all(not any(ch in w for ch in "()[]=") for w in words):
        return words
    return items


def _balanced(text: str) -> None:
    """Refuse an answer whose brackets do not pair up (it could not be split into its parts)."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                raise AnswerError(f"{_clip(text)}: a '{ch}' that closes nothing")
    if stack:
        raise AnswerError(f"{_clip(text)}: a '{stack[-1]}' that is never closed")


def _clip(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _split_top(text: str, seps: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch in seps and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def grade(parts: tuple[Part, ...], answer: object) -> list[PartResult]:
    """Grade a whole answer (see split): one result per part answered, in the parts' order."""
    given = split(parts, answer)
    return [grade_part(p, given[p.name]) for p in parts if p.name in given]
