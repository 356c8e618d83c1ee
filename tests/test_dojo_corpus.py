"""The dojo against two corpora (tests/dojo_corpus.py): realistic mistakes its catalogue does not list,
across the classes learners make (a wrong upstream variable, dropped parentheses, another wrong local
derivative, an exponent's sign, a slip in one term of a closed form, a wrong factor, an index pattern, a
bare number for n/(n-1), a sum over everything, ...), in every exercise and challenge, in files and in
a notebook of the lecture's exercises: each is flagged, located on its own line, and at least 90% are named from the
learner's own line by the edit search. And unusual but right solutions: all right."""

from __future__ import annotations

import re

import pytest

import dojo_corpus as D
import dojo_notebook as NB
from handgrad import dojo
from handgrad.dojo import catalogue as K
from handgrad.dojo.items import ITEMS, get

NB_CELLS = {"1": NB.EX1, "2": NB.EX2, "3": NB.EX3, "4": NB.EX4.replace("STEPS", "30")}
NB_BEFORE = {"1": [], "2": [NB.EX2_FORWARD], "3": [NB.EX2_FORWARD, NB.EX3_FORWARD], "4": []}
LT_CELLS = [
    "import torch\n\ndef tanh_backward(z, a, da):\n    dz = (1 - a**2) * da\n    return dz",
    "def linear_backward(x, W, b, dz):\n    dx = dz @ W.T\n    dW = x.T @ dz\n    db = dz.sum(0)\n    return dx, dW, db",
]


def _mistakes() -> list[tuple[str, str, str, list, list]]:
    out = [(m, "1", "file", e, w) for m, e, w in D.EX1] + [(m, "1", "notebook", e, w) for m, e, w in D.NB1]
    out += [
        (m, k, where, e, w)
        for k, group in (("2", D.EX2), ("3", D.EX3), ("4", D.EX4))
        for m, where, e, w in group
    ]
    out += [(m, k.split("@")[0], "notebook" if "@" in k else "file", e, w) for m, k, e, w in D.CHALLENGES]
    return out


MISTAKES = _mistakes()
RIGHT = (
    [(m, "1", "file", e) for m, e in D.RIGHT_EX1]
    + [(m, "1", "notebook", e) for m, e in D.RIGHT_NB1]
    + [(m, k, where, e) for m, k, where, e in D.RIGHT_OTHER]
)


