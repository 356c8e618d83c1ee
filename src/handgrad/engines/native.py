"""The native engine: the training step (forward, closed-form backward, SGD) in native code that runs
many steps per call on preallocated padded buffers. The lecture MLP has its own fused step
(csrc/step.cpp, on its own 7-tensor struct MLP); any other stack of layers with a lowering (LOWERING,
one entry per layer type) is compiled into a program of ops that csrc/program.cpp runs. Both are built
at first use with the system compiler into a per-user cache and loaded with ctypes; no torch headers.
The math is ops.py's pairs + SGD; tests/test_fast.py proves it. Which of them runs, in what tiles, is
handgrad.engines.plan's choice; this module says why a model does not fit (mlp_reason, program_reason).

Environment: HANDGRAD_CC (the C++ compiler; default c++ or g++ on PATH), HANDGRAD_CACHE (the build
cache; default $XDG_CACHE_HOME/handgrad or ~/.cache/handgrad), HANDGRAD_BUILD_TIMEOUT (native_cache).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from handgrad import models, native_cache, ops
from handgrad.layers import BatchNorm1d, Embedding, FlattenConsecutive, Linear, ReLU, Tanh
from handgrad.train import NonFiniteError

SOURCE = Path(__file__).parents[1] / "csrc" / "step.cpp"
PROGRAM_SOURCE = Path(__file__).parents[1] / "csrc" / "program.cpp"
ABI_VERSION = 1
PROGRAM_ABI = 4
GRAD_NAMES = ("loss", "dC", "dW1", "db1", "dW2", "db2", "dbngain", "dbnbias")  # status codes of hg_steps

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL] = {}  # source -> its library, bound (once per process)


class MLP(dict):
    """The lecture MLP as csrc/step.cpp reads it: its 7 trainable tensors by the lecture's names, in
    models.LECTURE_NAMES's order (C (V, E), W1 (T*E, H), b1 (H,), W2 (H, V), b2 (V,), bngain (1, H),
    bnbias (1, H)), sharing memory with the model's layers."""

    def tensors(self) -> list[Tensor]:
        return list(self.values())


class BNStats:
    """The running statistics the native step updates: (1, H) views of a BatchNorm1d's buffers."""

    def __init__(self, mean: Tensor, var: Tensor):
        self.mean, self.var = mean, var


FastUnavailable = native_cache.NativeUnavailable  # cannot be built or loaded here (why, in one line)


# ---------------------------------------------------------------------------- build and load
# native_cache builds, caches and loads the libraries (its docstring says what the cache trusts).
have_compiler = native_cache.have_compiler


def build(force: bool = False, source: Path = SOURCE) -> Path:
    """Compile `source` (csrc/step.cpp or program.cpp) into the build cache unless a good copy is
    there, and return the shared library's path (native_cache.build)."""
    return native_cache.build(source, force)


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


def _load(source: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str) -> ctypes.CDLL:
    """Build (once per process and source) and load `source`'s library; raises FastUnavailable."""
    with _lock:
        if source not in _loaded:
            _loaded[source] = native_cache.load(source, bind, what)
        return _loaded[source]


def load_library() -> ctypes.CDLL:
    """The lecture MLP's fused native step (csrc/step.cpp); raises FastUnavailable."""
    return _load(SOURCE, _bind, "the native step")


# program.cpp's data-parallel hook, int sync(int what, float* buf, long n, float* out): the collectives
# of a step (an all-gather of buf into out, or an all-reduce of buf in place), made in Python
# (handgrad.engines.parallel) while the native step waits.
SYNC_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p)
SYNC_STATS, SYNC_SUMS, SYNC_GRADS, SYNC_WAIT = 0, 1, 2, 3  # program.cpp's SyncWhat
NO_SYNC = ctypes.cast(None, SYNC_FN)  # the null hook: one process


