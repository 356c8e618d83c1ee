"""The dojo as plain functions: list the items, start one as a file, grade a file or a notebook, ask
for a hint, see the reference, draw the graph. Each returns an object or raises an error with a one-line
message (ValueError, FileExistsError, OSError); nothing here prints (the command line does).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from handgrad import io
from handgrad.dojo import hints as H
from handgrad.dojo.framework import Item, item_of, render
from handgrad.dojo.registry import ITEMS, get
from handgrad.dojo.report import Grade


def items(kind: str | None = None) -> list[Item]:
    """Every exercise and challenge (or those of one kind), in the order `dojo list` shows them."""
    return [it for it in ITEMS if kind is None or it.kind == kind]


def start(name: str, directory: str | Path = ".") -> Path:
    """Write the item's file into `directory` and return its path. FileExistsError if a file of that name
    is there already: a learner's work is never overwritten."""
    item = get(name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{item.slug}.py"
    if path.exists() or path.is_symlink():
        raise FileExistsError(str(path))
    tmp = d / f".{item.slug}.start{io.TMP_SUFFIX}"
    io.atomic_write_bytes(tmp, render(item).encode())
    try:
        import os

        os.link(tmp, path)  # atomic, and fails if the file appeared meanwhile (never overwrites)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def solution(name: str) -> str:
    """The item's reference as a whole file (`dojo solution 1 > ref.py` grades all right)."""
    item = get(name)
    return render(item, item.solution)


def grade(
    item: int | str,
    namespace: Mapping[str, object],
    *,
    strict: bool = False,
    names: Mapping[str, str] | None = None,
) -> Grade:
    """Grade a notebook's work: `dojo.grade(1, globals())` (an HTML table as a cell's value)."""
    from handgrad.dojo.notebook import grade as grade_notebook

    return grade_notebook(item, namespace, strict=strict, names=names)


def hint(item: int | str, name: str, level: int | None = None) -> str:
    """For a notebook: the next hint for one row (or hint `level`, 1-3), counted in this session."""
    it = get(str(item))
    level, what, text = H.session_hint(it, name, level)
    return f"hint {level} of {len(H.LEVELS)} for {H.resolve(it, name).name}, {what}:\n{text}"


def next_hint(
    path: str | Path, name: str, item: str | None = None, level: int | None = None
) -> tuple[int, str, str]:
    """For a file: (level, what it is, the hint) for one row, one level further each call; the count is
    kept beside the file. ValueError: a file that names no item, or a row it does not have."""
    path = Path(path)
    key = item or item_of(path.read_text(encoding="utf-8"))
    if key is None:
        raise ValueError(f"{path}: no '# handgrad dojo: ...' line; name the exercise (--exercise)")
    return H.next_hint(path, get(key), name, level)


def draw(grade: Grade, path: str | Path) -> Path:
    """The item's graph as SVG, each tensor coloured by its grade (graph items)."""
    from handgrad.dojo.picture import write

    return write(grade, path)
