"""The dojo's coding challenges: every reference solution passes, a fresh file is all missing, each
planted mistake is flagged on its row (and only there) with the mistake named; files that cannot be
graded say why in one line (exit 2); list/start/grade/hint/solution work from the CLI."""

from __future__ import annotations

import pytest
import torch

from handgrad import cli, dojo
from handgrad.dojo import catalogue as K
from handgrad.dojo.catalogue import Vals
from handgrad.dojo.challenges import CHALLENGES
from handgrad.dojo.challenges import batchnorm as B
from handgrad.dojo.challenges import checkpoint as CK
from handgrad.dojo.challenges import gradcheck as G
from handgrad.dojo.framework import render
from handgrad.dojo.registry import get

CE = "dlogits = dloss * (F.softmax(logits, 1) - F.one_hot(Y, logits.shape[1]).to(logits.dtype)) / n"
EMB = (
    "dC = torch.zeros_like(C)  # (V, E)\n    dC.index_add_(0, X.reshape(-1), demb.reshape(-1, C.shape[1]))  "
    "# accumulates repeated indices"
)

GC_SHAPE = (
    "    if not isinstance(analytic, torch.Tensor) or analytic.shape != x.shape:\n"
    "        return False  # a broadcast would hide a wrong shape\n"
)
GC_RULE = "verdict = bool(((analytic - numeric).abs() <= atol + rtol * numeric.abs()).all())"
BN_UPDATE = (
    "        self.running_mean = (1 - m) * self.running_mean + m * xmean[0]\n"
    "            self.running_var = (1 - m) * self.running_var + m * xvar[0]\n"
)

CK_STORE = "        if l % every == 0:\n            stash[l] = h  # the checkpoint: block l's input\n"
CK_FWD = CK_STORE + "        h = block_forward(h, W)\n"
CK_RECOMPUTE = (
    "hs = [stash[s]]  # recompute the segment's activations from its checkpoint\n"
    "        for l in range(s, e):\n            hs.append(block_forward(hs[-1], Ws[l]))\n"
)
CK_BWD = "        for l in reversed(range(s, e)):\n            dh, dWs[l] = block_backward(dh,"

