"""The `handgrad` command (pyproject's [project.scripts]) and `python -m handgrad`.

main() takes over Ctrl-C before the heavy imports: importing torch takes a second or more, and
Python's default handler would print a KeyboardInterrupt traceback from wherever the import was.
Until the CLI is imported, and again once it has returned, Ctrl-C exits at once with one line and
code 130 (nothing has been written then: the CLI writes files only while it runs, atomically); in
between, the CLI's own handlers say what was kept.
"""

import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _quit(message: bytes):
    def handler(signum, frame):
        for stream in (sys.stdout, sys.stderr):  # what was printed before stays printed
            try:
                stream.flush()
            except Exception:  # a closed pipe, a write this signal interrupted
                pass
        os.write(2, message)
        os._exit(INTERRUPTED)
    return handler


def _sandbox_flag(argv: list[str]) -> str | None:
    """--sandbox's value as argparse will read it (None: not given)."""
    for i, a in enumerate(argv):
        if a == "--sandbox" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--sandbox="):
            return a.split("=", 1)[1]
    return None


def _start_sandbox_early(argv: list[str]) -> None:
    """`handgrad dojo grade` under bubblewrap: start its sandbox now, so that the zygote in it imports
    torch while this process does (side by side on two cores, not one after the other). Not started for
    --help or when no file named exists; one the command does not use (a bad flag, another --sandbox)
    is killed when it exits."""
    if argv[:2] != ["dojo", "grade"] or {"-h", "--help"} & set(argv):
        return
    if not any(os.path.exists(a) for a in argv[2:] if not a.startswith("-")):  # a mistyped file: no sandbox
        return
    from handgrad.dojo import child, sandbox  # neither imports torch

    try:
        box = sandbox.choose(_sandbox_flag(argv))
    except sandbox.SandboxError:  # the command says so, in its own words
        return
    if box.isolated:
        child.zygote_for(box)


def main() -> int:
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # as `nohup` or `cmd &` in a script leave it

    def on_ctrl_c(handler) -> None:
        if not ignored:
            signal.signal(signal.SIGINT, handler)

    on_ctrl_c(_quit(b"handgrad: error: interrupted while starting; nothing was written\n"))
    from handgrad import lifeline  # (ctypes: an extension module, loaded with the handler in place)

    lifeline.follow_launcher()  # a rank of --nproc ends with its launcher, before the heavy imports
    _start_sandbox_early(sys.argv[1:])
    from handgrad.cli import main as cli_main  # torch, numpy, ...

    try:
        on_ctrl_c(signal.default_int_handler)  # KeyboardInterrupt, which the CLI catches
        return cli_main()
    except KeyboardInterrupt:  # between the line above and the CLI's own handler
        print("handgrad: error: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        on_ctrl_c(_quit(b"handgrad: error: interrupted while exiting, after the command had finished\n"))


if __name__ == "__main__":
    raise SystemExit(main())