def _apply(text: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{id: (grade, the learner's text, where the mistake's line is)} for both corpora."""
    d = tmp_path_factory.mktemp("corpus")
    base = None
    out = {}
    files = {}
    for mid, key, where, edits, *_ in MISTAKES + RIGHT:
        new_first = edits[-1][1].splitlines()[0].strip()
        if where == "file":
            text = _apply(dojo.solution(key), edits)
            p = d / f"{mid}.py"
            p.write_text(text)
            files[mid] = (p, text, new_first)
            continue
        base = base if base is not None else NB.setup_namespace()
        ns = NB.fork(base)
        if key == "linear-tanh":
            for c in LT_CELLS:
                NB.run(ns, _apply(c, edits) if "def tanh" in c else c)
        else:
            NB.run(ns, NB.FORWARD)
            if key != "1":
                NB.run(ns, NB.EX1)
            for c in NB_BEFORE[key]:
                NB.run(ns, c)
            NB.run(ns, _apply(NB_CELLS[key], edits))
        cell = (
            next(i for i, src in enumerate(ns["_ih"]) if new_first in src)
            if any(new_first in s for s in ns["_ih"])
            else None
        )
        out[mid] = (dojo.grade(key, ns), "\n".join(ns["_ih"]), (cell, new_first, ns["_ih"]))
    for mid, (_, text, new_first), g in zip(
        files, files.values(), dojo.grade_files([v[0] for v in files.values()])
    ):
        out[mid] = (g, text, (None, new_first, None))
    return out


def _located(g, row, loc) -> bool:
    """The row, or the edit that names it, points at the line the mistake was typed on."""
    cell, first, cells = loc
    m = re.search(r"your (?:In \[(\d+)\] )?line (\d+) is right", row.edit)
    if m:
        at_cell, at = (int(m.group(1)) if m.group(1) else None), int(m.group(2))
    else:
        w = re.match(r"(?:In \[(\d+)\] )?line (\d+)", row.where or "")
        at_cell, at = ((int(w.group(1)) if w.group(1) else None), int(w.group(2))) if w else (None, row.line)
    if at is None:
        return False
    if cells is not None:
        src = cells[at_cell] if at_cell is not None and at_cell < len(cells) else ""
        return at_cell == cell and 0 < at <= len(src.splitlines()) and first in src.splitlines()[at - 1]
    return first in g_lines(g)[at - 1] if 0 < at <= len(g_lines(g)) else False


def g_lines(g) -> list[str]:
    return open(g.file).read().splitlines()


def _catalogued(key: str) -> bool:
    """Whether a diagnosis key is a catalogue entry (the item's own or a generic one)."""
    k = key.removesuffix("-negated")
    names = {v.key for it in ITEMS for vs in it.variants.values() for v in vs}
    generic = re.fullmatch(
        r"sign|transposed|scale-.*|missing-.*|no-upstream|passthrough-.*|not-summed|keepdim-.*|"
        r"sum-dim-.*",
        k,
    )
    return k in names or bool(generic)


def test_the_mistake_corpus_is_big_and_spans_every_item():
    assert len(MISTAKES) >= 60
    assert {k for _, k, *_ in MISTAKES} == {it.key for it in ITEMS}
    assert {w for _, _, w, *_ in MISTAKES} == {"file", "notebook"}
    assert len(RIGHT) >= 25


@pytest.mark.parametrize("mid, key, where, edits, wrong", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_uncatalogued_mistake_is_flagged_and_located_on_its_line(graded, mid, key, where, edits, wrong):
    g, _, loc = graded[mid]
    assert g.problem == "", g.problem
    bad = [r.name for r in g.rows if not r.ok]
    assert bad == [r.name for r in g.rows if r.name in wrong], (
        g.table()
    )  # exactly these rows, in the table's order
    row = next(r for r in g.rows if r.name == wrong[0])
    assert not _catalogued(row.key), (row.key, row.diagnosis)  # the catalogue does not list it
    assert _located(g, row, loc), (row.where, row.edit, g.table())


def test_at_least_90_percent_are_named_from_the_learners_own_line(graded):
    named = {
        mid: bool(next(r for r in graded[mid][0].rows if r.name == wrong[0]).edit)
        for mid, _, _, _, wrong in MISTAKES
    }
    missed = [m for m, ok in named.items() if not ok]
    assert sum(named.values()) >= 0.9 * len(named), missed


@pytest.mark.parametrize("mid, key, where, edits", RIGHT, ids=[r[0] for r in RIGHT])
def test_unusual_right_solutions_are_right(graded, mid, key, where, edits):
    g = graded[mid][0]
    assert g.exit_code == 0, g.table()


def test_the_edit_search_says_so_when_nothing_small_explains_it(tmp_path):
    """Two slips on one line: no single edit explains them, and the diagnosis says so."""
    p = tmp_path / "two.py"
    p.write_text(
        _apply(dojo.solution("1"), [("dW1 = embcat.T @ dhprebn", "dW1 = emb.view(n, -1).T @ dhpreact * 2")])
    )
    g = dojo.grade_file(p)
    (row,) = [r for r in g.rows if not r.ok]
    assert row.edit == "" and "no known mistake and no small edit of your line explains it" in row.diagnosis
    assert row.kind == K.OTHER


def test_a_corpus_summary_for_the_report(graded, capsys):
    """Not a claim: the per-item counts, printed with -s (the README and the report quote them)."""
    rows = []
    for mid, key, where, _, wrong in MISTAKES:
        r = next(r for r in graded[mid][0].rows if r.name == wrong[0])
        rows.append((key, where, bool(r.edit)))
    by = {}
    for key, where, named in rows:
        n, k = by.get((key, where), (0, 0))
        by[(key, where)] = (n + 1, k + named)
    with capsys.disabled():
        print("\ncorpus: item, where, mistakes, named from the line")
        for (key, where), (n, k) in sorted(by.items()):
            print(f"  {key:14s} {where:8s} {n:3d} {k:3d}")
        print(f"  all: {len(rows)} mistakes, {sum(r[2] for r in rows)} named; {len(RIGHT)} right solutions")
    assert get("1")
