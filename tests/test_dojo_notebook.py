"""The dojo in the learner's own notebook: a finished notebook of the lecture's exercises
(tests/dojo_notebook.py), run cell by cell with its sources kept as IPython keeps them, is graded right
(with a shape note); each classic mistake typed into it is reported once, on its own row, every right
line below it right given the learner's upstream; the learner's own names are found; exercises 2-4 are
graded in place (4 with its loss curve); a .ipynb file runs without a kernel; a challenge is graded from
the functions a notebook defines."""

from __future__ import annotations

import re

import pytest
import torch

import dojo_notebook as NB
from handgrad import dojo
from handgrad.dojo import catalogue as K

# The lecture's classic mistakes, typed into the notebook's exercise 1 cell: (id, edits, the row, its kind)
CLASSIC = [
    ("1-h", [("dhpreact = (1 - h**2) * dh", "dhpreact = (1 - h) * dh")], "dhpreact", K.TANH),
    ("sign", [("dh = dlogits @ W2.T", "dh = -dlogits @ W2.T")], "dh", K.SIGN),
    (
        "missing-branch",
        [("dcounts += dcounts_sum\n", "")],
        "dcounts",
        K.MISSING_BRANCH,
    ),
    (
        "-1-without-/n",
        [("dlogprobs[range(n), Yb] = -1/n", "dlogprobs[range(n), Yb] = -1")],
        "dlogprobs",
        K.SCALE_N,
    ),
    (
        "dlogprobs*probs",
        [("dprobs = dlogprobs / probs", "dprobs = dlogprobs * probs")],
        "dprobs",
        K.INPUT_OUTPUT,
    ),
    (
        "unsummed-dbnvar_inv",
        [("dbnvar_inv = (dbnraw * bndiff).sum(0, keepdim=True)", "dbnvar_inv = dbnraw * bndiff")],
        "dbnvar_inv",
        K.SHAPE,
    ),
    ("alias", [("dhprebn = dbndiff.clone()", "dhprebn = dbndiff")], "dhprebn", K.ALIAS),
    ("bessel", [("dbndiff2 = 1/(n-1) *", "dbndiff2 = 1/n *")], "dbndiff2", K.BESSEL),
    ("overwrite", [("dC[ch] += demb[row, pos]", "dC[ch] = demb[row, pos]")], "dC", K.OVERWRITE),
    ("transposed", [("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h")], "dW2", K.TRANSPOSED),
    ("no-eps", [("(bnvar + 1e-5)**-1.5", "bnvar**-1.5")], "dbnvar", K.EPS_LEFT_OUT),
    (
        "no-max-branch",
        [("dlogits += F.one_hot(logits.argmax(1), logits.shape[1]) * dlogit_maxes\n", "")],
        "dlogits",
        K.MISSING_BRANCH,
    ),
    ("db1-zeros", [("db1 = dhprebn.sum(0)", "db1 = torch.zeros_like(b1)")], "db1", K.ZERO),
]


@pytest.fixture(scope="module")
def base():
    return NB.setup_namespace()


def notebook(base, *cells):
    ns = NB.fork(base)
    for c in cells:
        NB.run(ns, c)
    return ns


def test_the_lectures_finished_notebook_is_all_right_with_a_shape_note(base):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.EX1))
    assert g.exit_code == 0, g.table()
    assert g.summary() == "26 of 26 right (1 with a shape note); all done"
    (marked,) = [r for r in g.rows if r.mark == "shape"]
    assert marked.name == "dbnmeani" and "(64,) where bnmeani is (1, 64)" in marked.note
    assert all(r.chain == "yes" for r in g.rows)
    # the learner's own cell and line
    assert g.rows[0].where == f"In [9] line {NB.line_of(NB.EX1, 'dlogprobs[range(n), Yb] =')}"
    assert g.seconds < 30  # recorded for the benchmark; the timing itself is measured there
    html = g._repr_html_()
    assert html.count("<tr") == 27 and "26 of 26 right" in html and "ok*" in html


@pytest.mark.parametrize("mid, edits, name, kind", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_a_classic_mistake_is_reported_once_and_the_lines_below_are_right(base, mid, edits, name, kind):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.edit(NB.EX1, edits)))
    bad = [r for r in g.rows if not r.ok]
    assert [r.name for r in bad] == [name], g.table()
    assert bad[0].kind == kind, bad[0].diagnosis
    assert g.summary().startswith("25 of 26 right")
    line = bad[0].where
    assert line.startswith("In [9] line ")
    given = [r for r in g.rows if r.chain == "given"]
    assert all(r.ok and f"the mistake is above, at {name}" in r.note for r in given), g.table()
    # a parameter's gradient (dW2, dC) has no line below it; eps, the max branch and db1 are below float32's cmp
    if mid not in ("no-max-branch", "db1-zeros", "alias", "no-eps", "overwrite", "transposed"):
        assert len(given) >= 3, g.table()


