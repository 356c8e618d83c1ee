"""The dojo, exercise 1 as a file: the reference passes, a blank file is all missing, each classic
mistake is flagged once, where it is, with the mistake named and every right line below it right (given
the learner's own upstream in the chain column); shape notes and strict mode; aliases and in-place
changes said and never blamed on a right line; natural float32 lines right; files that cannot be graded
say why (exit 2)."""

from __future__ import annotations

import pytest

from handgrad import cli, dojo
from handgrad.dojo import catalogue as K
from handgrad.dojo.framework import render
from handgrad.dojo.registry import get

EX1 = get("1")
REF = EX1.solution[0]
LOOP = """dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
    for j in range(Xb.shape[1]):
        ix = Xb[k, j]
        dC[ix] += demb[k, j]
"""

# (id, edits of the reference as (old, new) pairs, the one wrong gradient, the kind it must be named)
MISTAKES = [
    (
        "log-times",
        [("dprobs = (1.0 / probs) * dlogprobs", "dprobs = probs * dlogprobs")],
        "probs",
        K.INPUT_OUTPUT,
    ),
    ("tanh-1-h", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1.0 - h) * dh")], "hpreact", K.TANH),
    (
        "tanh-at-input",
        [("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1.0 - hpreact**2) * dh")],
        "hpreact",
        K.INPUT_OUTPUT,
    ),
    (
        "counts-one-branch",
        [("dcounts += torch.ones_like(counts) * dcounts_sum\n", "")],
        "counts",
        K.MISSING_BRANCH,
    ),
    (
        "logits-no-max-branch",
        [("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes\n", "")],
        "logits",
        K.MISSING_BRANCH,
    ),
    ("bndiff-one-branch", [("dbndiff += (2 * bndiff) * dbndiff2\n", "")], "bndiff", K.MISSING_BRANCH),
    ("bessel", [("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / n)")], "bndiff2", K.BESSEL),
    (
        "no-mean",
        [("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0")],
        "logprobs",
        K.SCALE_N,
    ),
    ("no-eps", [("(bnvar + 1e-5) ** -1.5", "bnvar ** -1.5")], "bnvar", K.EPS_LEFT_OUT),
    (
        "not-summed",
        [("dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)", "dbnvar_inv = bndiff * dbnraw")],
        "bnvar_inv",
        K.SHAPE,
    ),
    ("wrong-dim", [("db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)")], "b2", K.WRONG_DIM),
    ("transposed", [("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h")], "W2", K.TRANSPOSED),
    ("overwrite", [(LOOP, "dC = torch.zeros_like(C)\ndC[Xb] += demb\n")], "C", K.OVERWRITE),
    ("sign", [("dh = dlogits @ W2.T", "dh = -(dlogits @ W2.T)")], "h", K.SIGN),
    ("mean-no-1/n", [("dhprebn += 1.0 / n * (", "dhprebn += (")], "hprebn", K.SCALE_N),
    ("power-rule", [("(-counts_sum**-2)", "(-counts_sum**-1)")], "counts_sum", K.POWER),
    (
        "exp-at-input",
        [("dnorm_logits = counts * dcounts", "dnorm_logits = norm_logits * dcounts")],
        "norm_logits",
        K.INPUT_OUTPUT,
    ),
    (
        "hard-coded",
        [("dlogprobs[range(n), Yb] = -1.0 / n", "dlogprobs[range(n), Yb] = -1.0 / 32")],
        "logprobs",
        K.HARDCODED,
    ),
    ("other-factor", [("dbnraw = bngain * dhpreact", "dbnraw = bnraw * dhpreact")], "bnraw", K.WRONG_FACTOR),
    ("columns", [("dW1 = embcat.T @ dhprebn", "dW1 = embcat.T @ dhprebn\ndW1[:, :8] = 0")], "W1", K.ROWS),
    ("rows", [("dh = dlogits @ W2.T", "dh = dlogits @ W2.T\ndh[:3] *= 2")], "h", K.ROWS),
    ("alias", [("dhprebn = dbndiff.clone()", "dhprebn = dbndiff")], "hprebn", K.ALIAS),
    ("alias-logits", [("dlogits = dnorm_logits.clone()", "dlogits = dnorm_logits")], "logits", K.ALIAS),
]

