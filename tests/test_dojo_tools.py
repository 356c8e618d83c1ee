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
    from handgrad.dojo.grade import grade_file

    assert "hints used: dcounts (1 of 3), dprobs (3 of 3)" in grade_file(path).notes


def test_notebook_hints_count_in_the_session():
    from handgrad import dojo

    first = dojo.hint(3, "dhprebn")
    assert first.startswith("hint 1 of 3 for dhprebn") and "three ways" in first
    assert dojo.hint(3, "hprebn").startswith("hint 2 of 3")
    assert "bngain * bnvar_inv / n" in dojo.hint(3, "dhprebn", level=3)
    with pytest.raises(ValueError, match="no gradient"):
        dojo.hint(3, "dprobs")


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
    assert out.rstrip().endswith("26 of 26 right; all done") and g.notes == []
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
    import torch

    from handgrad import dojo
    from handgrad.dojo import catalogue as K

    ns = notebook_globals([("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / n)")])
    del ns["dC"]
    ns["dW1"] = ns["dW1"].detach().numpy()
    g = dojo.grade(1, ns, quiet=True)
    rows = {r.name: r for r in g.rows}
    assert rows["dbndiff2"].kind == K.BESSEL and rows["dC"].status == "missing"
    assert rows["dW1"].status == "invalid" and "numpy" in rows["dW1"].diagnosis
    assert [r.name for r in g.rows if not r.ok] == ["dbndiff2", "dW1", "dC"] and g.notes == []
    with torch.no_grad():
        ns["W2"] += 0.1  # a parameter changed after the forward cell ran
    assert "logits is not the forward pass" in dojo.grade(1, ns, quiet=True).notes[0]


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
    g = dojo.grade(4, notebook_globals(), quiet=True)  # graded by its training run: from a file
    assert g.exit_code == 2 and "dojo start 4" in g.problem


# ---------------------------------------------------------------------------- the picture
def test_graph_picture_colours_each_tensor_by_its_grade(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from handgrad.dojo.grade import COLOURS

    ex = E.get("1")
    src = ex.solution.replace("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h")
    src = src.replace("dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv", "dbnvar = None")
    path = tmp_path / "ex1.py"
    path.write_text(E.template(ex, src))
    out = tmp_path / "pic" / "g.svg"
    assert cli.main(["dojo", "grade", str(path), "--graph", str(out)]) == 2  # the folder does not exist
    assert "does not exist" in capsys.readouterr().err
    out.parent.mkdir()
    assert cli.main(["dojo", "grade", str(path), "--graph", str(tmp_path / "g.png")]) == 2
    assert cli.main(["dojo", "grade", str(path), "--graph", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.rstrip().endswith(f"graph: {out}") and "24 of 26 right; next: dW2" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.svg"]  # written atomically: no temp left
    ns = {"s": "http://www.w3.org/2000/svg"}
    root = ET.fromstring(out.read_text())
    fills = {}
    for g in root.findall("s:g", ns):
        name = g.find("s:text", ns).text
        fills[name] = g.find("s:rect", ns).get("fill")
    assert len(fills) == 29  # 20 forward values and 9 inputs
    assert fills["W2"] == COLOURS["wrong"] and fills["bnvar"] == COLOURS["missing"]
    assert {k for k, v in fills.items() if v == COLOURS["ok"]} == set(ex.grads) - {"W2", "bnvar"}
    assert {k for k, v in fills.items() if v not in COLOURS.values()} == {"Xb", "Yb", "loss"}
    tip = next(g.find("s:title", ns).text for g in root.findall("s:g", ns) if g.find("s:text", ns).text == "W2")
    assert "transposed" in tip
    beside = [t.text for t in root.findall("s:text", ns) if (t.text or "").startswith("dW2: ")]
    assert len(beside) == 1 and "transposed" in beside[0]  # written beside the graph, not only as a tooltip


# ---------------------------------------------------------------------------- exit codes on the command line
@pytest.mark.parametrize("name, old, new, words", [
    ("syntax", "dh = dlogits @ W2.T", "dh = dlogits @@ W2.T", "SyntaxError"),
    ("loop", "dh = dlogits @ W2.T", "while True:\n    pass\ndh = dlogits @ W2.T", "time limit"),
    ("numpy", "dh = dlogits @ W2.T", "dh = (dlogits @ W2.T).numpy()", "NumPy array"),
    ("dtype", "dlogprobs = torch.zeros_like(logprobs)", "dlogprobs = torch.zeros((n, 27))", "float32 tensor"),
])
def test_cli_cannot_grade_is_one_line_exit_2(tmp_path, capsys, name, old, new, words):
    ex = E.get("1")
    path = tmp_path / f"{name}.py"
    path.write_text(E.template(ex, ex.solution.replace(old, new)))
    assert cli.main(["dojo", "grade", str(path), "--time-limit", "3"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and words in cap.err and str(path) in cap.err
    assert "Traceback" not in cap.err


@pytest.mark.parametrize("edit, code, last", [
    (None, 0, "26 of 26 right; all done"),
    (("dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)", "dbnvar_inv = None"), 1,
     "25 of 26 right; next: dbnvar_inv"),
])
def test_cli_exit_code_and_last_line(tmp_path, capsys, edit, code, last):
    ex = E.get("1")
    src = ex.solution if edit is None else ex.solution.replace(*edit)
    path = tmp_path / "ex1.py"
    path.write_text(E.template(ex, src))
    assert cli.main(["dojo", "grade", str(path)]) == code
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == last
