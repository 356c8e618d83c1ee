"""The corpus of hand-written backward passes (tests/function_corpus.py) through check_function,
check_op and check_backward: every wrong one is flagged, at least 90% have their mistake named (here:
all), and no correct one fails in float64, float32 or bfloat16."""

from functools import cache

import pytest
import torch

import function_corpus as C


def _id(case):
    return case.name


@cache
def wrong_report(name):
    """Each wrong case's float64 report, made once for the tests below."""
    return C.run_case(next(c for c in C.WRONG if c.name == name), torch.float64)


def test_the_corpus_is_as_large_and_as_varied_as_the_issue_asks():
    assert len(C.WRONG) >= 40 and len(C.CORRECT) >= 30
    classes = {c.klass for c in C.WRONG}
    for needed in (
        "branch",
        "derivative",
        "sign",
        "constant",
        "eps",
        "transpose",
        "reduction",
        "index",
        "multi-output",
        "contract",
        "saved",
        "second order",
        "forward mode",
    ):
        assert needed in classes, needed
    kinds = {c.kind for c in C.WRONG} | {c.kind for c in C.CORRECT}
    assert kinds == {C.FUNC, C.PAIR, C.OP}
    several_inputs = [
        c
        for c in C.WRONG
        if sum(isinstance(a, torch.Tensor) and a.is_floating_point() for a in c.inputs(0)) > 1
    ]
    non_diff_inputs = [
        c
        for c in C.WRONG
        if any(not (isinstance(a, torch.Tensor) and a.is_floating_point()) for a in c.inputs(0))
    ]
    assert len(several_inputs) >= 8 and len(non_diff_inputs) >= 4


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("case", C.CORRECT, ids=_id)
def test_a_correct_backward_passes(case, dtype):
    if dtype not in case.dtypes:
        pytest.skip(f"{case.name} does not run in {dtype}")
    report = C.run_case(case, dtype)
    assert report.passed, str(report)


@pytest.mark.parametrize("case", C.WRONG, ids=_id)
def test_a_wrong_backward_is_flagged_and_its_mistake_named(case):
    report = wrong_report(case.name)
    assert not report.passed, str(report)
    said = C.said(report)
    assert any(w in said for w in case.expect), said


@pytest.mark.parametrize(
    "case", [c for c in C.WRONG if torch.float32 in c.dtypes and c.klass != "contract"], ids=_id
)
def test_a_wrong_backward_is_flagged_in_float32_too(case):
    report = C.run_case(case, torch.float32, fd=False)
    assert not report.passed, str(report)


def test_at_least_90_percent_of_the_wrong_ones_are_named():
    named = 0
    for case in C.WRONG:
        named += any(w in C.said(wrong_report(case.name)) for w in case.expect)
    assert named / len(C.WRONG) >= 0.9, f"{named} of {len(C.WRONG)} named"


def test_a_mistake_in_bfloat16_fails_in_bfloat16_itself_not_only_in_the_float64_replay():
    report = C.run_case(next(c for c in C.WRONG if c.name == "tanh: 1 - h"), torch.bfloat16)
    first = report.sections[1]
    assert "bfloat16" in first.title and not first.passed, str(report)