def test_a_term_that_is_zero_here_says_why_cmp_calls_it_right(base):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.edit(NB.EX1, CLASSIC[-2][1])))
    (row,) = [r for r in g.rows if not r.ok]
    assert "~0 in this graph" in row.diagnosis and "cmp" in row.diagnosis and row.chain == "yes"
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.edit(NB.EX1, CLASSIC[-1][1])))
    (row,) = [r for r in g.rows if not r.ok]
    assert row.name == "db1" and "nothing was added" not in row.diagnosis and "dhprebn" in row.diagnosis


def test_the_edit_search_reads_the_learners_cell(base):
    cell = NB.edit(
        NB.EX1,
        [
            ("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T"),
            ("dhpreact = (1 - h**2) * dh", "dhpreact = 1 - h**2 * dh"),
        ],
    )
    g = dojo.grade(1, notebook(base, NB.FORWARD, cell))
    rows = {r.name: r for r in g.rows if not r.ok}
    assert set(rows) == {"dembcat", "dhpreact"}, g.table()
    line = NB.line_of(cell, "dembcat = dhpreact @ W1.T")
    assert f"your In [9] line {line} is right with `dhprebn` in place of `dhpreact`" in rows["dembcat"].edit
    assert "`(1 - h ** 2) * dh` in place of `1 - h**2 * dh`" in rows["dhpreact"].edit


def test_renamed_gradients_and_batch_are_found_and_said(base):
    cell = NB.EX1
    for t in NB.NAMES:
        cell = re.sub(rf"\bd{t}\b", f"dL_d{t}", cell)
    g = dojo.grade(1, notebook(base, NB.FORWARD, cell))
    assert g.exit_code == 0, g.table()
    assert g.notes[0].startswith("names: took dL_dlogprobs for dlogprobs")
    fwd = NB.FORWARD.replace("Xb", "xb").replace("Yb", "yb")
    ex = NB.EX1.replace("Xb", "xb").replace("Yb", "yb").replace("dlogit_maxes", "dlogits_maxes")
    g = dojo.grade(1, notebook(base, "xb, yb = Xb, Yb\ndel Xb, Yb", fwd, ex))
    assert g.exit_code == 0, g.table()
    assert "xb for Xb, yb for Yb" in g.notes[0] and "dlogits_maxes for dlogit_maxes" in g.notes[0]


def test_a_gradient_under_an_unrelated_name_is_found_by_its_value(base):
    cell = re.sub(r"\bdW2\b", "grad_of_the_second_matrix", NB.EX1)
    g = dojo.grade(1, notebook(base, NB.FORWARD, cell))
    assert g.exit_code == 0, g.table()
    assert "grad_of_the_second_matrix for dW2 (by its value)" in g.notes[0]
    assert "not in your notebook" not in g.table()


def test_an_explicit_mapping_is_taken(base):
    cell = re.sub(r"\bdlogprobs\b", "g17", NB.EX1)
    g = dojo.grade(1, notebook(base, NB.FORWARD, cell), names={"dlogprobs": "g17"})
    assert g.exit_code == 0, g.table()
    assert next(r for r in g.rows if r.name == "dlogprobs").yours == "g17"


def test_a_hard_coded_size_right_at_the_notebooks_batch_is_right_with_a_note(base):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.edit(NB.EX1, [("= -1/n", "= -1/32")])))
    assert g.exit_code == 0, g.table()
    assert "hard-coded" in g.rows[0].note and "`n` in place of `32`" in g.rows[0].note


def test_an_overwritten_setup_variable_is_named(base):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.EX1, "for n in range(3):\n  pass"))
    assert g.exit_code == 0
    assert any(nt.startswith("n is 2 here, but the batch has 32 rows") for nt in g.notes), g.notes


def test_a_strict_grade_wants_exact_shapes(base):
    g = dojo.grade(1, notebook(base, NB.FORWARD, NB.EX1), strict=True)
    assert [r.name for r in g.rows if not r.ok] == ["dbnmeani"] and "strict" in g.table()


def test_without_cell_sources_the_values_are_graded_alone(base):
    ns = notebook(base, NB.FORWARD, NB.edit(NB.EX1, CLASSIC[0][1]))
    del ns["_ih"], ns["In"]
    g = dojo.grade(1, ns)
    assert [r.name for r in g.rows if not r.ok] == ["dhpreact"] and g.rows[11].kind == K.TANH, g.table()
    assert any("graded on your values alone" in nt for nt in g.notes)


def test_a_parameter_changed_after_the_backward_is_said(base):
    ns = notebook(base, NB.FORWARD, NB.EX1)
    with torch.no_grad():
        ns["W2"] = ns["W2"] + 0.1
    g = dojo.grade(1, ns)
    assert any("your logits is not the forward pass of your parameters and batch" in nt for nt in g.notes), (
        g.notes
    )


