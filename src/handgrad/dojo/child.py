"""The grader's side of the child process that runs one learner's file (runner.py is the child's side).
The child only computes: requests and replies are frames on the channel (channel.py: JSON and
safetensors, sizes checked), and the grader checks every reply again before it uses a byte of it.

Under bubblewrap (sandbox.py) one sandbox is started per grading session, holding the zygote
(zygote.py), which has imported torch once and forks each file's child inside the sandbox (its
standard input, output and error /dev/null, its only other descriptors the channel's two pipes, passed
in over the zygote's control socket); after each file the zygote kills every process in the sandbox
but itself and empties its /tmp, and a zygote that does not answer has the whole sandbox killed and a
new one started. The basic child is forked from the grader (which has imported torch already: a new
interpreter spends 2-4 s importing it again) into a new session and a private temporary directory, and
what it leaves behind is swept up by the grader as its subreaper.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from handgrad.dojo import channel
from handgrad.dojo import sandbox as SB

if TYPE_CHECKING:  # torch is imported by whoever sends or reads tensors, not by importing this
    from torch import Tensor

SLACK = 10.0  # seconds a reply may take beyond the learner's time limit (the child's own work)
START_SLACK = 60.0  # and, for a new interpreter, its start (importing torch: 3-6 s on a busy machine)


class Zygote:
    """One bubblewrap sandbox and the zygote in it (zygote.py), asked over its control socket to fork a
    file's child (`fork`) and, after the file, to kill all it left (`end`). `dead` once it failed to
    answer: it is killed, and `zygote_for` starts a new one."""

    def __init__(self, box: SB.Sandbox):
        self.box, self.dead, self.why = box, False, ""
        self.ctl, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._info_r, info_w = os.pipe()
        argv = [SB.bwrap_binary(), *SB.bwrap_args(box.limits, info_w),
                "--setenv", "PYTHONPATH", SB.python_path(),
                "--setenv", "HANDGRAD_DOJO_CTL", str(inner.fileno()),
                "--setenv", "HANDGRAD_DOJO_BINDS", os.pathsep.join(SB.tmp_binds()),
                "--", sys.executable, "-s", "-m", "handgrad.dojo.zygote"]
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(inner.fileno(), info_w), start_new_session=True,
            )
        finally:
            inner.close()
            os.close(info_w)
        self.init, self.ready = 0, False  # ready: the zygote has said so (it imports torch first)

    def _wait_ready(self) -> bool:
        """Wait for the zygote's first word, once: a sandbox started early (handgrad.__main__) imports
        torch while the grader does."""
        if not self.ready and not self.dead:
            self.ready = bool((self._answer(START_SLACK) or {}).get("ready"))
            if not self.ready:
                self.kill()
        return self.ready

    def _answer(self, wait: float) -> dict | None:
        try:
            ready, _, _ = select.select([self.ctl], [], [], wait)
            data = self.ctl.recv(1 << 16) if ready else b""
            out = json.loads(data) if data else None
        except (OSError, ValueError):
            out = None
        return out if isinstance(out, dict) else None

    def fork(self, r: int, w: int, time_limit: float) -> int:
        """The child's pid in the sandbox, 0 when the zygote does not answer (it is killed)."""
        if not self._wait_ready():
            return 0
        try:
            socket.send_fds(self.ctl, [json.dumps({"op": "fork", "time_limit": time_limit}).encode()], [r, w])
        except OSError:
            self.kill()
            return 0
        pid = (self._answer(SLACK) or {}).get("pid")
        if not isinstance(pid, int) or pid <= 1:
            self.kill()
            return 0
        return pid

    def end(self, pid: int) -> int | None:
        """Kill everything the file's child left in the sandbox; its exit status (None: not known). A
        zygote that does not answer, or cannot leave the sandbox empty, is killed with its sandbox."""
        if self.dead:
            return None
        try:
            self.ctl.sendall(json.dumps({"op": "end", "pid": pid}).encode())
        except OSError:
            self.kill()
            return None
        rep = self._answer(SLACK)
        if rep is None or rep.get("clean") is not True:
            self.kill()
        self.why = rep.get("why") if rep and isinstance(rep.get("why"), str) else ""
        status = rep.get("status") if rep else None
        return status if isinstance(status, int) else None

    def _sandbox_init(self) -> int:
        """The host pid of the first process in bwrap's PID namespace (killing it ends the namespace)."""
        if not self.init and self._info_r >= 0:
            os.set_blocking(self._info_r, False)
            try:
                pid = json.loads(os.read(self._info_r, 4096).decode()).get("child-pid", 0)
                self.init = pid if isinstance(pid, int) and pid > 1 else 0
            except (OSError, ValueError, AttributeError):
                pass
        return self.init

    def kill(self) -> None:
        """The whole sandbox, every process in it."""
        self.dead = True
        init = self._sandbox_init()
        if init:
            _signal(init, signal.SIGKILL, group=False)
        _signal(self.proc.pid, signal.SIGKILL, group=True)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self) -> None:
        self.dead = True
        try:
            self.ctl.close()
        except OSError:
            pass
        if self._info_r >= 0:
            os.close(self._info_r)
            self._info_r = -1
        if self.proc.poll() is None and not self.ready:  # never used: still starting, nothing to end
            _signal(self.proc.pid, signal.SIGKILL, group=True)
        if self.proc.poll() is None:
            try:
                self.proc.wait(5.0)  # the zygote ends when its control socket closes
            except subprocess.TimeoutExpired:
                _signal(self.proc.pid, signal.SIGKILL, group=True)
                self.proc.wait()


