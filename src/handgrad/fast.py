"""The fast path: the training step (forward, closed-form backward, SGD) fused into one small C++
file (csrc/step.cpp) that runs many steps per call on preallocated padded buffers. Built at first
use with the system compiler into a per-user cache, loaded with ctypes; no torch headers.
The math is the lecture MLP's layers (layers.py, ops.py) + SGD; tests/test_fast.py proves it.
`plan(model)` recognises that layer pattern and maps its parameters onto the native step.

Environment: HANDGRAD_CC (the C++ compiler; default c++ or g++ on PATH), HANDGRAD_CACHE (the build
cache; default $XDG_CACHE_HOME/handgrad or ~/.cache/handgrad).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from handgrad import ops
from handgrad.atomic import Params
from handgrad.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Tanh

SOURCE = Path(__file__).parent / "csrc" / "step.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-exceptions", "-fno-rtti"]
ABI_VERSION = 1
GRAD_NAMES = ("loss", "dC", "dW1", "db1", "dW2", "db2", "dbngain", "dbnbias")  # status codes of hg_steps

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class BNStats:
    """The running statistics the native step updates: (1, H) views of a BatchNorm1d's buffers."""

    def __init__(self, mean: Tensor, var: Tensor):
        self.mean, self.var = mean, var


class FastUnavailable(RuntimeError):
    """The native step cannot be built or loaded here (the message says why, in one line)."""


