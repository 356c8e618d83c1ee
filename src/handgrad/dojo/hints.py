"""`handgrad dojo hint FILE NAME` and `handgrad dojo solution EXERCISE`: three hints per gradient, each
asked for separately (the rule; the shapes; the form, which is the reference lines), and the reference.
The count of hints shown is kept beside the learner's file (`.STEM.hints.json`, written atomically).
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

from handgrad.dojo import exercises as E

# The rule behind each gradient (Karpathy, "Becoming a Backprop Ninja"), in the lecture's names. None
# says the answer: it names the local derivative and how the uses and broadcasts combine.
RULES: dict[str, str] = {
    "logprobs": "loss = -(mean of the picked entries logprobs[range(n), Yb]): each picked entry moves the "
    "loss by -1/n; an entry that is not picked does not enter the loss at all",
    "probs": "logprobs = log(probs): the local derivative of log(x) is 1/x, taken at the input; the chain "
    "rule multiplies it by the upstream gradient",
    "counts_sum_inv": "probs = counts * counts_sum_inv: the derivative of a product with respect to one "
    "factor is the other factor; counts_sum_inv is broadcast across the columns",
    "counts_sum": "counts_sum_inv = counts_sum**-1: the power rule, d(x**k)/dx = k * x**(k-1), at the input",
    "counts": "counts is used twice, in probs = counts * counts_sum_inv and in counts_sum = counts.sum(1): "
    "its gradient is the sum of one term per use; a sum hands its upstream gradient to every element it "
    "added up",
    "norm_logits": "counts = exp(norm_logits): the derivative of exp is exp itself, a value you already "
    "have",
    "logit_maxes": "norm_logits = logits - logit_maxes: subtraction hands -1 times the upstream gradient to "
    "what is subtracted; logit_maxes is broadcast across the columns",
    "logits": "logits is used twice: directly in norm_logits (derivative 1) and in logit_maxes, the max of "
    "each row, which passes its gradient only to the entry that was largest",
    "h": "logits = h @ W2 + b2: the gradient with respect to one operand of @ is the upstream gradient "
    "times the other operand, transposed so that the shapes fit",
    "W2": "logits = h @ W2 + b2: the gradient with respect to one operand of @ is the other operand, "
    "transposed, times the upstream gradient, in the order that makes the shapes fit",
    "b2": "b2 is added to every row of h @ W2 (broadcast along dim 0): its gradient adds up the upstream "
    "gradient over the rows",
    "hpreact": "h = tanh(hpreact): d tanh(x)/dx = 1 - tanh(x)**2, and tanh(x) is the output you already "
    "have",
    "bngain": "hpreact = bngain * bnraw + bnbias: the other factor times the upstream gradient; bngain is "
    "broadcast over the rows",
    "bnbias": "hpreact = bngain * bnraw + bnbias: a sum passes the upstream gradient through; bnbias is "
    "broadcast over the rows",
    "bnraw": "hpreact = bngain * bnraw + bnbias: the derivative with respect to bnraw is the other factor",
    "bnvar_inv": "bnraw = bndiff * bnvar_inv: the other factor times the upstream gradient; bnvar_inv is "
    "broadcast over the rows",
    "bnvar": "bnvar_inv = (bnvar + 1e-5)**-0.5: the power rule at the input, with the eps where the "
    "forward has it",
    "bndiff2": "bnvar = 1/(n-1) * bndiff2.sum(0): the sum hands the upstream gradient to every row it "
    "added up, times the constant in front (Bessel's n-1, as in the forward)",
    "bndiff": "bndiff is used twice, in bndiff2 = bndiff**2 and in bnraw = bndiff * bnvar_inv: one term "
    "per use, added",
    "bnmeani": "bndiff = hprebn - bnmeani: subtraction hands -1 times the upstream gradient to bnmeani, "
    "which is broadcast over the rows",
    "hprebn": "hprebn is used twice: directly in bndiff (derivative 1) and in bnmeani = 1/n * "
    "hprebn.sum(0), which hands its upstream to every row, times 1/n",
    "embcat": "hprebn = embcat @ W1 + b1: the upstream gradient times the other operand, transposed so "
    "that the shapes fit",
    "W1": "hprebn = embcat @ W1 + b1: the other operand, transposed, times the upstream gradient, in the "
    "order that makes the shapes fit",
    "b1": "b1 is added to every row (broadcast along dim 0): add up the upstream gradient over the rows",
    "emb": "embcat = emb.view(n, -1) only rearranges the numbers: the gradient is the upstream one, "
    "rearranged back to emb's shape",
    "C": "emb = C[Xb]: every row of emb is a copy of a row of C; a row of C gets the sum of the gradients "
    "of all its copies, and a character can be picked many times in one batch",
}

# Exercises 2-4 write two gradients in closed form: their rules differ from the atomic ones.
CLOSED_RULES: dict[str, str] = {
    "logits": "loss = mean over the rows of -log softmax(logits)[Yb]: for one row, the derivative of "
    "-log softmax(x)[y] with respect to x is the softmax of x, minus 1 at the target y; the mean over the "
    "batch divides by n",
    "hprebn": "hpreact = bngain * (hprebn - mean) / sqrt(var + 1e-5) + bnbias, with the variance over n-1: "
    "hprebn reaches hpreact three ways (directly, through the mean, through the variance), so the closed "
    "form has one term per way, all scaled by bngain * bnvar_inv",
}


def rule(ex: E.Exercise, g: str) -> str:
    if ex.key != "1" and g in CLOSED_RULES:
        return CLOSED_RULES[g]
    return RULES.get(g, f"write d{g} from the line of the forward pass that uses {g}")


def shapes(ex: E.Exercise, g: str) -> str:
    """The second hint: the shape of d{g}, and of each upstream gradient it is made from."""
    users = ex.graph.consumers(g)
    ups = []
    for u in users:
        if u == ex.graph.seed == "loss":
            ups.append("loss is a scalar (the seed: dloss = 1)")
        else:
            ups.append(f"d{u} is {ex.shapes.get(u, 'shaped like ' + u)}")
    out = f"d{g} has exactly the shape of {g}: {ex.shapes.get(g, '?')}. From the uses: " + "; ".join(ups)
    small = ex.shapes.get(g, "")
    broadcast = any(ex.shapes.get(u, small) != small for u in users if u != "loss")
    if broadcast and small.startswith("(1,"):
        out += f". {g} was broadcast along dim 0: add up over it with keepdim=True so the shape stays"
    elif broadcast and small.endswith(", 1)"):
        out += f". {g} was broadcast along dim 1: add up over it with keepdim=True so the shape stays"
    elif broadcast and small.endswith(",)"):
        out += f". {g} is 1-D and was broadcast over the rows: add up over dim 0 without keepdim"
    return out


def form(ex: E.Exercise, g: str) -> str:
    """The third hint: the reference's own lines for d{g} (the answer)."""
    tree = ast.parse(ex.solution)
    lines = ex.solution.splitlines()
    mine = []
    for st in tree.body:
        names = {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        names |= {
            n.value.id
            for n in ast.walk(st)
            if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name)
        }
        if f"d{g}" in names or (isinstance(st, ast.Expr) and f"d{g}." in ast.unparse(st)):
            mine.append("\n".join(lines[st.lineno - 1 : st.end_lineno]))
    return "the reference writes it as:\n    " + "\n    ".join("\n".join(mine).splitlines())


