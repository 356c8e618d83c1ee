"""A file the grader reads that a learner or a hostile student may have put there: read only if it is a
regular file (a symlink, FIFO, device or directory is refused without being opened for reading, so nothing
blocks and no system file is quoted), of a bounded size, UTF-8 without NUL bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from handgrad import io

MAX_BYTES = 1 << 20  # a dojo file is a few KB; a MiB is far more than any real one


class SubmissionError(ValueError):
    """A path that cannot be graded as it is: one line naming it and what is wrong."""


KINDS = {  # what a path is, in words, when it is not a regular file
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The text of the learner's file at `path`; SubmissionError when it is not a regular file (its own
    path, not a symlink), is larger than `max_bytes`, or is not UTF-8 text."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SubmissionError("no such file") from None
    except OSError as e:
        raise SubmissionError(f"cannot read it ({e.strerror or type(e).__name__})") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise SubmissionError(
            f"is a symbolic link (to {target[:200]}); the grader reads only a file itself, "
            "not a link: give the file's own path"
        )
    if not stat.S_ISREG(st.st_mode):
        what = KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise SubmissionError(f"is {what}, not a Python file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror or e})"
        raise SubmissionError(why) from None
    try:
        data = io.read_fd(fd, Path(""), max_bytes)  # closes fd
    except io.UnsafeFileError as e:
        raise SubmissionError(str(e).removeprefix(": ").removeprefix(".: ")) from None
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise SubmissionError(f"line {line} holds a NUL byte: not a Python source file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SubmissionError(f"line {line} is not UTF-8 text (byte 0x{data[e.start]:02x})") from None
