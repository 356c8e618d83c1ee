"""check_function and check_op on their own: what a report says about the contract, bad input in one
line each (a non-Function, a forward that raises, inputs that are not tensors, a backward that never
returns), the time limit, CUDA when there is a GPU, and the naming of mistakes in check_layer and
check_model through the same recorded-forward variants."""

import threading
import time

import numpy as np
import pytest
import torch

import function_corpus as C
from handgrad import check, layers, variants
from handgrad.functions import CheckInputError, check_function, check_op
from handgrad.limits import time_limit

X = C.randn(0, 4, 5)


# ---------------------------------------------------------------------------- bad input, one line each
@pytest.mark.parametrize(
    "thing, words",
    [
        (C.tanh_forward, "check_backward"),
        (lambda x: x, "function"),
        (torch.nn.Linear(3, 3), "Linear"),
        (42, "int"),
    ],
)
def test_a_non_function_is_refused_in_one_line_naming_what_was_passed(thing, words):
    with pytest.raises(CheckInputError) as e:
        check_function(thing, X)
    msg = str(e.value)
    assert "\n" not in msg and "torch.autograd.Function" in msg and words in msg


def test_a_function_without_backward_is_refused():
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

    with pytest.raises(CheckInputError, match="defines no backward"):
        check_function(NoBackward, X)


class RaisingForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x @ torch.ones(3, 3, dtype=x.dtype)  # (4, 5) @ (3, 3): shapes do not fit

    @staticmethod
    def backward(ctx, g):
        return g


def test_a_forward_that_raises_is_one_failing_line_with_where_it_raised():
    report = check_function(RaisingForward, X)
    assert not report.passed
    [row] = report.failures()
    assert row.name == "forward" and "RaisingForward.forward raised RuntimeError" in row.message
    assert "test_check_function.py:" in row.message and "\n" not in row.message
    assert sum("->" in line for line in str(report).splitlines()) == 1


