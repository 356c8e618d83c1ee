"""The checker itself: compare() tables, shape strictness, finite differences without autograd,
the diagnosis of deliberately broken backward passes, the report object and the example script."""

import dataclasses
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from handgrad import atomic, check, ops

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "check_my_backward.py"


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- compare
def test_compare_reports_exact_allclose_maxdiff_and_relative_error():
    r = randn(4, 3)
    same = check.compare("w", r.clone(), r)
    assert same.exact and same.allclose and same.passed and same.max_abs_diff == 0.0
    near = check.compare("w", r + 1e-14, r)
    assert not near.exact and near.allclose and near.passed
    assert near.rel_err == pytest.approx(near.max_abs_diff / r.abs().max().item())
    far = check.compare("w", r * 1.01, r)
    assert not far.passed and far.max_abs_diff > 0


@pytest.mark.parametrize("got, want", [((64,), (1, 64)), ((1, 64), (64,)), ((64, 1), (64,))])
def test_compare_is_shape_strict_even_when_the_gradient_would_broadcast(got, want):
    ref = randn(*want)
    c = check.compare("bngain", ref.reshape(got).clone(), ref)
    assert not c.passed and not c.exact and not c.allclose
    assert "keepdim" in c.diagnosis and f"shape {got}" in c.diagnosis and "exactly its tensor's shape" in c.diagnosis


def test_compare_flags_a_dtype_mismatch():
    r = randn(3, 2)
    c = check.compare("x", r.float(), r)
    assert not c.passed and "dtype" in c.diagnosis


def test_tolerances_are_defined_once_by_dtype_and_method():
    assert check.autograd_tolerance(torch.float64).rtol <= 1e-10
    assert check.autograd_tolerance(torch.float32).rtol > check.autograd_tolerance(torch.float64).rtol
    assert check.FD_TOL.rtol == 1e-5 and check.FD_EPS == 1e-6


# ---------------------------------------------------------------------------- diagnosis by hand
@pytest.mark.parametrize("k, words", [(32, "missing 1/n"), (1 / 32, "1/n"), (32 / 31, "n/(n-1)"),
                                      (31 / 32, "Bessel"), (2.0, "factor 2"), (0.5, "a missing factor 2"),
                                      (-32, "sign flipped")])
def test_diagnosis_names_common_constant_scales(k, words):
    r = randn(32, 5)
    text = check.diagnose(r * k, r, sizes={"n": 32})
    assert "scaled by a constant" in text
    assert words in text


def test_diagnosis_names_a_fraction_even_without_sizes():
    r = randn(6, 5)
    assert "= 7/6" in check.diagnose(r * 7 / 6, r)


def test_diagnosis_says_sign_flipped():
    r = randn(5, 4)
    assert check.diagnose(-r, r).startswith("sign flipped")


def test_diagnosis_says_transposed_for_square_and_rectangular():
    sq, rect = randn(4, 4), randn(3, 5)
    assert "transposed" in check.diagnose(sq.T.clone(), sq)
    assert "transposed" in check.diagnose(rect.T.clone(), rect)


def test_diagnosis_says_summed_over_the_wrong_dimension():
    dout = randn(8, 5)
    assert "wrong dimension" in check.diagnose(dout.sum(1, keepdim=True), dout.sum(0, keepdim=True))
    assert "wrong dimension" in check.diagnose(dout.sum(1), dout.sum(0))


def test_diagnosis_points_at_rows_whose_index_repeats():
    X = torch.tensor([0, 2, 2, 3, 3, 3])
    demb = randn(6, 4)
    right = torch.zeros(5, 4, dtype=torch.float64).index_add_(0, X, demb)
    wrong = torch.zeros(5, 4, dtype=torch.float64)
    wrong[X] = demb  # overwrites: rows 2 and 3 keep one contribution
    text = check.diagnose(wrong, right, index=[X])
    assert "index" in text and "repeats" in text and "overwritten instead of accumulated" in text
    assert "[2, 3]" in text


def test_diagnosis_says_nan_and_fails_the_comparison():
    r = randn(6, 4)
    m = r.clone()
    m[1, 1] = float("nan")
    c = check.compare("x", m, r)
    assert not c.passed and "NaN" in c.diagnosis


