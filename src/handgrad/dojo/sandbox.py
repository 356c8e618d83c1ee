"""Where a learner's file runs when the dojo grades it: a child process held by bubblewrap (`bwrap`,
the sandbox Flatpak uses) where it is installed and works, else by rlimits alone.

- bwrap: the system, Python and the directories handgrad, torch and safetensors are imported from,
  read-only; a private tmpfs of a few MiB at /tmp as the only writable place; no network; its own PID
  namespace (it cannot see or signal the grader, and every process it starts dies with its first one);
  no inherited descriptor but its channel; a new terminal session (no TIOCSTI into the grader's
  terminal); all capabilities dropped; killed if the grader dies (--die-with-parent).
- basic: rlimits, a new session, a private temporary directory as its working directory, and the
  grader's subreaper sweep for the processes it leaves behind; it runs as you, with your files.

Both: rlimits on CPU time, address space, file size, open files, core files and processes (the
kernel does not apply a process limit to root: there the time limit and the PID namespace are what
end a fork bomb).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MODES = ("auto", "require", "basic")  # --sandbox: bwrap where it works, bwrap or refuse, rlimits only
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # read-only, or their symlinks
LOADER = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")  # what the dynamic loader reads
PACKAGES = ("handgrad", "torch", "safetensors", "numpy")  # what the child imports, bound read-only


class SandboxError(ValueError):
    """`--sandbox require` where bubblewrap cannot run, or a mode there is not: one line."""


@dataclass(frozen=True)
class Limits:
    """The rlimits of a child and its descendants (per process), and the size of its tmpfs."""

    memory: int = 4 << 30  # bytes of address space (RLIMIT_AS): importing torch maps ~0.7 GiB
    file_size: int = 16 << 20  # bytes a file it writes may reach (RLIMIT_FSIZE; Python gets EFBIG)
    open_files: int = 256  # RLIMIT_NOFILE
    processes: int = 64  # processes and threads of its own (RLIMIT_NPROC; not applied to root)
    tmpfs: int = 64 << 20  # bytes of its private /tmp under bwrap
    cpu_floor: float = 120.0  # CPU seconds (RLIMIT_CPU) at the least: the edit search is many requests

    def cpu(self, time_limit: float) -> int:
        """CPU seconds for the whole child: a request each for load and run, and the edit search."""
        return int(max(self.cpu_floor, 8 * time_limit)) + 1


@dataclass(frozen=True)
class Sandbox:
    """How a child is held: kind "bwrap" or "basic", and the one line saying what basic does not hold
    (empty when there is nothing to say)."""

    kind: str
    warning: str = ""
    limits: Limits = Limits()

    @property
    def isolated(self) -> bool:
        return self.kind == "bwrap"


def choose(mode: str | None = None, limits: Limits | None = None) -> Sandbox:
    """The sandbox for `mode` (None: $HANDGRAD_DOJO_SANDBOX, else "auto"): "auto" (bwrap if it works
    here, else basic with a warning), "require"
    (bwrap, else SandboxError naming why not), "basic" (rlimits only, no warning)."""
    limits = limits or Limits()
    mode = mode or os.environ.get("HANDGRAD_DOJO_SANDBOX") or "auto"
    if mode not in MODES:
        raise SandboxError(f"--sandbox {mode}: choose one of {', '.join(MODES)}")
    if mode == "basic":
        return Sandbox("basic", "", limits)
    why = bwrap_problem()
    if not why:
        return Sandbox("bwrap", "", limits)
    if mode == "require":
        raise SandboxError(
            f"--sandbox require: {why}; install bubblewrap (apt-get install bubblewrap) or "
            "grade with --sandbox basic"
        )
    return Sandbox(
        "basic",
        f"{why}: each file runs as you and can read and change your files, use the "
        "network and signal your processes; only rlimits, its own session and a private "
        "temporary directory hold it (--sandbox require refuses to grade without bubblewrap)",
        limits,
    )


# ---------------------------------------------------------------------------- bubblewrap
def bwrap_binary() -> str | None:
    return os.environ.get("HANDGRAD_BWRAP") or shutil.which("bwrap")


@cache
def bwrap_problem() -> str:
    """Why bwrap cannot hold a child here ('' when it can): missing, or it fails to start (namespaces
    refused, as in some containers). Tried once per process with the child's own arguments."""
    exe = bwrap_binary()
    if not exe or not os.access(exe, os.X_OK):
        return "no bubblewrap (bwrap) on this machine"
    argv = [exe, *bwrap_args(Limits(), None), "--", sys.executable, "-S", "-c", "pass"]
    try:
        r = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap does not start here ({type(e).__name__})"
    if r.returncode != 0:
        said = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"bubblewrap does not start here ({(said[-1] if said else f'exit {r.returncode}')[:120]})"
    return ""