# Right answers written differently from the reference (another order, another form of the same maths,
# index_add_ for the loop, einsum, float32 factories): no false alarm at the float64 verdict's tolerance.
RIGHT_VARIANTS = [
    ("dprobs = (1.0 / probs) * dlogprobs", "dprobs = dlogprobs / probs"),
    (
        "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
        "dcounts_sum_inv = (dprobs * counts).sum(1, keepdim=True)",
    ),
    ("dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv", "dcounts_sum = -dcounts_sum_inv / counts_sum**2"),
    (
        "dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
        "dlogits[range(n), logits.argmax(1)] += dlogit_maxes.view(-1)",
    ),
    ("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1 - torch.tanh(hpreact) ** 2) * dh"),
    ("dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv", "dbnvar = -0.5 * bnvar_inv**3 * dbnvar_inv"),
    (
        "dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(bndiff2) * dbnvar",
        "dbndiff2 = torch.ones(n, n_hidden) * dbnvar / (n - 1)",
    ),
    ("dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)", "dhprebn += dbnmeani / n"),
    ("dW1 = embcat.T @ dhprebn", "dW1 = torch.einsum('ni,nj->ij', embcat, dhprebn)"),
    (LOOP, "dC = torch.zeros(vocab_size, n_embd)\ndC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))\n"),
]


def _edit(edits: list[tuple[str, str]]) -> str:
    src = REF
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    return render(EX1, (src,))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every file of this module graded: {id: Grade}."""
    d = tmp_path_factory.mktemp("dojo")
    files = {"reference": dojo.solution("1"), "blank": render(EX1)}
    files |= {m[0]: _edit(m[1]) for m in MISTAKES}
    files["right-variants"] = _edit(RIGHT_VARIANTS)
    files["error"] = _edit([("dh = dlogits @ W2.T", "dh = dlogits @ W2")])
    files["numpy"] = _edit([("dh = dlogits @ W2.T", "dh = (dlogits @ W2.T).numpy()")])
    files["syntax"] = _edit([("dh = dlogits @ W2.T", "dh = dlogits @@ W2.T")])
    files["keepdim"] = _edit(
        [
            ("dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)"),
            ("db2 = dlogits.sum(0)", "db2 = dlogits.sum(0, keepdim=True)"),
        ]
    )
    files["n-by-1"] = _edit(
        [
            (
                "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
                "dcounts_sum_inv = (counts * dprobs).sum(1)",
            )
        ]
    )
    files["forward-in-place"] = _edit(
        [("dprobs = (1.0 / probs) * dlogprobs", "dprobs = (1.0 / probs) * dlogprobs\nprobs *= 2")]
    )
    files["n-rebound"] = _edit([("for k in range(Xb.shape[0]):", "for n in range(Xb.shape[0]):\n    k = n")])
    files["float32-constant"] = _edit(
        [("(bnvar + 1e-5) ** -1.5", "(bnvar + torch.tensor(1e-5, dtype=torch.float32)) ** -1.5")]
    )
    paths = []
    for name, text in files.items():
        p = d / f"{name.replace('/', '_')}.py"
        p.write_text(text)
        paths.append(p)
    out = dict(zip(files, dojo.grade_files(paths)))
    out["strict"] = dojo.grade_file(d / "keepdim.py", strict=True)
    return out


def test_reference_passes_every_gradient(graded):
    g = graded["reference"]
    assert g.problem == "" and g.exit_code == 0
    assert [r.name for r in g.rows] == [f"d{n}" for n in EX1.graph.grads]
    assert all(r.ok and r.chain == "yes" for r in g.rows), g.table()
    # the lecture's (1 - h**2) * dh rounds twice: float32 bit-exactness fails there and only there
    assert [r.name for r in g.rows if not r.exact] == ["dhpreact"]
    assert g.summary() == "26 of 26 right; all done"


def test_right_answers_written_differently_pass(graded):
    g = graded["right-variants"]
    assert g.exit_code == 0 and all(r.ok and r.chain == "yes" for r in g.rows), g.table()


def test_blank_file_is_all_missing_with_its_lines(graded):
    g = graded["blank"]
    assert g.exit_code == 1 and all(r.status == "missing" for r in g.rows)
    lines = [r.line for r in g.rows]
    assert lines == list(range(lines[0], lines[0] + 26))
    assert g.summary() == "0 of 26 right; next: dlogprobs"


@pytest.mark.parametrize("mid, edits, wrong, kind", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_flagged_once_and_named(graded, mid, edits, wrong, kind):
    g = graded[mid]
    assert g.exit_code == 1
    bad = [r for r in g.rows if not r.ok]
    assert [r.name for r in bad] == [f"d{wrong}"], g.table()  # local grading: everything else right
    assert bad[0].kind == kind, bad[0].diagnosis
    assert g.summary() == f"25 of 26 right; next: d{wrong}"


@pytest.mark.parametrize("mid", ["tanh-1-h", "log-times", "sign", "no-mean"])
def test_right_lines_below_a_mistake_say_given_your_upstream(graded, mid):
    """The chain column: below the mistake the learner's own chain is off, but each line is the right
    local backward of the learner's own upstream values, and says where the mistake is."""
    g = graded[mid]
    (bad,) = [r for r in g.rows if not r.ok]
    below = g.rows[g.rows.index(bad) + 1 :]
    given = [r for r in below if r.chain == "given"]
    # every row below is right; those made from the wrong row are right given it (the rest, like dW2 beside
    # dh, or db1, ~0 under batchnorm whatever its upstream, are right end to end)
    assert len(given) >= 10 and all(r.ok and r.chain in ("given", "yes") for r in below), g.table()
    assert all(f"the mistake is above, at {bad.name}" in r.note for r in given)