# (id, challenge, edits of the reference as (old, new) pairs, the wrong rows, the kind the first is named)
MISTAKES = [
    ("lt-1-a", "linear-tanh", [("dz = (1 - a**2) * da", "dz = (1 - a) * da")], ["dz"], K.TANH),
    (
        "lt-at-input",
        "linear-tanh",
        [("dz = (1 - a**2) * da", "dz = (1 - z**2) * da")],
        ["dz"],
        K.INPUT_OUTPUT,
    ),
    ("lt-no-upstream", "linear-tanh", [("dz = (1 - a**2) * da", "dz = 1 - a**2")], ["dz"], K.NO_UPSTREAM),
    ("lt-sign", "linear-tanh", [("dz = (1 - a**2) * da", "dz = (a**2 - 1) * da")], ["dz"], K.SIGN),
    ("lt-dW-transposed", "linear-tanh", [("dW = x.T @ dz", "dW = dz.T @ x")], ["dW"], K.TRANSPOSED),
    ("lt-dx-transposed", "linear-tanh", [("dx = dz @ W.T", "dx = (dz @ W.T).T")], ["dx"], K.TRANSPOSED),
    ("lt-db-no-sum", "linear-tanh", [("db = dz.sum(0)", "db = dz")], ["db"], K.SHAPE),
    ("lt-db-dim1", "linear-tanh", [("db = dz.sum(0)", "db = dz.sum(1)")], ["db"], K.WRONG_DIM),
    ("lt-dW-mean", "linear-tanh", [("dW = x.T @ dz", "dW = x.T @ dz / x.shape[0]")], ["dW"], K.SCALE_N),
    (
        "ce-no-minus-one",
        "cross-entropy",
        [(CE, "dlogits = dloss * F.softmax(logits, 1) / n")],
        ["dlogits"],
        K.SOFTMAX_MINUS_ONE,
    ),
    ("ce-no-1/n", "cross-entropy", [(CE, CE.replace(") / n", ")"))], ["dlogits"], K.SCALE_N),
    (
        "ce-dim0",
        "cross-entropy",
        [(CE, CE.replace("softmax(logits, 1)", "softmax(logits, 0)"))],
        ["dlogits"],
        K.WRONG_DIM,
    ),
    ("ce-no-dloss", "cross-entropy", [(CE, CE.replace("dloss * ", ""))], ["dlogits"], K.NO_UPSTREAM),
    ("ce-sign", "cross-entropy", [(CE, CE.replace("dloss *", "-dloss *"))], ["dlogits"], K.SIGN),
    (
        "ce-overflow",
        "cross-entropy",
        [
            (
                CE,
                "p = logits.exp() / logits.exp().sum(1, keepdim=True)\n    "
                + CE.replace("F.softmax(logits, 1)", "p"),
            )
        ],
        ["dlogits"],
        K.NONFINITE,
    ),
    ("emb-assign", "embedding", [(EMB, "dC = torch.zeros_like(C)\n    dC[X] = demb")], ["dC"], K.OVERWRITE),
    ("emb-plus-eq", "embedding", [(EMB, "dC = torch.zeros_like(C)\n    dC[X] += demb")], ["dC"], K.OVERWRITE),
    (
        "emb-loop-assign",
        "embedding",
        [
            (
                EMB,
                "dC = torch.zeros_like(C)\n    for k in range(X.shape[0]):\n"
                "        for j in range(X.shape[1]):\n            dC[X[k, j]] = demb[k, j]",
            )
        ],
        ["dC"],
        K.OVERWRITE,
    ),
    (
        "bn-biased",
        "batchnorm",
        [("xvar = x.var(0, keepdim=True)", "xvar = x.var(0, keepdim=True, unbiased=False)")],
        ["out(train)", "running_var"],
        K.BESSEL,
    ),
    (
        "bn-no-eps",
        "batchnorm",
        [("(xvar + self.eps) ** -0.5", "xvar ** -0.5")],
        ["out(train)", "out(eval)"],
        K.EPS_LEFT_OUT,
    ),
    ("bn-not-updated", "batchnorm", [(BN_UPDATE, "")], ["running_mean", "running_var"], B.NOT_UPDATED),
    (
        "bn-momentum",
        "batchnorm",
        [("(1 - m) * self.running_mean + m * xmean[0]", "m * self.running_mean + (1 - m) * xmean[0]")],
        ["running_mean"],
        B.MOMENTUM,
    ),
    (
        "bn-eval-batch",
        "batchnorm",
        [
            (
                "xmean = self.running_mean\n            xvar = self.running_var",
                "xmean = x.mean(0, keepdim=True)\n            xvar = x.var(0, keepdim=True)",
            )
        ],
        ["out(eval)"],
        B.BATCH_IN_EVAL,
    ),
    (
        "bn-eval-updates",
        "batchnorm",
        [
            (
                "    xvar = self.running_var\n",
                "    xvar = self.running_var\n"
                "            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean(0)\n",
            )
        ],
        ["stats(eval)"],
        B.UPDATED_IN_EVAL,
    ),
    ("bn-dx-bessel", "batchnorm", [("n / (n - 1) * xhat", "xhat")], ["dx"], K.BESSEL),
    (
        "bn-dx-direct",
        "batchnorm",
        [
            (
                "dx = self.gamma * var_inv / n * (n * dout - dbeta - n / (n - 1) * xhat * dgamma)",
                "dx = self.gamma * var_inv * dout",
            )
        ],
        ["dx"],
        K.MISSING_BRANCH,
    ),
    (
        "bn-dgamma",
        "batchnorm",
        [("dgamma = (xhat * dout).sum(0)", "dgamma = dout.sum(0)")],
        ["dgamma", "dx"],
        K.WRONG_FACTOR,
    ),
    (
        "gc-no-shape-check",
        "gradcheck",
        [(GC_SHAPE, "")],
        ["rejects shape (1, n)", "rejects broadcast (1,)"],
        K.SHAPE,
    ),
    (
        "gc-mean",
        "gradcheck",
        [(GC_RULE, "verdict = bool((analytic - numeric).abs().mean() <= 1e-3)")],
        ["rejects one element"],
        K.ROWS,
    ),
    (
        "gc-loose",
        "gradcheck",
        [("rtol * numeric.abs()", "0.05 * numeric.abs()")],
        ["rejects one element", "rejects 3% off"],
        K.ROWS,
    ),
    (
        "gc-exact",
        "gradcheck",
        [("atol + rtol * numeric.abs()", "0")],
        ["accepts right (sin)", "accepts right (matrix)"],
        G.TOO_STRICT,
    ),
    ("gc-no-restore", "gradcheck", [("\n        flat[k] = old  # restore x", "")], ["x unchanged"], K.OTHER),
    (
        "ck-store-all",
        "checkpoint",
        [
            (CK_STORE, "        stash[l] = h\n"),
            ("    out = h\n", "    stash[len(Ws)] = h\n    out = h\n"),
            (CK_RECOMPUTE, "hs = [stash[k] for k in range(s, e + 1)]\n"),
        ],
        ["stored"],
        CK.STORES_ALL,
    ),
    (
        "ck-store-stacked",
        "checkpoint",
        [
            ("    h = x\n", "    h = x\n    acts = [x]\n"),
            (CK_STORE, ""),
            ("    out = h\n", "        acts.append(h)\n    stash['all'] = torch.stack(acts)\n    out = h\n"),
            (CK_RECOMPUTE, "hs = list(stash['all'][s:e + 1])\n"),
        ],
        ["stored"],
        CK.STORES_ALL,
    ),
    (
        "ck-after-block",
        "checkpoint",
        [(CK_FWD, "        h = block_forward(h, W)\n" + CK_STORE)],
        ["dx", "dW"],
        CK.WRONG_CHECKPOINT,
    ),
    (
        "ck-overwritten",
        "checkpoint",
        [(CK_STORE, "        stash[l // every * every] = h\n")],
        ["dx", "dW"],
        CK.WRONG_CHECKPOINT,
    ),
    (
        "ck-next-segment",
        "checkpoint",
        [("hs = [stash[s]]", "hs = [stash[s + every] if s + every in stash else stash[s]]")],
        ["dx", "dW"],
        CK.WRONG_CHECKPOINT,
    ),
    (
        "ck-stale",
        "checkpoint",
        [
            ("    h = x\n", "    global ACTS\n    ACTS = [x]\n    h = x\n"),
            ("    out = h\n", "        ACTS.append(h)\n    out = h\n"),
            (CK_RECOMPUTE, "hs = ACTS[s:e + 1]  # kept from forward\n"),
        ],
        ["dx", "dW"],
        CK.NOT_RECOMPUTED,
    ),
    (
        "ck-recompute-unchained",
        "checkpoint",
        [("hs.append(block_forward(hs[-1], Ws[l]))", "hs.append(block_forward(hs[0], Ws[l]))")],
        ["dx", "dW"],
        CK.NOT_RECOMPUTED,
    ),
    (
        "ck-segments-not-chained",
        "checkpoint",
        [(CK_BWD, "        dh = dout\n" + CK_BWD)],
        ["dx", "dW"],
        CK.NOT_CHAINED,
    ),
    (
        "ck-blocks-not-chained",
        "checkpoint",
        [(CK_BWD, "        g = dh\n" + CK_BWD.replace("block_backward(dh,", "block_backward(g,"))],
        ["dx", "dW"],
        CK.NOT_CHAINED,
    ),
    (
        "ck-from-x",
        "checkpoint",
        [
            (
                CK_RECOMPUTE,
                CK_RECOMPUTE.replace("stash[s]", "stash[0]").replace("range(s, e)", "range(0, e)")
                + "        hs = hs[s:]\n",
            )
        ],
        ["recompute"],
        CK.RECOMPUTES_TOO_MUCH,
    ),
]