def test_nothing_to_grade_says_what_is_missing(base):
    g = dojo.grade(1, {"dprobs": None})
    assert g.exit_code == 2 and "C is missing" in g.problem and "\n" not in g.problem
    assert "cannot grade" in g._repr_html_() and "cannot grade" in str(g)


@pytest.mark.parametrize(
    "key, cell, edits, wrong",
    [
        ("2", NB.EX2, [], []),
        ("2", NB.EX2, [("dlogits[range(n), Yb] -= 1\n", "")], ["dlogits"]),
        ("3", NB.EX3, [], []),
        ("3", NB.EX3, [("n/(n-1) * bnraw", "bnraw")], ["dhprebn"]),
    ],
)
def test_exercises_2_and_3_in_the_notebook(base, key, cell, edits, wrong):
    fwd = NB.EX2_FORWARD if key == "2" else NB.EX3_FORWARD
    g = dojo.grade(key, notebook(base, NB.FORWARD, NB.EX1, fwd, NB.edit(cell, edits)))
    assert [r.name for r in g.rows if not r.ok] == wrong, g.table()
    # the exercise 1 cell is still exercise 1's: a closed form in a later cell is not its dlogits
    assert dojo.grade(1, notebook(base, NB.FORWARD, NB.EX1, fwd, NB.edit(cell, edits))).exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "edits, wrong",
    [
        ([], []),
        (
            [("dhpreact = (1 - h**2) * dh", "dhpreact = (1 - h) * dh")],
            ["dhpreact", "loss curve", "loss reached"],
        ),
    ],
)
def test_exercise_4_is_graded_in_place_with_its_loss_curve(base, edits, wrong):
    g = dojo.grade(4, notebook(base, NB.FORWARD, NB.EX1, NB.edit(NB.EX4.replace("STEPS", "30"), edits)))
    assert [r.name for r in g.rows if not r.ok] == wrong, g.table()
    assert [r.name for r in g.rows][-2:] == ["loss curve", "loss reached"]
    assert "graded at the parameters of your loop's last step" in g.notes[0]
    assert g.rows[0].shape == (32, 27) and g.rows[1].shape == (32, 200)  # the loop's own n_hidden


def test_a_real_ipynb_runs_without_a_kernel_and_is_graded(tmp_path):
    cells = NB.SETUP + [NB.FORWARD, NB.edit(NB.EX1, CLASSIC[4][1])]
    path = NB.write_ipynb(tmp_path / "makemore_part4_backprop.ipynb", cells)
    ns = NB.run_ipynb(path)
    g = dojo.grade(1, ns)
    assert [r.name for r in g.rows if not r.ok] == ["dprobs"], g.table()
    assert (
        ns["_ih"][1].startswith("import torch")
        and "get_ipython().run_line_magic('matplotlib'" in ns["_ih"][1]
    )


CHALLENGE_CELLS = [
    "import torch\n\ndef tanh_backward(z, a, da):\n    dz = (1 - a**2) * da\n    return dz",
    "def linear_backward(x, W, b, dz):\n    dx = dz @ W.T\n    dW = dz.T @ x\n    db = dz.sum(0)\n    return dx, dW, db",
]


def test_a_challenge_is_graded_from_the_functions_a_notebook_defines():
    ns: dict = {"__name__": "__main__"}
    for c in CHALLENGE_CELLS:
        NB.run(ns, c)
    g = dojo.grade("linear-tanh", ns)
    assert [r.name for r in g.rows if not r.ok] == ["dW"], g.table()
    assert g.rows[2].kind == K.TRANSPOSED and "dz.T @ x is (H, D)" in g.rows[2].diagnosis
    NB.run(ns, CHALLENGE_CELLS[1].replace("dz.T @ x", "x.T @ dz"))
    NB.run(ns, CHALLENGE_CELLS[0].replace("dz = (1 - a**2) * da", "dz = 1 - a**2 * da"))
    g = dojo.grade("linear-tanh", ns)
    assert [r.name for r in g.rows if not r.ok] == ["dz"], g.table()
    assert (
        "your In [4] line 4 is right with `(1 - a ** 2) * da` in place of `1 - a**2 * da`" in g.rows[0].edit
    )


def test_the_notebooks_solution_as_a_dojo_file_is_all_right_with_a_shape_note(tmp_path):
    from handgrad.dojo.framework import render
    from handgrad.dojo.items import get

    cell = NB.EX1_LINES  # the notebook's gradient lines, without its checks (a file has no .grad)
    p = tmp_path / "ex1_atomic.py"
    p.write_text(render(get("1"), (cell,)))
    g = dojo.grade_file(p)
    assert g.summary() == "26 of 26 right (1 with a shape note); all done", g.table()