def test_diagnosis_says_all_zeros():
    r = randn(6, 4)
    assert check.diagnose(torch.zeros_like(r), r).startswith("all zeros")


def test_diagnosis_names_wrong_rows_without_a_repeated_index():
    r = randn(6, 4)
    m = r.clone()
    m[2] += 1.0
    m[4] *= 3.0
    text = check.diagnose(m, r, index=[torch.tensor([0, 1, 1, 3])])  # 1 repeats, but rows 2 and 4 are wrong
    assert text.startswith("correct on 4 of 6 rows, wrong on rows [2, 4]") and "each a row" not in text


def test_diagnosis_of_a_pattern_free_difference_says_so():
    assert check.diagnose(randn(6, 4, seed=1), randn(6, 4, seed=2)).startswith("values differ, with no simple")


@pytest.mark.parametrize("got, want", [((4,), (6, 4)), ((3,), (2, 3))])
def test_compare_fails_a_gradient_that_would_broadcast_to_a_larger_shape(got, want):
    c = check.compare("x", randn(*got), randn(*want))
    assert not c.passed and "would broadcast" in c.diagnosis and "exactly its tensor's shape" in c.diagnosis


@pytest.mark.parametrize("got, want", [((6, 5), (6, 4)), ((5, 4), (4, 6))])
def test_compare_fails_an_incompatible_shape_and_names_both_shapes(got, want):
    c = check.compare("x", randn(*got), randn(*want))
    assert not c.passed and c.diagnosis == f"shape {got} but the tensor is {want}"


def test_diagnosis_of_agreeing_tensors_is_empty():
    r = randn(3, 3)
    assert check.diagnose(r.clone(), r) == ""


# ---------------------------------------------------------------------------- finite differences
def test_finite_differences_need_no_autograd_and_accept_a_right_gradient():
    x = randn(40)  # <= FD_MAX_ELEMENTS: every element
    with torch.no_grad():
        res = check.finite_differences(lambda: (x**3).sum(), x, 3 * x**2, "x")
    assert res.passed and res.elements == 40 and res.directions == 0 and res.max_abs_err < 1e-8
    assert not x.requires_grad


def test_finite_differences_sample_large_tensors_and_check_random_directions():
    x = randn(30, 40)
    res = check.finite_differences(lambda: torch.sin(x).sum(), x, torch.cos(x), "x", max_elements=50)
    assert res.passed and res.elements == 50 and res.numel == 1200 and res.directions == check.FD_DIRECTIONS


def test_finite_differences_restore_the_tensor():
    x = randn(10)
    before = x.clone()
    check.finite_differences(lambda: (x**2).sum(), x, 2 * x, "x")
    assert torch.equal(x, before)


def test_finite_differences_catch_a_wrong_gradient_and_diagnose_it():
    x = randn(20)
    res = check.finite_differences(lambda: (x**2).sum(), x, x, "x")  # missing factor 2
    assert not res.passed and "1/2" in res.diagnosis


def test_finite_differences_random_directions_catch_an_error_outside_the_sample():
    x = randn(100, 100)
    g = 2 * x
    g[7, 7] += 1.0  # a single wrong element, almost surely not in a 10-element sample
    res = check.finite_differences(lambda: (x**2).sum(), x, g, "x", max_elements=10, seed=3)
    assert not res.passed
    assert "every sampled element agrees" in res.diagnosis and "outside the sample" in res.diagnosis
    assert "rounding" not in res.diagnosis  # not mistaken for a tolerance problem


def test_finite_differences_diagnose_wrong_sampled_elements():
    x = randn(100, 100)
    g = 2 * x
    g[:50] *= 3  # half the rows wrong: some of a 10-element sample are
    res = check.finite_differences(lambda: (x**2).sum(), x, g, "x", max_elements=10, seed=3)
    assert not res.passed and res.diagnosis.startswith("wrong on ") and "of 10 sampled elements" in res.diagnosis


def test_finite_differences_fail_and_diagnose_a_nan_gradient():
    x = randn(5)
    g = 2 * x
    g[2] = float("nan")
    res = check.finite_differences(lambda: (x**2).sum(), x, g, "x")
    assert not res.passed and "NaN" in res.diagnosis


