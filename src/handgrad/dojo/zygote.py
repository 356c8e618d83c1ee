"""The process inside bubblewrap that starts each learner's file's child (`python -m handgrad.dojo.zygote`,
started once per grading session by child.Zygote). It imports torch and the runner once, so a file's
child is a fork of it (milliseconds) instead of a new interpreter (2-10 s to import torch again).

It takes two requests on its control socket (a socketpair: one JSON message each):
- {"op": "fork", "time_limit": s}, with the child's two channel pipes as passed descriptors: fork a
  child into a new session and an empty private directory under the sandbox's /tmp, its rlimits set, its
  only descriptors its channel (0-2 are /dev/null), and answer {"pid": ...};
- {"op": "end", "pid": ...}: kill every process in the sandbox but itself and bubblewrap's init (the
  child, and whatever it started: a `setsid` grandchild included, since the PID namespace shows them
  all), reap the child, empty /tmp, and answer {"status": its exit status, "why": ...}.

While a child runs the zygote counts the sandbox's processes every 50 ms, and more than the limit
(a fork bomb; the kernel's RLIMIT_NPROC does not hold root) kills them all ("why" says so).

Nothing of one file's run is left for the next: no process, no file. The zygote makes itself
non-dumpable (its children inherit that), so with no capabilities a child can neither trace it nor open
its descriptors through /proc; a child can only signal it, and then the grader's next request gets no
answer, the grader kills the whole sandbox and starts a new one.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time

PR_SET_DUMPABLE = 4
TMP = "/tmp"
WATCH = 0.05  # seconds between two counts of the processes while a file's child runs


def most_processes() -> int:
    """The most processes a file's child may have running at once (sandbox.Limits.processes): counted
    here, since the kernel does not apply RLIMIT_NPROC to root."""
    from handgrad.dojo import sandbox as SB

    return SB.Limits().processes


def _others() -> list[int]:
    """Every live process in this PID namespace but bubblewrap's init (1) and this one."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in (1, me):
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                out.append(int(d))
    return out


def _reap_all() -> dict[int, int]:
    got = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return got
        if not pid:
            return got
        got[pid] = os.waitstatus_to_exitcode(status)


# the grader's read-only directories under /tmp (sandbox.tmp_binds): kept when /tmp is emptied
BINDS = tuple(p for p in os.environ.get("HANDGRAD_DOJO_BINDS", "").split(os.pathsep) if p)


def _holds_bind(path: str) -> bool:
    return any(b == path or b.startswith(path + "/") for b in BINDS)


def _wipe(path: str) -> None:
    """Remove `path`, except the grader's binds: a directory on the way to one is emptied around it."""
    if path in BINDS:
        return
    if _holds_bind(path):
        for name in os.listdir(path):
            _wipe(os.path.join(path, name))
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def end(pid: int, statuses: dict[int, int], wipe: bool = True) -> dict:
    """Kill everything but this process and init, until nothing is left; the child's exit status (and,
    `wipe`, /tmp emptied)."""
    clean = False
    for _ in range(200):
        others = _others()
        if not others:
            clean = True
            break
        for p in others:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        statuses.update(_reap_all())
        time.sleep(0.005)
    statuses.update(_reap_all())
    if not wipe:
        return {"status": None, "clean": clean}
    for name in os.listdir(TMP):
        try:
            _wipe(os.path.join(TMP, name))
        except OSError:
            clean = False
    left = [n for n in os.listdir(TMP) if not _holds_bind(os.path.join(TMP, n))]
    return {"status": statuses.pop(pid, None), "clean": clean and not left}


def fork(ctl: socket.socket, req: dict, r: int, w: int, n: int) -> int:
    from handgrad.dojo import sandbox as SB

    d = os.path.join(TMP, f"run{n}")
    os.mkdir(d, 0o700)
    limits, base = SB.Limits(), SB.address_space()
    pid = os.fork()
    if pid == 0:  # the child: never returns here
        code = 0
        try:
            ctl.close()
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
                if fd not in (0, 1, 2, r, w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            os.chdir(d)
            os.environ.update(TMPDIR=d, HOME=d)
            tempfile.tempdir = d
            SB.set_limits(limits, float(req.get("time_limit", 20.0)), base)
            from handgrad.dojo import runner

            runner.serve(r, w)
        except BaseException:  # noqa: BLE001  nothing of the child may reach the zygote's code
            code = 70
        finally:
            os._exit(code)
    os.close(r)
    os.close(w)
    return pid


def main() -> int:
    ctl = socket.socket(fileno=int(os.environ["HANDGRAD_DOJO_CTL"]))
    import torch  # noqa: F401  imported once, here, for every child

    from handgrad.dojo import runner  # noqa: F401

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd != ctl.fileno():
            try:
                os.close(fd)
            except OSError:
                pass
    statuses: dict[int, int] = {}
    n, active, why = 0, False, ""
    most = most_processes()
    ctl.sendall(json.dumps({"ready": True}).encode())
    while True:
        ready, _, _ = select.select([ctl], [], [], WATCH if active else None)
        if not ready:  # a file's child is running: more processes than the limit ends them all
            if len(_others()) > most:
                why = f"it started more than {most} processes"
                end(0, statuses, wipe=False)
                active = False
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 2)
        except OSError:
            return 0
        if not msg:
            return 0
        req = json.loads(msg)
        if req.get("op") == "fork" and len(fds) == 2:
            n += 1
            active, why = True, ""
            ctl.sendall(json.dumps({"pid": fork(ctl, req, fds[0], fds[1], n)}).encode())
        elif req.get("op") == "end":
            active = False
            ctl.sendall(json.dumps({**end(int(req.get("pid", 0)), statuses), "why": why}).encode())
        else:
            for fd in fds:
                os.close(fd)
            ctl.sendall(json.dumps({"error": "unknown request"}).encode())


if __name__ == "__main__":
    sys.exit(main())