def _edit(key: str, edits: list[tuple[str, str]]) -> str:
    c = get(key)
    src = render(c, c.solution)
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    return src


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every file of this module graded in one child process: {id: ChallengeGrade}."""
    d = tmp_path_factory.mktemp("challenges")
    files = {}
    for c in CHALLENGES:
        files[f"ref-{c.key}"] = render(c, c.solution)
        files[f"blank-{c.key}"] = render(c)
    files |= {m[0]: _edit(m[1], m[2]) for m in MISTAKES}
    files["error"] = _edit("linear-tanh", [("dx = dz @ W.T", "dx = dz @ W")])
    files["numpy"] = _edit("linear-tanh", [("dW = x.T @ dz", "dW = (x.T @ dz).numpy()")])
    files["syntax"] = _edit("linear-tanh", [("dW = x.T @ dz", "dW = x.T @@ dz")])
    paths = []
    for name, text in files.items():
        p = d / f"{name.replace('/', '_')}.py"
        p.write_text(text)
        paths.append(p)
    files["lt-db-keepdim"] = _edit("linear-tanh", [("db = dz.sum(0)", "db = dz.sum(0, keepdim=True)")])
    paths.append(d / "lt-db-keepdim.py")
    paths[-1].write_text(files["lt-db-keepdim"])
    out = dict(zip(files, dojo.grade_files(paths)))
    out["lt-db-keepdim-strict"] = dojo.grade_file(paths[-1], strict=True)
    return out


@pytest.mark.parametrize("key", [c.key for c in CHALLENGES])
def test_reference_solution_passes(graded, key):
    g = graded[f"ref-{key}"]
    assert g.problem == "" and g.exit_code == 0, g.table()
    assert g.summary() == f"{len(g.rows)} of {len(g.rows)} right; all done"


@pytest.mark.parametrize("key", [c.key for c in CHALLENGES])
def test_fresh_file_is_all_missing(graded, key):
    g = graded[f"blank-{key}"]
    assert g.exit_code == 1, g.table()
    assert all(r.status == "missing" and r.line for r in g.rows), g.table()


@pytest.mark.parametrize("mid, key, edits, wrong, kind", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_flagged_where_it_is_and_named(graded, mid, key, edits, wrong, kind):
    g = graded[mid]
    assert g.exit_code == 1, g.table()
    assert [r.name for r in g.rows if not r.ok] == wrong, g.table()
    bad = next(r for r in g.rows if not r.ok)
    assert bad.kind == kind, bad.diagnosis
    assert bad.diagnosis and "matches none" not in bad.diagnosis


def test_a_bias_gradient_with_keepdim_is_right_with_a_shape_note(graded):
    g = graded["lt-db-keepdim"]
    assert g.exit_code == 0 and [r.name for r in g.rows if r.mark == "shape"] == ["db"], g.table()
    s = graded["lt-db-keepdim-strict"]
    assert [r.name for r in s.rows if not r.ok] == ["db"] and s.rows[-1].kind == K.SHAPE


def test_learner_exception_reports_their_line(graded):
    g = graded["error"]
    bad = [r for r in g.rows if not r.ok]
    assert {r.name for r in bad} == {"dx", "dW", "db"} and all(r.status == "error" for r in bad)
    src = _edit("linear-tanh", [("dx = dz @ W.T", "dx = dz @ W")]).splitlines()
    assert src[bad[0].line - 1].strip() == "dx = dz @ W"
    assert bad[0].diagnosis.startswith(f"line {bad[0].line}: RuntimeError")


@pytest.mark.parametrize("name, words", [("numpy", "NumPy array"), ("syntax", "SyntaxError")])
def test_cannot_grade_says_why_in_one_line(graded, name, words):
    g = graded[name]
    assert g.exit_code == 2 and words in g.problem and "\n" not in g.problem


def test_infinite_loop_is_stopped_with_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "loop.py"
    p.write_text(_edit("linear-tanh", [("dW = x.T @ dz", "while True:\n        pass")]))
    assert cli.main(["dojo", "grade", str(p), "--time-limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "time limit" in err and "\n" not in err


def test_cli_list_start_grade_hint_solution(tmp_path, capsys):
    assert cli.main(["dojo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(c.key in out for c in CHALLENGES) and "ex1_atomic" in out
    for c in CHALLENGES:
        assert cli.main(["dojo", "start", c.key, "--dir", str(tmp_path)]) == 0
    path = tmp_path / "ch_linear_tanh.py"
    path.write_text(path.read_text() + "# my work\n")
    assert cli.main(["dojo", "start", "a", "--dir", str(tmp_path)]) == 2  # never overwrites
    assert path.read_text().endswith("# my work\n")
    capsys.readouterr()
    assert cli.main(["dojo", "grade", str(path)]) == 1
    assert "0 of 4 right; next: dz" in capsys.readouterr().out
    for level in (1, 2):
        assert cli.main(["dojo", "hint", str(path), "db"]) == 0  # the next level each time
        out = capsys.readouterr().out
        assert out.startswith(f"hint {level} of 3 for db") and "dz.sum(0)" not in out  # not given away yet
    assert cli.main(["dojo", "hint", str(path), "db"]) == 0
    assert "dz.sum(0)" in capsys.readouterr().out
    assert cli.main(["dojo", "hint", str(path), "dx", "--level", "3"]) == 0
    assert "dz @ W.T" in capsys.readouterr().out
    assert cli.main(["dojo", "hint", str(path), "dQ"]) == 2
    assert cli.main(["dojo", "solution", "linear-tanh"]) == 0
    sol = tmp_path / "sol.py"
    sol.write_text(capsys.readouterr().out)
    assert cli.main(["dojo", "grade", str(sol)]) == 0


def test_every_hint_hides_the_answer_until_the_last():
    for c in CHALLENGES:
        for s in c.rows:
            assert len(s.hints) == 3 and all(s.hints)
            assert s.hints[2] not in s.hints[0] + s.hints[1], (c.key, s.name)


def test_checkpoint_memory_row_reports_what_was_kept(graded):
    """The memory row of the reference says what one probe kept; storing every activation fails it
    with the elements kept against the checkpoints'; a wrong dW names the blocks that are wrong."""
    ref = next(r for r in graded["ref-checkpoint"].rows if r.name == "stored")
    assert (
        ref.ok
        and "kept 3 tensors, 60 elements (checkpoints: 3, 60; every activation: 6, 120)" in ref.diagnosis
    )
    bad = next(r for r in graded["ck-store-all"].rows if r.name == "stored")
    assert bad.status == "wrong" and "kept 7 tensors, 140 elements" in bad.diagnosis, bad.diagnosis
    assert "no memory saved" in bad.diagnosis
    dW = next(r for r in graded["ck-segments-not-chained"].rows if r.name == "dW")
    assert "wrong on blocks 0, 1, 2, 3 of 6 (right: 4, 5)" in dW.diagnosis, dW.diagnosis
    calls = next(r for r in graded["ck-from-x"].rows if r.name == "recompute")
    assert "in backward" in calls.diagnosis and "from x" in calls.diagnosis, calls.diagnosis