def test_the_edit_search_speaks_where_the_catalogue_is_silent(graded):
    (row,) = [r for r in graded["hard-coded"].rows if not r.ok]
    assert "your line 50 is right with `n` in place of `32`" in row.edit and "hard-coded" in row.diagnosis
    (row,) = [r for r in graded["columns"].rows if not r.ok]
    assert row.edit and "line 77" in row.edit
    (row,) = [r for r in graded["tanh-1-h"].rows if not r.ok]
    assert row.edit == "" and "1 - h**2" in row.diagnosis  # a known mistake: the catalogue's words


@pytest.mark.parametrize(
    "mid, words",
    [
        ("columns", "wrong only in columns 0, 1, 2, 3, 4, 5, 6, 7 of 64"),
        ("rows", "wrong only on rows 0, 1, 2 of"),
    ],
)
def test_a_mistake_on_some_rows_or_columns_says_which(graded, mid, words):
    (row,) = [r for r in graded[mid].rows if not r.ok]
    assert words in row.diagnosis


def test_a_shape_that_broadcasts_alike_is_right_with_a_note_and_wrong_in_strict_mode(graded):
    g = graded["keepdim"]
    marked = {r.name: r for r in g.rows if r.mark == "shape"}
    assert set(marked) == {"dbnmeani", "db2"} and g.exit_code == 0, g.table()
    assert "shape (64,) where bnmeani is (1, 64)" in marked["dbnmeani"].note
    assert g.summary() == "26 of 26 right (2 with a shape note); all done"
    assert "ok*" in g.table()
    s = graded["strict"]
    assert [r.name for r in s.rows if not r.ok] == ["db2", "dbnmeani"] and s.exit_code == 1
    assert all(r.kind == K.SHAPE and "strict mode" in r.diagnosis for r in s.rows if not r.ok)


def test_a_shape_that_changes_the_result_is_wrong_with_the_reason(graded):
    (row,) = [r for r in graded["n-by-1"].rows if not r.ok]
    assert row.name == "dcounts_sum_inv" and row.kind == K.SHAPE
    assert "keepdim" in row.diagnosis and "sum(1, keepdim=True)" in row.diagnosis


def test_an_alias_names_the_line_and_says_clone(graded):
    (row,) = [r for r in graded["alias"].rows if not r.ok]
    src = _edit([("dhprebn = dbndiff.clone()", "dhprebn = dbndiff")]).splitlines()
    assert "`dhprebn = dbndiff` makes dhprebn the same tensor as dbndiff" in row.diagnosis
    assert "write `dhprebn = dbndiff.clone()`" in row.diagnosis
    line = int(row.diagnosis.split("line ")[1].split()[0])
    assert src[line - 1] == "dhprebn = dbndiff"
    dbndiff = next(r for r in graded["alias"].rows if r.name == "dbndiff")
    assert dbndiff.ok and "changed later through dhprebn" in dbndiff.note  # the right line is not blamed


