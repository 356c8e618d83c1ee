"""The makemore zoo's three dojo challenges (layernorm, one causal attention head, an RNN through time):
the grader's references equal autograd and float64 finite differences of the plain forward; right
solutions written three ways are all right (a shape that broadcasts alike gets the shape note); each
catalogued mistake typed into a right solution is reported once, on its line, with its name, and the rows
below it are right given the learner's own upstream; mistakes no catalogue lists are named by the edit
search from the learner's own line; a fresh file is all blank and its template holds no autograd.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from handgrad import dojo
from handgrad.dojo import catalogue as K
from handgrad.dojo.challenges import attention as AT
from handgrad.dojo.challenges import layernorm as LN
from handgrad.dojo.challenges import rnn as RN
from handgrad.dojo.framework import render
from handgrad.dojo.grading import upstream
from handgrad.dojo.items import get

ZOO = ("layernorm", "attention", "rnn")
MODULES = {"layernorm": LN, "attention": AT, "rnn": RN}

LN_DX = "dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))"
LN_DW = "dweight = (dout * xhat).reshape(-1, C).sum(0)"
LN_DB = "dbias = dout.reshape(-1, C).sum(0)"
AT_DM = "dmasked = att * (datt - (att * datt).sum(-1, keepdim=True))"
AT_DS = "dscores = dmasked.masked_fill(tril[:T, :T] == 0, 0.0)"
AT_DQ = "dq = dscores @ k * hs**-0.5"
AT_DK = "dk = dscores.transpose(-2, -1) @ q * hs**-0.5"
RN_DZ = "dz[:, t] = (1 - hs[:, t] ** 2) * dh"
RN_H0 = "dh0 = (dz[:, 0] @ Whh.T).sum(0, keepdim=True)"

# Right solutions written otherwise: (id, challenge, the whole region).
RIGHT = [
    (
        "ln-step-by-step",
        "layernorm",
        "lead = tuple(range(dout.dim() - 1))  # every dim but the last\n"
        "dbias = dout.sum(lead)\n"
        "dweight = (dout * xhat).sum(lead)\n"
        "dxhat = weight * dout\n"
        "dxmu = dxhat * rstd  # the direct path\n"
        "drstd = (dxhat * xmu).sum(-1, keepdim=True)\n"
        "dvar = -0.5 * (var + eps) ** -1.5 * drstd\n"
        "dxmu = dxmu + 2 * xmu / C * dvar  # var = mean(xmu**2) over C: no Bessel\n"
        "dmean = -dxmu.sum(-1, keepdim=True)\n"
        "dx = dxmu + dmean / C\n",
    ),
    (
        "ln-keepdim",  # (1, 1, C) and (1, C): the shape note, not WRONG
        "layernorm",
        "lead = tuple(range(dout.dim() - 1))\n"
        "dbias = dout.sum(lead, keepdim=True)\n"
        "dweight = (dout * xhat).sum(lead, keepdim=True)\n"
        "dxhat = weight * dout\n"
        "n = C\n"
        "dx = rstd / n * (n * dxhat - dxhat.sum(-1, keepdim=True) - xhat * (dxhat * xhat).sum(-1, keepdim=True))\n",
    ),
    (
        "at-einsum",
        "attention",
        'datt = torch.einsum("bth,bsh->bts", dy, v)\n'
        'dv = torch.einsum("bts,bth->bsh", att, dy)\n'
        "dmasked = att * datt - att * (att * datt).sum(-1, keepdim=True)\n"
        "dscores = dmasked * tril[:T, :T]\n"
        "dq = (dscores @ k) / hs**0.5\n"
        "dk = (q.transpose(-2, -1) @ dscores).transpose(-2, -1) / hs**0.5\n",
    ),
    (
        "at-jacobian",  # softmax's Jacobian diag(att) - att att^T built in full, row by row
        "attention",
        "datt = dy @ v.transpose(-2, -1)\n"
        "dv = att.transpose(-2, -1) @ dy\n"
        "J = torch.diag_embed(att) - att.unsqueeze(-1) * att.unsqueeze(-2)  # (B, T, T, T)\n"
        "dmasked = (J @ datt.unsqueeze(-1)).squeeze(-1)\n"
        "dscores = torch.where(tril[:T, :T] == 0, torch.zeros_like(dmasked), dmasked)\n"
        "dq = dscores @ k * hs**-0.5\n"
        "dk = dscores.transpose(-2, -1) @ q * hs**-0.5\n",
    ),
    (
        "rnn-in-the-loop",  # every weight accumulated step by step, dh0 from what the first step sends back
        "rnn",
        "dz = torch.zeros_like(z)\n"
        "dWxh, dWhh, db = torch.zeros_like(Wxh), torch.zeros_like(Whh), torch.zeros_like(b)\n"
        "dx = torch.zeros_like(x)\n"
        "carry = torch.zeros(B, H)\n"
        "for t in range(T - 1, -1, -1):\n"
        "    dz[:, t] = (1 - hs[:, t] ** 2) * (dhs[:, t] + carry)\n"
        "    dWxh += x[:, t].T @ dz[:, t]\n"
        "    dWhh += hprev[:, t].T @ dz[:, t]\n"
        "    db += dz[:, t].sum(0)\n"
        "    dx[:, t] = dz[:, t] @ Wxh.T\n"
        "    carry = dz[:, t] @ Whh.T\n"
        "dh0 = carry.sum(0, keepdim=True)\n",
    ),
    (
        "rnn-einsum",
        "rnn",
        "dz = torch.zeros_like(z)\n"
        "dh = torch.zeros(B, H)\n"
        "t = T - 1\n"
        "while t >= 0:\n"
        "    dh = (1 - hs[:, t] ** 2) * (dhs[:, t] + dh)  # dz of step t\n"
        "    dz[:, t] = dh\n"
        "    dh = dh @ Whh.T\n"
        "    t -= 1\n"
        'dWxh = torch.einsum("btd,bth->dh", x, dz)\n'
        'dWhh = torch.einsum("btj,bth->jh", hprev, dz)\n'
        "db = dz.sum(0).sum(0)\n"
        'dx = torch.einsum("bth,dh->btd", dz, Wxh)\n'
        "dh0 = dh.sum(0)[None]\n",
    ),
]

# Catalogued mistakes typed into the reference: (id, challenge, edits, the wrong row, its kind, the entry).
CATALOGUED = [
    (
        "ln-no-mean",
        "layernorm",
        [(LN_DX, LN_DX.replace(" - dxhat.mean(-1, keepdim=True)", ""))],
        "dx",
        K.MISSING_BRANCH,
        "no-mean-term",
    ),
    (
        "ln-no-var",
        "layernorm",
        [(LN_DX, LN_DX.replace(" - xhat * (dxhat * xhat).mean(-1, keepdim=True)", ""))],
        "dx",
        K.MISSING_BRANCH,
        "no-var-term",
    ),
    (
        "ln-bessel",
        "layernorm",
        [(LN_DX, LN_DX.replace("- xhat *", "- C / (C - 1) * xhat *"))],
        "dx",
        K.BESSEL,
        "bessel",
    ),
    ("ln-sums", "layernorm", [(LN_DX, LN_DX.replace(".mean(", ".sum("))], "dx", K.SCALE_N, "sums"),
    (
        "ln-dweight-dim0",
        "layernorm",
        [(LN_DW, "dweight = (dout * xhat).sum(0)")],
        "dweight",
        K.WRONG_DIM,
        "sum-dim0",
    ),
    ("ln-dbias-last", "layernorm", [(LN_DB, "dbias = dout.sum(-1)")], "dbias", K.WRONG_DIM, "sum-last"),
    (
        "ln-dxhat-factor",
        "layernorm",
        [("dxhat = weight * dout", "dxhat = xhat * dout")],
        "dxhat",
        K.WRONG_FACTOR,
        "times-xhat",
    ),
    (
        "at-no-row-sum",
        "attention",
        [(AT_DM, "dmasked = att * datt")],
        "dmasked",
        K.SOFTMAX_ROW_SUM,
        "no-row-sum",
    ),
    ("at-through-mask", "attention", [(AT_DS, "dscores = dmasked")], "dscores", K.MASKED, "through-mask"),
    ("at-dq-no-scale", "attention", [(AT_DQ, "dq = dscores @ k")], "dq", K.ATTENTION_SCALE, "no-scale"),
    (
        "at-dk-no-scale",
        "attention",
        [(AT_DK, "dk = dscores.transpose(-2, -1) @ q")],
        "dk",
        K.ATTENTION_SCALE,
        "no-scale",
    ),
    (
        "at-dv-untransposed",
        "attention",
        [("dv = att.transpose(-2, -1) @ dy", "dv = att @ dy")],
        "dv",
        K.TRANSPOSED,
        "att-untransposed",
    ),
    (
        "at-dq-dk-form",
        "attention",
        [(AT_DQ, "dq = dscores.transpose(-2, -1) @ k * hs**-0.5")],
        "dq",
        K.TRANSPOSED,
        "dk-form",
    ),
    ("at-dk-dq-form", "attention", [(AT_DK, "dk = dscores @ q * hs**-0.5")], "dk", K.TRANSPOSED, "dq-form"),
    (
        "at-datt-transposed",
        "attention",
        [("datt = dy @ v.transpose(-2, -1)", "datt = v @ dy.transpose(-2, -1)")],
        "datt",
        K.TRANSPOSED,
        "transposed",
    ),
    (
        "rnn-no-carry",
        "rnn",
        [("dh = dhs[:, t] + dh_next", "dh = dhs[:, t]")],
        "dz",
        K.THROUGH_TIME,
        "no-carry",
    ),
    ("rnn-no-tanh", "rnn", [(RN_DZ, "dz[:, t] = dh")], "dz", K.NO_LOCAL, "no-tanh"),
    ("rnn-one-minus-h", "rnn", [(RN_DZ, "dz[:, t] = (1 - hs[:, t]) * dh")], "dz", K.TANH, "one-minus-h"),
    (
        "rnn-forward-in-time",
        "rnn",
        [("for t in reversed(range(T)):", "for t in range(T):")],
        "dz",
        K.TIME_DIRECTION,
        "forward-in-time",
    ),
    ("rnn-h0-not-summed", "rnn", [(RN_H0, "dh0 = dz[:, 0] @ Whh.T")], "dh0", K.SHAPE, "not-summed"),
    (
        "rnn-h0-last-step",
        "rnn",
        [(RN_H0, RN_H0.replace("dz[:, 0]", "dz[:, -1]"))],
        "dh0",
        K.TIME_DIRECTION,
        "last-step",
    ),
    (
        "rnn-whh-hs",
        "rnn",
        [("dWhh = hprev.reshape", "dWhh = hs.reshape")],
        "dWhh",
        K.INPUT_OUTPUT,
        "hs-for-hprev",
    ),
]

# Mistakes no catalogue lists, each named by the edit search from the learner's own line:
# (id, challenge, edits, the wrong row).
UNCATALOGUED = [
    ("ln-dout-for-dxhat", "layernorm", [(LN_DX, LN_DX.replace("rstd * (dxhat -", "rstd * (dout -"))], "dx"),
    ("ln-rstd-squared", "layernorm", [(LN_DX, LN_DX.replace("dx = rstd *", "dx = rstd**2 *"))], "dx"),
    ("ln-var-term-sign", "layernorm", [(LN_DX, LN_DX.replace("- xhat *", "+ xhat *"))], "dx"),
    ("ln-mean-term-dim", "layernorm", [(LN_DX, LN_DX.replace("dxhat.mean(-1,", "dxhat.mean(-2,"))], "dx"),
    ("ln-dweight-xmu", "layernorm", [(LN_DW, LN_DW.replace("xhat", "xmu"))], "dweight"),
    ("ln-dbias-dim1", "layernorm", [(LN_DB, LN_DB.replace(".sum(0)", ".sum(1)"))], "dbias"),
    ("at-k-for-v", "attention", [("datt = dy @ v.transpose", "datt = dy @ k.transpose")], "datt"),
    ("at-row-mean", "attention", [(AT_DM, AT_DM.replace(".sum(-1", ".mean(-1"))], "dmasked"),
    ("at-dq-v-for-k", "attention", [(AT_DQ, "dq = dscores @ v * hs**-0.5")], "dq"),
    ("at-dk-exponent", "attention", [(AT_DK, AT_DK.replace("hs**-0.5", "hs**-1.5"))], "dk"),
    (
        "at-dv-scaled",
        "attention",
        [("dv = att.transpose(-2, -1) @ dy", "dv = att.transpose(-2, -1) @ dy * hs**-0.5")],
        "dv",
    ),
    ("rnn-carry-sign", "rnn", [("dh = dhs[:, t] + dh_next", "dh = dhs[:, t] - dh_next")], "dz"),
    ("rnn-tanh-squared", "rnn", [(RN_DZ, "dz[:, t] = (1 - hs[:, t]) ** 2 * dh")], "dz"),
    ("rnn-dwxh-dhs", "rnn", [("@ dz.reshape(-1, H)\ndWhh", "@ dhs.reshape(-1, H)\ndWhh")], "dWxh"),
    ("rnn-db-over-b", "rnn", [("db = dz.sum((0, 1))", "db = dz.sum((0, 1)) / B")], "db"),
    ("rnn-dx-whh", "rnn", [("dx = dz @ Wxh.T", "dx = dz @ Whh.T")], "dx"),
    ("rnn-h0-dim1", "rnn", [(RN_H0, RN_H0.replace(".sum(0,", ".sum(1,"))], "dh0"),
]


def _region(key: str, region: str) -> str:
    it = get(key)
    return render(it, (region,))


def _edit(key: str, edits: list[tuple[str, str]]) -> str:
    it = get(key)
    src = render(it, it.solution)
    for old, new in edits:
        assert old in src, old
        src = src.replace(old, new)
    return src


def _line_of(text: str, new: str) -> int:
    """The line of the learner's region that holds the first line of `new`."""
    first = new.splitlines()[0].strip()
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# >>>"))
    return next(i for i, ln in enumerate(lines, 1) if i > start and first in ln)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every file of this module graded in one grader process: {id: (Grade, text)}."""
    d = tmp_path_factory.mktemp("zoo")
    files = {}
    for key in ZOO:
        files[f"ref-{key}"] = render(get(key), get(key).solution)
        files[f"blank-{key}"] = render(get(key))
    files |= {mid: _region(key, region) for mid, key, region in RIGHT}
    files |= {m[0]: _edit(m[1], m[2]) for m in CATALOGUED + UNCATALOGUED}
    paths = []
    for name, text in files.items():
        p = d / f"{name}.py"
        p.write_text(text)
        paths.append(p)
    return {name: (g, text) for (name, text), g in zip(files.items(), dojo.grade_files(paths))}


# ---------------------------------------------------------------------------- the references
def _layernorm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN.EPS)


def _attention(q, k, v):
    t, hs = q.shape[-2], q.shape[-1]
    att = (q @ k.transpose(-2, -1)) / hs**0.5
    att = att.masked_fill(torch.tril(torch.ones(t, t, dtype=torch.bool)).logical_not(), float("-inf"))
    return F.softmax(att, -1) @ v


def _rnn(x, Wxh, Whh, b, h0):
    h, out = h0, []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ Wxh + h @ Whh + b)  # (B, H); (1, H) broadcast at the first step
        out.append(h)
    return torch.stack(out, 1)  # (B, T, H)


CASES = {  # the plain forward, its inputs, the output whose upstream gradient the probe feeds
    "layernorm": (_layernorm, ("x", "weight", "bias"), "out"),
    "attention": (_attention, ("q", "k", "v"), "y"),
    "rnn": (_rnn, ("x", "Wxh", "Whh", "b", "h0"), "hs"),
}


@pytest.mark.parametrize("key", ZOO)
def test_references_match_autograd_and_finite_differences_of_the_plain_forward(key):
    """At every point (three shapes each, random seed gradients), with the true upstream: the grader's reference for
    each input equals autograd of a plain forward (torch's own layer_norm, a masked softmax, the RNN
    loop), and float64 central differences of (out * dout).sum()."""
    fn, names, seed = CASES[key]
    probes = [p for p in MODULES[key].probes(random=False) if p.verdict]
    assert len(probes) == 3 and len({tuple(p.inputs[names[0]].shape) for p in probes}) == 3
    for p in probes:
        ins = [p.inputs[n].detach().clone().requires_grad_() for n in names]
        up = p.feeds[seed]
        (fn(*ins) * up).sum().backward()
        for n, t in zip(names, ins):
            assert torch.allclose(p.refs[n], t.grad, rtol=1e-10, atol=1e-12), (key, p.name, n)
        eps = 1e-6
        with torch.no_grad():
            for n, t in zip(names, ins):
                flat = t.detach().clone().reshape(-1)
                idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:6]
                for i in idx.tolist():
                    vals = []
                    for s in (1, -1):
                        f = flat.clone()
                        f[i] += s * eps
                        args = [f.view(t.shape) if m == n else o.detach() for m, o in zip(names, ins)]
                        vals.append(float((fn(*args) * up).sum()))
                    num = (vals[0] - vals[1]) / (2 * eps)
                    ana = float(p.refs[n].reshape(-1)[i])
                    assert abs(ana - num) <= 1e-6 + 1e-5 * abs(num), (key, p.name, n, i, ana, num)


def test_the_recurrence_trick_gives_backprop_through_time():
    """The graph's recur(z) has the forward's values, and its gradient w.r.t. z is BPTT's dz."""
    p = get("rnn").probes()[0]
    i = p.inputs
    hs = RN._states(i["x"], i["Wxh"], i["Whh"], i["b"], i["h0"])
    assert torch.allclose(i["hs"], hs, rtol=0, atol=1e-14)
    z = i["z"].clone().requires_grad_()
    (RN.recur(z, i["hprev"], i["Whh"]) * i["dhs"]).sum().backward()
    assert torch.allclose(z.grad, p.refs["z"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ZOO)
def test_the_template_has_no_autograd_and_runs_as_it_is(key, tmp_path):
    text = render(get(key))
    assert not re.search(r"backward\(|requires_grad|torch\.autograd|\.grad\b", text)
    ns: dict = {"__name__": "__main__", "__file__": "x.py"}
    exec(compile(text, "x.py", "exec"), ns)  # noqa: S102  the file as written runs (its blanks None)
    assert all(ns[f"d{g}"] is None for g in get(key).graph.grads)


# ---------------------------------------------------------------------------- right solutions
@pytest.mark.parametrize("key", ZOO)
def test_reference_and_fresh_file(graded, key):
    g, _ = graded[f"ref-{key}"]
    assert g.problem == "" and g.exit_code == 0 and all(r.chain == "yes" for r in g.rows), g.table()
    b, _ = graded[f"blank-{key}"]
    assert b.exit_code == 1 and all(r.status == "missing" and r.line for r in b.rows), b.table()


@pytest.mark.parametrize("mid", [r[0] for r in RIGHT])
def test_right_solutions_written_otherwise_are_right(graded, mid):
    g, _ = graded[mid]
    assert g.problem == "" and g.exit_code == 0, g.table()
    marked = [r.name for r in g.rows if r.mark == "shape"]
    if mid == "ln-keepdim":
        assert marked == ["dbias", "dweight"], g.table()
        assert all("broadcasts the same way" in r.note for r in g.rows if r.mark), g.table()
    else:
        assert marked == [], g.table()


def test_keepdim_is_wrong_in_strict_mode(graded, tmp_path):
    _, text = graded["ln-keepdim"]
    p = tmp_path / "strict.py"
    p.write_text(text)
    g = dojo.grade_file(p, strict=True)
    assert [r.name for r in g.rows if not r.ok] == ["dbias", "dweight"] and g.rows[0].kind == K.SHAPE


# ---------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("mid, key, edits, row, kind, entry", CATALOGUED, ids=[m[0] for m in CATALOGUED])
def test_a_catalogued_mistake_is_named_once_on_its_line_and_below_it_is_right_given_yours(
    graded, mid, key, edits, row, kind, entry
):
    g, text = graded[mid]
    assert g.exit_code == 1, g.table()
    assert [r.name for r in g.rows if not r.ok] == [row], g.table()
    bad = next(r for r in g.rows if r.name == row)
    assert (bad.kind, bad.key) == (kind, entry), (bad.kind, bad.key, bad.diagnosis)
    assert _line_of(text, edits[-1][1]) in _lines_of(text, bad), g.table()
    graph = get(key).graph
    below = [r for r in g.rows if row[1:] in upstream(graph, _key(key, r.name)) and r.name != row]
    assert below or row in ("dx", "dweight", "dbias", "dq", "dk", "dv", "dWhh", "dh0"), g.table()
    for r in below:  # right given the learner's own upstream; where the mistake is ~0 at the true
        # upstream (the masked positions get no gradient there anyway), their own chain is right too
        if bad.chain == "yes":
            assert r.chain == "yes", g.table()
            continue
        assert r.chain == "given" and "right given your d" in r.note, (r.name, g.table())
        assert f"the mistake is above, at {row}" in r.note, g.table()


def _key(key: str, name: str) -> str:
    return get(key).row(name).key


def _lines_of(text: str, row) -> range:
    """The lines of the statement the row was recorded at (a loop spans several)."""
    lines = text.splitlines()
    start = row.line
    end = start
    indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
    while end < len(lines) and lines[end].strip() and len(lines[end]) - len(lines[end].lstrip()) > indent:
        end += 1
    return range(start, end + 1)


def _catalogued(it, key: str) -> bool:
    k = key.removesuffix("-negated")
    names = {v.key for vs in it.variants.values() for v in vs}
    generic = re.fullmatch(
        r"sign|transposed|scale-.*|missing-.*|no-upstream|passthrough-.*|not-summed|keepdim-.*|sum-dim-.*", k
    )
    return k in names or bool(generic)


@pytest.mark.parametrize("mid, key, edits, row", UNCATALOGUED, ids=[m[0] for m in UNCATALOGUED])
def test_an_uncatalogued_mistake_is_named_by_the_edit_search_on_its_line(graded, mid, key, edits, row):
    g, text = graded[mid]
    assert [r.name for r in g.rows if not r.ok] == [row], g.table()
    bad = next(r for r in g.rows if r.name == row)
    assert not _catalogued(get(key), bad.key), (bad.key, bad.diagnosis)
    at = _line_of(text, edits[-1][1])
    assert bad.edit and re.search(rf"your line {at} is right with", bad.edit), (bad.edit, bad.diagnosis)


def test_at_least_five_uncatalogued_mistakes_per_challenge():
    assert all(sum(m[1] == k for m in UNCATALOGUED) >= 5 for k in ZOO)
    assert all(sum(m[1] == k for m in CATALOGUED) >= 5 for k in ZOO)


def test_every_catalogue_entry_is_wrong_on_some_probe():
    """An entry equal to the right answer on every probe could never name anything. Some equal it on a
    probe, by the maths (dweight.sum(0) is right for (N, C); gradient through the masked positions is
    zero at the true upstream anyway): the random and the other-shaped probes are there for them."""
    from handgrad.dojo.catalogue import Vals

    for key in ZOO:
        it = get(key)
        probes = [p for p in it.probes() if p.verdict]
        for rk, variants in it.variants.items():
            for v in variants:
                wrong = applies = 0
                for p in probes:
                    ref = p.refs[rk]
                    try:
                        w = v.fn(Vals(p.inputs, p.feeds, ref, p.refs))
                    except RuntimeError:  # does not apply at this probe's shapes (dy @ v needs T == hs)
                        continue
                    applies += 1
                    wrong += not (tuple(w.shape) == tuple(ref.shape) and torch.allclose(w, ref, 1e-9, 1e-12))
                assert wrong >= 1 and applies >= 1, (key, rk, v.key, wrong, applies)


def test_the_module_docstrings_state_the_maths():
    for m in (LN, AT, RN):
        assert m.__doc__ and len(m.__doc__.splitlines()) >= 3


@pytest.mark.parametrize("key", ZOO)
def test_a_notebook_grade_says_in_one_line_to_grade_the_file(key):
    g = dojo.grade(key, {})
    assert g.problem.startswith(f"challenge {key} is graded from its file") and "\n" not in g.problem
    assert g.exit_code == 2
