"""The examples of checking an autograd.Function and a custom op run, pass, and print what the
README says they print; the planted mistake is caught and named."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name, capsys):
    sys.argv = [str(EXAMPLES / name)]
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return e.value.code, capsys.readouterr().out


@pytest.mark.parametrize("name", ["fused_layernorm.py", "memory_saving_gelu.py", "custom_op.py"])
def test_an_example_passes_in_float64_float32_and_bfloat16(name, capsys):
    code, out = run(name, capsys)
    assert code == 0, out
    assert out.count("PASSED") == 3
    for dtype in ("float64", "float32", "bfloat16"):
        assert dtype in out


def test_the_fused_layernorm_is_once_differentiable_and_says_so(capsys):
    _, out = run("fused_layernorm.py", capsys)
    assert "the backward is @once_differentiable: a double backward raises, as it should" in out


def test_the_memory_saving_gelu_saves_less_and_is_checked_to_second_order(capsys):
    _, out = run("memory_saving_gelu.py", capsys)
    assert "(4.0x less)" in out and "x (d/dx of <dinputs, v>)" in out


def test_the_planted_mistake_is_caught_and_named(capsys):
    code, out = run("planted_mistake.py", capsys)
    assert code == 0, out
    assert "FAILED" in out
    assert "the power rule's factor 3 dropped: d(x**3) taken as x**2 instead of 3 x**2" in out
