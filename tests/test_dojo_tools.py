"""The dojo's tools around grading: hints (three levels, counted beside the file, none giving the answer
before the last), the reference on request, grading in a notebook, and the graph picture."""

from __future__ import annotations

import ast
import json

import pytest

from handgrad import cli
from handgrad.dojo import exercises as E
from handgrad.dojo import hints as H


def _answer_lines(ex: E.Exercise, g: str) -> list[str]:
    """The right-hand sides the reference writes d{g} with (what no early hint may contain)."""
    out = []
    for st in ast.parse(ex.solution).body:
        if isinstance(st, (ast.Assign, ast.AugAssign)) and f"d{g}" in ast.unparse(st).split("=")[0]:
            out.append(ast.unparse(st.value))
    return [r for r in out if len(r) > 6]  # "1", "n": too short to be an answer



@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_every_gradient_has_three_hints_and_only_the_last_gives_the_answer(key):
    ex = E.get(key)
    for g in ex.grads:
        texts = [H.hint_text(ex, g, level) for level in (1, 2, 3)]
        assert all(texts) and len(set(texts)) == 3
        assert f"d{g} =" in texts[2] or f"d{g}." in texts[2]  # the form is the reference's own lines
        for rhs in _answer_lines(ex, g):
            assert rhs not in texts[0] and rhs not in texts[1], (g, rhs)
        assert g in H.RULES or g in H.CLOSED_RULES  # a written rule, not the fallback


def test_hint_levels_are_counted_beside_the_file(tmp_path, capsys):
    path = E.start("1", tmp_path)
    seen = []
    for _ in range(4):
        assert cli.main(["dojo", "hint", str(path), "dprobs"]) == 0
        seen.append(capsys.readouterr().out)
    assert [s.split(",")[0] for s in seen] == ["hint 1 of 3 for dprobs", "hint 2 of 3 for dprobs"] + [
        "hint 3 of 3 for dprobs"
    ] * 2
    assert "1/x" in seen[0] and "(n, vocab_size)" in seen[1] and "dprobs = (1.0 / probs) * dlogprobs" in seen[2]
    assert cli.main(["dojo", "hint", str(path), "counts"]) == 0  # the bare name works too
    counter = tmp_path / ".ex1_atomic.hints.json"
    assert json.loads(counter.read_text()) == {"dprobs": 3, "dcounts": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ex1_atomic.hints.json", "ex1_atomic.py"]  # no temp
    assert H.used(path) == {"dprobs": 3, "dcounts": 1}


def test_hint_and_solution_refuse_bad_input_in_one_line(tmp_path, capsys):
    path = E.start("2", tmp_path)
    assert cli.main(["dojo", "hint", str(path), "dprobs"]) == 2  # exercise 2 has only dlogits
    err = capsys.readouterr().err
    assert "no gradient 'dprobs'" in err and "dlogits" in err and err.count("\n") == 1
    assert cli.main(["dojo", "hint", str(tmp_path / "nope.py"), "dlogits"]) == 2
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert cli.main(["dojo", "hint", str(tmp_path / "plain.py"), "dlogits"]) == 2
    assert cli.main(["dojo", "solution", "9"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("key", list(E.EXERCISES))
def test_solution_prints_the_reference(key, capsys):
    assert cli.main(["dojo", "solution", key]) == 0
    out = capsys.readouterr().out
    assert out == E.get(key).solution
    compile(out, "solution", "exec")