def test_finite_differences_refuse_float32():
    x = randn(3).float()
    with pytest.raises(TypeError, match="float64"):
        check.finite_differences(lambda: x.sum(), x, torch.ones(3), "x")


def test_finite_differences_fail_a_gradient_of_the_wrong_shape():
    x = randn(1, 6)
    res = check.finite_differences(lambda: x.sum(), x, torch.ones(6, dtype=torch.float64), "x")
    assert not res.passed and "keepdim" in res.diagnosis


# ---------------------------------------------------------------------------- broken backward passes
def linear_inputs(N=6, D=4, O=3):
    return {"x": randn(N, D, seed=1), "W": randn(D, O, seed=2), "b": randn(O, seed=3)}


def test_a_right_backward_passes_against_autograd_and_finite_differences():
    report = check.check_backward(ops.linear_forward, ops.linear_backward, linear_inputs())
    assert report.passed, str(report)
    assert len(report.sections) == 2 and [r.name for r in report.sections[1].rows] == ["x", "W", "b"]


def test_flipped_sign_is_flagged_and_named():
    def backward(dout, cache):
        dx, dW, db = ops.linear_backward(dout, cache)
        return -dx, dW, db
    report = check.check_backward(ops.linear_forward, backward, linear_inputs())
    assert not report.passed
    assert report.row("x").diagnosis.startswith("sign flipped")
    assert "sign flipped" in report.sections[1].rows[0].diagnosis  # finite differences agree
    assert report.row("W").passed and report.row("b").passed


def test_transposed_matmul_gradient_is_flagged_and_named():
    def backward(dout, cache):
        x, W, _ = cache
        return dout @ W.T, dout.T @ x, dout.sum(0)  # dW transposed
    report = check.check_backward(ops.linear_forward, backward, linear_inputs())
    assert not report.passed and "transposed" in report.row("W").diagnosis


def test_bias_summed_over_the_wrong_dimension_is_flagged_and_named():
    def backward(dout, cache):
        dx, dW, _ = ops.linear_backward(dout, cache)
        return dx, dW, dout.sum(1)
    report = check.check_backward(ops.linear_forward, backward, linear_inputs())
    assert not report.passed and "wrong dimension" in report.row("b").diagnosis


def test_missing_1_over_n_in_cross_entropy_is_flagged_and_named():
    def backward(dloss, cache):
        logprobs, Y = cache
        dlogits = logprobs.exp()
        dlogits[torch.arange(logprobs.shape[0]), Y] -= 1.0
        return dlogits * dloss  # forgot the mean's 1/n
    Y = torch.tensor([1, 0, 4, 4, 2, 3, 0])
    report = check.check_backward(ops.cross_entropy_forward, backward, {"logits": randn(7, 5), "Y": Y},
                                  sizes={"n": 7})
    assert not report.passed
    assert "scaled by a constant" in report.row("logits").diagnosis
    assert "missing 1/n" in report.row("logits").diagnosis


def test_missing_keepdim_in_batchnorm_is_flagged_and_named():
    def backward(dout, cache):
        dx, dbngain, dbnbias = ops.batchnorm_backward(dout, cache)
        return dx, dbngain.squeeze(0), dbnbias  # (H,) instead of (1, H)
    inputs = {"x": randn(8, 5), "bngain": 1 + 0.1 * randn(1, 5, seed=1), "bnbias": 0.1 * randn(1, 5, seed=2)}
    report = check.check_backward(ops.batchnorm_forward, backward, inputs)
    assert not report.passed
    assert "keepdim" in report.row("bngain").diagnosis and "the values agree" in report.row("bngain").diagnosis
    assert report.row("x").passed


def test_batchnorm_dividing_by_n_minus_1_where_n_belongs_is_flagged_and_named():
    def backward(dout, cache):
        bnraw, bnvar_inv, bngain = cache
        n = dout.shape[0]
        dbngain = (bnraw * dout).sum(0, keepdim=True)
        dbnbias = dout.sum(0, keepdim=True)
        dx = bngain * bnvar_inv / (n - 1) * (n * dout - dbnbias - n / (n - 1) * bnraw * dbngain)
        return dx, dbngain, dbnbias
    inputs = {"x": randn(8, 5), "bngain": 1 + 0.1 * randn(1, 5, seed=1), "bnbias": 0.1 * randn(1, 5, seed=2)}
    report = check.check_backward(ops.batchnorm_forward, backward, inputs, sizes={"n": 8})
    assert not report.passed and "n/(n-1)" in report.row("x").diagnosis


