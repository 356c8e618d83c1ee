"""The grader's side of the child process that runs one learner's file (runner.py is the child's side).
The child only computes: requests and replies are frames on the channel (channel.py: JSON and
safetensors, sizes checked), and the grader checks every reply again before it uses a byte of it.

Under bubblewrap (sandbox.py) the child is a new `python -m handgrad.dojo.runner` in the sandbox, its
standard input, output and error /dev/null, its only other descriptors the channel's two pipes; it is
killed with its whole PID namespace. The basic child is forked from the grader (which has imported
torch already: a new interpreter spends 2-4 s importing it again) into a new session and a private
temporary directory, and what it leaves behind is swept up by the grader as its subreaper.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from torch import Tensor

from handgrad.dojo import channel
from handgrad.dojo import sandbox as SB

SLACK = 10.0  # seconds a reply may take beyond the learner's time limit (the child's own work)
START_SLACK = 60.0  # and, for a new interpreter, its start (importing torch: 3-6 s on a busy machine)


class Child:
    """One child process for one learner's file: `request(dict, time_limit, tensors)` -> (reply,
    tensors), then `close()`. `events` says what the grader did to it (killed at the time limit, ...)."""

    def __init__(self, box: SB.Sandbox | None = None, time_limit: float = 20.0):
        self.box = box or SB.Sandbox("basic")
        self.events: list[str] = []
        self.alive = True
        self._gone = ""
        self.pid = 0
        self.proc: subprocess.Popen | None = None
        self._info_r = -1
        self._tmp = ""
        self._keep: set[int] = set()
        self.time_limit = time_limit
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        try:
            if self.box.isolated:
                self._start_bwrap(req_r, rep_w, time_limit)
            else:
                self._start_basic(req_r, rep_w, time_limit)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.reader = channel.Reader(self._rep_r)

    # ------------------------------------------------------------------------ starting
    def _start_bwrap(self, req_r: int, rep_w: int, time_limit: float) -> None:
        self._info_r, info_w = os.pipe()
        argv = [SB.bwrap_binary(), *SB.bwrap_args(self.box.limits, info_w),
                "--setenv", "PYTHONPATH", SB.python_path(),
                "--setenv", "HANDGRAD_DOJO_FDS", f"{req_r},{rep_w}",
                "--", sys.executable, "-s", "-m", "handgrad.dojo.runner"]
        limits = self.box.limits
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(req_r, rep_w, info_w), start_new_session=True,
                preexec_fn=lambda: SB.set_limits(limits, time_limit),
            )
        finally:
            os.close(info_w)
        self.pid = self.proc.pid
        self.spawned = True

    def _start_basic(self, req_r: int, rep_w: int, time_limit: float) -> None:
        self.spawned = False
        self._tmp = tempfile.mkdtemp(prefix="handgrad-dojo-")
        self._keep = SB.children()
        SB.subreaper(True)
        limits, base = self.box.limits, SB.address_space()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the grader's code
            code = 0
            try:
                os.setsid()  # its own session and process group, no controlling terminal
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                keep = {0, 1, 2, req_r, rep_w}
                for fd in _open_fds():
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                os.chdir(self._tmp)
                os.environ.update(TMPDIR=self._tmp, HOME=self._tmp)
                tempfile.tempdir = self._tmp
                SB.set_limits(limits, time_limit, base)
                from handgrad.dojo import runner

                runner.serve(req_r, rep_w)
            except BaseException:  # noqa: BLE001  nothing of the child may reach the grader's code
                code = 70
            finally:
                os._exit(code)
        self.pid = pid

    # ------------------------------------------------------------------------ talking
    def request(self, req: dict, time_limit: float, tensors: dict[str, Tensor] | None = None
                ) -> tuple[dict, dict[str, Tensor]]:
        """Send one request; its reply and tensors, or ({"ok": False, "problem": ...}, {}) when the child
        is out of time, gone or breaks the channel's rules (then it is killed, and every later request
        gets the same answer). The reply must carry the request's own id."""
        if not self.alive:
            return {"ok": False, "problem": self._gone}, {}
        rid = secrets.token_hex(8)
        try:
            channel.send(self._req_w, {**req, "id": rid, "time_limit": time_limit}, tensors)
        except OSError:
            return self._died(), {}
        wait = time_limit + SLACK + (START_SLACK if self.spawned else 0.0)
        self.spawned = False  # the start is paid once
        try:
            reply, out = self.reader.read(time.monotonic() + wait)
        except TimeoutError:
            self._kill()
            self._gone = f"still running after {time_limit:g} s (an infinite loop?)"
            self.events.append(f"killed at the time limit ({time_limit:g} s)")
            return {"ok": False, "problem": self._gone}, {}
        except EOFError:
            return self._died(), {}
        except channel.ChannelError as e:
            return self._refused(str(e)), {}
        if reply.get("id") != rid:
            return self._refused("a reply that does not answer the grader's request"), {}
        return reply, out

    def _refused(self, why: str) -> dict:
        self._kill()
        self._gone = f"the grader's child process sent {why}: the grade stops here (did your file write to " \
                     "the grader's channel?)"
        self.events.append(f"killed: its reply broke the channel's rules ({why})")
        return {"ok": False, "problem": self._gone}

    def _died(self) -> dict:
        code = self._reap(5.0)
        if code is None:
            how = "closed the grader's channel"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if -code == signal.SIGXCPU:
                how += f" (its CPU time limit, {self.box.limits.cpu(self.time_limit):,} s)"
        else:
            how = f"exited with code {code}"
        self._gone = f"your file ended the grader's process: it {how}"
        self.events.append(f"ended: it {how}")
        self._kill()
        return {"ok": False, "problem": self._gone}

    # ------------------------------------------------------------------------ ending
    def _reap(self, wait: float) -> int | None:
        if self.proc is not None:
            try:
                return self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                return None
        if not self.pid:
            return None
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.pid = 0
                return None
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        return None

    def _sandbox_init(self) -> int:
        """The host pid of the first process in bwrap's PID namespace (killing it ends the namespace)."""
        if self._info_r < 0:
            return 0
        os.set_blocking(self._info_r, False)
        try:
            data = os.read(self._info_r, 4096)
        except OSError:
            return 0
        try:
            pid = json.loads(data.decode()).get("child-pid", 0)
        except (ValueError, AttributeError):
            return 0
        return pid if isinstance(pid, int) and pid > 1 else 0

    def _kill(self) -> None:
        """Kill the child and everything it started: bwrap's namespace, or the basic child's session
        and the processes it left to this process (the subreaper)."""
        self.alive = False
        init = self._sandbox_init() if self.proc is not None else 0
        if init:
            _signal(init, signal.SIGKILL, group=False)
        if self.pid:
            _signal(self.pid, signal.SIGKILL, group=True)
            self._reap(5.0)
        if self.proc is None:
            SB.sweep(self._keep)

    def close(self) -> None:
        if self.alive:
            try:
                channel.send(self._req_w, {"op": "quit"})
            except OSError:
                pass
            self._reap(2.0)
            self._kill()
        elif self.proc is None:
            SB.sweep(self._keep)
        for fd in (self._req_w, self._rep_r, self._info_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._req_w = self._rep_r = self._info_r = -1
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        if group:  # the group's leader may be gone while its group lives on
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _open_fds() -> list[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))