LEVELS = ("the rule", "the shapes", "the form (this is the answer)")


def hint_text(ex: E.Exercise, g: str, level: int) -> str:
    return (rule, shapes, form)[level - 1](ex, g)


def _counter_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.hints.json")


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def used(path: str | Path) -> dict[str, int]:
    """{gradient: hints shown} for a learner's file (empty if none yet, or the counter is unreadable)."""
    try:
        data = json.loads(_counter_path(Path(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _resolve(ex: E.Exercise, name: str) -> str:
    g = name[1:] if name.startswith("d") and name[1:] in ex.grads else name
    if g not in ex.grads:
        raise ValueError(
            f"exercise {ex.key} has no gradient {name!r}; it has: {', '.join('d' + x for x in ex.grads)}"
        )
    return g


_SESSION: dict[tuple[str, str], int] = {}  # hints shown in this Python session (a notebook has no file)


def hint(exercise: int | str, name: str, level: int | None = None) -> str:
    """For a notebook: the next hint for gradient `name` of an exercise (or hint `level`, 1-3)."""
    ex = E.get(str(exercise))
    g = _resolve(ex, name)
    if level is None:
        level = min(_SESSION.get((ex.key, g), 0) + 1, len(LEVELS))
    if not 1 <= level <= len(LEVELS):
        raise ValueError(f"level {level}: there are hints 1 to {len(LEVELS)}")
    _SESSION[(ex.key, g)] = max(level, _SESSION.get((ex.key, g), 0))
    return f"hint {level} of {len(LEVELS)} for d{g}, {LEVELS[level - 1]}:\n{hint_text(ex, g, level)}"


def next_hint(path: str | Path, name: str, exercise: str | None = None) -> tuple[int, str, str]:
    """(level, what it is, the hint) for gradient `name` (dprobs or probs) of the learner's file, one
    level further each call, up to 3; the count is saved beside the file. ValueError: a wrong name or
    a file that names no exercise (one line)."""
    path = Path(path)
    source = path.read_text(encoding="utf-8")
    key = exercise or E.exercise_of(source)
    if key is None:
        raise ValueError(f"{path}: no '# handgrad dojo: exercise K' line; pass --exercise")
    ex = E.get(key)
    g = _resolve(ex, name)
    counts = used(path)
    level = min(counts.get(f"d{g}", 0) + 1, len(LEVELS))
    counts[f"d{g}"] = level
    _write_atomic(_counter_path(path), counts)
    return level, LEVELS[level - 1], hint_text(ex, g, level)


def solution(key: str) -> str:
    """The reference backward of an exercise, as it goes between the markers."""
    return E.get(key).solution
