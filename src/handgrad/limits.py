"""A time limit on one call of a user's code (a forward or backward that never returns): the checks
stop it and say so in one line instead of hanging."""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Overran(BaseException):
    """Raised inside a user's forward or backward that overran its time limit (a BaseException, so
    an `except Exception` in the user's code does not swallow it)."""


@contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Stop the code inside after `seconds` by raising Overran in it: SIGALRM on the main thread,
    otherwise an asynchronous exception in this thread (a pure-Python loop stops at its next bytecode;
    a C call that never returns cannot be stopped). None or 0: no limit."""
    if not seconds or seconds <= 0:
        yield
        return
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        prev_handler = signal.getsignal(signal.SIGALRM)
        prev_delay, prev_interval = signal.getitimer(signal.ITIMER_REAL)
        if prev_delay and prev_delay < seconds and prev_handler is _alarm:
            yield  # an outer limit of ours that ends sooner already watches this
            return

        start = time.monotonic()
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        _ALARM_WHAT.append((what, seconds))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _ALARM_WHAT.pop()
            signal.signal(signal.SIGALRM, prev_handler)
            if prev_delay:
                left = max(prev_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, prev_interval)
        return
    tid = threading.get_ident()
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(Overran))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Overran:
        raise Overran(what, seconds) from None
    finally:
        timer.cancel()
        if fired.is_set():  # the exception may still be pending: clear it
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)


_ALARM_WHAT: list[tuple[str, float]] = []


def _alarm(signum: int, frame: Any) -> None:
    what, seconds = _ALARM_WHAT[-1] if _ALARM_WHAT else ("the call", 0.0)
    raise Overran(what, seconds)


def overran_message(e: Overran, what: str) -> str:
    """One line for a call stopped by time_limit."""
    secs = e.args[1] if len(e.args) > 1 else 0
    return (f"{what} did not return within {secs:g} s and was stopped (an endless loop? pass timeout= to "
            "allow longer)")


def limited(fn: Any, seconds: float | None, what: str) -> Any:
    """fn with every call under time_limit(seconds, what)."""
    if not seconds:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        with time_limit(seconds, what):
            return fn(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "fn")
    return call
