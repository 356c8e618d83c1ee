"""The dojo's tools around grading, the same for every item: hints (three levels, counted beside the
file, none giving the answer before the last), the reference on request, the graph picture, the CLI's
exit codes, and the shape of the package (no argparse, no print, no registration at import)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from handgrad import cli, dojo
from handgrad.dojo import hints as H
from handgrad.dojo import sandbox
from handgrad.dojo.framework import render
from handgrad.dojo.registry import ITEMS, get


def _answer_lines(solution: str, g: str) -> list[str]:
    """The right-hand sides the reference writes d{g} with (what no early hint may contain)."""
    out = []
    for st in ast.parse(solution).body:
        if isinstance(st, (ast.Assign, ast.AugAssign)) and f"d{g}" in ast.unparse(st).split("=")[0]:
            out.append(ast.unparse(st.value))
    return [r for r in out if len(r) > 6]  # "1", "n": too short to be an answer


@pytest.mark.parametrize("key", [it.key for it in ITEMS])
def test_every_row_has_three_hints_and_only_the_last_gives_the_answer(key):
    it = get(key)
    for r in it.rows:
        assert len(r.hints) == 3 and all(r.hints) and len(set(r.hints)) == 3, (key, r.name)
        if it.kind == "exercise":
            assert f"{r.var} =" in r.hints[2] or f"{r.var}." in r.hints[2]  # the form: the reference's lines
            for rhs in _answer_lines(it.solution[0], r.key):
                assert rhs not in r.hints[0] and rhs not in r.hints[1], (r.key, rhs)
        else:
            assert r.hints[2] not in r.hints[0] + r.hints[1]


def test_hint_levels_are_counted_beside_the_file(tmp_path, capsys):
    path = dojo.start("1", tmp_path)
    seen = []
    for _ in range(4):
        assert cli.main(["dojo", "hint", str(path), "dprobs"]) == 0
        seen.append(capsys.readouterr().out)
    assert [s.split(",")[0] for s in seen] == ["hint 1 of 3 for dprobs", "hint 2 of 3 for dprobs"] + [
        "hint 3 of 3 for dprobs"
    ] * 2
    assert (
        "1/x" in seen[0] and "(n, vocab_size)" in seen[1] and "dprobs = (1.0 / probs) * dlogprobs" in seen[2]
    )
    assert cli.main(["dojo", "hint", str(path), "counts"]) == 0  # the bare name works too
    counter = tmp_path / ".ex1_atomic.hints.json"
    assert json.loads(counter.read_text()) == {"dprobs": 3, "dcounts": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ex1_atomic.hints.json",
        "ex1_atomic.py",
    ]  # no temp
    assert H.used(path) == {"dprobs": 3, "dcounts": 1}
    assert "hints used: dcounts (1 of 3), dprobs (3 of 3)" in dojo.grade_file(path).notes


def test_a_tampered_hint_counter_is_read_safely(tmp_path):
    path = dojo.start("2", tmp_path)
    (tmp_path / ".ex2_cross_entropy.hints.json").write_text('{"dlogits": -5, "x": "y"}')
    assert H.used(path) == {}
    level, _, text = dojo.next_hint(path, "dlogits")
    assert level == 1 and "softmax" in text


def test_notebook_hints_count_in_the_session():
    first = dojo.hint(3, "dhprebn")
    assert first.startswith("hint 1 of 3 for dhprebn") and "three ways" in first
    assert dojo.hint(3, "hprebn").startswith("hint 2 of 3")
    assert "bngain * bnvar_inv / n" in dojo.hint(3, "dhprebn", level=3)
    assert dojo.hint("linear-tanh", "db").startswith("hint 1 of 3 for db")
    with pytest.raises(ValueError, match="no row"):
        dojo.hint(3, "dprobs")


def test_hint_and_solution_refuse_bad_input_in_one_line(tmp_path, capsys):
    path = dojo.start("2", tmp_path)
    assert cli.main(["dojo", "hint", str(path), "dprobs"]) == 2  # exercise 2 has only dlogits
    err = capsys.readouterr().err
    assert "no row 'dprobs'" in err and "dlogits" in err and err.count("\n") == 1
    assert cli.main(["dojo", "hint", str(tmp_path / "nope.py"), "dlogits"]) == 2
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert cli.main(["dojo", "hint", str(tmp_path / "plain.py"), "dlogits"]) == 2
    assert cli.main(["dojo", "solution", "9"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("key", [it.key for it in ITEMS])
def test_solution_prints_the_reference_file(key, tmp_path, capsys):
    assert cli.main(["dojo", "solution", key]) == 0
    out = capsys.readouterr().out
    it = get(key)
    assert out == render(it, it.solution) and out.startswith(f"# handgrad dojo: {it.kind} {it.key}\n")
    compile(out, "solution", "exec")


# ---------------------------------------------------------------------------- the picture
def test_graph_picture_colours_each_tensor_by_its_grade(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from handgrad.dojo.report import COLOURS

    ex = get("1")
    src = ex.solution[0].replace("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h")
    src = src.replace("dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv", "dbnvar = None")
    path = tmp_path / "ex1.py"
    path.write_text(render(ex, (src,)))
    out = tmp_path / "pic" / "g.svg"
    assert cli.main(["dojo", "grade", str(path), "--graph", str(out)]) == 2  # the folder does not exist
    assert "does not exist" in capsys.readouterr().err
    out.parent.mkdir()
    assert cli.main(["dojo", "grade", str(path), "--graph", str(tmp_path / "g.png")]) == 2
    assert cli.main(["dojo", "grade", str(path), "--graph", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.rstrip().endswith(f"graph: {out}") and "24 of 26 right; next: dW2" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.svg"]  # written atomically: no temp left
    ns = {"s": "http://www.w3.org/2000/svg"}
    root = ET.fromstring(out.read_text())
    fills = {}
    for g in root.findall("s:g", ns):
        fills[g.find("s:text", ns).text] = g.find("s:rect", ns).get("fill")
    assert len(fills) == 29  # 20 forward values and 9 inputs
    assert fills["W2"] == COLOURS["wrong"] and fills["bnvar"] == COLOURS["missing"]
    assert {k for k, v in fills.items() if v == COLOURS["ok"]} == set(ex.graph.grads) - {"W2", "bnvar"}
    assert {k for k, v in fills.items() if v not in COLOURS.values()} == {"Xb", "Yb", "loss"}
    tip = next(
        g.find("s:title", ns).text for g in root.findall("s:g", ns) if g.find("s:text", ns).text == "W2"
    )
    assert "transposed" in tip
    beside = [t.text for t in root.findall("s:text", ns) if (t.text or "").startswith("dW2: ")]
    assert len(beside) == 1 and "transposed" in beside[0]  # written beside the graph, not only as a tooltip


# ---------------------------------------------------------------------------- exit codes on the command line
@pytest.mark.parametrize(
    "name, old, new, words",
    [
        ("syntax", "dh = dlogits @ W2.T", "dh = dlogits @@ W2.T", "SyntaxError"),
        ("loop", "dh = dlogits @ W2.T", "while True:\n    pass\ndh = dlogits @ W2.T", "time limit"),
        ("numpy", "dh = dlogits @ W2.T", "dh = (dlogits @ W2.T).numpy()", "NumPy array"),
        ("exit", "dh = dlogits @ W2.T", "import os\nos._exit(3)", "ended the grader's process: it exited with code 3"),
    ],
)
def test_cli_cannot_grade_is_one_line_exit_2(tmp_path, capsys, name, old, new, words):
    ex = get("1")
    path = tmp_path / f"{name}.py"
    path.write_text(render(ex, (ex.solution[0].replace(old, new),)))
    assert cli.main(["dojo", "grade", str(path), "--time-limit", "3"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and words in cap.err and str(path) in cap.err
    assert "Traceback" not in cap.err


@pytest.mark.parametrize(
    "edit, code, last",
    [
        (None, 0, "26 of 26 right; all done"),
        (
            ("dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)", "dbnvar_inv = None"),
            1,
            "25 of 26 right; next: dbnvar_inv",
        ),
    ],
)
def test_cli_exit_code_and_last_line(tmp_path, capsys, edit, code, last):
    ex = get("1")
    src = ex.solution[0] if edit is None else ex.solution[0].replace(*edit)
    path = tmp_path / "ex1.py"
    path.write_text(render(ex, (src,)))
    assert cli.main(["dojo", "grade", str(path)]) == code
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == last


def test_cli_json_output(tmp_path, capsys):
    path = tmp_path / "ex2.py"
    path.write_text(dojo.solution("2"))
    assert cli.main(["dojo", "grade", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 0 and data["rows"][0]["name"] == "dlogits" and data["item"] == "2"


# ---------------------------------------------------------------------------- the package's shape
def test_the_dojo_library_imports_no_argparse_prints_nothing_and_registers_nothing():
    root = Path(dojo.__file__).parent
    for f in root.rglob("*.py"):
        tree = ast.parse(f.read_text())
        names = {
            a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names
        }
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "argparse" not in names and "argparse" not in mods and "handgrad.cli" not in mods, f
        calls = {
            n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert "print" not in calls, f
        assert "sys.modules" not in f.read_text(), f  # no patching of other modules at import


@pytest.mark.slow
@pytest.mark.skipif(bool(sandbox.bwrap_problem()), reason="no working bubblewrap (apt-get install bubblewrap)")
def test_the_child_in_the_bubblewrap_sandbox_grades_the_same(tmp_path):
    """sandbox="require": the child is forked by the zygote inside bubblewrap, answering the same requests."""
    p = tmp_path / "lt.py"
    p.write_text(dojo.solution("linear-tanh").replace("dW = x.T @ dz", "dW = x.T @ dz * 2"))
    g = dojo.grade_file(p, sandbox="require")
    assert g.sandbox == "bwrap"
    assert [r.name for r in g.rows if not r.ok] == ["dW"] and g.rows[2].kind == "power-rule", g.table()