def _ck_loss(x, Ws, dout):
    h = x
    for W in Ws:
        h = CK.block_forward(h, W)
    return (h * dout).sum()


@pytest.mark.parametrize("probe", range(4))
def test_checkpoint_reference_gradients_match_autograd_and_finite_differences(probe):
    """The grader's checkpointed backward (every probe's L and every) against autograd and float64
    central differences of (out * dout).sum()."""
    p = CK.probes()[probe]
    i = p.inputs
    dx, dW = p.refs["dx"], p.refs["dW"]
    x, Ws = i["x"].clone().requires_grad_(), i["Ws"].clone().requires_grad_()
    _ck_loss(x, Ws, i["dout"]).backward()
    assert torch.allclose(dx, x.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(dW, Ws.grad, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    x, Ws = i["x"].clone(), i["Ws"].clone()
    for t, g in ((x, dx), (Ws, dW)):
        flat, num = t.view(-1), torch.zeros_like(g).view(-1)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            fp = _ck_loss(x, Ws, i["dout"]).item()
            flat[k] = old - eps
            fm = _ck_loss(x, Ws, i["dout"]).item()
            flat[k] = old
            num[k] = (fp - fm) / (2 * eps)
        assert torch.allclose(g.reshape(-1), num, rtol=1e-5, atol=1e-7)


def test_checkpoint_every_variant_is_a_real_mistake():
    """Each planted variant differs from the right gradients on some probe (none can match a right answer)."""
    ps = CK.probes()
    for row in ("dx", "dW"):
        for v in CK.VARIANTS[row]:
            assert any(not torch.allclose(v.fn(Vals(p.inputs, {}, None, p.refs)), p.refs[row]) for p in ps), (
                row,
                v.key,
            )


def test_checkpoint_stash_keeps_tensors_only(tmp_path):
    """A list put in the stash is the learner's error, reported at their line."""
    src = _edit("checkpoint", [("stash[l] = h  # the checkpoint", "stash[l] = [h]  # the checkpoint")])
    p = tmp_path / "ck_list.py"
    p.write_text(src)
    g = dojo.grade_file(p)
    assert g.exit_code == 1
    bad = [r for r in g.rows if not r.ok]
    assert {r.status for r in bad} == {"error"} and "stash keeps tensors" in bad[0].diagnosis
    assert "stash[l] = [h]" in src.splitlines()[bad[0].line - 1], g.table()
