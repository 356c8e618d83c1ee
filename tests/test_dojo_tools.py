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


# ---------------------------------------------------------------------------- the notebook
def notebook_globals(edits: list[tuple[str, str]] = (), key: str = "1") -> dict:
    """A namespace built as the lecture's notebook builds its globals: parameters that require grad,
    the forward cell verbatim, loss.backward() with retain_grad, then the exercise's backward cell."""
    import torch
    import torch.nn.functional as F

    from handgrad.dojo.setup import lecture_setup

    ns: dict = {"torch": torch, "F": F}
    C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb = lecture_setup()
    parameters = [C, W1, b1, W2, b2, bngain, bnbias]
    for p in parameters:
        p.requires_grad = True
    ns.update(C=C, W1=W1, b1=b1, W2=W2, b2=b2, bngain=bngain, bnbias=bnbias, parameters=parameters,
              Xb=Xb, Yb=Yb, batch_size=32, n=32, n_embd=10, n_hidden=64, block_size=3, vocab_size=27)
    exec(E._LECTURE_FORWARD, ns)  # noqa: S102  the lecture's forward cell
    exec("for t in [logprobs, probs, counts, counts_sum, counts_sum_inv, norm_logits, logit_maxes, logits, h,"
         " hpreact, bnraw, bnvar_inv, bnvar, bndiff2, bndiff, hprebn, bnmeani, embcat, emb]:\n"
         "    t.retain_grad()\nloss.backward()\n", ns)  # noqa: S102
    if key != "1":
        exec(E.get("1").solution, ns)  # noqa: S102  exercise 1's cell (exercise 3 reads its dhpreact)
    src = E.get(key).solution  # the exercise's cell, as the learner wrote it
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    exec(src, ns)  # noqa: S102
    return ns


def test_notebook_reference_grades_all_right(capsys):
    from handgrad import dojo

    g = dojo.grade(1, notebook_globals())
    out = capsys.readouterr().out
    assert g.exit_code == 0 and all(r.ok and r.chain for r in g.rows), g.table()
    assert out.rstrip().endswith("26 of 26 right; all done")
    # as in the lecture's cmp: bit for bit with autograd down to db2; from dhpreact on, the rounding of
    # (1 - h**2) * dh differs from autograd's and flows down the learner's own chain
    assert [r.name for r in g.rows if r.exact] == [f"d{n}" for n in E.get("1").grads[:11]]


def test_notebook_mistake_is_reported_once_where_it_is(capsys):
    from handgrad import dojo
    from handgrad.dojo import catalogue as K

    ns = notebook_globals([("dprobs = (1.0 / probs) * dlogprobs", "dprobs = probs * dlogprobs")])
    g = dojo.grade(1, ns, quiet=True)
    assert capsys.readouterr().out == ""
    bad = [r for r in g.rows if not r.ok]
    assert [r.name for r in bad] == ["dprobs"] and bad[0].kind == K.INPUT_OUTPUT, g.table()
    assert g.summary() == "25 of 26 right; next: dprobs"
    assert [r.chain for r in g.rows[:3]] == [True, False, False]  # everything below it is off end to end
    html = g._repr_html_()
    assert html.count("<tr") == 27 and "#f8d0d0" in html and "25 of 26 right; next: dprobs" in html


def test_notebook_bessel_and_missing_names():
    from handgrad import dojo
    from handgrad.dojo import catalogue as K

    ns = notebook_globals([("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / n)")])
    del ns["dC"]
    ns["dW1"] = ns["dW1"].detach().numpy()
    g = dojo.grade(1, ns, quiet=True)
    rows = {r.name: r for r in g.rows}
    assert rows["dbndiff2"].kind == K.BESSEL and rows["dC"].status == "missing"
    assert rows["dW1"].status == "invalid" and "numpy" in rows["dW1"].diagnosis
    assert [r.name for r in g.rows if not r.ok] == ["dbndiff2", "dW1", "dC"]


@pytest.mark.parametrize("key, edits, kind", [
    ("2", [], None),
    ("2", [("dlogits[range(n), Yb] -= 1\n", "")], "softmax-minus-one"),
    ("3", [], None),
    ("3", [("n / (n - 1) * bnraw", "bnraw")], "bessel"),
])
def test_notebook_closed_forms(key, edits, kind):
    from handgrad import dojo

    g = dojo.grade(key, notebook_globals(edits, key), quiet=True)
    assert len(g.rows) == 1
    assert (g.rows[0].kind if kind else g.rows[0].status) == (kind or "ok"), g.table()


def test_notebook_without_the_forward_says_what_is_missing(capsys):
    from handgrad import dojo

    g = dojo.grade(1, {"dprobs": None})
    assert g.exit_code == 2 and "C is missing" in g.problem and "\n" not in g.problem
    assert "cannot grade" in capsys.readouterr().out and "cannot grade" in g._repr_html_()
