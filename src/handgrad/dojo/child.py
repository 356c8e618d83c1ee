"""The grader's side of the child process that runs a learner's file (runner.py serves it). Where the
platform can fork, the child is forked from the grader (which has imported torch already: a fresh
interpreter would spend 2-3 s importing it again); otherwise, or with HANDGRAD_DOJO_SPAWN=exec, it is a
new `python -m handgrad.dojo.runner`. Requests and replies are JSON lines over two pipes; tensors travel
in safetensors files the grader names. A child that outlives its time limit is killed with its process
group.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLACK = 10.0  # seconds a reply may take beyond the learner's time limit (the child's own work)
START_SLACK = 30.0  # and, for a new interpreter, its start (importing torch)


def _fork_ok() -> bool:
    return hasattr(os, "fork") and os.environ.get("HANDGRAD_DOJO_SPAWN", "fork") != "exec"


class Child:
    """One child process for one learner's file: `request(dict) -> dict`, then `close()`."""

    def __init__(self):
        self.err = tempfile.TemporaryFile()
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.spawned = not _fork_ok()
        self._buf = b""
        if not self.spawned:
            pid = os.fork()
            if pid == 0:  # the child: never returns into the grader's code
                code = 0
                try:
                    os.setpgid(0, 0)  # its own process group: killed with everything it started
                    os.close(self._req_w)
                    os.close(self._rep_r)
                    devnull = os.open(os.devnull, os.O_RDWR)
                    os.dup2(devnull, 0)
                    os.dup2(devnull, 1)
                    os.dup2(self.err.fileno(), 2)
                    from handgrad.dojo import runner

                    runner.serve(req_r, rep_w)
                except BaseException:  # noqa: BLE001  nothing of the child may reach the grader's code
                    code = 70
                finally:
                    os._exit(code)
            self.pid = pid
        else:
            env = dict(os.environ)
            src = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env["OMP_NUM_THREADS"] = "1"
            env["HANDGRAD_DOJO_REPLY_FD"] = str(rep_w)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "handgrad.dojo.runner"],
                stdin=req_r,
                stdout=subprocess.DEVNULL,
                stderr=self.err,
                pass_fds=(rep_w,),
                env=env,
                start_new_session=True,
            )
            self.pid = self.proc.pid
        os.close(req_r)
        os.close(rep_w)
        self.alive = True

    def request(self, req: dict, time_limit: float) -> dict:
        """Send one request; its reply, or {"ok": False, "problem": ...} when the child is out of time or
        gone (then it is killed and every later request gets the same answer)."""
        if not self.alive:
            return {"ok": False, "problem": self._gone}
        req = {**req, "time_limit": time_limit}
        try:
            os.write(self._req_w, (json.dumps(req) + "\n").encode())
        except OSError:
            return self._died()
        wait = time_limit + SLACK + (START_SLACK if self.spawned else 0.0)
        deadline = time.monotonic() + wait
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                self._gone = f"still running after {time_limit:g} s (an infinite loop?)"
                return {"ok": False, "problem": self._gone}
            ready, _, _ = select.select([self._rep_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._rep_r, 1 << 16)
            if not chunk:
                return self._died()
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._kill()
            self._gone = "the grader's process gave no readable reply (did your file write to its pipes?)"
            return {"ok": False, "problem": self._gone}
        return reply

    def _died(self) -> dict:
        code = self._reap(5.0)
        self.err.seek(0)
        tail = [ln for ln in self.err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        last = tail[-1].strip()[:200] if tail else "no output"
        self._gone = f"your file ended the grader's process (exit {code}): {last}"
        self._kill()
        return {"ok": False, "problem": self._gone}

    def _reap(self, wait: float) -> int | None:
        if self.proc is not None:
            try:
                return self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        return None

    def _kill(self) -> None:
        self.alive = False
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._reap(5.0)

    def close(self) -> None:
        if self.alive:
            try:
                os.write(self._req_w, b'{"op": "quit"}\n')
            except OSError:
                pass
            if self._reap(2.0) is None and (self.pid or self.proc):
                self._kill()
            self.alive = False
        for fd in (self._req_w, self._rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.err.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