class SyncFailed(RuntimeError):
    """The data-parallel hook returned non-zero (a collective failed): the step stopped at step k,
    the parameters hold the state before it; the hook keeps the reason."""

    def __init__(self, k: int):
        super().__init__(f"fast path: a collective failed at step {k}")
        self.k = k


def floats_at(address: int, n: int) -> Tensor:
    """The n float32 at a native address as a tensor sharing that memory (no copy)."""
    return torch.frombuffer((ctypes.c_float * n).from_address(address), dtype=torch.float32)


def _bind_program(lib: ctypes.CDLL) -> ctypes.CDLL:
    p = ctypes.c_void_p
    lib.hg_program_abi.restype = ctypes.c_int
    lib.hg_program_bytes.restype = ctypes.c_long
    lib.hg_program_bytes.argtypes = [p, p]
    lib.hg_program_steps.restype = ctypes.c_long
    lib.hg_program_steps.argtypes = [p] * 10 + [SYNC_FN]
    lib.hg_program_profile.restype = ctypes.c_int
    lib.hg_program_profile.argtypes = [ctypes.c_int, p]
    lib.hg_program_par_min_macs.restype = ctypes.c_double
    lib.hg_fma_loop.restype = ctypes.c_double
    lib.hg_fma_loop.argtypes = [ctypes.c_long]
    if lib.hg_program_abi() != PROGRAM_ABI:
        raise FastUnavailable("the cached native program library has the wrong ABI version")
    return lib


def load_program_library() -> ctypes.CDLL:
    """The native program engine (csrc/program.cpp); raises FastUnavailable."""
    return _load(PROGRAM_SOURCE, _bind_program, "the native program")


def _reset_for_tests() -> None:
    """Forget the loaded libraries so the next load builds again (tests of the fallback)."""
    with _lock:
        _loaded.clear()


# ---------------------------------------------------------------------------- the steps function
def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _dims(p: MLP, B: int, T: int, K: int, tile: int, n: int) -> ctypes.Array:
    V, E = p["C"].shape
    H = p["W1"].shape[1]
    return (ctypes.c_int * 8)(B, T, E, H, V, tile, K, n)