def test_a_forward_value_changed_in_place_is_restored_and_said(graded):
    g = graded["forward-in-place"]
    assert g.exit_code == 0, g.table()  # every line below reads the forward value it should
    assert any("`probs *= 2` changes the forward value probs in place" in nt for nt in g.notes), g.notes


def test_a_rebound_setup_size_is_said_in_the_learners_terms(graded):
    g = graded["n-rebound"]
    assert g.exit_code == 0, g.table()
    assert any(nt.startswith("n is 31 after line") and "the setup's n is 32" in nt for nt in g.notes), g.notes


def test_a_float32_constant_in_a_right_formula_is_right(graded):
    g = graded["float32-constant"]
    assert g.exit_code == 0, (
        g.table()
    )  # 1e-5 in float32 moves dbnvar by ~1e-13 of itself: rounding, not a formula


def test_learner_exception_reports_their_line(graded):
    g = graded["error"]
    (row,) = [r for r in g.rows if not r.ok]
    src = dojo.solution("1").splitlines()
    assert row.status == "error" and row.name == "dh"
    assert src[row.line - 1] == "dh = dlogits @ W2.T"
    assert row.diagnosis.startswith(f"line {row.line}: RuntimeError")


@pytest.mark.parametrize("name, words", [("numpy", "NumPy array"), ("syntax", "SyntaxError")])
def test_cannot_grade_says_why_in_one_line(graded, name, words):
    g = graded[name]
    assert g.exit_code == 2 and words in g.problem and "\n" not in g.problem


def test_infinite_loop_is_stopped(tmp_path):
    p = tmp_path / "loop.py"
    p.write_text(_edit([("dh = dlogits @ W2.T", "while True:\n    pass\ndh = dlogits @ W2.T")]))
    (g,) = dojo.grade_files([p], time_limit=2.0)
    assert g.exit_code == 2 and "time limit" in g.problem


def test_renamed_gradients_in_a_file_are_found_and_said(tmp_path):
    import re

    src = REF
    for g in ("logprobs", "probs", "counts_sum_inv"):
        src = re.sub(rf"\bd{g}\b", f"dL_d{g}", src)
    p = tmp_path / "renamed.py"
    p.write_text(render(EX1, (src,)))
    g = dojo.grade_file(p)
    assert g.exit_code == 0, g.table()
    assert "took dL_dlogprobs for dlogprobs" in g.notes[0]
    assert next(r for r in g.rows if r.name == "dprobs").yours == "dL_dprobs"


def test_cli_list_start_grade(tmp_path, capsys):
    assert cli.main(["dojo", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("1  ex1_atomic") and "a  linear-tanh" in out
    assert cli.main(["dojo", "start", "1", "--dir", str(tmp_path)]) == 0
    path = tmp_path / "ex1_atomic.py"
    path.write_text(path.read_text() + "# my work\n")
    assert cli.main(["dojo", "start", "1", "--dir", str(tmp_path)]) == 2  # never overwrites
    assert path.read_text().endswith("# my work\n")
    assert "never overwritten" in capsys.readouterr().err
    assert cli.main(["dojo", "start", "nine", "--dir", str(tmp_path)]) == 2
    (tmp_path / "notes.py").write_text("x = 1\n")
    assert cli.main(["dojo", "grade", str(tmp_path / "notes.py")]) == 2
    assert "handgrad dojo" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--time-limit", "0"], ["--time-limit", "nan"], ["--name", "dlogprobs"]])
def test_cli_bad_flags_are_one_line(tmp_path, capsys, flag):
    p = tmp_path / "ex1.py"
    p.write_text(dojo.solution("1"))
    assert cli.main(["dojo", "grade", str(p), *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag[0] in err


def test_cli_strict_and_names(tmp_path, capsys):
    p = tmp_path / "ex1.py"
    p.write_text(_edit([("dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)")]))
    assert cli.main(["dojo", "grade", str(p)]) == 0
    assert "(1 with a shape note)" in capsys.readouterr().out
    assert cli.main(["dojo", "grade", str(p), "--strict"]) == 1
    assert "next: dbnmeani" in capsys.readouterr().out
    q = tmp_path / "mine.py"
    q.write_text(render(EX1, (REF.replace("dlogprobs", "grads17"),)))
    assert cli.main(["dojo", "grade", str(q), "--name", "dlogprobs=grads17"]) == 0
