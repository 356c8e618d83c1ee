"""The dojo's conceptual questions: every accepted form of every right answer is accepted, typical wrong
answers are each diagnosed in the learner's terms, the graders' references are autograd's and agree
with float64 finite differences, hostile expressions are refused, progress and hints are kept, every
experiment's picture is drawn and its numbers hold, and the CLI gives one line and exit 2 for bad input.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from handgrad import check, cli, dojo
from handgrad.dojo import answers as A
from handgrad.dojo import expression as X
from handgrad.dojo import progress as P
from handgrad.dojo import questions as Q
from handgrad.dojo import quiz

RIGHT = [(q.key, p.name, r) for q in Q.QUESTIONS.values() for p in q.parts for r in p.right]
MISTAKES = [(q.key, p.name, m) for q in Q.QUESTIONS.values() for p in q.parts for m in p.mistakes]
CHOICES = [(q.key, p.name, c) for q in Q.QUESTIONS.values() for p in q.parts for c in p.choices]


def part(q: str, name: str) -> A.Part:
    return Q.get(q).part(name)


# ---------------------------------------------------------------------------- right answers
@pytest.mark.parametrize("q,name,answer", RIGHT, ids=[f"{q}-{n}-{i}" for i, (q, n, _) in enumerate(RIGHT)])
def test_every_accepted_form_of_a_right_answer_is_accepted(q, name, answer):
    r = A.grade(Q.get(q).parts, {name: answer})[0]  # a dict of parts: each part's text as given
    assert r.ok, r.diagnosis


@pytest.mark.parametrize("q,answer", [
    ("1", "5; 5; 15; 10"), ("1", "5, 5, 15, 10"), ("1", "5 5 15 10"), ("1", "dy; dy; b*dy; a*dy"),
    ("1", "da = 5, db = 5, da = 15, db = 10"), ("1", "mul.db = 10; mul.da = 15; add.db = 5; add.da = 5"),
    ("1", [5, 5, 15, 10]), ("1", {"add.da": 5, "add.db": "5", "mul.da": "3*5", "mul.db": 10.0}),
    ("q2", "a; a"), ("sparse", "a; -F.one_hot(Yb, V) / n"), ("2", "A, target"),
    ("3", "dy.expand_as(x); dy.sum_to_size(x.shape)"), ("3", "dy.expand_as(x), dy.sum_to_size(x.shape)"),
    ("3", "dx = dy.expand_as(x)\ndx = dy.sum_to_size(x.shape)"),
    ("3", "broadcast = dy.sum_to_size(x.shape); sum = torch.ones_like(x) * dy"),
    ("4", "a; b; 0.19"), ("4", "good bad 0.19"), ("4", "good; bad; 1 - h**2"), ("saturation", "(a); (b); .19"),
    ("5", "a; (F.softmax(logits, 1) - F.one_hot(Y, V)) / n; a; 0"),
    ("6", "a; 10; demb[Xb == t].sum(0)"), ("6", "sum, 10, demb[Xb == t].sum(0)"),
])
def test_a_whole_answer_in_each_accepted_layout_is_right(q, answer):
    v = quiz.grade(q, answer)
    assert not v.problem and v.right, v.text()
    assert len(v.results) == len(Q.get(q).parts)


def test_a_named_subset_of_parts_is_graded_alone():
    v = quiz.grade(1, "mul.db = 10")
    assert [r.part.name for r in v.results] == ["mul.db"] and v.right


def test_answers_made_of_float32_arithmetic_are_right_at_float32_precision():
    # torch.ones makes float32: its rounding is not a mistake, an error of 1e-4 still is
    assert A.grade_part(part("3", "sum"), "torch.ones(x.shape) * dy").ok
    assert not A.grade_part(part("3", "sum"), "dy.expand_as(x) * 1.0001").ok


# ---------------------------------------------------------------------------- the references
def _fd_passes(fn, x: torch.Tensor, analytic: torch.Tensor, dout=None) -> bool:
    return check.finite_differences(fn, x, analytic, dout=dout).passed


def test_the_graders_references_are_autograds_and_agree_with_finite_differences():
    """Each probe's reference against float64 central differences of its forward (no autograd), and a
    right answer's value on the probe against the reference."""
    forwards = {  # (question, part): (the forward of the probe, a right answer)
        ("2", "where"): (lambda e: (e["logprobs"], lambda x: -x[torch.arange(e["n"]), e["Yb"]].mean(), None),
                         "-F.one_hot(Yb, V) / n"),
        ("3", "sum"): (lambda e: (e["x"], lambda x: x.sum(), e["dy"]), "torch.ones(x.shape) * dy"),
        ("3", "broadcast"): (lambda e: (e["x"], lambda x: x.broadcast_to(e["shape"]), e["dy"]),
                             "dy.sum_to_size(x.shape)"),
        ("5", "dlogits"): (lambda e: (e["logits"], lambda x: F.cross_entropy(x, e["Y"]), None),
                           "(F.softmax(logits, 1) - F.one_hot(Y, V)) / n"),
    }
    for (q, name), (make, right) in forwards.items():
        p = part(q, name)
        for probe in p.probes:
            x, f, dout = make(probe.env)
            x = x.clone()
            assert _fd_passes(lambda f=f, x=x: f(x), x, probe.reference, dout), (q, name, probe.label)
            value = X.evaluate(X.parse(right, p.expression.names), probe.env)
            assert torch.allclose(value.double(), probe.reference, rtol=1e-5, atol=1e-7), (q, name, probe.label)
    # question 6: dC[t] is one row of dC; the whole dC by index_add against finite differences of C[Xb]
    for probe in part("6", "row").probes:
        e = probe.env
        C = e["C"].clone()
        dC = torch.zeros_like(C).index_add(0, e["Xb"].reshape(-1), e["demb"].reshape(-1, C.shape[1]))
        assert _fd_passes(lambda C=C, Xb=e["Xb"]: C[Xb], C, dC, e["demb"])
        assert torch.allclose(dC[e["t"]], probe.reference, rtol=0, atol=1e-14)


