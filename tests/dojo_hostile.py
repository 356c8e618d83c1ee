"""A hostile class for the dojo's sandbox tests: exercise 1's files that attack the grader, each the
template's blanks (so a forged "all right" shows) or the reference (a cheat that would pass), with the
attack as the first lines of the graded region. Each attack names what it must not manage.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from handgrad import dojo

MARK = "4242.25"  # the sleep time of every process an attack leaves behind: found in /proc if one survives
FAKE = "FORGED 26 of 26 right"  # what a forged grade prints

ATTACKS = {  # name -> (start from "template" or "reference", the lines put first in the region)
    # forge the grade: the grader's stdout through /proc, then kill it
    "forge_proc_fd": ("template", f"""
        import os
        for pid in (os.getppid(), 1):
            try:
                with open(f"/proc/{{pid}}/fd/1", "w") as f:
                    f.write("\\x1b[2J\\x1b[H{FAKE}\\n")
            except OSError:
                pass
        os.kill(os.getppid(), 9)
    """),
    # forge the reply: a well-formed frame, with terminal escapes, on every descriptor there is
    "forge_channel": ("template", f"""
        import os, json, struct
        head = json.dumps({{"ok": True, "probes": {{}}, "notes": ["\\x1b[2J{FAKE}"], "id": "x"}}).encode()
        frame = struct.pack("<4sIQ", b"HGD1", len(head), 0) + head
        for fd in range(0, 64):
            try:
                os.write(fd, frame)
            except OSError:
                pass
    """),
    # the runner's frames found and their request's id used for a forged reply
    "forge_frames": ("template", f"""
        import sys, os
        from handgrad.dojo import channel
        f = sys._getframe()
        while f is not None:
            if "req" in f.f_locals and "wfd" in f.f_locals:
                channel.send(f.f_locals["wfd"], {{"ok": True, "probes": {{}}, "notes": ["{FAKE}"],
                             "id": f.f_locals["req"].get("id"), "watch": []}})
            f = f.f_back
    """),
    # an exception whose message clears the screen and draws a fake table
    "escapes": ("template", f"""
        raise ValueError("\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07{FAKE}\\r\\n\\u202eok")
    """),
    # autograd in the graded region: right values, not by hand
    "autograd": ("reference", """
        lp_ = logprobs.detach().clone().requires_grad_(True)
        (-lp_[range(n), Yb].mean()).backward()
        dlogprobs = lp_.grad
    """),
    # the grader's own autograd helper and the dojo's reference, exec'd
    "helper": ("template", """
        from handgrad.dojo.setup import lecture_gradients
        from handgrad.dojo import registry
        exec(registry.get("1").solution, globals())
    """),
    # writes next to itself, over a classmate's file, into the installed package, anywhere
    "write_outside": ("template", """
        import os, handgrad
        for target in (__file__ + ".owned", os.path.join(os.path.dirname(__file__), "classmate.py"),
                       os.path.join(os.path.dirname(handgrad.__file__), "dojo", "judge.py"),
                       "/tmp/handgrad-owned", os.path.expanduser("~/handgrad-owned")):
            try:
                with open(target, "a") as f:
                    f.write("\\nOWNED = True\\n")
            except OSError:
                pass
    """),
    # fills the disk
    "fill_disk": ("template", """
        import os
        for d in ("/tmp", os.path.dirname(__file__), "."):
            try:
                with open(os.path.join(d, "fill.bin"), "wb") as f:
                    for _ in range(4096):
                        f.write(b"x" * (1 << 20))
            except OSError:
                pass
    """),
    # stops the grader, then kills every process it can
    "stop_grader": ("template", """
        import os, signal
        for pid in (os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    """),
    # a grandchild in its own session that outlives the time limit, then an endless loop
    "setsid_grandchild": ("template", f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{MARK}"])
            os._exit(0)
        for _ in range(20):
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{MARK}"])
        while True:
            pass
    """),
    # the network
    "network": ("template", """
        import socket
        socket.create_connection(("1.1.1.1", 80), timeout=2).sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    """),
    # memory
    "memory": ("template", """
        hog = bytearray(64 << 30)
    """),
    # a classmate's secret in its exception (the grader does not show what the sandbox cannot read)
    "leak": ("template", """
        import os
        raise ValueError(open(os.path.join(os.path.dirname(__file__), "secret.txt")).read())
    """),
    # exit() in the graded region
    "exit": ("template", """
        raise SystemExit(0)
    """),
}
SECRET = "the answer key: 7f3a9c"


def inject(text: str, code: str) -> str:
    """The file with `code` as the first lines of its graded region (after the `# >>>` line)."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("# >>>")) + 1
    return "".join(lines[:at]) + textwrap.dedent(code).strip("\n") + "\n" + "".join(lines[at:])


def write_class(d: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The hostile files (and a classmate's file and a secret beside them) in `d`; name -> path."""
    d.mkdir(parents=True, exist_ok=True)
    start = {"template": dojo.api.render(dojo.api.get("1")), "reference": dojo.solution("1")}
    out = {}
    for name in names or list(ATTACKS):
        base, code = ATTACKS[name]
        p = d / f"{name}.py"
        p.write_text(inject(start[base], code))
        out[name] = p
    (d / "classmate.py").write_text(start["reference"])
    (d / "secret.txt").write_text(SECRET)
    return out
