"""The native build cache: compile a C++ file of csrc/ with the system compiler, keep the shared
library in a per-user cache and load it with ctypes, trusting only what this user built there.

What it trusts (the rules of ssh's StrictModes for key files, applied to a directory of code):
- the cache directory (HANDGRAD_CACHE, else $XDG_CACHE_HOME/handgrad or ~/.cache/handgrad) after its
  symlinks are resolved once: it must be owned by you (or root) and writable by no one else, and so
  must every directory above it up to /, except that those may be writable by others if they are
  sticky (as /tmp is: there no one else can rename or remove what you own);
- a file in it: a regular file (never followed through a symlink) owned by you (or root), writable by
  no one else, whose sha256 is the one in the `.sha256` file beside it (owned by you too; it catches a
  truncated or damaged copy, not an attacker: the directory's rules keep attackers out), whose ELF
  headers fit in the file (a truncated library would crash dlopen with SIGBUS) and which passes its
  ABI check (the caller's `bind`);
- the compiler named by HANDGRAD_CC or found on PATH, and csrc/ beside this file (as all of handgrad).
A cache directory that fails is refused in one line (a logged warning) and the library is built in a
private temporary directory instead, for this process only; a cached file that fails is rebuilt.
A build has a time limit (HANDGRAD_BUILD_TIMEOUT, seconds); at the limit or on Ctrl-C the
compiler's whole process group is killed.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import pwd
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-exceptions", "-fno-rtti", "-pthread"]
# The longest a build may take, both attempts (-march=native, then without) together. A cold build
# of csrc/program.cpp took 26 s here (2 cores shared with other jobs; ~3 s idle on a faster core).
BUILD_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)
_warned: set[str] = set()  # the warnings given in this process (each is given once)


class NativeUnavailable(RuntimeError):
    """The native code cannot be built or loaded here (the message says why, in one line)."""


class UntrustedCache(NativeUnavailable):
    """A cache directory that someone else could write (the message names it and why)."""


# ---------------------------------------------------------------------------- where, with what
def cache_dir() -> Path:
    """The configured cache directory, before any check: HANDGRAD_CACHE, else the XDG cache's."""
    if os.environ.get("HANDGRAD_CACHE"):
        return Path(os.environ["HANDGRAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "handgrad"


def compiler() -> str:
    cc = os.environ.get("HANDGRAD_CC")
    if cc:
        return cc
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise NativeUnavailable("no C++ compiler found (install g++ or set HANDGRAD_CC)")


def have_compiler() -> bool:
    """Whether a C++ compiler is there to build the native code (HANDGRAD_CC, else c++/g++/clang++)."""
    try:
        cc = compiler()
    except NativeUnavailable:
        return False
    return bool(shutil.which(cc) or os.path.exists(cc))


def _cpu_id() -> str:
    """-march=native binaries are CPU specific: the cache key includes the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines()[:40] if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(keep) or platform.machine()


def library_name(source: Path, cc: str) -> str:
    """`stem-KEY.so`: KEY hashes the source and the headers beside it, the flags, the compiler, the CPU
    and the Python version, so that a change to any of them builds a new library."""
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cc.encode(), _cpu_id().encode(),
                                     platform.python_version().encode()])).hexdigest()[:20]
    return f"{source.stem}-{key}.so"


def build_timeout() -> float:
    text = os.environ.get("HANDGRAD_BUILD_TIMEOUT", "")
    if not text:
        return BUILD_TIMEOUT_S
    try:
        limit = float(text)
    except ValueError:
        limit = float("nan")
    if not limit > 0:
        raise NativeUnavailable(f"HANDGRAD_BUILD_TIMEOUT={text!r}: expected a number of seconds > 0")
    return limit


# ---------------------------------------------------------------------------- what it trusts
def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _writers(mode: int) -> str:
    return {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[mode & 0o022]


def _distrust(path: str, st: os.stat_result, above: bool = False) -> str:
    """Why `path` cannot be trusted, or "": it must be owned by you or root and writable by no one
    else, except that a directory `above` the cache may be writable by others if it is sticky."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        return f"{path} is owned by {_user(st.st_uid)}, not by you or root (you: {_user(me)})"
    if st.st_mode & 0o022 and not (above and st.st_mode & stat.S_ISVTX):
        sticky = " and not sticky" if above else ""
        return f"{path} is writable by {_writers(st.st_mode)}{sticky} (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def trusted_dir(path: Path) -> Path:
    """The real path of the cache directory `path`, created (mode 0700, as are directories above it
    that are missing) if needed, after checking every directory from / down to it. Raises
    UntrustedCache naming the first that fails, NativeUnavailable when it cannot be created."""
    real = Path(os.path.realpath(path))  # symlinks resolved once; only the real path is used after
    chain = [real, *real.parents][::-1]  # /, /a, /a/b, ..., real
    for d in chain:
        above = d != real
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o700)  # whatever the umask
                st = os.lstat(d)
            except OSError as e:
                raise NativeUnavailable(f"cannot create the build cache {real}: {e.strerror}") from None
        except OSError as e:
            raise NativeUnavailable(f"cannot use the build cache {real}: {d}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):  # resolved above: a link here appeared since
            raise UntrustedCache(f"{d} became a symbolic link while it was being checked")
        if not stat.S_ISDIR(st.st_mode):
            raise NativeUnavailable(f"cannot create the build cache {real}: {d} is not a directory")
        why = _distrust(str(d), st, above)
        if why:
            raise UntrustedCache(f"{why}, above the build cache {real}" if above else why)
    return real


ABSENT = "absent"


def _read_own_file(path: Path) -> tuple[bytes | None, str]:
    """(the bytes of `path`, "") when it is a regular file owned by you (or root) and writable by no
    one else, opened without following a symlink (and without waiting on a FIFO); else (None, why):
    ABSENT when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ABSENT
    except OSError as e:
        what = "a symbolic link" if os.path.islink(path) else e.strerror or "unreadable"
        return None, f"{path.name} is {what}"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{path.name} is not a regular file"
        why = _distrust(path.name, st)
        return (None, why) if why else (f.read(), "")


def digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _elf_fits(data: bytes) -> bool:
    """Whether every segment the ELF program headers map lies inside the file (the loader maps them,
    and touching a page past the end of a truncated file is SIGBUS). Not ELF: left to the loader."""
    if data[:4] != b"\x7fELF":
        return True
    if len(data) < 52:  # shorter than the smallest ELF header
        return False
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    # e_phoff (at 32 or 28), e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum; p_type, p_offset, p_filesz
    header, phdr = (f"{order}QQ6xHH", f"{order}I4xQ16xQ") if wide else (f"{order}II6xHH", f"{order}II8xI")
    phoff, _, phentsize, phnum = struct.unpack_from(header, data, 32 if wide else 28)
    if phnum and (phentsize < struct.calcsize(phdr) or phoff + phnum * phentsize > len(data)):
        return False
    for k in range(phnum):
        p_type, offset, filesz = struct.unpack_from(phdr, data, phoff + k * phentsize)
        if p_type == 1 and offset + filesz > len(data):  # PT_LOAD
            return False
    return True


def cached_problem(library: Path) -> str:
    """"" when `library` (in a trusted directory) can be loaded: it and its .sha256 are files you own
    that no one else can write, the digest matches and its ELF headers fit; else why not (ABSENT
    when there is no library)."""
    data, why = _read_own_file(library)
    if data is None:
        return why
    want, why = _read_own_file(digest_path(library))
    if want is None:
        return "its sha256 file is missing" if why == ABSENT else why
    if hashlib.sha256(data).hexdigest() != want.decode(errors="replace").strip():
        return "its bytes do not match its sha256"
    return "" if _elf_fits(data) else "it is truncated (its ELF segments end past the file)"


# ---------------------------------------------------------------------------- build
def _compile(cmd: list[str], deadline: float, limit: float, work: Path) -> tuple[int, str]:
    """Run the compiler in its own process group with no stdin and TMPDIR=`work` (its intermediate
    files, as the assembly it hands to the assembler, stay where only you can write); (exit code,
    first line of its messages). At the deadline, or when interrupted, the whole group is killed."""
    with tempfile.TemporaryFile(dir=work) as messages:  # a file, not a pipe: nothing left over can block it
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=messages, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "TMPDIR": str(work)})
        except OSError as e:
            raise NativeUnavailable(f"cannot run the C++ compiler {cmd[0]!r}: {e.strerror}") from None
        try:
            code = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            raise NativeUnavailable(f"the C++ compiler {cmd[0]!r} did not finish within {limit:g} s and was "
                                    "stopped (set HANDGRAD_BUILD_TIMEOUT to allow longer)") from None
        finally:
            if proc.returncode is None:  # the limit, Ctrl-C: the driver and everything it started
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        messages.seek(0)
        lines = messages.read().decode(errors="replace").strip().splitlines()
    return code, (lines or ["(no message)"])[0]


def _compile_into(directory: Path, source: Path, cc: str) -> Path:
    """Compile `source` into a new temporary file in `directory` (trusted), mode 0755 less the umask
    and never writable by group or others; returns its path (the caller renames or removes it)."""
    limit = build_timeout()
    deadline = time.monotonic() + limit
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
    os.close(fd)
    work = Path(tempfile.mkdtemp(prefix=f".{source.stem}-work-", dir=directory))
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):  # a compiler without -march=native
            code, first = _compile([cc, *flags, "-o", tmp, str(source)], deadline, limit, work)
            if code == 0:
                break
        else:
            raise NativeUnavailable(f"building {source.name} with {cc} failed: {first}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask & ~0o022)
        return Path(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    """Rename the library over `target` (a link named `target` is replaced, never followed), then
    write its sha256 beside it, atomically too."""
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".sha256", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest + "\n")
    os.replace(name, digest_path(target))


def build(source: Path, force: bool = False) -> Path:
    """The path of `source`'s library in the trusted cache, compiled unless a good copy is there
    (cached_problem) or `force`. Raises NativeUnavailable, or UntrustedCache for a refused cache."""
    cc = compiler()
    directory = trusted_dir(cache_dir())
    target = directory / library_name(source, cc)
    if force or cached_problem(target):
        _install(_compile_into(directory, source, cc), target)
    return target


# ---------------------------------------------------------------------------- load
def _open(path: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL]) -> tuple[ctypes.CDLL | None, str]:
    """(the bound library, "") or (None, why it fails to load or its ABI check)."""
    try:
        return bind(ctypes.CDLL(str(path))), ""
    except OSError as e:  # not a library, another machine's, ...
        return None, f"it does not load ({e})"
    except (AttributeError, NativeUnavailable) as e:  # another library: a symbol missing, another ABI
        return None, f"it fails the ABI check ({str(e).removeprefix(f'{path}: ')})"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _fresh(directory: Path, source: Path, cc: str, bind: Callable, what: str) -> tuple[ctypes.CDLL, Path]:
    """Compile `source` into `directory` and load it under its temporary name (a name this process
    never loaded before: the loader reuses a library already loaded under the same name)."""
    tmp = _compile_into(directory, source, cc)
    lib, why = _open(tmp, bind)
    if lib is None:
        tmp.unlink(missing_ok=True)
        raise NativeUnavailable(f"{what} just built from {source.name} with {cc}: {why}")
    return lib, tmp


def load(source: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str = "the native library"
         ) -> ctypes.CDLL:
    """`source`'s library, bound (`bind` sets the argument types and checks the ABI, raising
    AttributeError or NativeUnavailable). A cached copy that fails any check is rebuilt; a refused
    cache directory is named in one warning and the library built in a private temporary directory.
    Raises NativeUnavailable."""
    try:
        cc = compiler()
        name = library_name(source, cc)
        try:
            directory = trusted_dir(cache_dir())
        except UntrustedCache as e:
            return _load_private(source, cc, bind, what, f"refusing the build cache: {e}")
        target = directory / name
        why = cached_problem(target)
        if not why:
            lib, why = _open(target, bind)
            if lib is not None:
                return lib
        if why != ABSENT:
            _warn_once(f"rebuilding {what} {target}: {why}")
        lib, tmp = _fresh(directory, source, cc, bind, what)
        _install(tmp, target)
        return lib
    except OSError as e:  # unreadable source, unwritable cache, full disk, ...
        raise NativeUnavailable(f"cannot build {what}: {e}") from None


def _load_private(source: Path, cc: str, bind: Callable, what: str, refusal: str) -> ctypes.CDLL:
    """Build and load `source` in a new private temporary directory, removed once it is loaded (the
    library stays mapped); `refusal` says why the cache was not used."""
    where = Path(tempfile.mkdtemp(prefix="handgrad-build-"))
    try:
        try:
            directory = trusted_dir(where)
        except UntrustedCache as e:
            raise NativeUnavailable(f"{refusal}, and so is the temporary directory {where} ({e}); set "
                                    "HANDGRAD_CACHE to a directory only you can write") from None
        _warn_once(f"{refusal}; building {what} in a private temporary directory instead (to keep it "
                   "between runs, set HANDGRAD_CACHE to a directory only you can write)")
        return _fresh(directory, source, cc, bind, what)[0]
    finally:
        shutil.rmtree(where, ignore_errors=True)
