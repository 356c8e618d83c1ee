"""Three hints per row of every dojo item, each asked for separately: the rule, the shapes, the form
(the reference's own lines: the answer). For a file the count of hints shown is kept beside it
(`.STEM.hints.json`, written atomically) and the grade says how many were used; in a notebook it is kept
for the Python session.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

from handgrad import io
from handgrad.dojo.framework import Item, RowSpec
from handgrad.dojo.graph import Graph

LEVELS = ("the rule", "the shapes", "the form (this is the answer)")


# ---------------------------------------------------------------------------- hints built from a graph
def shapes_hint(graph: Graph, shapes: dict[str, str], g: str) -> str:
    """The second hint of a graph row: the shape of d{g}, and of each upstream gradient it is made from."""
    users = graph.consumers(g)
    ups = []
    for u in users:
        if u == graph.seed == "loss":
            ups.append("loss is a scalar (the seed: dloss = 1)")
        else:
            ups.append(f"d{u} is {shapes.get(u, 'shaped like ' + u)}")
    out = f"d{g} has exactly the shape of {g}: {shapes.get(g, '?')}. From the uses: " + "; ".join(ups)
    small = shapes.get(g, "")
    broadcast = any(shapes.get(u, small) != small for u in users if u != "loss")
    if broadcast and small.startswith("(1,"):
        out += f". {g} was broadcast along dim 0: add up over it with keepdim=True so the shape stays"
    elif broadcast and small.endswith(", 1)"):
        out += f". {g} was broadcast along dim 1: add up over it with keepdim=True so the shape stays"
    elif broadcast and small.endswith(",)"):
        out += f". {g} is 1-D and was broadcast over the rows: add up over dim 0 without keepdim"
    return out


def form_hint(solution: str, g: str) -> str:
    """The third hint of a graph row: the reference's own lines for d{g} (the answer)."""
    tree = ast.parse(solution)
    lines = solution.splitlines()
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


# ---------------------------------------------------------------------------- asking
def resolve(item: Item, name: str) -> RowSpec:
    """The row a learner names: dprobs, probs, or a challenge's row; ValueError names the rows there are."""
    for cand in (name, name[1:] if name.startswith("d") else "d" + name):
        try:
            return item.row(cand)
        except ValueError:
            continue
    raise ValueError(
        f"{item.kind} {item.key} has no row {name!r}; it has: "
        f"{', '.join(r.name for r in item.rows if any(r.hints))}"
    )


def hint_text(item: Item, name: str, level: int) -> str:
    spec = resolve(item, name)
    if not 1 <= level <= len(LEVELS):
        raise ValueError(f"level {level}: there are hints 1 to {len(LEVELS)}")
    return spec.hints[level - 1]


def _counter_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.hints.json")


def used(path: str | Path) -> dict[str, int]:
    """{row: hints shown} for a learner's file (empty if none yet, or the counter is unreadable)."""
    from handgrad.dojo.files import SubmissionError, read

    counter = _counter_path(Path(path))
    if not os.path.lexists(counter):
        return {}
    try:  # a regular file of a few KB only: a FIFO, a link or /dev/zero put there is no counter
        data = json.loads(read(counter, 64 << 10))
    except (SubmissionError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): min(max(v, 0), len(LEVELS)) for k, v in data.items() if isinstance(v, int) and v > 0}


_SESSION: dict[tuple[str, str], int] = {}  # hints shown in this Python session (a notebook has no file)


def session_hint(item: Item, name: str, level: int | None = None) -> tuple[int, str, str]:
    """(level, what it is, the hint) for a notebook: the next level for this row, or `level` (1-3)."""
    spec = resolve(item, name)
    if level is None:
        level = min(_SESSION.get((item.key, spec.name), 0) + 1, len(LEVELS))
    text = hint_text(item, spec.name, level)
    _SESSION[(item.key, spec.name)] = max(level, _SESSION.get((item.key, spec.name), 0))
    return level, LEVELS[level - 1], text


def next_hint(path: str | Path, item: Item, name: str, level: int | None = None) -> tuple[int, str, str]:
    """(level, what it is, the hint) for a row of the learner's file: one level further each call (up to
    3), or `level`; the count is saved beside the file. ValueError: a row the item does not have."""
    path = Path(path)
    spec = resolve(item, name)
    counts = used(path)
    if level is None:
        level = min(counts.get(spec.name, 0) + 1, len(LEVELS))
    text = hint_text(item, spec.name, level)
    counts[spec.name] = max(level, counts.get(spec.name, 0))
    io.atomic_write_bytes(_counter_path(path), json.dumps(counts, indent=1, sort_keys=True).encode())
    return level, LEVELS[level - 1], text
