"""Assertions for test suites: each runs one of handgrad.check's checks and, when it fails, raises an
AssertionError whose message is the whole report (the tables, each failure's diagnosis and the
mistake named), so pytest shows it. On success each returns the report.

    from handgrad.testing import assert_function

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_my_layernorm(dtype):
        assert_function(MyLayerNorm, torch.randn(8, 16, dtype=dtype), w, b, 1e-5)
"""

from __future__ import annotations

from typing import Any

from handgrad.check import Report, check_backward, check_layer, check_model
from handgrad.functions import check_function, check_op

__all__ = ["assert_backward", "assert_function", "assert_layer", "assert_model", "assert_op"]


def _passed(report: Report) -> Report:
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    if not report.passed:
        raise AssertionError(str(report))
    return report


def assert_backward(forward: Any, backward: Any, inputs: Any, **options: Any) -> Report:
    """check_backward(forward, backward, inputs, **options) must pass."""
    __tracebackhide__ = True
    return _passed(check_backward(forward, backward, inputs, **options))


def assert_function(fn: Any, *inputs: Any, **options: Any) -> Report:
    """check_function(fn, *inputs, **options) must pass: a torch.autograd.Function or its .apply."""
    __tracebackhide__ = True
    return _passed(check_function(fn, *inputs, **options))


def assert_op(op: Any, *inputs: Any, **options: Any) -> Report:
    """check_op(op, *inputs, **options) must pass: a custom op's registered backward."""
    __tracebackhide__ = True
    return _passed(check_op(op, *inputs, **options))


def assert_layer(layer: Any, x: Any, **options: Any) -> Report:
    """check_layer(layer, x, **options) must pass."""
    __tracebackhide__ = True
    return _passed(check_layer(layer, x, **options))


def assert_model(model: Any, X: Any, Y: Any, **options: Any) -> Report:
    """check_model(model, X, Y, **options) must pass."""
    __tracebackhide__ = True
    return _passed(check_model(model, X, Y, **options))