# ---------------------------------------------------------------------------- build and load
def cache_dir() -> Path:
    if os.environ.get("HANDGRAD_CACHE"):
        return Path(os.environ["HANDGRAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "handgrad"


def _compiler() -> str:
    cc = os.environ.get("HANDGRAD_CC")
    if cc:
        return cc
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise FastUnavailable("no C++ compiler found (install g++ or set HANDGRAD_CC)")


def _cpu_id() -> str:
    """-march=native binaries are CPU specific: the cache key includes the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines()[:40] if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(keep) or platform.machine()


def build(force: bool = False) -> Path:
    """Compile csrc/step.cpp (if not cached) and return the shared library's path. The cache key is
    a hash of the source, the flags, the compiler and the CPU; the file is written atomically."""
    cc = _compiler()
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cc.encode(), _cpu_id().encode(),
                                     platform.python_version().encode()])).hexdigest()[:20]
    out_dir = cache_dir()
    target = out_dir / f"step-{key}.so"
    if target.exists() and not force:
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastUnavailable(f"cannot create the build cache {out_dir}: {e.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=".step-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        for flags in (FLAGS, [f for f in FLAGS if f != "-march=native"]):  # a compiler without -march=native
            try:
                r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                   timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise FastUnavailable(f"cannot run the C++ compiler {cc!r}: {e}") from None
            if r.returncode == 0:
                break
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["(no message)"])[0]
            raise FastUnavailable(f"building {SOURCE.name} with {cc} failed: {first}")
        os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_long
    lib.hg_abi_version.restype = ctypes.c_int
    lib.hg_workspace_bytes.restype = i64
    lib.hg_workspace_bytes.argtypes = [p]
    lib.hg_steps.restype = i64
    lib.hg_steps.argtypes = [p] * 10 + [ctypes.c_double] + [p] * 6
    if lib.hg_abi_version() != ABI_VERSION:
        raise FastUnavailable("the cached native library has the wrong ABI version")
    return lib


def load_library() -> ctypes.CDLL:
    """Build (once per process and source) and load the native step; raises FastUnavailable."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        try:
            path = build()
        except OSError as e:  # unreadable source, unwritable cache, ...
            raise FastUnavailable(f"cannot build the native step: {e}") from None
        try:
            _lib = _bind(ctypes.CDLL(str(path)))
        except OSError as e:
            raise FastUnavailable(f"cannot load {path}: {e}") from None
        return _lib


def _reset_for_tests() -> None:
    """Forget the loaded library so the next load builds again (tests of the fallback)."""
    global _lib
    with _lock:
        _lib = None


# ---------------------------------------------------------------------------- the steps function
def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _dims(p: Params, B: int, T: int, K: int, tile: int, n: int) -> ctypes.Array:
    V, E = p.C.shape
    H = p.W1.shape[1]
    return (ctypes.c_int * 8)(B, T, E, H, V, tile, K, n)


def _run(lib: ctypes.CDLL, p: Params, bn_running: BNStats | None, Xtr: Tensor, Ytr: Tensor, idx: Tensor,
         lrs: Tensor, momentum: float, tile: int, grads_out: Tensor | None) -> tuple[Tensor, int]:
    for name, t in p.items():
        if t.dtype != torch.float32:
            raise TypeError(f"fast path: {name} must be float32, got {t.dtype}")
    X = Xtr.to(torch.int64).contiguous()  # (n, T)
    Y = Ytr.to(torch.int64).contiguous()  # (n,)
    ix = idx.to(torch.int64).contiguous()  # (K, B)
    lr = lrs.to(torch.float64).contiguous()  # (K,)
    K, B = ix.shape
    if lr.shape[0] != K:
        raise ValueError(f"lrs has {lr.shape[0]} entries for {K} steps")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"Xtr has {X.shape[0]} rows but Ytr {Y.shape[0]}")
    bufs = [t if t.is_contiguous() else t.contiguous() for t in p.tensors()]
    run = None
    if bn_running is not None:
        run = [t if t.is_contiguous() else t.contiguous() for t in (bn_running.mean, bn_running.var)]
    losses = torch.empty(K, dtype=torch.float64)  # (K,)
    status = lib.hg_steps(_dims(p, B, X.shape[1], K, tile, X.shape[0]), *(_ptr(t) for t in bufs),
                          _ptr(run[0]) if run else None, _ptr(run[1]) if run else None, float(momentum),
                          _ptr(X), _ptr(Y), _ptr(ix), _ptr(lr), _ptr(losses),
                          _ptr(grads_out) if grads_out is not None else None)
    for t, b in zip(p.tensors(), bufs):
        if b is not t:
            t.copy_(b)
    if run:
        for t, b in zip((bn_running.mean, bn_running.var), run):
            if b is not t:
                t.copy_(b)
    if status == -4:
        raise IndexError("fast path: idx holds a row outside Xtr, or Xtr/Ytr a character id outside the "
                         "vocabulary (parameters hold the state before that step)")
    if status in (-2, -3):
        raise RuntimeError("fast path: " + ("unsupported dimensions" if status == -2 else "out of memory"))
    return losses, int(status)


# The lecture MLP's layer pattern, and the position of each of the native step's tensors in it.
MLP_PATTERN = (Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear)
MLP_NAMES = {"C": "0.weight", "W1": "2.weight", "b1": "2.bias", "W2": "5.weight", "b2": "5.bias",
             "bngain": "3.weight", "bnbias": "3.bias"}


def mlp_view(model) -> tuple[Params, BNStats, float] | str:
    """The native step's view of a model with the lecture MLP's layers (sharing memory, so the
    native updates land in the model), or the one-line reason it does not fit."""
    layers = getattr(model, "layers", None)
    kinds = tuple(type(layer) for layer in layers) if layers is not None else ()
    if kinds != MLP_PATTERN:
        names = ", ".join(type(layer).__name__ for layer in layers) if layers else type(model).__name__
        return (f"the native step implements the lecture MLP (Embedding, FlattenConsecutive, Linear, "
                f"BatchNorm1d, Tanh, Linear), not this model ({names})")
    emb, flat, lin1, bn, _, lin2 = layers
    if lin1.bias is None or lin2.bias is None:
        return "the native step needs both Linear layers with a bias"
    if bn.eps != ops.BN_EPS:
        return f"the native step uses batchnorm eps {ops.BN_EPS:g} (this model: {bn.eps:g})"
    V = emb.weight.shape[0]
    if V > 128:
        return f"the fast path supports vocab_size <= 128 (got {V})"
    dtypes = {t.dtype for t in (*model.params().values(), *model.buffers().values())}
    if dtypes != {torch.float32}:
        got = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"the fast path is float32 only (got {got})"
    H = lin1.weight.shape[1]
    p = Params(emb.weight, lin1.weight, lin1.bias, lin2.weight, lin2.bias,
               bn.weight.view(1, H), bn.bias.view(1, H))
    return p, BNStats(bn.running_mean.view(1, H), bn.running_var.view(1, H)), bn.momentum


def make_steps_fn(lib: ctypes.CDLL, tile: int = 0) -> Callable:
    """The steps function of train.py's contract (model, Xtr, Ytr, idx, lrs) -> losses, running
    on the native library. tile > 0 turns on activation checkpointing with that many rows per tile."""
    from handgrad.train import NonFiniteError  # train imports fast lazily; no cycle at import time

    def fast_steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor) -> Tensor:
        """Run K = len(idx) SGD steps in place in native code (see train.eager_steps for the contract)."""
        view = mlp_view(model)
        if isinstance(view, str):
            raise ValueError(view)
        p, bn, momentum = view
        losses, status = _run(lib, p, bn, Xtr, Ytr, idx, lrs, momentum, tile, None)
        if status >= 0:
            name = GRAD_NAMES[status % 8]
            raise NonFiniteError(status // 8, name if name == "loss" else "d" + MLP_NAMES[name[1:]])
        return losses

    return fast_steps


def plan(model, tile: int = 0) -> tuple[Callable | None, str]:
    """(steps_fn, "") when the fast path can run this model, else (None, one-line reason)."""
    view = mlp_view(model)
    if isinstance(view, str):
        return None, view
    try:
        lib = load_library()
    except FastUnavailable as e:
        return None, str(e)
    return make_steps_fn(lib, tile), ""


def fast_grads(model, X: Tensor, Y: Tensor, tile: int = 0) -> tuple[float, dict[str, Tensor]]:
    """One step's loss and gradients from the native code, for the batch X (N, T), Y (N,); the
    model is not modified. Returns (loss, {parameter name: gradient})."""
    view = mlp_view(model)
    if isinstance(view, str):
        raise ValueError(view)
    p, _, _ = view
    lib = load_library()
    sizes = [t.numel() for t in p.tensors()]
    out = torch.zeros(sum(sizes), dtype=torch.float32)
    idx = torch.arange(X.shape[0], dtype=torch.int64)[None]  # (1, N)
    lrs = torch.zeros(1, dtype=torch.float64)  # (1,) unused: no update is made
    losses, _ = _run(lib, p, None, X, Y, idx, lrs, 0.0, tile, out)  # with grads_out p is only read
    params = model.params()
    grads = {MLP_NAMES[f]: g.view(params[MLP_NAMES[f]].shape)
             for (f, _), g in zip(p.items(), torch.split(out, sizes))}
    return float(losses[0]), grads


def workspace_bytes(model, batch_size: int, tile: int = 0) -> int:
    """Bytes the native step allocates for one call (padded parameters, gradients, activations)."""
    view = mlp_view(model)
    if isinstance(view, str):
        raise ValueError(view)
    p = view[0]
    lib = load_library()
    T = p.W1.shape[0] // p.C.shape[1]
    return int(lib.hg_workspace_bytes(_dims(p, batch_size, T, 1, tile, 1)))