def test_atomic_chain_with_n_instead_of_bessels_n_minus_1_is_flagged_and_named():
    def backward(p, X, Y, f):
        g = atomic.backward(p, X, Y, f)
        n = X.shape[0]
        return dataclasses.replace(g, dbndiff2=(g.dbnvar * (1 / n)).expand_as(f.bndiff2).contiguous())
    p, X, Y = check.lecture_batch(0, torch.float64)
    report = check.check_lecture_graph(p, X, Y, backward=backward, fd=False)
    assert not report.passed
    bad = report.row("bndiff2")
    assert "(n-1)/n" in bad.diagnosis and "Bessel" in bad.diagnosis


def test_lecture_check_names_the_first_wrong_gradient_in_backward_order():
    def backward(p, X, Y, f):  # a wrong dlogits; recompute nothing after it, just flag the rows
        g = atomic.backward(p, X, Y, f)
        return dataclasses.replace(g, dlogits=-g.dlogits, dh=-g.dh)
    p, X, Y = check.lecture_batch(0, torch.float64)
    text = str(check.check_lecture_graph(p, X, Y, backward=backward, fd=False))
    assert "first wrong gradient in backward order: logits" in text


def test_dC_that_overwrites_instead_of_accumulating_is_flagged_and_named():
    def backward(demb, cache):
        X, V = cache
        dC = torch.zeros((V, demb.shape[-1]), dtype=demb.dtype)
        dC[X.reshape(-1)] = demb.reshape(-1, demb.shape[-1])  # last write wins
        return dC
    X = torch.tensor([[0, 1, 1], [2, 3, 1], [4, 4, 5]])  # 1 and 4 repeat; 0, 2, 3, 5 do not; 6 unused
    report = check.check_backward(ops.embedding_forward, backward, {"C": randn(7, 3), "X": X})
    assert not report.passed
    diag = report.row("C").diagnosis
    assert "repeats" in diag and "overwritten instead of accumulated" in diag and "[1, 4]" in diag
    assert "overwritten instead of accumulated" in report.sections[1].rows[0].diagnosis  # and by FD


@pytest.mark.parametrize("op, row_name, other", [
    ("cross_entropy_backward", "logits (ops.cross_entropy_backward)", "hprebn (ops.batchnorm_backward)"),
    ("batchnorm_backward", "hprebn (ops.batchnorm_backward)", "logits (ops.cross_entropy_backward)")])
def test_lecture_check_fails_a_broken_closed_form_against_autograd_and_finite_differences(
        monkeypatch, op, row_name, other):
    real = getattr(ops, op)

    def broken(dout, cache):
        out = real(dout, cache)
        return (2 * out[0], *out[1:]) if isinstance(out, tuple) else 2 * out
    monkeypatch.setattr(ops, op, broken)
    p, X, Y = check.lecture_batch(0, torch.float64)
    report = check.check_lecture_graph(p, X, Y)
    assert not report.row(row_name, 1).passed and not report.row(row_name, 2).passed
    assert "stray factor 2" in report.row(row_name, 1).diagnosis
    assert report.row(other, 1).passed and report.row(other, 2).passed
    assert report.sections[0].passed  # the atomic chain does not use ops


def test_broken_lecture_backward_fails_finite_differences_too():
    def backward(p, X, Y, f):
        g = atomic.backward(p, X, Y, f)
        return dataclasses.replace(g, dW2=2 * g.dW2)
    p, X, Y = check.lecture_batch(0, torch.float32)
    report = check.check_lecture_graph(p, X, Y, backward=backward)
    assert not report.passed
    assert not report.row("W2", 2).passed and "2" in report.row("W2", 2).diagnosis
    assert report.row("W1", 2).passed


# ---------------------------------------------------------------------------- the public API
def test_check_backward_accepts_a_forward_that_returns_only_out():
    report = check.check_backward(torch.tanh, lambda dout, x: dout * (1 - torch.tanh(x) ** 2), [randn(5, 2)])
    assert report.passed and report.row("x0").passed