def test_the_probes_are_not_trivial():
    """Upstreams far from 0 and 1, and the repeated token really repeated, so a missing dy, a mean or an
    overwrite cannot pass."""
    for probe in part("3", "sum").probes:
        assert 0.5 < abs(float(probe.env["dy"])) and abs(float(probe.env["dy"]) - 1) > 0.2
    counts = [int((probe.env["Xb"] == probe.env["t"]).sum()) for probe in part("6", "row").probes]
    assert counts == list(Q.REPEATS)
    assert len({tuple(p.env["x"].shape) for p in part("3", "broadcast").probes}) == 3


# ---------------------------------------------------------------------------- wrong answers
@pytest.mark.parametrize("q,name,mistake", MISTAKES, ids=[f"{q}-{n}-{i}" for i, (q, n, _) in enumerate(MISTAKES)])
def test_each_catalogued_mistake_is_wrong_and_named(q, name, mistake):
    r = A.grade_part(part(q, name), mistake.answer if isinstance(mistake.answer, str) else repr(mistake.answer))
    assert not r.ok and r.diagnosis == mistake.diagnosis


@pytest.mark.parametrize("q,name,c", CHOICES, ids=[f"{q}-{n}-{c.key}" for q, n, c in CHOICES])
def test_each_choice_is_graded_and_a_wrong_one_says_why(q, name, c):
    r = A.grade_part(part(q, name), c.key)
    assert r.ok == c.right
    assert r.ok or (c.why and c.why in r.diagnosis)


def test_each_part_has_exactly_one_right_choice_and_three_hints():
    for q in Q.QUESTIONS.values():
        for p in q.parts:
            assert len(p.hints) == 3 and all(p.hints)
            if p.choices:
                assert sum(c.right for c in p.choices) == 1
            assert p.right, (q.key, p.name)