@pytest.mark.parametrize(
    "inputs, words",
    [
        ((np.ones((3, 2)),), "numpy.ndarray, not a torch.Tensor"),
        (([1.0, 2.0],), "no floating-point tensor"),
        ((3, "x"), "no floating-point tensor"),
        (([X, X],), "list of tensors"),
        ((torch.zeros(3, dtype=torch.complex64),), "complex"),
        ((torch.arange(4),), "no floating-point tensor"),
    ],
)
def test_inputs_that_are_not_tensors_are_refused_in_one_line(inputs, words):
    with pytest.raises(CheckInputError) as e:
        check_function(C.Tanh, *inputs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_keyword_names_the_forwards_inputs_and_the_options():
    with pytest.raises(CheckInputError) as e:
        check_function(C.Scale, X, scale=2.0)
    assert "'scale'" in str(e.value) and "x, c" in str(e.value) and "timeout" in str(e.value)


def test_keyword_inputs_are_bound_to_the_forwards_parameters():
    assert check_function(C.Scale, X, c=2.5).passed


class EndlessBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        while True:
            pass


class EndlessForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        while True:
            time.sleep(0.01)

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize(
    "fn, what", [(EndlessBackward, "EndlessBackward.backward"), (EndlessForward, "EndlessForward.forward")]
)
def test_a_call_that_never_returns_is_stopped_and_said_in_one_line(fn, what):
    start = time.monotonic()
    report = check_function(fn, X, timeout=0.5)
    assert time.monotonic() - start < 10
    assert not report.passed
    msgs = [getattr(r, "diagnosis", "") for r in report.failures()]
    assert any(f"{what} did not return within 0.5 s" in m for m in msgs), str(report)


def test_the_time_limit_also_works_off_the_main_thread():
    out = {}

    def run():
        out["report"] = check_function(EndlessBackward, X, timeout=0.5, fd=False)

    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    assert not t.is_alive()
    assert any("did not return within 0.5 s" in getattr(r, "diagnosis", "") for r in out["report"].failures())


def test_time_limit_restores_an_outer_alarm_and_does_nothing_without_a_limit():
    with time_limit(None, "x"):
        pass
    with time_limit(5, "outer"):
        with time_limit(0.2, "inner"), pytest.raises(BaseException, match="inner"):
            while True:
                pass
        time.sleep(0.3)  # the outer limit is still 5 s away


def test_check_op_refuses_what_is_not_an_op():
    with pytest.raises(CheckInputError, match="custom op"):
        check_op(C.Tanh, X)
    with pytest.raises(CheckInputError, match="custom op"):
        check_op(torch.tanh, X)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(CheckInputError, match="no CUDA GPU"):
        check_function(C.Tanh, X, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_inputs_are_checked_on_the_gpu(dtype):
    for case in [c for c in C.CORRECT if c.kind == C.FUNC][:12]:
        args = [
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in case.inputs(0)
        ]
        report = check_function(case.target, *args, device="cuda")
        assert report.passed, str(report)
    wrong = check_function(C.TanhOneMinusH, X.to(dtype), device="cuda")
    assert not wrong.passed and "1 - h instead of 1 - h**2" in C.said(wrong)


# ---------------------------------------------------------------------------- the report
def test_the_backwards_own_return_is_checked_before_autograd_sums_or_casts_it():
    """Autograd silently sums a (4, 3) gradient for a (3,) bias; the check does not."""
    report = check_function(C.LinearBiasNotSummed, *C.linear_rect_inputs(0))
    row = report.row("b", 1)
    assert not row.passed and "not summed over dim(s) [0]" in row.diagnosis


def test_wasted_gradients_are_said_but_do_not_fail():
    report = check_function(C.LayerNorm, *C.ln_inputs(0))
    assert report.passed
    note = report.row("needs_input_grad").note
    assert "even when it needs none" in note and "wasted work" in note


def test_respecting_needs_input_grad_is_not_called_wasted():
    report = check_function(C.Linear, *C.linear_rect_inputs(0))
    assert report.passed and "wasted" not in report.row("needs_input_grad").note


def test_each_output_is_checked_on_its_own():
    report = check_function(C.MeanVarBessel, X)
    k = next(i for i, s in enumerate(report.sections) if s.title.startswith("each output on its own"))
    assert report.row("x via output 0", k).passed and not report.row("x via output 1", k).passed


def test_an_opaque_forward_falls_back_on_finite_differences_with_a_note():
    report = check_op(C.custom_ops()["np_tanh_right"], X, 1.5)
    assert report.passed
    assert "finite differences" in report.row("reference", 1).note


def test_a_custom_ops_registration_is_checked_by_opcheck():
    report = check_op(C.custom_ops()["softplus"], X)
    assert report.row("registration (opcheck)").passed


def test_the_second_order_diagnosis_names_the_constant_intermediates_and_confirms_them():
    report = check_function(C.LayerNormSavedNotOnce, *C.ln_inputs(0))
    msg = next(r.message for r in report.failures() if r.name == "double backward")
    assert "ctx.saved_tensors[0]" in msg and "confirmed" in msg and "@once_differentiable" in msg


def test_a_first_order_failure_skips_the_second_order():
    report = check_function(C.TanhOneMinusH, X)
    assert not any(s.title.startswith("second order") for s in report.sections)


def test_double_false_skips_the_second_order():
    report = check_function(C.LayerNormSavedNotOnce, *C.ln_inputs(0), double=False)
    assert report.passed


def test_name_mistakes_false_keeps_the_plain_diagnosis():
    report = check_function(C.TanhOneMinusH, X, name_mistakes=False)
    assert "named from your forward" not in C.said(report)
    assert "no simple pattern" in C.said(report)


def test_a_user_function_is_left_as_it_was():
    before = dict(vars(C.Tanh))
    check_function(C.TanhOneMinusH, X)
    check_function(C.Tanh, X)
    assert dict(vars(C.Tanh)) == before and "backward" in vars(C.TanhOneMinusH)


# ---------------------------------------------------------------------------- the variants themselves
def test_a_recorded_forward_replays_to_autograds_gradient():
    x, w, b, _ = C.ln_inputs(0)
    g = C.randn(9, 4, 6)
    graph = variants.record_checked(
        lambda x, w, b: [C.layernorm_forward(x, w, b)[0]], [x, w, b], ["x", "w", "b"], [g]
    )
    assert graph is not None and [c.op for c in graph.calls][:2] == ["mean", "sub"]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = torch.autograd.grad((C.layernorm_forward(*leaves)[0] * g).sum(), leaves)
    got = variants.variant_grads(graph, [x, w, b], [g], None)
    assert all(torch.allclose(a, r, rtol=0, atol=1e-14) for a, r in zip(got, ref))


def test_every_use_of_a_tensor_used_twice_is_a_branch_variant():
    x = C.randn(0, 3)
    graph = variants.record_checked(lambda x: [x * torch.tanh(x)], [x], ["x"], [torch.ones(3, dtype=x.dtype)])
    drops = [v for v in variants.variants(graph) if v.kind == variants.BRANCH]
    assert len(drops) == 2 and all("`x` is used 2 times" in v.text for v in drops)


def test_a_slice_scaled_by_its_own_constant_is_said():
    r = C.randn(0, 5, 4)
    k = torch.tensor([1.00001, 1.00002, 1.000005, 1.00003])
    assert "each column scaled by its own constant" in check.diagnose(r * k, r)
    assert "eps left out?" in check.diagnose(r * k, r)


def test_wrong_columns_are_said():
    r = C.randn(0, 5, 4)
    m = r.clone()
    m[:, 0] += 1
    assert check.diagnose(m, r).startswith("correct on 3 of 4 columns")


# ---------------------------------------------------------------------------- check_layer and check_model
class TanhOneMinusH(layers.Tanh):
    def backward(self, dout, cache):
        (h,) = cache
        return (1 - h) * dout, {}


def test_check_layer_names_the_mistake_from_the_layers_forward():
    report = check.check_layer(TanhOneMinusH(), C.randn(0, 4, 5))
    assert not report.passed
    assert "tanh's derivative taken as 1 - h instead of 1 - h**2" in report.row("x").diagnosis


def test_check_model_names_a_mistake_in_one_layer_from_every_gradient_it_spoils(names_splits):
    model = layers.Sequential(
        [
            layers.Embedding(27, 4),
            layers.FlattenConsecutive(3),
            layers.Linear(12, 8),
            TanhOneMinusH(),
            layers.Linear(8, 27),
        ]
    )
    model.init_(torch.Generator().manual_seed(0))
    X, Y = names_splits.Xtr[:8], names_splits.Ytr[:8]
    report = check.check_model(model, X, Y, fd=False)
    bad = [r for r in report.failures() if r.name in ("0.weight", "2.weight", "2.bias")]
    assert bad and all("1 - h instead of 1 - h**2" in r.diagnosis for r in bad), str(report)
    assert report.row("4.weight").passed


def test_check_backward_stops_a_backward_that_never_returns():
    def forward(x):
        return 2 * x

    def backward(dout, x):
        while True:
            pass

    report = check.check_backward(forward, backward, [X], timeout=0.5)
    assert not report.passed
    [row] = report.failures()
    assert "backward backward did not return within 0.5 s" in row.message


def test_inputs_passed_with_requires_grad_pick_what_is_differentiated():
    x, w, b = C.linear_rect_inputs(0)
    report = check_function(C.Linear, x, w.requires_grad_(), b)
    assert report.passed and "inputs differentiated: W (" in report.header[0]
    assert [r.name for r in report.sections[1].rows] == ["W"]


def test_the_package_exports_the_two_entry_points():
    import handgrad
    assert handgrad.check_function(C.Tanh, X).passed and callable(handgrad.check_op)