def test_check_backward_compares_in_the_inputs_dtype_and_differences_in_float64():
    inputs = {k: v.float() for k, v in linear_inputs().items()}
    report = check.check_backward(ops.linear_forward, ops.linear_backward, inputs)
    assert report.passed
    assert "float32" in report.sections[0].title and "float64" in report.sections[1].title


def test_check_backward_checks_only_the_inputs_in_wrt():
    report = check.check_backward(ops.linear_forward, lambda d, c: ops.linear_backward(d, c)[0],
                                  linear_inputs(), wrt=["x"])
    assert report.passed and [r.name for r in report.rows()] == ["x", "x"]


def test_check_backward_wants_zeros_for_an_input_the_forward_does_not_use():
    def forward(x, W, b):  # b unused: autograd has no gradient for it, the reference is zeros
        return x @ W

    def backward(dout, x, W, b):
        return dout @ W.T, x.T @ dout, torch.zeros_like(b)
    assert check.check_backward(forward, backward, linear_inputs()).passed
    wrong = check.check_backward(forward, lambda d, x, W, b: (*backward(d, x, W, b)[:2], torch.ones_like(b)),
                                 linear_inputs())
    assert not wrong.passed and not wrong.row("b").passed and wrong.row("x").passed


def test_check_backward_rejects_a_wrong_number_of_gradients():
    with pytest.raises(ValueError, match="2 gradients for 3 inputs"):
        check.check_backward(ops.linear_forward, lambda d, c: ops.linear_backward(d, c)[:2], linear_inputs())


def test_report_has_a_readable_str_a_short_repr_and_never_prints(capsys):
    report = check.check_backward(ops.tanh_forward, ops.tanh_backward, {"x": randn(3, 4)})
    text = str(report)
    assert "exact" in text and "max|a-n|" in text and text.rstrip().endswith("PASSED")
    assert "passed" in repr(report) and len(repr(report)) < 200
    assert capsys.readouterr().out == ""


def test_failed_report_str_says_failed_and_why():
    report = check.check_backward(ops.tanh_forward, lambda d, c: -ops.tanh_backward(d, c), {"x": randn(3, 4)})
    text = str(report)
    assert "FAILED" in text and "-> sign flipped" in text and not report.passed


def test_report_pretty_prints_in_a_notebook():
    report = check.check_backward(ops.tanh_forward, ops.tanh_backward, {"x": randn(3, 4)})

    class Printer:
        def __init__(self):
            self.out = ""

        def text(self, s):
            self.out += s
    p = Printer()
    report._repr_pretty_(p, False)
    assert p.out == str(report)


def test_the_readme_example_script_runs_and_reports_pass(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("PASSED") == 2 and "FAIL" not in out


def test_a_backward_that_returns_none_for_an_input_fails_with_a_message():
    def backward(dout, cache):
        dx, dW, _ = ops.linear_backward(dout, cache)
        return dx, dW, None
    report = check.check_backward(ops.linear_forward, backward, linear_inputs())
    assert not report.passed and "no gradient" in report.row("b").diagnosis
    assert "no gradient" in report.sections[1].rows[2].diagnosis


def test_a_float32_rounding_difference_is_not_mistaken_for_a_wrong_formula():
    r = randn(16, 16).float()
    text = check.diagnose(r * (1 + 1e-6), r, tol=check.Tolerance(rtol=1e-9, atol=0.0))
    assert "rounding" in text


def test_run_tolerances_have_one_home_in_tolerances():
    """--verify-autograd and the diagnostics' sanity checks read check.RUN_TOL (tolerances.py's, which
    check.py re-exports); no other module spells out a tolerance of its own."""
    from handgrad import diagnostics
    assert check.run_tolerance(torch.float32) == 1e-5 and check.run_tolerance(torch.float64) == 1e-12
    assert diagnostics.TOL is check.RUN_TOL and diagnostics.ATOMIC_TOL is check.RUN_TOL
    src = Path(check.__file__).parent
    for path in sorted(src.glob("*.py")):
        if path.name != "tolerances.py":
            for line in path.read_text().splitlines():  # a tol name assigned a literal like 1e-5
                assert not re.search(r"tol\w*\s*=[^=].*\d+e-\d+", line, re.IGNORECASE), (path.name, line)
