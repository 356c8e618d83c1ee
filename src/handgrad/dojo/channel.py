"""The one channel between the grader and the child that runs a learner's file: a pipe each way, one
frame per message. A frame is a fixed 16-byte head (magic, the JSON header's size, the tensors' size),
the JSON header, then the tensors as safetensors bytes (no pickle: reading runs no code). The reader
checks both sizes against its limits before it reads a byte of either, and a frame that breaks any rule
ends the conversation (ChannelError): the grader trusts the child's frames for nothing but data it
checks again (grading.clean_reply), and shows none of its text unescaped (report.safe_text).
"""

from __future__ import annotations

import json
import math
import os
import select
import struct
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by whoever sends or reads tensors, not by importing this
    from torch import Tensor


MAGIC = b"HGD1"
HEAD = struct.Struct("<4sIQ")  # magic, header bytes, tensor bytes
MAX_HEADER = 8 << 20  # bytes of JSON a reply may have (a grade's replies are a few KB to ~1 MB)
MAX_TENSORS = 256 << 20  # bytes of tensors a reply may carry (a grade's: ~2 MB)


class ChannelError(Exception):
    """A frame that breaks the channel's rules (size, magic, JSON, safetensors): one line, in words."""


def pack(header: dict, tensors: dict[str, Tensor] | None = None) -> bytes:
    """One frame: the head, the header as JSON, the tensors as safetensors (none: no bytes)."""
    from safetensors.torch import save

    head = json.dumps(header, allow_nan=True).encode()
    blob = save({k: v.contiguous() for k, v in tensors.items()}) if tensors else b""
    return HEAD.pack(MAGIC, len(head), len(blob)) + head + blob


def send(fd: int, header: dict, tensors: dict[str, Tensor] | None = None) -> None:
    """Write one frame to `fd` (all of it; OSError when the reader is gone)."""
    view = memoryview(pack(header, tensors))
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Reader:
    """Reads frames from one descriptor, each within the limits, before a deadline (monotonic seconds;
    None: wait for ever). `read()` -> (header, tensors); EOFError when the writer is gone, TimeoutError
    at the deadline, ChannelError for a frame that breaks the rules."""

    def __init__(self, fd: int, max_header: int = MAX_HEADER, max_tensors: int = MAX_TENSORS):
        self.fd, self.max_header, self.max_tensors = fd, max_header, max_tensors
        self.buf = bytearray()

    def _fill(self, size: int, deadline: float | None) -> bytes:
        while len(self.buf) < size:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                ready, _, _ = select.select([self.fd], [], [], left)
                if not ready:
                    continue
            chunk = os.read(self.fd, min(1 << 20, max(size - len(self.buf), 1 << 16)))
            if not chunk:
                raise EOFError()
            self.buf += chunk
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def read(self, deadline: float | None = None) -> tuple[dict, dict[str, Tensor]]:
        magic, n_head, n_blob = HEAD.unpack(self._fill(HEAD.size, deadline))
        if magic != MAGIC:
            raise ChannelError("a frame that does not start as the grader's frames do")
        if n_head > self.max_header:
            raise ChannelError(f"a header of {n_head:,} bytes, more than the {self.max_header:,} allowed")
        if n_blob > self.max_tensors:
            raise ChannelError(f"{n_blob:,} bytes of tensors, more than the {self.max_tensors:,} allowed")
        try:
            header = json.loads(self._fill(n_head, deadline), parse_constant=_constant)
        except (ValueError, RecursionError):
            raise ChannelError("a header that is not JSON") from None
        if not isinstance(header, dict):
            raise ChannelError("a header that is not a JSON object")
        blob = self._fill(n_blob, deadline) if n_blob else b""
        return header, (_tensors(blob) if blob else {})


def _constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def _tensors(blob: bytes) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise ChannelError(f"tensors that are not safetensors ({str(e)[:80]})") from None
