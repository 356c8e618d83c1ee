"""A process that must not outlive the process that started it: a rank of `handgrad train --nproc N`
ends when its launcher does, however the launcher ends (SIGTERM, kill -9, a crash), so no rank goes on
writing a run directory that nobody supervises. Kept free of heavy imports: a rank binds itself to
its launcher first thing, before importing torch (handgrad.__main__).

Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), the kernel's signal to a child whose parent dies, then a
check that the parent is still the launcher (it may have died before the prctl). Elsewhere: a daemon
thread that polls the parent's pid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

LAUNCHER_ENV = "HANDGRAD_LAUNCHER"  # the launcher's pid, in the environment of each process it starts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5
ORPHANED = 1  # the exit code of a process whose launcher was already gone


def _parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_SECONDS)
    os._exit(ORPHANED)


def follow_launcher(env: dict | None = None) -> None:
    """When this process was started by a launcher (LAUNCHER_ENV holds its pid), die with it: at once if
    it is already gone, else when it goes. A process started any other way is left alone."""
    env = os.environ if env is None else env
    raw = env.get(LAUNCHER_ENV, "")
    if not raw.isdigit():
        return
    launcher = int(raw)
    bound = _parent_death_signal(signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the signal was asked for (or this is not its child)
        os._exit(ORPHANED)
    if not bound:
        threading.Thread(target=_watch, args=(launcher,), daemon=True, name="handgrad-lifeline").start()