# Typical wrong answers written here (not taken from the catalogue), and what the diagnosis must say.
TYPICAL = [
    ("1", "add.da", "1", "local derivative"), ("1", "add.da", "2.5", "does not split"),
    ("1", "add.da", "-5", "wrong sign"), ("1", "mul.da", "3", "multiplies it by the upstream dy"),
    ("1", "mul.da", "10", "OTHER factor"), ("1", "mul.db", "15", "OTHER factor"),
    ("1", "mul.da", "b*dy*2", "30 = a * b * dy"),
    ("2", "why", "b", "not reading those entries"), ("2", "where", "c", "divides by n"),
    ("2", "where", "-F.one_hot(Yb, V)", "mean over the n rows"), ("2", "where", "F.one_hot(Yb, V) / n", "sign"),
    ("2", "where", "F.one_hot(Yb, 27).bool()", "mask of shape"), ("2", "where", "Yb", "shape (6,) but dlogprobs"),
    ("3", "sum", "dy", "dx must have x's shape"), ("3", "sum", "torch.ones_like(x)", "upstream dy"),
    ("3", "sum", "-dy.expand_as(x)", "sign flipped"), ("3", "sum", "dy.expand_as(x) * 2", "2 x autograd's"),
    ("3", "sum", "dy.expand_as(x) / x.numel()", "mean"),
    ("3", "broadcast", "dy", "sum of its copies' gradients"),
    ("3", "broadcast", "dy.sum(0)", "keepdim=True forgotten"),
    ("3", "broadcast", "dy.sum(0, keepdim=True)", "right on x (1, 6) broadcast to (5, 6)"),
    ("3", "broadcast", "dy.mean(0, keepdim=True)", "1/N"), ("3", "broadcast", "dy.sum()", "everything"),
    ("4", "small", "bad", "factor near 1"), ("4", "saturated", "good", "kills the gradient"),
    ("4", "factor", "0.1", "with the square"), ("4", "factor", "0.81", "1 minus that"),
    ("4", "factor", "0.38", "twice"),
    ("5", "dlogits", "F.softmax(logits, 1) - F.one_hot(Y, V)", "divide by n"),
    ("5", "dlogits", "(F.softmax(logits, 1) - F.one_hot(Y, V)) / (n - 1)", "n/(n-1)"),
    ("5", "dlogits", "(F.one_hot(Y, V) - F.softmax(logits, 1)) / n", "sign is flipped"),
    ("5", "dlogits", "(F.softmax(logits, 0) - F.one_hot(Y, V)) / n", "dim 1"),
    ("5", "dlogits", "(F.softmax(logits, 1) - 1) / n", "only at the target"),
    ("5", "dlogits", "(F.softmax(logits, 1) - F.one_hot(Y, V)) / n / n", "1/n"),
    ("5", "dlogits", "F.softmax(logits, 1) / n", "one-hot) is missing"),
    ("5", "rowsum", "1", "subtracts 1"), ("5", "terms", "c", "dense"),
    ("6", "compare", "d", "overwrites"), ("6", "compare", "mean", "divides by 10"),
    ("6", "times", "1", "overwriting"),
    ("6", "row", "demb[Xb == t][-1]", "overwrites"), ("6", "row", "demb[Xb == t].mean(0)", "mean"),
    ("6", "row", "demb[Xb == t]", ".sum(0)"), ("6", "row", "demb.sum((0, 1))", "all tokens"),
    ("6", "row", "demb[Xb == t].sum(0) * 2", "2 x autograd's"), ("6", "row", "C[t]", "forward value"),
    ("6", "row", "demb[Xb == t].sum(1)", "shape"), ("6", "row", "demb[Xb == t].sum(0)[0]", "shape ()"),
]


@pytest.mark.parametrize("q,name,answer,says", TYPICAL, ids=[f"{q}-{n}-{a}" for q, n, a, _ in TYPICAL])
def test_a_typical_wrong_answer_is_diagnosed(q, name, answer, says):
    r = A.grade_part(part(q, name), answer)
    assert not r.ok
    assert says in r.diagnosis, r.diagnosis


