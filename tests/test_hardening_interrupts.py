"""Ctrl-C at any moment of start-up: the `handgrad` command (the console script pyproject.toml
declares, and `python -m handgrad`) exits with one line and code 130, never a KeyboardInterrupt
traceback, for `train` and `sample` alike.

The moments are events seen from outside, not fixed delays (which land in different phases on a
loaded machine): in /proc/PID/maps, the first extension module of the CLI's imports and torch's own
libraries being mapped (deep inside `import torch`), a second after that; and the command at work
(train's run directory made, sample's first name printed), where the CLI's own handlers answer.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handgrad.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/PID/maps")]


def _console_script(tmp: Path) -> Path:
    """The wrapper pip writes for pyproject's `handgrad = "MODULE:FUNC"` (so the test follows what
    pyproject declares, not what an older install left in the venv)."""
    text = (ROOT / "pyproject.toml").read_text()
    module, func = re.search(r'^handgrad\s*=\s*"([\w.]+):(\w+)"', text, re.M).groups()
    script = tmp / "handgrad"
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\nif __name__ == '__main__':\n"
                      f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({func}())\n")
    return script


def _as_a_terminal_starts_it() -> None:
    """A command typed at a terminal starts with SIGINT at its default, whatever this test runner
    inherited (a runner started in the background of a script inherits SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _mapped(pid: int, pattern: str) -> bool:
    try:
        return re.search(pattern, Path(f"/proc/{pid}/maps").read_text()) is not None
    except OSError:
        return False


def _working(pid: int, cwd: Path) -> bool:
    return (cwd / "run").exists() or (cwd / "stdout").stat().st_size > 0


MOMENTS = {  # name -> (the event to wait for, then seconds more)
    "first-extension-module": (lambda pid, cwd: _mapped(pid, r"lib-dynload/|site-packages/"), 0.0),
    "torch-libraries-loading": (lambda pid, cwd: _mapped(pid, r"libtorch|libc10"), 0.0),
    "torch+1s": (lambda pid, cwd: _mapped(pid, r"libtorch|libc10"), 1.0),
    "at-work": (_working, 0.0),
}


def _interrupt(cmd: list[str], moment: str, cwd: Path) -> tuple[int | None, str, bool]:
    """Start `cmd` in `cwd`, send SIGINT at `moment`; (exit code, stderr, whether it had already exited)."""
    event, extra = MOMENTS[moment]
    with open(cwd / "stdout", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": SRC}, stdout=stdout,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_as_a_terminal_starts_it)
    t0 = time.monotonic()
    while not event(proc.pid, cwd) and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.002)
    time.sleep(extra)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{moment}: still running 60 s after SIGINT")
    return proc.returncode, err, finished


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    assert main(["train", "--steps", "20", "--n-hidden", "8", "--engine", "eager", "--quiet", "--samples", "0",
                 "--chunk-steps", "10", "--out", str(out)]) == 0
    return out


COMMANDS = {
    "train": lambda tmp, ckpt: ["train", "--steps", "1000000", "--n-hidden", "8", "--engine", "eager", "--quiet",
                                "--samples", "0", "--out", str(tmp / "run")],
    "sample": lambda tmp, ckpt: ["sample", "--checkpoint", str(ckpt), "-n", "50000", "--seed", "1"],
}


def _check(rc, err, finished, what):
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, f"{what}:\n{err}"
    if finished:  # it was done before this moment came: nothing to interrupt
        assert rc == 0, f"{what}: exit {rc}\n{err}"
        return
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1 and "interrupted" in lines[0], f"{what}: exit {rc}\n{err}"


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(command, moment, tmp_path, checkpoint):
    script = _console_script(tmp_path)
    rc, err, finished = _interrupt([sys.executable, str(script), *COMMANDS[command](tmp_path, checkpoint)],
                                   moment, tmp_path)
    _check(rc, err, finished, f"handgrad {command}, SIGINT at {moment}")
    if moment in ("first-extension-module", "torch-libraries-loading"):  # surely still importing
        assert not finished and "while starting" in err
    if moment == "at-work" and not finished:  # the CLI's own handler
        assert "while starting" not in err


def test_ctrl_c_while_python_m_handgrad_imports_torch_is_one_line(tmp_path):
    rc, err, finished = _interrupt([sys.executable, "-m", "handgrad", *COMMANDS["train"](tmp_path, None)],
                                   "torch-libraries-loading", tmp_path)
    _check(rc, err, finished, "python -m handgrad train")
    assert not finished and "while starting" in err


def test_ctrl_c_ignored_by_the_parent_stays_ignored(tmp_path):
    """`nohup handgrad train &` and `handgrad train &` in a script start it with SIGINT ignored:
    the command must not take Ctrl-C back."""
    script = _console_script(tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), "--help"], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    t0 = time.monotonic()
    while not _mapped(proc.pid, r"libtorch|libc10") and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "usage: handgrad" in out and err == ""
