"""The dojo, exercises 2-4: each reference passes (float32 and float64 probes), a blank file is all
missing, and each planted mistake is flagged where it is with the mistake named; exercise 4's loss curve
and the loss it reaches are held against autograd's run."""

from __future__ import annotations

import pytest

from handgrad import dojo
from handgrad.dojo import catalogue as K
from handgrad.dojo.framework import render
from handgrad.dojo.registry import get

CE, BN, TR = "dlogits /= n\n", "n / (n - 1) * bnraw", "dbngain = (bnraw * dhpreact).sum(0, keepdim=True)"
CE_ALL = "dlogits = F.softmax(logits, 1)\ndlogits[range(n), Yb] -= 1\ndlogits /= n\n"

# (id, exercise, edits of the reference as (old, new), the wrong rows, the kind the first must be named)
MISTAKES = [
    ("ce-no-minus-one", "2", [("dlogits[range(n), Yb] -= 1\n", "")], ["dlogits"], K.SOFTMAX_MINUS_ONE),
    ("ce-no-mean", "2", [(CE, "")], ["dlogits"], K.SCALE_N),
    ("ce-bessel", "2", [(CE, "dlogits /= n - 1\n")], ["dlogits"], K.BESSEL),
    ("ce-sign", "2", [(CE, "dlogits /= -n\n")], ["dlogits"], K.SIGN),
    ("ce-dim0", "2", [("F.softmax(logits, 1)", "F.softmax(logits, 0)")], ["dlogits"], K.WRONG_DIM),
    ("ce-hard-coded", "2", [(CE, "dlogits /= 32\n")], ["dlogits"], K.HARDCODED),
    (
        "ce-keepdim",
        "2",
        [("dlogits = F.softmax(logits, 1)\n", "counts = logits.exp()\ndlogits = counts / counts.sum(1)\n")],
        ["dlogits"],
        K.SHAPE,
    ),
    (
        "ce-one-hot-classes",
        "2",
        [(CE_ALL, "dlogits = (F.softmax(logits, 1) - F.one_hot(Yb)) / n\n")],
        ["dlogits"],
        K.SHAPE,
    ),
    (
        "ce-minus-one-assigned",
        "2",
        [("dlogits[range(n), Yb] -= 1", "dlogits[range(n), Yb] = -1")],
        ["dlogits"],
        K.SOFTMAX_MINUS_ONE,
    ),
    (
        "ce-sum-all",
        "2",
        [("dlogits = F.softmax(logits, 1)\n", "dlogits = logits.exp() / logits.exp().sum()\n")],
        ["dlogits"],
        K.WRONG_DIM,
    ),
    ("ce-no-mean-keepdim", "2", [(CE, "dlogits = dlogits.mean(0, keepdim=True)\n")], ["dlogits"], K.SHAPE),
    ("bn-bessel-n", "3", [(BN, "bnraw")], ["dhprebn"], K.BESSEL),
    ("bn-bessel-whole", "3", [("bnvar_inv / n *", "bnvar_inv / (n - 1) *")], ["dhprebn"], K.BESSEL),
    ("bn-no-eps", "3", [("bngain * bnvar_inv", "bngain * bnvar**-0.5")], ["dhprebn"], K.EPS_LEFT_OUT),
    ("bn-no-mean-term", "3", [(" - dhpreact.sum(0)", "")], ["dhprebn"], K.MISSING_BRANCH),
    (
        "bn-sum-dim1",
        "3",
        [(" - dhpreact.sum(0)", " - dhpreact.sum(1, keepdim=True)")],
        ["dhprebn"],
        K.WRONG_DIM,
    ),
    ("bn-no-gain", "3", [("bngain * bnvar_inv", "bnvar_inv")], ["dhprebn"], K.WRONG_FACTOR),
    ("bn-var-sign", "3", [(f" - {BN}", f" + {BN}")], ["dhprebn"], K.SIGN),
    ("bn-bessel-reversed", "3", [(BN, "(n - 1) / n * bnraw")], ["dhprebn"], K.BESSEL),
    (
        "bn-var-dim1",
        "3",
        [("(dhpreact * bnraw).sum(0)", "(dhpreact * bnraw).sum(1, keepdim=True)")],
        ["dhprebn"],
        K.WRONG_DIM,
    ),
    ("bn-no-1/n", "3", [("bnvar_inv / n *", "bnvar_inv *")], ["dhprebn"], K.SCALE_N),
    ("bn-hard-coded", "3", [(BN, "n / (32 - 1) * bnraw")], ["dhprebn"], K.HARDCODED),
    (
        "bn-bndiff",
        "3",
        [(BN + " * (dhpreact * bnraw)", "n / (n - 1) * bndiff * (dhpreact * bndiff)")],
        ["dhprebn"],
        K.WRONG_FACTOR,
    ),
    ("tr-no-mean", "4", [(CE, "")], ["dlogits", "loss curve", "loss reached"], K.SCALE_N),
    ("tr-tanh", "4", [("(1.0 - h**2)", "(1.0 - h)")], ["dhpreact", "loss curve", "loss reached"], K.TANH),
    (
        "tr-not-summed",
        "4",
        [(TR, "dbngain = bnraw * dhpreact")],
        ["dbngain", "loss curve", "loss reached"],
        K.SHAPE,
    ),
    # a Bessel slip barely changes the training: the curve shows it, the loss reached does not
    ("tr-bessel", "4", [(BN, "bnraw")], ["dhprebn", "loss curve"], K.BESSEL),
    (
        "tr-overwrite",
        "4",
        [("dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))", "dC[Xb] += demb")],
        ["dC", "loss curve", "loss reached"],
        K.OVERWRITE,
    ),
]