def test_an_answer_that_raises_is_wrong_with_torchs_reason():
    r = A.grade_part(part("3", "broadcast"), "dy + torch.ones(3)")
    assert not r.ok and "raises an error" in r.diagnosis and "size" in r.diagnosis


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("q,answer,says", [
    ("3", "dy.expand_as(x; dy", "never closed"),
    ("3", "dy.expand_as(x)", "takes 2 answers"),
    ("1", "5; 5; 15", "takes 4 answers"),
    ("1", "5; 5; 15; ten", "unknown name 'ten'"),
    ("1", "5; 5; 15; 1 +", "does not parse"),
    ("4", "e; b; 0.19", "not one of the choices a, b, c"),
    ("4", "good; bad; 'x'", "not a number"),
    ("2", "a; e", "unknown name 'e'"),
    ("3", "dout.expand_as(x); dy", "unknown name 'dout'"),
    ("3", "x.__class__; dy", "'_'"),
    ("3", "__import__('os').system('true'); dy", ".system is not one"),
    ("3", "__import__('os'); dy", "'_'"),
    ("3", "lambda: dy; dy", "lambda"),
    ("3", "lambda x: dy; dy", "lambda"),
    ("3", "[d for d in x]; dy", "comprehension"),
    ("3", "x.numpy(); dy", ".numpy"),
    ("3", "torch.ones(10**9); dy", "elements"),
    ("1", "add.da = 5; add.da = 5", "twice"),
    ("1", "", "empty"),
])
def test_an_answer_that_cannot_be_graded_is_bad_input(q, answer, says):
    v = quiz.grade(q, answer)
    assert v.problem and v.exit_code == 2 and "\n" not in v.problem
    assert says in v.problem, v.problem


def test_answers_and_names_are_shown_escaped_when_not_printable(tmp_path, capsys):
    v = quiz.grade(1, "5; 5; 15; 1\x1b[2J")
    assert v.problem and "\x1b" not in v.problem
    v = quiz.grade(3, {"sum": "dy.expand_as(\n x)"})
    assert v.right and "\n" not in v.text().splitlines()[1] and "'dy.expand_as(\\n x)'" in v.text()
    r = A.grade_part(part("3", "sum"), "x.to('\x1b[2J')")  # torch's message quotes the string
    assert not r.ok and "\x1b" not in r.diagnosis and "\\x1b" in r.diagnosis
    rc, _, err = run(["dojo", "ask", "\x1b[31m"], capsys)
    assert rc == 2 and "\x1b" not in err and "\\x1b" in err


def test_an_unknown_question_is_refused():
    for name in ("7", "q0", "routingx", ""):
        with pytest.raises(ValueError, match="no question"):
            quiz.grade(name, "1")


