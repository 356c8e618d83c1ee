"""Files of a run directory, handled as untrusted: atomic writes with the process umask, reads
confined to regular files inside one directory (no symlinks, no devices, bounded size), a lock
per run directory (fcntl.flock, holder's pid inside), and clean-up of this project's own temp files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
from pathlib import Path

from handgrad.config import ConfigError, ref

TMP_SUFFIX = ".handgrad-tmp"
TMP_RE = re.compile(r"\..+\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))  # .NAME.RANDOM.handgrad-tmp
LOCK_FILE = ".handgrad.lock"
PROBE_BYTES = 4096  # what prepare_dir writes to prove an output directory takes data
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")  # one path component, no '/', not '..'


class UnsafeFileError(ValueError):
    """A file that may not be read (outside its directory, a symlink, not a regular file, too
    large, unreadable); the message is one line for the user."""


class OutputError(ConfigError):
    """An output location that cannot be written; one line for the user, naming the config field that
    chose the location."""


class LockedError(OutputError):
    """Another process holds the run directory's lock."""


def describe(e: OSError) -> str:
    return e.strerror or type(e).__name__


# ---------------------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temporary file next to `path` (created with mode 0o666 less the umask, never through a
    symlink), fsync it, rename it over `path`, fsync the directory. A kill at any moment leaves the
    old file or the new one; an interrupted write removes its temporary file. Raises OSError."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink named `path` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def clean_temp_files(directory: Path) -> list[str]:
    """Delete this project's temporary files (.NAME.<16 hex>.handgrad-tmp) left in `directory` by a
    killed write. Call it only while holding the directory's lock. Returns the names removed."""
    removed = []
    for entry in os.scandir(directory):
        if TMP_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def remove_inside(directory: Path, name: str) -> bool:
    """Delete `directory/name` if it is a regular file (not a symlink or directory) directly inside
    `directory`. Returns whether a file was removed."""
    if not PLAIN_NAME.fullmatch(name):
        return False
    p = Path(directory) / name
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        p.unlink()
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------- reading
def read_inside(directory: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of the regular file `name` directly inside `directory` (see open_inside), refused
    over `max_bytes`. Raises FileNotFoundError or UnsafeFileError."""
    return read_fd(open_inside(directory, name), Path(directory) / name, max_bytes)


def open_inside(directory: Path, name: str) -> int:
    """A read-only descriptor of the file `name` directly inside `directory`: `name` must be one
    plain path component; a symlink is refused, and the open never blocks (a FIFO or device is
    refused by read_fd). An open descriptor keeps the file readable even if a writer deletes it
    afterwards. Raises FileNotFoundError or UnsafeFileError."""
    where = Path(directory) / name
    if not PLAIN_NAME.fullmatch(name):
        raise UnsafeFileError(f"{directory}: {name!r:.80} is not a plain file name inside the directory")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeFileError(f"{directory}: cannot open the directory ({describe(e)})") from None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFileError(f"{where}: is a symlink; a checkpoint reads only regular files "
                                      "inside its own directory") from None
            raise UnsafeFileError(f"{where}: cannot open ({describe(e)})") from None
    finally:
        os.close(dir_fd)


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed, as for a path the user named), or
    UnsafeFileError for a device, FIFO, directory or a file over `max_bytes`; never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot open ({describe(e)})") from None
    return read_fd(fd, Path(path), max_bytes)


def read_fd(fd: int, where: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file open as `fd` (closed here), or UnsafeFileError for anything
    else or for more than `max_bytes`."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{where}: not a regular file")
        if st.st_size > max_bytes:
            raise UnsafeFileError(f"{where}: {st.st_size:,} bytes, more than the {max_bytes:,} allowed")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise UnsafeFileError(f"{where}: more than the {max_bytes:,} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise UnsafeFileError(f"{where}: cannot read ({describe(e)})") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- output directories
def prepare_dir(path: Path, field: str) -> Path:
    """Create `path` (and its parents) if needed and check that it is a directory this process can
    create files in, before any work is spent. Raises OutputError naming the config field `field`."""
    path, flag = Path(path), ref(field)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{flag} {path}: is a file, expected a directory") from None
    except NotADirectoryError:
        raise OutputError(f"{flag} {path}: a parent of it is a file, expected directories") from None
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create the directory ({describe(e)})") from None
    if not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file, expected a directory")
    probe = path / f".probe.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:  # a few KiB of data, not an empty file: a full disk or a file-size limit shows here
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write files there ({describe(e)})") from None
    return path


def output_subdir(run_dir: Path, name: str) -> Path:
    """The directory `run_dir/name` for a run's own outputs (diagnostics, plots), created if needed.
    It must be a real directory directly inside the run: a symlink (to anywhere) or a file under
    that name is refused, so nothing is written outside the run. Raises OutputError."""
    if not PLAIN_NAME.fullmatch(name):
        raise OutputError(f"{name!r:.80}: not a plain directory name")
    sub = Path(run_dir) / name
    try:
        os.mkdir(sub, 0o777)
    except FileExistsError:
        pass
    except OSError as e:
        raise OutputError(f"{sub}: cannot create the directory ({describe(e)})") from None
    st = os.lstat(sub)
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{sub}: is a symlink; a run writes only inside its own directory "
                          "(remove the link or choose another output directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{sub}: is a file, expected a directory")
    return sub


# ---------------------------------------------------------------------------- the run lock
class RunLock:
    """An exclusive lock on a run directory, held while one process writes to it: flock on
    DIR/.handgrad.lock, which holds the holder's pid (to name it in the refusal). The kernel drops
    a flock when its holder dies, so a lock file left by a killed run is simply taken over.
    `inherited`: a descriptor of the lock file whose open file already holds the lock (a --nproc
    rank's, from its launcher), adopted instead of a new lock."""

    def __init__(self, directory: Path, field: str = "out", inherited: int | None = None):
        self.path = Path(directory) / LOCK_FILE
        self.flag, self.fd, self.inherited = ref(field), None, inherited

    def _adopt(self) -> int | None:
        """The inherited descriptor when it is this directory's lock file (its holder, a --nproc
        launcher, shares the lock with its ranks: flock belongs to the open file, not the process)."""
        fd, self.inherited = self.inherited, None
        try:
            mine, path = os.fstat(fd), os.lstat(self.path)
        except (OSError, TypeError):
            return None
        if not stat.S_ISREG(path.st_mode) or (mine.st_dev, mine.st_ino) != (path.st_dev, path.st_ino):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock its open file already holds
        except OSError:
            return None
        return fd

    def acquire(self) -> RunLock:
        if self.inherited is not None and (fd := self._adopt()) is not None:
            self.fd = fd  # the holder's pid stays in the file: it is the process to name
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot open the run's lock file ({describe(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise LockedError(f"{self.flag} {self.path.parent}: in use by {who} (another handgrad run "
                              "writes there); wait for it to finish or choose another directory") from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"{self.path}: cannot lock ({describe(e)})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