def _edit(key: str, edits: list[tuple[str, str]]) -> str:
    ex = get(key)
    src = ex.solution[0]
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    return render(ex, (src,))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every file of this module graded in one child process: {id: Grade}."""
    d = tmp_path_factory.mktemp("dojo-ex")
    files = {}
    for k in "234":
        files[f"reference{k}"] = dojo.solution(k)
        files[f"blank{k}"] = render(get(k))
    files |= {m[0]: _edit(m[1], m[2]) for m in MISTAKES}
    files["tr-keepdim"] = _edit("4", [(TR, TR.replace(", keepdim=True", ""))])
    files["ce-float32"] = _edit(
        "2", [("dlogits = F.softmax(logits, 1)", "dlogits = (F.softmax(logits, 1) + 1e3) - 1e3")]
    )
    files["tr-diverges"] = _edit("4", [("dW2 = h.T @ dlogits", "dW2 = -1e4 * (h.T @ dlogits)")])
    paths = []
    for name, text in files.items():
        p = d / f"{name.replace('/', '_')}.py"
        p.write_text(text)
        paths.append(p)
    return dict(zip(files, dojo.grade_files(paths)))


@pytest.mark.parametrize("key, rows", [("2", 1), ("3", 1), ("4", 15)])
def test_reference_passes(graded, key, rows):
    g = graded[f"reference{key}"]
    assert g.problem == "" and g.exit_code == 0, g.table()
    assert len(g.rows) == rows and all(r.ok for r in g.rows)
    assert g.summary() == f"{rows} of {rows} right; all done"
    assert all(r.exact is not None for r in g.rows if r.grad)  # the float32 probe ran


def test_reference_loss_curve_is_autograds(graded):
    curve, reached = graded["reference4"].rows[-2:]
    assert (curve.name, reached.name) == ("loss curve", "loss reached")
    assert curve.max_rel < 1e-10 and reached.max_rel < 1e-10


@pytest.mark.parametrize("key, first", [("2", "dlogits"), ("3", "dhprebn"), ("4", "dlogits")])
def test_blank_is_missing(graded, key, first):
    g = graded[f"blank{key}"]
    assert g.exit_code == 1 and all(r.status in ("missing", "wrong") for r in g.rows)
    assert all(r.status == "missing" for r in g.rows if r.grad)
    assert g.summary() == f"0 of {len(g.rows)} right; next: {first}"
    if key == "4":
        assert "still blank" in g.rows[-1].diagnosis and "step 0" in g.rows[-1].diagnosis


@pytest.mark.parametrize("mid, key, edits, wrong, kind", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_flagged_and_named(graded, mid, key, edits, wrong, kind):
    g = graded[mid]
    assert g.exit_code == 1
    bad = [r for r in g.rows if not r.ok]
    assert [r.name for r in bad] == wrong, g.table()
    assert bad[0].kind == kind, bad[0].diagnosis
    assert g.summary() == f"{len(g.rows) - len(wrong)} of {len(g.rows)} right; next: {wrong[0]}"


def test_training_stops_on_a_wrong_shape(graded):
    curve, reached = graded["tr-not-summed"].rows[-2:]
    assert "dbngain has shape (32, 64)" in curve.diagnosis and "step 0" in reached.diagnosis


def test_a_keepdim_left_out_trains_and_is_right_with_a_shape_note(graded):
    """(64,) for the (1, 64) dbngain: the update broadcasts it as the learner's own loop does."""
    g = graded["tr-keepdim"]
    assert g.exit_code == 0 and [r.name for r in g.rows if r.mark == "shape"] == ["dbngain"], g.table()


def test_diverging_training_is_named(graded):
    g = graded["tr-diverges"]
    assert [r.name for r in g.rows if not r.ok] == ["dW2", "loss curve", "loss reached"]
    assert g.rows[-1].kind == K.NONFINITE or "higher" in g.rows[-1].diagnosis


def test_right_in_float64_but_unstable_in_float32_is_wrong(graded):
    (row,) = graded["ce-float32"].rows
    assert row.status == "wrong" and row.key == "float32" and "float32" in row.diagnosis
    assert 1e-5 < row.max_rel < 1e-3
