"""handgrad.testing: the assert helpers pass quietly on a right backward and raise an AssertionError
whose message is the report on a wrong one; the README's parametrized pytest example runs."""

import pytest
import torch

import function_corpus as C
from handgrad import layers
from handgrad.check import Report
from handgrad.testing import assert_backward, assert_function, assert_layer, assert_model, assert_op


def test_a_right_backward_passes_and_returns_its_report():
    report = assert_function(C.Tanh, C.randn(0, 4, 5))
    assert isinstance(report, Report) and report.passed


def test_a_wrong_backward_raises_with_the_report_as_the_message():
    with pytest.raises(AssertionError) as e:
        assert_function(C.TanhOneMinusH, C.randn(0, 4, 5))
    msg = str(e.value)
    assert msg.startswith("check_function: TanhOneMinusH(x (4, 5) float64)")
    assert "tanh's derivative taken as 1 - h instead of 1 - h**2" in msg and "FAILED" in msg


def test_every_check_has_its_assert():
    assert_backward(C.tanh_forward, C.tanh_backward, [C.randn(0, 4, 5)])
    assert_op(C.custom_ops()["softplus"], C.randn(0, 4, 5))
    assert_layer(layers.Tanh(), C.randn(0, 4, 5))
    with pytest.raises(AssertionError, match="1 - h instead of 1 - h"):
        assert_backward(C.tanh_forward, C.tanh_backward_one_minus_h, [C.randn(0, 4, 5)])


def test_assert_model_passes_on_a_built_in_model(names_splits):
    model = layers.Sequential(
        [
            layers.Embedding(27, 4),
            layers.FlattenConsecutive(3),
            layers.Linear(12, 8),
            layers.Tanh(),
            layers.Linear(8, 27),
        ]
    )
    model.init_(torch.Generator().manual_seed(0))
    assert_model(model, names_splits.Xtr[:8], names_splits.Ytr[:8], fd=False)


# the README's example, verbatim in spirit: a Function checked over shapes and dtypes
@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_readme_example_layernorm_over_shapes_and_dtypes(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)  # not ones: a wrong dw cannot hide
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    assert_function(C.LayerNorm, x, w, b, 1e-5)
