"""A learner's file as the grader takes it in, trusting nothing about it: read as files.read reads
(a regular file of its own, bounded, UTF-8), and which exercise or challenge it is, from its content
(the lines its template gives and the names it fills in) as well as its `# handgrad dojo: KEY` line,
which a learner can edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from handgrad.dojo.files import SubmissionError, read
from handgrad.dojo.framework import BEGIN, END, SLOT, Item, item_of
from handgrad.dojo.registry import ITEMS, find, get

MATCH = 0.5  # a file is an item's when at least half of the item's given lines and names are in it
MARGIN = 0.25  # and the content overrides the file's own mark when it fits the other item this much better
__all__ = ["SubmissionError", "identify", "read"]


# ---------------------------------------------------------------------------- which item it is
@dataclass(frozen=True)
class Signature:
    """What a file of an item holds whatever the learner writes: its template's given lines, and the
    names its learner fills in (a region item's row variables, a call item's functions)."""

    given: frozenset[str]
    names: tuple[str, ...]


def _norm(line: str) -> str:
    return re.sub(r"\s+", " ", line.split("#", 1)[0]).strip()


@cache
def signature(key: str) -> Signature:
    item = get(key)
    text = SLOT.sub("", item.text)
    given = frozenset(
        n
        for n in (_norm(ln) for ln in text.splitlines())
        if len(n) > 3 and not BEGIN.match(n) and not END.match(n)
    )
    if item.mode == "region":
        names = tuple(dict.fromkeys(r.blank or r.var for r in item.rows if r.tensor))
    else:
        names = tuple(re.findall(r"^(?:def|class) (\w+)", text, re.M))
    return Signature(given, names)


def _outside_regions(text: str) -> tuple[set[str], str]:
    """The file's given lines (normalised, outside its `# >>>` ... `# <<<` regions) and its regions' text."""
    given, inside, regions = set(), False, []
    for ln in text.splitlines():
        if BEGIN.match(ln):
            inside = True
        elif END.match(ln):
            inside = False
        elif inside:
            regions.append(ln)
        elif len(_norm(ln)) > 3:
            given.add(_norm(ln))
    return given, "\n".join(regions)


@cache
def _all_names() -> frozenset[str]:
    return frozenset(n for it in ITEMS for n in signature(it.key).names)


def _names_in(item: Item, text: str, regions: str) -> set[str]:
    """The known names the file fills in: row variables its regions assign, or functions it defines."""
    if item.mode == "region":
        assigned = set(re.findall(r"^\s*(\w+)\s*(?:\[.*\])?\s*[-+*/]?=", regions, re.M))
    else:
        assigned = set(re.findall(r"^(?:def|class) (\w+)", text, re.M))
    return assigned & _all_names()


def fit(item: Item, text: str) -> float:
    """How well the file matches the item, 0 to 1: the overlap (intersection over union) of its given
    lines with the item's template's, and of the names it fills in with the item's."""
    sig = signature(item.key)
    lines, regions = _outside_regions(text)
    given = len(sig.given & lines) / max(len(sig.given | lines), 1)
    names = _names_in(item, text, regions)
    return 0.5 * given + 0.5 * len(names & set(sig.names)) / max(len(names | set(sig.names)), 1)


def identify(text: str, name: str | None = None) -> tuple[Item, str]:
    """(the file's item, a note when its content and its mark or `name` disagree). `name` (--exercise)
    decides; else the content, where it fits one item well and the mark's item clearly less; else the
    mark. SubmissionError when neither says."""
    scores = sorted(((fit(it, text), i, it) for i, it in enumerate(ITEMS)), key=lambda t: (-t[0], t[1]))
    best_score, _, best = scores[0]
    by_content = best if best_score >= MATCH else None
    if name is not None:
        item = find(name) or get(name)
        note = ""
        if by_content is not None and by_content is not item and best_score >= fit(item, text) + MARGIN:
            note = (
                f"graded as {_says(item)} as asked; by its content the file is {_says(by_content)}'s "
                f"({best_score:.0%} of its lines and names)"
            )
        return item, note
    mark = item_of(text)
    marked = find(mark) if mark else None
    if mark and marked is None:
        if by_content is None:
            get(mark)  # ValueError naming the items there are
        return (
            by_content,
            f"its '# handgrad dojo: {mark[:40]}' line names no item; "
            f"by its content it is {_says(by_content)}",
        )
    if marked is not None:
        if by_content is not None and by_content is not marked and best_score >= fit(marked, text) + MARGIN:
            return by_content, (
                f"its '# handgrad dojo' line says {_says(marked)}, but its content is "
                f"{_says(by_content)}'s ({best_score:.0%} of its given lines and names, against "
                f"{fit(marked, text):.0%}): graded as {_says(by_content)}"
            )
        return marked, ""
    if by_content is None:
        raise SubmissionError(
            "no '# handgrad dojo: ...' line, and its content is no exercise's or challenge's: "
            "start from a file that `handgrad dojo start` wrote, or name it (--exercise)"
        )
    return by_content, f"no '# handgrad dojo' line; by its content it is {_says(by_content)}"


def _says(item: Item) -> str:
    return f"{item.kind} {item.key}"