def readonly_paths() -> list[str]:
    """The directories the child needs, read-only: Python's own and the packages it imports (not the
    working directory, not the learner's files: the file's text travels over the channel)."""
    want = [
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    ]
    want += [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin:
            want.append(str(Path(spec.origin).resolve().parent.parent))
    out: list[str] = []
    for p in want:
        for q in {os.path.abspath(p), os.path.realpath(p)}:
            if os.path.isdir(q) and not any(q == o or q.startswith(o.rstrip("/") + "/") for o in out):
                out = [o for o in out if not o.startswith(q.rstrip("/") + "/")] + [q]
    return sorted(out)


def bwrap_args(limits: Limits, info_fd: int | None) -> list[str]:
    """bwrap's arguments before `--`: the read-only system and Python, /proc of its own PID namespace,
    a read-only /dev of the usual devices, a tmpfs at /tmp, then the root made read-only."""
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for d in SYSTEM:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in LOADER:
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    args += ["--size", str(limits.tmpfs), "--tmpfs", "/tmp"]  # before the binds: a venv under /tmp shows
    for d in readonly_paths():
        if not d.startswith(("/usr/", "/bin/", "/lib")):
            args += ["--ro-bind", d, d]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        "/",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        "--setenv",
        "OMP_NUM_THREADS",
        "1",
        "--setenv",
        "MKL_NUM_THREADS",
        "1",
    ]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    return args


def tmp_binds() -> list[str]:
    """The read-only directories that lie under /tmp (a project or venv there): the zygote keeps them
    when it empties /tmp after each file."""
    return [d for d in readonly_paths() if d.startswith("/tmp/")]


def python_path() -> str:
    """PYTHONPATH for the child: where handgrad is imported from (an editable install's src/)."""
    import handgrad

    return str(Path(handgrad.__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------- rlimits
def set_limits(limits: Limits, time_limit: float, base: int = 0) -> None:
    """The child's rlimits (called in the child before it runs anything else; inherited by all it
    starts). `base`: the address space a forked child has already (the grader's), on top of which it may
    map `limits.memory`. A limit above the caller's own hard limit is lowered to it."""

    def cap(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    cap(resource.RLIMIT_CPU, limits.cpu(time_limit))
    cap(resource.RLIMIT_AS, base + limits.memory)
    cap(resource.RLIMIT_FSIZE, limits.file_size)
    cap(resource.RLIMIT_NOFILE, limits.open_files)
    cap(resource.RLIMIT_CORE, 0)
    if os.geteuid() != 0:  # counted over all of this user's processes: the ones running now, plus the child's
        cap(resource.RLIMIT_NPROC, own_processes() + limits.processes)


def address_space() -> int:
    """Bytes of address space this process maps now (VmSize), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmSize:"):
                    return int(ln.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def own_processes() -> int:
    """Processes and threads of this user now (what RLIMIT_NPROC counts)."""
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{d}/task"))
            except OSError:
                continue
    return n


# ---------------------------------------------------------------------------- the basic sweep
PR_SET_CHILD_SUBREAPER = 36


def subreaper(on: bool) -> bool:
    """Make this process the subreaper of its descendants (Linux): a process a child leaves behind (a
    `setsid` grandchild whose parent exited) becomes this process's child, where sweep() finds it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> set[int]:
    """The pids whose parent is this process (its threads' children included)."""
    me, out = os.getpid(), set()
    try:
        for task in _tasks():
            with open(f"/proc/{me}/task/{task}/children") as f:
                out |= {int(x) for x in f.read().split()}
        return out
    except OSError:  # a kernel without the children files: every process's parent, from its stat
        pass
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    out.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _tasks() -> list[str]:
    try:
        return os.listdir(f"/proc/{os.getpid()}/task")
    except OSError:
        return []


def sweep(keep: set[int]) -> int:
    """Kill and reap every child of this process not in `keep` (what a basic child left behind came to
    this process as its subreaper), until there are none. Returns how many were killed."""
    killed = 0
    for _ in range(50):
        extra = children() - keep
        if not extra:
            break
        for pid in extra:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        for pid in extra:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return killed
