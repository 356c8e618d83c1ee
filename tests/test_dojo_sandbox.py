"""The dojo's sandbox against a hostile class (tests/dojo_hostile.py), under bubblewrap: each attack is
graded as what it is (wrong, flagged, or cannot be graded, in its own row), nothing outside the sandbox
changes (the class's folder and the installed package hashed before and after), no process of a
submission survives, and the grader's exit code and output are its own. One command grades the whole
class, as a teacher would; the tests read its JSON and its table.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import handgrad
from dojo_hostile import ATTACKS, FAKE, MARK, SECRET, write_class
from handgrad.dojo import sandbox

WHY = sandbox.bwrap_problem()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"{WHY}: install bubblewrap (apt-get install bubblewrap)")
PACKAGE = Path(handgrad.__file__).resolve().parent
OWNED = ("/tmp/handgrad-owned", os.path.expanduser("~/handgrad-owned"))


def tree_hash(*roots: Path) -> dict[str, str]:
    """Every file under the roots (the package's caches left out: Python may write them) -> its sha256."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def survivors() -> list[str]:
    """The processes on this machine whose command line holds the hostile class's mark."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if MARK.encode() in f.read():
                        out.append(d)
            except OSError:
                continue
    return out


def grade(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HANDGRAD_DOJO_SANDBOX": "require"}
    return subprocess.run([sys.executable, "-m", "handgrad.cli", "dojo", "grade", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    d = tmp_path_factory.mktemp("class")
    write_class(d / "class")
    for p in OWNED:
        if os.path.exists(p):
            os.unlink(p)
    before = tree_hash(d, PACKAGE)
    r = grade(["class", "--time-limit", "5", "--json"], d)
    after = tree_hash(d, PACKAGE)
    by = {Path(s["file"]).stem: s for s in json.loads(r.stdout)["submissions"]}
    return {"run": r, "before": before, "after": after, "by": by, "dir": d}


@pytest.mark.slow
def test_the_whole_hostile_class_is_graded_in_one_command_and_its_output_is_the_graders(graded):
    r, by = graded["run"], graded["by"]
    assert r.returncode == 1, r.stderr
    assert set(by) == {*ATTACKS, "classmate"}
    assert r.stderr == "" and "Traceback" not in r.stdout
    assert all(s["sandbox"] == "bwrap" for s in by.values())
    assert by["classmate"]["status"] == "all right", by["classmate"]
    assert all(s["status"] != "all right" for k, s in by.items() if k != "classmate"), by


@pytest.mark.slow
def test_nothing_outside_the_sandbox_changes_and_no_process_survives(graded):
    assert graded["after"] == graded["before"]
    assert not any(os.path.exists(p) for p in OWNED)
    assert survivors() == []


@pytest.mark.slow
@pytest.mark.parametrize("name,status,said", [
    ("forge_proc_fd", "wrong", "reaches outside"),
    ("forge_channel", "cannot grade", "channel"),
    ("forge_frames", "wrong", "frames"),
    ("escapes", "wrong", ""),
    ("autograd", "flagged", "autograd"),
    ("helper", "wrong", "the dojo's own code"),
    ("write_outside", "wrong", "opens a file"),
    ("fill_disk", "wrong", "opens a file"),
    ("stop_grader", "wrong", "os.kill"),
    ("setsid_grandchild", "cannot grade", "time limit"),
    ("network", "wrong", "socket"),
    ("memory", "wrong", ""),
    ("leak", "wrong", "opens a file"),
    ("exit", "cannot grade", "exit()"),
])
def test_each_attack_is_graded_as_what_it_is(graded, name, status, said):
    s = graded["by"][name]
    assert s["status"] == status, s
    whats = " ".join(f["what"] for f in s["grade"]["flags"]) + " ".join(s["grade"]["events"])
    assert said in s["first"] + whats, s
    assert FAKE not in json.dumps(s["grade"]["rows"]), s  # no forged verdict among its rows
    assert SECRET not in json.dumps(s), s


@pytest.mark.slow
def test_the_table_shows_learners_text_escaped_and_nothing_forged(graded):
    d = graded["dir"]
    r = grade(["class/escapes.py", "class/forge_proc_fd.py", "class/forge_channel.py", "--time-limit", "5"], d)
    assert r.returncode == 1, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "\r" not in r.stdout and "\u202e" not in r.stdout
    lines = r.stdout.splitlines()
    assert not any(ln.startswith(FAKE) for ln in lines)  # the forged line never reached the grader's output
    one = grade(["class/escapes.py", "--time-limit", "5"], d)
    assert one.returncode == 1 and "\x1b" not in one.stdout and "0 of 26 right" in one.stdout
    assert "\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07" in one.stdout  # the learner's message is there, escaped


@pytest.mark.slow
def test_a_grandchild_in_its_own_session_is_killed_at_the_time_limit(tmp_path):
    from handgrad import dojo

    paths = write_class(tmp_path, ["setsid_grandchild"])
    g = dojo.grade_file(paths["setsid_grandchild"], time_limit=2.0, sandbox="require")
    assert "still running" in g.problem and g.sandbox == "bwrap", g.problem  # its own alarm, or killed
    assert survivors() == []


@pytest.mark.slow
def test_more_processes_than_the_limit_are_all_killed_even_as_root(tmp_path):
    from dojo_hostile import inject
    from handgrad import dojo

    p = tmp_path / "many.py"
    p.write_text(inject(dojo.api.render(dojo.api.get("1")), f"""
        import os, time
        for _ in range(300):
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{MARK}"])
        time.sleep(60)
    """))
    g = dojo.grade_file(p, time_limit=30.0, sandbox="require")
    assert g.problem == "your file ended the grader's process: it was killed: it started more than 64 processes", g.problem
    assert survivors() == []