# ---------------------------------------------------------------------------- the expression sandbox
ENV = {"x": torch.randn(4, 3, dtype=torch.float64), "dy": torch.tensor(2.0, dtype=torch.float64)}
HOSTILE = [
    "__import__('os')", "x.__class__.__mro__", "().__class__", "x._version", "torch.load", "torch._C",
    "torch.ops", "torch.nn.Module", "torch.nn.functional.__dict__", "open('/etc/passwd')", "eval('1')",
    "exec('1')", "getattr(x, 'data')", "globals()", "x.tolist()", "x.numpy()", "x.backward()", "x.grad",
    "x.requires_grad_()", "x.register_hook", "x.data_ptr()", "x.storage()", "(lambda: 1)()",
    "[i for i in range(10**9)]", "(y := 1)", "f'{x}'", "{1: 2}", "x if (x := 1) else 0",
    "torch.ones(10**9)", "torch.ones(4096, 4096)", "torch.eye(10**5)", "x.expand(10**5, 10**5).sum()",
    "torch.arange(0., 1e12)", "torch.arange(torch.tensor(10**9))", "F.one_hot(torch.tensor([10**9]))",
    "x.repeat(10**4, 10**4)", "torch.zeros(torch.tensor(10**9))", "x[range(10**9)]", "sum(range(10**9))",
    "torch.tensor(range(10**9))", "10**10**10", "(10**12)**10", "torch.ones(3000, 3000) @ torch.ones(3000, 3000)",
    "x.index_select(0, torch.zeros(2**21, dtype=torch.long))", "1 < 2 < 3", "not x", "x and dy",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_expressions_are_refused_quickly(text):
    start = time.perf_counter()
    with pytest.raises((X.ExpressionError, X.EvaluationError)):
        X.evaluate(X.parse(text, ENV), ENV)
    assert time.perf_counter() - start < 2.0


def test_string_and_list_repetition_cannot_grow_memory():
    for text in ("'a' * 10**9", "[x] * 10**9", "(x,) * 10**9"):
        with pytest.raises(X.EvaluationError, match="operator"):
            X.evaluate(X.parse(text, ENV), ENV)


def test_the_whitelist_allows_what_answers_need():
    ok = ["dy.expand_as(x)", "x.sum(0, keepdim=True)", "x.max(1).values", "x.shape[0]", "x.T @ x",
          "torch.where(x > 0, x, -x)", "F.softmax(x, dim=1)", "torch.nn.functional.one_hot(torch.arange(3), 4)",
          "x[..., None]", "x[:, 1:]", "x.view(-1)", "torch.zeros_like(x).index_add_(0, torch.tensor([0, 0]), x[:2])",
          "x.to(torch.float32)", "len(x)", "float(dy)", "x.shape.numel()", "max(x.shape)", "dy.item() * 2"]
    for text in ok:
        X.evaluate(X.parse(text, ENV), ENV)


def test_an_answer_cannot_change_the_graders_tensors():
    p = part("3", "sum")
    before = [pr.env["x"].clone() for pr in p.probes]
    A.grade_part(p, "x.index_add_(0, torch.tensor([0]), x[:1])")
    assert all(torch.equal(b, pr.env["x"]) for b, pr in zip(before, p.probes))


# ---------------------------------------------------------------------------- progress and hints
def test_hints_come_one_per_wrong_answer_up_to_three_and_are_kept(tmp_path):
    texts = [quiz.answer(1, "5; 5; 15; 15", tmp_path).hint for _ in range(4)]
    assert [t.split(" for ")[0] for t in texts[:3]] == ["hint 1 of 3", "hint 2 of 3", "hint 3 of 3"]
    assert texts[2].endswith(part("1", "mul.db").hints[2])
    assert "all 3 hints" in texts[3]
    data = json.loads((tmp_path / P.FILE).read_text())
    assert data["questions"]["q1"]["hints"] == {"mul.db": 3} and data["questions"]["q1"]["attempts"] == 4
    assert data["questions"]["q1"]["parts"]["mul.da"] is True and not data["questions"]["q1"]["solved"]


def test_a_right_answer_gives_the_explanation_and_is_done(tmp_path):
    v = quiz.answer("q4", "a; b; 0.19", tmp_path)
    assert v.right and v.explanation == Q.SATURATION.explanation and v.done == 1
    assert "done" in "\n".join(quiz.list_lines(tmp_path))
    v = quiz.answer("q4", "b; b; 0.19", tmp_path)  # a later wrong answer does not undo it
    assert not v.right and P.Progress.load(tmp_path).records["q4"].solved


def test_parts_answered_right_over_several_answers_complete_a_question(tmp_path):
    assert not quiz.answer(3, "sum = dy.expand_as(x)", tmp_path).explanation
    v = quiz.answer(3, "broadcast = dy.sum_to_size(x.shape)", tmp_path)
    assert v.explanation and v.done == 1


def test_asking_for_hints_and_the_explanation_is_recorded(tmp_path):
    a = quiz.ask(2, tmp_path, experiment=False, hint=True)
    assert a.hint.startswith("hint 1 of 3 for why")
    a = quiz.ask(2, tmp_path, experiment=False, explain=True)
    assert a.explanation == Q.SPARSE.explanation
    rec = P.Progress.load(tmp_path).records["q2"]
    assert rec.hints == {"why": 1} and rec.explained
    quiz.answer(2, "a; a", tmp_path)
    assert "after the explanation" in "\n".join(quiz.list_lines(tmp_path))


def test_a_bad_answer_changes_no_progress(tmp_path):
    quiz.answer(1, "5; 5; 15; 15", tmp_path)
    before = (tmp_path / P.FILE).read_bytes()
    assert quiz.answer(1, "5; 5; (", tmp_path).problem
    assert (tmp_path / P.FILE).read_bytes() == before


def test_progress_is_per_learner_directory_and_written_atomically(tmp_path, monkeypatch):
    quiz.answer(4, "a; b; 0.19", tmp_path / "ann")
    assert P.Progress.load(tmp_path / "bob").records == {}
    writes = []
    real = P.io.atomic_write_bytes
    monkeypatch.setattr(P.io, "atomic_write_bytes", lambda path, data: (writes.append(path), real(path, data)))
    quiz.answer(1, "5; 5; 15; 10", tmp_path / "ann")
    assert writes == [tmp_path / "ann" / P.FILE]
    assert not [f for f in (tmp_path / "ann").iterdir() if f.name != P.FILE]  # no temporary file left


@pytest.mark.parametrize("content,says", [
    (b"{not json", "not a handgrad questions progress file"),
    (b'{"format": "other", "questions": {}}', "no 'handgrad-questions' format"),
    (b'{"format": "handgrad-questions", "version": 9, "questions": {}}', "version 9"),
    (b'{"format": "handgrad-questions", "version": 1, "questions": {"q1": {"attempts": -1}}}', "count"),
    (b"\xff\xfe", "not a handgrad questions progress file"),
])
def test_a_damaged_progress_file_is_named_and_never_overwritten(tmp_path, content, says):
    (tmp_path / P.FILE).write_bytes(content)
    with pytest.raises(P.ProgressError, match=says):
        quiz.answer(1, "5; 5; 15; 10", tmp_path)
    assert (tmp_path / P.FILE).read_bytes() == content


# ---------------------------------------------------------------------------- the experiments
@pytest.fixture(scope="module")
def experiments():
    from handgrad.dojo import experiments as E

    return {q: E.run(q) for q in range(1, 7)}


def test_experiment_1_routes_the_gradients_by_hand_as_autograd(experiments):
    n = experiments[1].numbers
    assert n["add_autograd"] == n["add_hand"] == (5.0, 5.0)
    assert n["mul_autograd"] == n["mul_hand"] == (15.0, 10.0)
    assert n["dbngain_diff"] < 1e-14 and n["dbnbias_diff"] < 1e-14


def test_experiment_2_dlogprobs_is_non_zero_only_at_the_targets(experiments):
    n = experiments[2].numbers
    assert n["nonzero"] == n["n"] == 32 and n["at_targets"]
    assert torch.equal(n["values"], torch.full((32,), -1 / 32, dtype=torch.float64))
    assert n["autograd_diff"] == 0.0


def test_experiment_3_sum_and_broadcast_are_each_others_backward(experiments):
    n = experiments[3].numbers
    assert n["rows_equal"] and n["full_sum_all_dy"]
    assert n["sum_diff"] < 1e-15 and n["broadcast_diff"] < 1e-15 and n["dbngain_diff"] < 1e-15


def test_experiment_4_saturation_cuts_the_gradient_that_reaches_the_layer_below(experiments):
    small, sat = experiments[4].numbers["small"], experiments[4].numbers["saturated"]
    assert small["in_small"] >= 0.9 and sat["beyond_09"] >= 0.9  # the question's two cases
    assert small["factor_max"] <= 1 and small["factor_mean"] >= 0.99 and sat["factor_mean"] <= 0.19
    # the diagnostics' gradient at the batchnorm's output is (1 - h**2) * dh of the tanh above it
    for m in (small, sat):
        assert m["dhpreact_std"] == pytest.approx(m["dhpreact_std_here"], rel=1e-9)
    assert small["dhpreact_std"] / small["dh_std"] > 0.99
    assert sat["dhpreact_std"] / sat["dh_std"] < 0.3


def test_experiment_5_one_row_of_dlogits_is_softmax_minus_one_hot_and_sums_to_zero(experiments):
    n = experiments[5].numbers
    assert abs(n["row_sum"]) < 1e-15 and n["max_row_sum"] < 1e-15
    assert n["form_diff"] < 1e-14 and n["autograd_diff"] < 1e-15 and n["positive_elsewhere"]
    assert n["dlogit_target"] == pytest.approx(n["p_target"] - 1, abs=1e-14)


def test_experiment_6_the_repeated_tokens_row_is_the_sum_of_its_ten_contributions(experiments):
    n = experiments[6].numbers
    assert n["uses_t"] == 10 and n["uses_u"] == 1
    assert n["contributions"].shape[0] == 10
    assert torch.allclose(n["dC_t"], n["contributions"].sum(0), rtol=0, atol=1e-15)
    assert torch.allclose(n["autograd_t"], n["dC_t"], rtol=0, atol=1e-15)
    assert torch.equal(n["dC_u"], n["single"])
    # overwriting keeps exactly one of the ten and loses the rest
    assert len(n["overwrite_kept"]) == 1 and not torch.allclose(n["overwrite_t"], n["dC_t"])


def test_every_experiment_draws_a_picture_written_atomically(experiments, tmp_path):
    from matplotlib.image import imread

    for q, e in experiments.items():
        path = e.write_png(tmp_path / f"q{q}.png")
        img = imread(path)
        assert img.shape[0] >= 400 and img.shape[1] >= 600, (q, img.shape)
        assert img[..., :3].std() > 0.05  # not a blank canvas
        assert e.lines and e.text().startswith(f"experiment {q}:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"q{q}.png" for q in range(1, 7)]


def test_ask_in_a_notebook_shows_the_question_and_the_experiment(tmp_path):
    a = dojo.ask(4, tmp_path)
    h = a._repr_html_()
    assert "Saturation check" in h and "data:image/png;base64," in h and "beyond +-0.9" in h
    v = dojo.answer(4, ["good", "bad", 0.19], tmp_path)
    assert v.right and "right" in v._repr_html_()


# ---------------------------------------------------------------------------- the command line
def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_dojo_list_shows_the_questions_beside_the_exercises(tmp_path, capsys):
    quiz.answer(6, "a; 10; demb[Xb == t].sum(0)", tmp_path)
    rc, out, _ = run(["dojo", "list", "--dir", str(tmp_path)], capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("1  ex1_atomic")
    assert [ln.split()[0] for ln in lines[-6:]] == [f"q{i}" for i in range(1, 7)]
    assert lines[-1].endswith("[done]")
    (tmp_path / P.FILE).write_text("{")  # a damaged progress file: the list, and a warning
    rc, out, err = run(["dojo", "list", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and out.splitlines()[-1].endswith("expression)") and "warning:" in err


def test_dojo_answer_right_wrong_and_unparsable(tmp_path, capsys):
    d = ["--dir", str(tmp_path)]
    rc, out, _ = run(["dojo", "answer", "1", "5", "5", "15", "10", *d], capsys)
    assert rc == 0 and "all 4 parts right" in out and "why:" in out
    rc, out, _ = run(["dojo", "answer", "5", "a; F.softmax(logits, 1) - F.one_hot(Y, V); a; 0", *d], capsys)
    assert rc == 1 and "divide by n" in out and "hint 1 of 3 for dlogits" in out
    rc, out, _ = run(["dojo", "answer", "5", "--json", "a; F.softmax(logits, 1); a; 0", *d], capsys)
    assert rc == 1 and json.loads(out)["hint"].startswith("hint 2 of 3")
    for argv, says in ((["dojo", "answer", "3", "dy.expand_as(x"], "dojo answer 3: 'dy.expand_as(x': a '('"),
                       (["dojo", "answer", "9", "1"], "dojo answer 9: no question '9'"),
                       (["dojo", "ask", "nine"], "dojo ask nine: no question 'nine'"),
                       (["dojo", "answer", "4", "z; b; 0.19"], "not one of the choices")):
        rc, out, err = run([*argv, *d], capsys)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1 and says in err, err
        assert "Traceback" not in err


def test_dojo_ask_prints_the_question_and_draws_its_experiment(tmp_path, capsys):
    rc, out, _ = run(["dojo", "ask", "q6", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and "Embedding accumulation" in out and "handgrad dojo answer 6 COMPARE TIMES ROW" in out
    png = tmp_path / "q6.png"
    rc, out, _ = run(["dojo", "ask", "accumulation", "--png", str(png), "--hint", "--dir", str(tmp_path)], capsys)
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "is used 10 times" in out and "hint 1 of 3 for compare" in out
    rc, _, err = run(["dojo", "ask", "6", "--png", str(tmp_path / "q6.svg")], capsys)
    assert rc == 2 and "something.png" in err


def test_dojo_quiz_from_flags_grades_every_answer_first(tmp_path, capsys):
    d = ["--dir", str(tmp_path)]
    rc, out, _ = run(["dojo", "quiz", "-a", "1=5; 5; 15; 10", "-a", "4=a; b; 0.19", *d], capsys)
    assert rc == 0 and "quiz: 2 of 2 question(s) right this time; 2 of 6 done" in out
    assert "experiment 4:" in out
    rc, out, _ = run(["dojo", "quiz", "-a", "2=a; b", *d], capsys)
    assert rc == 1 and "WRONG" in out
    before = (tmp_path / P.FILE).read_bytes()
    rc, out, err = run(["dojo", "quiz", "-a", "3=dy.expand_as(x); dy.sum_to_size(x.shape)", "-a", "5=a; (", *d],
                       capsys)
    assert rc == 2 and "question 5" in err and len(err.splitlines()) == 1
    assert (tmp_path / P.FILE).read_bytes() == before  # nothing graded is recorded when one cannot be
    for bad, says in (("7=1", "no question '7'"), ("1", "write Q=ANSWER")):
        rc, _, err = run(["dojo", "quiz", "-a", bad, *d], capsys)
        assert rc == 2 and says in err


def test_dojo_quiz_in_a_terminal_walks_through_the_questions(tmp_path, capsys, monkeypatch):
    typing(monkeypatch, ["5", "5", "15", "2", "?", "a*dy",  # q1: one wrong, a hint asked for, then right
                         "a", "explain",  # q2: the explanation, then on to q3
                         "skip",  # q3
                         "good", "bad", "0.19",  # q4
                         "quit"])
    rc, out, _ = run(["dojo", "quiz", "--dir", str(tmp_path), "--png", str(tmp_path / "pics")], capsys)
    assert rc == 1  # not every question asked was answered
    assert "mul.db> 2\n  WRONG: 2 is the other factor" in out and "hint 1 of 3 for mul.db" in out
    assert "hint 2 of 3 for mul.db" in out and "explanation: loss = -mean_i" in out
    assert "quiz: 2 of 5 question(s) right this time; 2 of 6 done" in out
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["q1-routing.png", "q4-saturation.png"]
    rec = P.Progress.load(tmp_path).records
    assert rec["q1"].solved and rec["q4"].solved and rec["q2"].explained and not rec["q2"].solved
    # the next quiz skips what is done and does not ask again a part answered right
    typing(monkeypatch, ["a"])
    rc, out, _ = run(["dojo", "quiz", "--dir", str(tmp_path)], capsys)
    assert "question 1 (routing): done already" in out and "why: right before" in out
    assert "where> a\n  right" in out and P.Progress.load(tmp_path).records["q2"].solved


def typing(monkeypatch, lines: list[str]) -> None:
    """input() as a terminal gives it: the prompt written, then each line; EOFError at the end."""
    typed = iter(lines)

    def fake(prompt: str = "") -> str:
        print(prompt, end="")
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake)