_ZYGOTES: dict[SB.Limits, Zygote] = {}
ZYGOTE_WHYS = (f"it started more than {SB.Limits().processes} processes",)  # what a zygote may say


def zygote_for(box: SB.Sandbox) -> Zygote:
    """The running sandbox for these limits, or a new one (the first file pays for its start)."""
    z = _ZYGOTES.get(box.limits)
    if z is None or z.dead:
        z = _ZYGOTES[box.limits] = Zygote(box)
    return z


@atexit.register
def close_zygotes() -> None:
    """End every sandbox this process started (bwrap's --die-with-parent would, too)."""
    for z in list(_ZYGOTES.values()):
        z.close()
    _ZYGOTES.clear()


class Child:
    """One child process for one learner's file: `request(dict, time_limit, tensors)` -> (reply,
    tensors), then `close()`. `events` says what the grader did to it (killed at the time limit, ...)."""

    def __init__(self, box: SB.Sandbox | None = None, time_limit: float = 20.0):
        self.box = box or SB.Sandbox("basic")
        self.events: list[str] = []
        self.alive = True
        self._gone = ""
        self.pid = 0
        self.zygote: Zygote | None = None
        self.spawned = False
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
        for _ in range(2):  # a sandbox that a previous file broke is replaced once
            self.zygote = zygote_for(self.box)
            self.pid = self.zygote.fork(req_r, rep_w, time_limit)
            if self.pid:
                return
        self.alive = False
        self._gone = "the sandbox (bubblewrap) did not start a process for this file"
        self.events.append("the sandbox did not start")

    def _start_basic(self, req_r: int, rep_w: int, time_limit: float) -> None:
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
        why = self.zygote.why if self.zygote is not None else ""
        if why in ZYGOTE_WHYS:
            how = f"was killed: {why}"
        elif code is None:
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
        """The child's exit status once it has ended (None: still running after `wait` s, or not known).
        In the sandbox the zygote reaps it, after killing all it left."""
        if not self.pid:
            return None
        if self.zygote is not None:
            self._eof(wait)
            pid, self.pid = self.pid, 0
            return self.zygote.end(pid)
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

    def _eof(self, wait: float) -> None:
        """Wait up to `wait` s for the child to close its end of the channel (it has ended)."""
        deadline = time.monotonic() + wait
        while self._rep_r >= 0 and time.monotonic() < deadline:
            ready, _, _ = select.select([self._rep_r], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return
            try:
                if not os.read(self._rep_r, 1 << 16):
                    return
            except OSError:
                return

    def _kill(self) -> None:
        """Kill the child and everything it started: in the sandbox, the zygote kills all but itself (or
        the whole sandbox goes); basic, the child's session and the processes it left to this process
        (the subreaper)."""
        self.alive = False
        if self.zygote is not None:
            if self.pid:
                pid, self.pid = self.pid, 0
                self.zygote.end(pid)
            return
        if self.pid:
            _signal(self.pid, signal.SIGKILL, group=True)
            self._reap(5.0)
        SB.sweep(self._keep)

    def close(self) -> None:
        if self.alive:
            try:
                channel.send(self._req_w, {"op": "quit"})
            except OSError:
                pass
            if self.zygote is not None:
                self._eof(2.0)
            else:
                self._reap(2.0)
            self._kill()
        elif self.zygote is None:
            SB.sweep(self._keep)
        for fd in (self._req_w, self._rep_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._req_w = self._rep_r = -1
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