def _step_inputs(Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The arrays a native call reads: X (n, T), Y (n,), idx (K, B) as contiguous int64, lrs (K,) as
    contiguous float64; ValueError when their lengths disagree."""
    X, Y = Xtr.to(torch.int64).contiguous(), Ytr.to(torch.int64).contiguous()
    ix, lr = idx.to(torch.int64).contiguous(), lrs.to(torch.float64).contiguous()
    if lr.shape[0] != ix.shape[0]:
        raise ValueError(f"lrs has {lr.shape[0]} entries for {ix.shape[0]} steps")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"Xtr has {X.shape[0]} rows but Ytr {Y.shape[0]}")
    return X, Y, ix, lr


def _run(lib: ctypes.CDLL, p: MLP, bn_running: BNStats | None, Xtr: Tensor, Ytr: Tensor, idx: Tensor,
         lrs: Tensor, momentum: float, tile: int, grads_out: Tensor | None) -> tuple[Tensor, int]:
    for name, t in p.items():
        if t.dtype != torch.float32:
            raise TypeError(f"fast path: {name} must be float32, got {t.dtype}")
    X, Y, ix, lr = _step_inputs(Xtr, Ytr, idx, lrs)
    K, B = ix.shape
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


def mlp_reason(model) -> str:
    """"" when the fused step (csrc/step.cpp) runs the model: the lecture MLP's layers
    (models.LECTURE_LAYERS) with both biases, batchnorm eps 1e-5, vocab <= 128, float32; else why not."""
    view = mlp_view(model)
    return view if isinstance(view, str) else ""


def mlp_view(model) -> tuple[MLP, BNStats, float] | str:
    """The fused step's view of a model with the lecture MLP's layers (sharing memory, so the native
    updates land in the model), or the one-line reason it does not fit."""
    layers = getattr(model, "layers", None)
    kinds = tuple(type(layer) for layer in layers) if layers is not None else ()
    if kinds != models.LECTURE_LAYERS:
        names = ", ".join(type(layer).__name__ for layer in layers) if layers else type(model).__name__
        want = ", ".join(k.__name__ for k in models.LECTURE_LAYERS)
        return f"the native step implements the lecture MLP ({want}), not this model ({names})"
    tensors = models.lecture_tensors(model)
    if tensors is None:
        return "the native step needs both Linear layers with a bias"
    bn = layers[3]
    if bn.eps != ops.BN_EPS:
        return f"the native step uses batchnorm eps {ops.BN_EPS:g} (this model: {bn.eps:g})"
    V = tensors["C"].shape[0]
    if V > 128:
        return f"the fast path supports vocab_size <= 128 (got {V})"
    dtypes = {t.dtype for t in (*model.params().values(), *model.buffers().values())}
    if dtypes != {torch.float32}:
        got = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"the fast path is float32 only (got {got})"
    H = tensors["W1"].shape[1]
    return MLP(tensors), BNStats(bn.running_mean.view(1, H), bn.running_var.view(1, H)), bn.momentum


def make_steps_fn(lib: ctypes.CDLL, tile: int = 0) -> Callable:
    """The steps function of train.py's contract (model, Xtr, Ytr, idx, lrs) -> losses, running
    on the native library. tile > 0 turns on activation checkpointing with that many rows per tile."""

    def fast_steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor) -> Tensor:
        """Run K = len(idx) SGD steps in place in native code (see train.eager_steps for the contract)."""
        view = mlp_view(model)
        if isinstance(view, str):
            raise ValueError(view)
        p, bn, momentum = view
        losses, status = _run(lib, p, bn, Xtr, Ytr, idx, lrs, momentum, tile, None)
        if status >= 0:
            name = GRAD_NAMES[status % 8]
            tensor = "loss" if name == "loss" else "d" + models.LECTURE_NAMES[name[1:]]
            raise NonFiniteError(status // 8, tensor)
        return losses

    return fast_steps



# ---------------------------------------------------------------------------- the program
# Op and parameter kinds of csrc/program.cpp, as data.
OP_KINDS = {"embed": 1, "linear": 2, "batchnorm": 3, "tanh": 4, "relu": 5, "bn_tanh": 6}
PARAM_KINDS = {"table": 1, "weight": 2, "bias": 3, "feature": 4}
VW = 16  # floats per vector in program.cpp: Linear outputs are padded to a multiple of it


def _pad16(n: int) -> int:
    return (n + VW - 1) // VW * VW


@dataclass(frozen=True)
class Layout:
    """An activation as program.cpp sees it: rows_per_example rows of nseg segments of c floats,
    segment s at s * segstride; alias >= 0 means it reinterprets that tensor's memory (flatten)."""

    rpe: int
    nseg: int
    c: int
    segstride: int
    alias: int = -1

    @property
    def width(self) -> int:  # the logical last dimension
        return self.nseg * self.c


@dataclass(frozen=True)
class Program:
    """A model compiled for program.cpp for inputs with T positions per example: the descriptor's body
    (tensors, ops, parameters, gradient check order; program.cpp's parse() documents the layout), the
    batchnorms' eps and momentum, and the model's parameter and buffer names in the program's order."""

    T: int
    counts: tuple[int, int, int]  # tensors, ops, parameters
    body: tuple[int, ...]
    fdesc: tuple[float, ...]  # eps, momentum per batchnorm
    params: tuple[str, ...]
    buffers: tuple[str, ...]  # running mean, running var per batchnorm

    def desc(self, B: int, K: int, nrows: int, tile: int, threads: int = 1, ranks: int = 1, rank: int = 0,
             count: bool = False) -> Tensor:
        """B examples per step in this process, of a global batch of B * ranks (data-parallel: this
        process is `rank` and takes the columns rank*B .. rank*B + B-1 of idx). count: the first
        batchnorm's statistics from character counts in one process too (program.cpp's Counted)."""
        return torch.tensor([B, self.T, K, nrows, tile, *self.counts, threads, ranks, rank, int(count),
                             *self.body], dtype=torch.int64)


# ---------------------------------------------------------------------------- lowering layers to ops
@dataclass
class _Lowering:
    """A program being built, layer by layer: its activations (the last is the current one), ops
    (kind, in, out, p0, p1, batchnorm index), parameters (kind, n0, n1, op, name), each batchnorm's
    eps and momentum and its buffers' names."""

    T: int
    tensors: list[Layout]
    ops: list[list[int]]
    params: list[tuple[int, int, int, int, str]]
    fdesc: list[float]
    buffers: list[str]
    rank3: bool = True  # the current activation is (N, t, C) rather than (N, C)

    def param(self, kind: str, shape: tuple[int, ...], name: str) -> int:
        n0, n1 = (1, shape[0]) if len(shape) == 1 else shape
        self.params.append((PARAM_KINDS[kind], n0, n1, len(self.ops), name))
        return len(self.params) - 1

    def op(self, kind: str, out: Layout, p0: int = -1, p1: int = -1, bn: int = -1) -> None:
        """An op from the current activation into a new one, `out`."""
        cur = len(self.tensors) - 1
        self.ops.append([OP_KINDS[kind], cur, cur + 1, p0, p1, bn])
        self.tensors.append(out)


def _where(i: int, layer) -> str:
    return f"layer {i} ({type(layer).__name__})"


def _embed(b: _Lowering, layers: list, i: int) -> int:
    """The first layer: its rows are packed (E floats) when a Linear reads them, else padded."""
    E = layers[0].weight.shape[1]
    first = next((x for x in layers[1:] if not isinstance(x, FlattenConsecutive)), None)
    b.tensors.append(Layout(b.T, 1, E, E if isinstance(first, Linear) else _pad16(E)))
    table = b.param("table", tuple(layers[0].weight.shape), "0.weight")
    b.ops.append([OP_KINDS["embed"], -1, 0, table, -1, -1])
    return 1


def _flatten(b: _Lowering, layers: list, i: int) -> int:
    """No op: a new view of the memory of the tensor before it."""
    x, n = b.tensors[-1], layers[i].n
    if not b.rank3 or x.rpe % n:
        raise ValueError(f"{_where(i, layers[i])} needs (N, T, C) input with T divisible by {n}, got "
                         f"{'T=' + str(x.rpe) if b.rank3 else '(N, C)'}")
    b.tensors.append(Layout(x.rpe // n, x.nseg * n, x.c, x.segstride, len(b.tensors) - 1))
    b.rank3 = x.rpe // n > 1  # (N, 1, C) is squeezed to (N, C)
    return 1


def _linear(b: _Lowering, layers: list, i: int) -> int:
    layer, x = layers[i], b.tensors[-1]
    fan_in, fan_out = layer.weight.shape
    if fan_in != x.width:
        raise ValueError(f"{_where(i, layer)} has fan_in {fan_in} but its input has {x.width} features")
    p0 = b.param("weight", (fan_in, fan_out), f"{i}.weight")
    p1 = b.param("bias", (fan_out,), f"{i}.bias") if layer.bias is not None else -1
    b.op("linear", Layout(x.rpe, 1, fan_out, _pad16(fan_out)), p0, p1)
    return 1


def _batchnorm(b: _Lowering, layers: list, i: int) -> int:
    """BatchNorm1d, fused with a Tanh right after it into one op."""
    layer, x = layers[i], b.tensors[-1]
    if layer.weight.shape[0] != x.width:
        raise ValueError(f"{_where(i, layer)} has {layer.weight.shape[0]} features but its input {x.width}")
    fused = i + 1 < len(layers) and isinstance(layers[i + 1], Tanh)
    p0 = b.param("feature", tuple(layer.weight.shape), f"{i}.weight")
    p1 = b.param("feature", tuple(layer.bias.shape), f"{i}.bias")
    out = Layout(x.rpe, x.nseg, x.c, x.segstride)
    b.op("bn_tanh" if fused else "batchnorm", out, p0, p1, len(b.fdesc) // 2)
    b.fdesc += [float(layer.eps), float(layer.momentum)]
    b.buffers += [f"{i}.running_mean", f"{i}.running_var"]
    return 2 if fused else 1


def _elementwise(kind: str) -> Callable[[_Lowering, list, int], int]:
    def lower(b: _Lowering, layers: list, i: int) -> int:
        x = b.tensors[-1]
        b.op(kind, Layout(x.rpe, x.nseg, x.c, x.segstride))
        return 1
    return lower


# How each layer type becomes program.cpp ops: one entry per layer type (rules as data). Which layers
# the native program runs, and the reason it gives for any other, are read from this table.
LOWERING: dict[type, Callable[[_Lowering, list, int], int]] = {
    Embedding: _embed, FlattenConsecutive: _flatten, Linear: _linear, BatchNorm1d: _batchnorm,
    Tanh: _elementwise("tanh"), ReLU: _elementwise("relu"),
}


def _and(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def program_reason(model) -> str:
    """"" when program.cpp knows every layer of the model (LOWERING) and its dtypes and settings, else a
    one-line reason (shapes are checked later by compile_program, which needs the input's T)."""
    layers = getattr(model, "layers", None)
    if not layers:
        return f"the native program runs a Sequential of layers, not {type(model).__name__}"
    names = ", ".join(type(layer).__name__ for layer in layers)
    unknown = [type(layer).__name__ for layer in layers if type(layer) not in LOWERING]
    if unknown:
        return (f"the native program knows {_and([k.__name__ for k in LOWERING])}, not "
                f"{', '.join(dict.fromkeys(unknown))} (model: {names})")
    if not isinstance(layers[0], Embedding) or any(isinstance(x, Embedding) for x in layers[1:]):
        return f"the native program needs one Embedding, as the first layer (model: {names})"
    if not any(isinstance(x, Linear) for x in layers):
        return f"the native program needs at least one Linear (model: {names})"
    dtypes = {t.dtype for t in (*model.params().values(), *model.buffers().values())}
    if dtypes != {torch.float32}:
        got = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"the fast path is float32 only (got {got})"
    return ""


def compile_program(model, T: int) -> Program:
    """The program of a model whose layers program_reason accepts, for inputs (N, T): each layer
    lowered by its LOWERING entry; raises ValueError (one line) when the shapes do not chain."""
    layers = model.layers
    b = _Lowering(T, [], [], [], [], [])
    i = 0
    while i < len(layers):
        i += LOWERING[type(layers[i])](b, layers, i)
    out = b.tensors[-1]
    if out.rpe != 1 or out.nseg != 1 or out.segstride % VW:
        raise ValueError(f"the model's output must be logits (N, V), got {out.rpe} rows of {out.width} "
                         "features per example")
    params = b.params
    # gradients are checked in the order backward produces them: last layer first, weight before bias
    order = sorted(range(len(params)), key=lambda j: (-int(params[j][4].split(".")[0]), j))
    body = [v for t in b.tensors for v in (t.rpe, t.nseg, t.c, t.segstride, t.alias)]
    body += [v for o in b.ops for v in o] + [v for p in params for v in p[:4]] + order
    return Program(T, (len(b.tensors), len(b.ops), len(params)), tuple(body), tuple(b.fdesc),
                   tuple(p[4] for p in params), tuple(b.buffers))


def _run_program(lib: ctypes.CDLL, model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor, tile: int,
                 grads_out: Tensor | None, threads: int = 1, sync=None, ranks: int = 1, rank: int = 0,
                 count: bool = False) -> tuple[Tensor, int, Program]:
    X, Y, ix, lr = _step_inputs(Xtr, Ytr, idx, lrs)
    K, BG = ix.shape
    if BG % ranks:
        raise ValueError(f"a global batch of {BG} does not split over {ranks} ranks")
    B = BG // ranks
    if X.dim() != 2:
        raise ValueError(f"Xtr must be (n, T) character ids, got shape {tuple(X.shape)}")
    prog = compile_program(model, X.shape[1])
    named = {**model.params(), **model.buffers()}
    for name in prog.params + prog.buffers:
        if named[name].dtype != torch.float32:
            raise TypeError(f"fast path: {name} must be float32, got {named[name].dtype}")
    user = [named[n] for n in prog.params + prog.buffers]
    bufs = [t if t.is_contiguous() else t.contiguous() for t in user]
    np_ = len(prog.params)
    pp = (ctypes.c_void_p * max(np_, 1))(*(t.data_ptr() for t in bufs[:np_]))
    bp = (ctypes.c_void_p * max(len(prog.buffers), 1))(*(t.data_ptr() for t in bufs[np_:]))
    desc = prog.desc(B, K, X.shape[0], tile, threads, ranks, rank, count)
    fdesc = torch.tensor(prog.fdesc or (0.0,), dtype=torch.float64)
    losses = torch.empty(K, dtype=torch.float64)  # (K,)
    status = lib.hg_program_steps(desc.data_ptr(), fdesc.data_ptr(), pp, bp, X.data_ptr(), Y.data_ptr(),
                                  ix.data_ptr(), lr.data_ptr(), losses.data_ptr(),
                                  grads_out.data_ptr() if grads_out is not None else None,
                                  NO_SYNC if sync is None else sync)
    for t, b in zip(user, bufs):
        if b is not t:
            t.copy_(b)
    if status <= -4:
        k, collective = divmod(-4 - status, 2)
        if collective:
            raise SyncFailed(k)
        raise IndexError(f"fast path: at step {k} idx holds a row outside Xtr, or Xtr/Ytr a "
                         "character id outside the vocabulary (parameters hold the state before that step)")
    if status in (-2, -3):
        raise RuntimeError("fast path: " + ("unsupported dimensions" if status == -2 else "out of memory"))
    return losses, int(status), prog


def make_program_fn(lib: ctypes.CDLL, tile: int = 0, threads: int = 1, sync=None, count: bool = False
                    ) -> Callable:
    """The steps function of train.py's contract running the model's program in native code. tile > 0
    turns on activation checkpointing with that many examples per tile; threads 2 splits the large
    matrix products (program.cpp's PAR_MIN_MACS: a large batch) over two threads, bit-identically.
    sync (a SYNC_FN) makes it rank `rank` of `ranks` in a data-parallel step: idx holds each step's
    global batch, of which it takes its columns (handgrad.engines.parallel.native_data_parallel_steps).
    count: in one process too, the first batchnorm's statistics from character counts and its backward
    deferred to the end of the step (as the ranks do; data-parallel it is always on)."""

    def program_steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor, ranks: int = 1,
                      rank: int = 0) -> Tensor:
        """Run K = len(idx) SGD steps in place in native code (see train.eager_steps for the contract)."""
        reason = program_reason(model)
        if reason:
            raise ValueError(reason)
        losses, status, prog = _run_program(lib, model, Xtr, Ytr, idx, lrs, tile, None, threads, sync, ranks,
                                            rank, count)
        if status >= 0:
            k, r = divmod(status, len(prog.params) + 1)
            raise NonFiniteError(k, "loss" if r == 0 else "d" + prog.params[r - 1])
        return losses

    return program_steps


# The phases csrc/program.cpp's profile times, in its order; "step" is the whole step (all phases).
PROFILE_PHASES = ("embedding", "linear", "batchnorm", "activation", "cross-entropy", "linear dW db",
                  "linear dx", "batchnorm backward", "activation backward", "embedding backward",
                  "sgd + transpose", "step")


def profile_program(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor,
                    tile: int = 0) -> dict[str, float]:
    """Run the model's program for K = len(idx) steps (updating it) with the native per-phase timer on;
    returns microseconds per step of each phase of PROFILE_PHASES (CPU time of the calling thread)."""
    lib = load_program_library()
    out = (ctypes.c_double * len(PROFILE_PHASES))()
    lib.hg_program_profile(1, None)
    try:
        losses, status, _ = _run_program(lib, model, Xtr, Ytr, idx, lrs, tile, None)
    finally:
        lib.hg_program_profile(0, out)
    K = idx.shape[0]
    return {name: out[i] / 1e3 / K for i, name in enumerate(PROFILE_PHASES)}


def fast_grads(model, X: Tensor, Y: Tensor, tile: int = 0) -> tuple[float, dict[str, Tensor]]:
    """One step's loss and gradients from the native code, for the batch X (N, T), Y (N,); the
    model is not modified. Returns (loss, {parameter name: gradient})."""
    view = mlp_view(model)
    if isinstance(view, str):
        return _program_grads(model, X, Y, tile)
    p, _, _ = view
    lib = load_library()
    sizes = [t.numel() for t in p.tensors()]
    out = torch.zeros(sum(sizes), dtype=torch.float32)
    idx = torch.arange(X.shape[0], dtype=torch.int64)[None]  # (1, N)
    lrs = torch.zeros(1, dtype=torch.float64)  # (1,) unused: no update is made
    losses, _ = _run(lib, p, None, X, Y, idx, lrs, 0.0, tile, out)  # with grads_out p is only read
    params = model.params()
    names = models.LECTURE_NAMES
    grads = {names[f]: g.view(params[names[f]].shape)
             for (f, _), g in zip(p.items(), torch.split(out, sizes))}
    return float(losses[0]), grads


def _program_grads(model, X: Tensor, Y: Tensor, tile: int) -> tuple[float, dict[str, Tensor]]:
    reason = program_reason(model)
    if reason:
        raise ValueError(reason)
    params = model.params()
    sizes = [t.numel() for t in params.values()]
    out = torch.zeros(sum(sizes), dtype=torch.float32)
    idx = torch.arange(X.shape[0], dtype=torch.int64)[None]  # (1, N)
    lrs = torch.zeros(1, dtype=torch.float64)  # (1,) unused: no update is made
    losses, _, prog = _run_program(load_program_library(), model, X, Y, idx, lrs, tile, out)
    sizes = [params[n].numel() for n in prog.params]
    grads = {n: g.view(params[n].shape) for n, g in zip(prog.params, torch.split(out, sizes))}
    return float(losses[0]), grads


def workspace_bytes(model, batch_size: int, tile: int = 0, T: int | None = None) -> int:
    """Bytes the native code allocates for one call (padded parameters, gradients, activations). The
    program needs the input's T (positions per example)."""
    view = mlp_view(model)
    if isinstance(view, str):
        reason = program_reason(model)
        if reason or T is None:
            raise ValueError(reason or "workspace_bytes of a program needs T")
        prog = compile_program(model, T)
        fdesc = torch.tensor(prog.fdesc or (0.0,), dtype=torch.float64)
        desc = prog.desc(batch_size, 1, 1, tile)
        return int(load_program_library().hg_program_bytes(desc.data_ptr(), fdesc.data_ptr()))
    p = view[0]
    lib = load_library()
    T = p["W1"].shape[0] // p["C"].shape[1]
    return int(lib.hg_workspace_bytes(_dims(p, batch_size, T, 1, tile, 1)))
