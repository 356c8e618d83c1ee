"""`handgrad dojo grade` on what a hostile class puts in front of it, without needing bubblewrap: every
bad flag or path is one line and exit 2 with no traceback, outputs are never overwritten, a tampered
hints counter changes nothing, the exercise comes from the file's content, a class's bad submission
never stops the others; and the channel, the reply checks and the escaping on their own.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dojo_hostile import inject
from handgrad import cli, dojo
from handgrad.dojo import channel, classroom, report, trust
from handgrad.dojo import scan as S

REF = dojo.solution("1")
TEMPLATE = dojo.api.render(dojo.api.get("1"))


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["dojo", "grade", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def ref(tmp_path):
    p = tmp_path / "ex1.py"
    p.write_text(REF)
    return p


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "inf", "-inf", "1e12"])
def test_a_time_limit_that_is_no_time_is_one_line(ref, capsys, limit):
    err = one_line_error(*run([str(ref), f"--time-limit={limit}"], capsys))
    assert "--time-limit" in err and "between 0 and 3600" in err


def test_paths_that_are_no_file_are_one_line_each(tmp_path, capsys):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    link = tmp_path / "passwd.py"
    link.symlink_to("/etc/passwd")
    (tmp_path / "empty").mkdir()
    cases = {str(fifo): "FIFO", "/dev/zero": "character device", str(link): "symbolic link",
             str(tmp_path / "nope.py"): "No such file", str(tmp_path / "empty"): "without any .py file"}
    for path, said in cases.items():
        err = one_line_error(*run([path], capsys))
        assert said in err, err
        assert "root:" not in err  # the linked system file is never read
    big = tmp_path / "big.py"
    big.write_bytes(b"# handgrad dojo: 1\n" + b"x = 1\n" * 400_000)
    assert "more than the 1,048,576 allowed" in one_line_error(*run([str(big)], capsys))
    nul = tmp_path / "nul.py"
    nul.write_bytes(REF.encode() + b"\0")
    assert "NUL byte" in one_line_error(*run([str(nul)], capsys))


def test_outputs_are_never_overwritten(ref, tmp_path, capsys):
    for flag, name in (("--graph", "g.svg"), ("--csv", "c.csv"), ("--html", "h.html")):
        out = tmp_path / name
        out.write_text("mine")
        err = one_line_error(*run([str(ref), flag, str(out)], capsys))
        assert "never overwritten" in err and out.read_text() == "mine"
    err = one_line_error(*run([str(ref), "--csv", str(tmp_path / "c.txt")], capsys))
    assert "something.csv" in err
    err = one_line_error(*run([str(ref), str(ref), "--graph", str(tmp_path / "new.svg")], capsys))
    assert "one file" in err


@pytest.mark.parametrize("counter", ['{"dprobs": -5, "dlogits": 2}', "dir", "fifo", "[1, 2]",
                                     '{"dprobs": 1e999}', "zero"])
def test_a_tampered_hints_counter_changes_nothing(tmp_path, capsys, counter):
    p = tmp_path / "ex1.py"
    p.write_text(TEMPLATE)
    c = tmp_path / ".ex1.hints.json"
    if counter == "dir":
        c.mkdir()
    elif counter == "fifo":
        os.mkfifo(c)
    elif counter == "zero":
        c.symlink_to("/dev/zero")
    else:
        c.write_text(counter)
    code, out, err = run([str(p)], capsys)
    assert code == 1 and "Traceback" not in out + err and "0 of 26 right" in out
    assert "hints used" not in out or "dlogits (2 of 3)" in out
    code = cli.main(["dojo", "hint", str(p), "dprobs"])
    out, err = capsys.readouterr()
    if code == 0:
        assert "hint 1 of 3" in out  # negative, unreadable or odd counts start again at the first hint
    else:
        one_line_error(code, out, err)


def test_the_exercise_comes_from_the_content_not_only_the_marker(tmp_path, capsys):
    p = tmp_path / "ex1.py"
    p.write_text(REF.replace("# handgrad dojo: exercise 1", "# handgrad dojo: exercise 2", 1))
    assert "# handgrad dojo: exercise 2" in p.read_text()
    code, out, err = run([str(p)], capsys)
    assert code == 0, out + err
    assert "says exercise 2, but its content is exercise 1's" in out and "26 of 26 right" in out
    bare = tmp_path / "bare.py"
    bare.write_text(REF.replace("# handgrad dojo: exercise 1\n", "", 1))
    code, out, err = run([str(bare)], capsys)
    assert code == 0 and "by its content it is exercise 1" in out, out + err


def test_autograd_in_the_graded_region_is_flagged_on_its_line_and_strict_fails_the_row(tmp_path):
    p = tmp_path / "cheat.py"
    p.write_text(inject(REF, """
        lp_ = logprobs.detach().clone().requires_grad_(True)
        (-lp_[range(n), Yb].mean()).backward()
        dlogprobs = lp_.grad
    """).replace("dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1.0 / n\n", ""))
    g = dojo.grade_file(p)
    row = next(r for r in g.rows if r.name == "dlogprobs")
    assert row.ok and "dlogprobs comes from autograd, not from your code" in row.note, g.table()
    assert {f.line for f in g.flags if f.kind == "autograd"} == {49, 50, 51}
    assert classroom.entry(g).status == "flagged"
    strict = dojo.grade_file(p, strict=True)
    row = next(r for r in strict.rows if r.name == "dlogprobs")
    assert row.status == "wrong" and "strict mode fails it" in row.diagnosis
    assert strict.exit_code == 1


@pytest.mark.parametrize("hidden", [
    'lp_ = logprobs.detach().clone()\nsetattr(lp_, "requires" + "_grad", True)\n'
    'dlogprobs = getattr(getattr(torch, "auto" + "grad"), "grad")((-lp_[range(n), Yb].mean(),), (lp_,))[0]',
    'exec("lp_ = logprobs.detach().clone().requires_grad_()\\n"\n'
    '     "dlogprobs = torch.autograd.grad((-lp_[range(n), Yb].mean(),), (lp_,))[0]")',
], ids=["getattr", "exec"])
def test_autograd_hidden_from_the_reading_is_noted_and_strict_mode_fails_it(tmp_path, hidden):
    """Code the grader cannot read (names built from text, exec) is noted on its line; strict mode fails
    the row it makes, and the reference, which reads plainly, stays right in strict mode."""
    p = tmp_path / "hidden.py"
    p.write_text(inject(REF, hidden)
                 .replace("dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[range(n), Yb] = -1.0 / n\n", ""))
    g = dojo.grade_file(p)
    assert any(S.opaque(f) and 49 <= f.line <= 51 for f in g.flags), g.flags
    strict = dojo.grade_file(p, strict=True)
    row = next(r for r in strict.rows if r.name == "dlogprobs")
    assert not row.ok and strict.exit_code == 1, strict.table()
    ref = tmp_path / "ref.py"
    ref.write_text(REF)
    assert dojo.grade_file(ref, strict=True).exit_code == 0


def test_a_class_with_a_crash_a_loop_and_an_attack_grades_every_other_file(tmp_path, capsys):
    d = tmp_path / "class"
    d.mkdir()
    (d / "a_right.py").write_text(REF)
    (d / "b_wrong.py").write_text(REF.replace("dh = dlogits @ W2.T", "dh = dlogits @ W2"))
    (d / "c_crash.py").write_text(inject(TEMPLATE, "import os\nos._exit(3)"))
    (d / "d_loop.py").write_text(inject(TEMPLATE, "while True:\n    pass"))
    (d / "e_kill.py").write_text(inject(TEMPLATE, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"))
    (d / "f_notes.txt").write_text("not graded")
    (d / "g_right.py").write_text(REF)
    code, out, err = run([str(d), "--time-limit", "2", "--csv", str(tmp_path / "c.csv"), "--html",
                          str(tmp_path / "c.html"), "--sandbox", "basic"], capsys)
    assert code == 1 and "Traceback" not in out + err, out + err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "c.csv").read_text())))
    status = {os.path.basename(r["file"]): r["status"] for r in rows}
    assert status == {"a_right.py": "all right", "b_wrong.py": "wrong", "c_crash.py": "cannot grade",
                      "d_loop.py": "cannot grade", "e_kill.py": "cannot grade", "g_right.py": "all right"}
    first = {os.path.basename(r["file"]): r["first_mistake"] for r in rows}
    assert "exited with code 3" in first["c_crash.py"] and "time limit" in first["d_loop.py"]
    assert "killed by SIGKILL" in first["e_kill.py"] and first["b_wrong.py"].startswith("dh:")
    assert "6 submissions: 2 all right, 1 wrong, 3 cannot grade" in out
    assert "1 dh: 1 of 3 wrong" in out
    page = (tmp_path / "c.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "b_wrong.py" in page
    code, out, err = run([str(d / "a_right.py"), str(d / "g_right.py"), "--json", "--sandbox", "basic"], capsys)
    got = json.loads(out)
    assert code == 0 and [s["status"] for s in got["submissions"]] == ["all right", "all right"]


def test_what_a_class_writes_is_escaped_for_each_reader():
    g = report.Grade("=cmd|' /C calc'!A0\x1b[2J.py", "1", problem="\x1b]0;title\x07 line\r\nfake")
    text = classroom.table([g])
    assert "\x1b" not in text and "\r" not in text and "\\x1b" in text
    row = next(csv.reader(io.StringIO(classroom.to_csv([g]).splitlines()[1])))
    assert row[0].startswith("'=") and "\x1b" not in row[0]
    page = classroom.to_html([g])
    assert "\x1b" not in page and "<script" not in page
    g2 = report.Grade("<img src=x onerror=alert(1)>.py", "1", problem="<script>alert(1)</script>")
    page = classroom.to_html([g2])
    assert "<script>" not in page and "<img" not in page and "&lt;script&gt;" in page


def test_safe_text_shows_every_control_and_invisible_character():
    assert report.safe_text("a\x1b[31mb\x07\r\n\t\u202e\u200b\x9b") == "a\\x1b[31mb\\x07\\r\\n\\t\\u202e\\u200b\\x9b"
    assert report.safe_text("x" * 50, 10) == "x" * 9 + "\u2026"
    assert report.safe_text("plain dprobs: ü") == "plain dprobs: ü"


def test_the_channel_refuses_what_breaks_its_rules():
    r, w = os.pipe()
    try:
        channel.send(w, {"ok": True, "x": math.nan}, {"t": torch.arange(4.0)})
        head, ts = channel.Reader(r).read()
        assert head["ok"] and math.isnan(head["x"]) and torch.equal(ts["t"], torch.arange(4.0))
        os.write(w, b"EVIL" + b"\0" * 12)
        with pytest.raises(channel.ChannelError, match="does not start"):
            channel.Reader(r).read()
        os.write(w, channel.HEAD.pack(channel.MAGIC, channel.MAX_HEADER + 1, 0))
        with pytest.raises(channel.ChannelError, match="more than"):
            channel.Reader(r).read()
        os.write(w, channel.HEAD.pack(channel.MAGIC, 0, channel.MAX_TENSORS + 1))
        with pytest.raises(channel.ChannelError, match="tensors"):
            channel.Reader(r).read()
        os.write(w, channel.HEAD.pack(channel.MAGIC, 3, 0) + b"[1]")
        with pytest.raises(channel.ChannelError, match="JSON object"):
            channel.Reader(r).read()
        os.write(w, channel.HEAD.pack(channel.MAGIC, 2, 5) + b"{}" + b"junk!")
        with pytest.raises(channel.ChannelError, match="safetensors"):
            channel.Reader(r).read()
    finally:
        os.close(r)
        os.close(w)


def test_a_reply_is_data_checked_against_what_was_asked():
    with pytest.raises(trust.ReplyError, match="did not ask"):
        trust.tensors({"p|other": torch.zeros(2)}, {"p|dW"})
    with pytest.raises(trust.ReplyError, match="refuses"):
        trust.tensors({"p|dW": torch.zeros(2, dtype=torch.int64)}, {"p|dW"})
    lines = trust.Lines("a = 1\nb = 2\n")
    got = trust.info({"status": "error", "line": 99, "msg": "\x1b[2J" + "x" * 999, "code": "forged"}, lines)
    assert got["line"] is None and got["code"] == "" and len(got["msg"]) <= trust.MSG and "\x1b" not in got["msg"]
    got = trust.info({"status": "verdict-all-right", "line": 2}, lines)
    assert got["status"] == "error" and got["code"] == "b = 2"


def test_require_refuses_to_grade_without_bubblewrap_and_auto_says_what_is_not_isolated(tmp_path):
    p = tmp_path / "ex1.py"
    p.write_text(REF)
    env = {**os.environ, "HANDGRAD_BWRAP": str(tmp_path / "no-bwrap")}
    r = subprocess.run([sys.executable, "-m", "handgrad.cli", "dojo", "grade", str(p), "--sandbox", "require"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "--sandbox require" in r.stderr and "bubblewrap" in r.stderr
    env["HANDGRAD_DOJO_SANDBOX"] = "auto"
    r = subprocess.run([sys.executable, "-m", "handgrad.cli", "dojo", "grade", str(p)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (warning,) = r.stderr.splitlines()
    assert "warning: no bubblewrap" in warning and "rlimits" in warning and "26 of 26 right" in r.stdout


def test_each_row_from_the_graders_own_autograd_helper_is_flagged_and_strict_fails_them_all(tmp_path):
    rows = [(r.name, r.key) for r in dojo.api.get("1").rows]
    lines = REF.splitlines()
    a = next(i for i, ln in enumerate(lines) if ln.startswith("# >>>")) + 1
    b = next(i for i, ln in enumerate(lines) if ln.startswith("# <<<"))
    region = ["g_ = lecture_gradients(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)"]
    region += [f"{name} = g_['{key}']" for name, key in rows]
    text = "\n".join(lines[:a] + region + lines[b:]) + "\n"
    p = tmp_path / "helper.py"
    p.write_text(text.replace("import lecture_setup", "import lecture_gradients, lecture_setup"))
    g = dojo.grade_file(p)  # autograd's values for the true upstream gradient only: wrong on a random one
    assert any("the grader's own autograd helper" in f.what and f.line == a + 1 for f in g.flags)
    first = g.rows[0]
    assert first.name == "dlogprobs" and first.ok, g.table()
    assert "dlogprobs comes from autograd, not from your code (line 50: uses a value from line 49" in first.note
    assert all(not r.ok for r in g.rows[1:]), g.table()
    strict = dojo.grade_file(p, strict=True)
    assert strict.right == 0 and "strict mode fails it" in strict.rows[0].diagnosis, strict.table()
