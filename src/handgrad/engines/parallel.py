"""The data-parallel engine on torch.distributed (gloo on CPU, NCCL for CUDA tensors; torchrun or
`handgrad train --nproc N` to launch) with every gradient still written by hand, synchronized
batchnorm included (ops.py's maths with the global counts and sums): the process group, the
synchronized step (eager and native), the ranks' agreement at the start, and local ranks' launch and
supervision. Which step a rank runs is handgrad.engines.plan's choice. References: Ioffe & Szegedy
2015 (batchnorm), the lecture's closed-form backward, Chan, Golub & LeVeque 1979 (combining per-rank
means and squared deviations), Li et al. 2020 ("PyTorch Distributed": one flat all-reduce instead of
one per tensor).

Shape legend: N rows of this rank's slice, n rows of the global batch, C channels, R ranks.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from handgrad import models, ops, optim, train
from handgrad.config import ConfigError, ref
from handgrad.engines import native
from handgrad.layers import BatchNorm1d, Sequential
from handgrad.lifeline import LAUNCHER_ENV
from handgrad.train import NonFiniteError, StepsFn, TrainConfig, TrainState

TIMEOUT_ENV = "HANDGRAD_DIST_TIMEOUT"  # seconds a collective may wait for a peer before giving up
DEFAULT_TIMEOUT = 60.0
LAUNCHED_ENV = "HANDGRAD_NPROC"  # set by --nproc in the processes it starts (they see --nproc too)
LOCK_FD_ENV = "HANDGRAD_LOCK_FD"  # the run directory's lock, an open descriptor the ranks inherit
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # the model's device type -> torch.distributed backend


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or never joined. One line."""


class DistUsageError(ConfigError):
    """Fields that cannot run on several ranks (or a bad rendezvous variable); one line for the user."""


# ---------------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class RankEnv:
    """The env:// rendezvous variables that torchrun (or --nproc) sets for each process."""

    rank: int  # RANK: this process among all, 0 .. world_size-1
    world_size: int  # WORLD_SIZE: processes in the job, over every machine
    local_rank: int  # LOCAL_RANK: this process on its machine
    master: str  # MASTER_ADDR:MASTER_PORT, where rank 0 hosts the rendezvous store
    local_world: int = 0  # LOCAL_WORLD_SIZE: processes on this machine (0: not set, taken as world_size)

    @classmethod
    def from_env(cls, env: dict | None = None) -> RankEnv | None:
        """The variables of `env` (default os.environ), or None when RANK/WORLD_SIZE are not set."""
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", 0))
        except ValueError:
            raise DistUsageError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r}: expected "
                                 "integers (as torchrun sets them)") from None
        if not 0 <= rank < world:
            raise DistUsageError(f"RANK={rank} is outside 0 .. WORLD_SIZE-1 = {world - 1}")
        return cls(rank, world, local, f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}",
                   local_world)

    @property
    def ranks_here(self) -> int:
        """Processes of the job on this machine."""
        return self.local_world if self.local_world > 0 else self.world_size


def timeout_seconds(env: dict | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistUsageError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Comm:
    """The collectives of one process group, timed per purpose, with a failure (a dead or hung
    peer) raised as PeerLost naming this rank and the collective.

    poll: wait for a collective by polling it (yielding the core between polls) instead of
    sleeping in it. A rank that sleeps lets its core go idle, and waking it (and gloo's threads)
    costs about 1 ms when every core is busy: measured here, a 12k-float all-reduce after 5 ms of
    compute took 2.0 ms sleeping and 0.5 ms polling. Only when the local ranks fit the cores: with
    more ranks than cores a poller takes time from a rank that computes."""

    def __init__(self, rank: int, world: int, group=None, timeout: float = DEFAULT_TIMEOUT,
                 poll: bool = False):
        self.rank, self.world, self.group, self.timeout, self.poll = rank, world, group, timeout, poll
        self.seconds: dict[str, float] = defaultdict(float)  # purpose -> time spent (incl. waiting)
        self.calls: dict[str, int] = defaultdict(int)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _lost(self, what: str, t0: float, e: BaseException) -> PeerLost:
        waited = time.perf_counter() - t0
        return PeerLost(f"rank {self.rank}: the {what} collective failed after {waited:.1f}s "
                        f"({_first_line(e)}); another rank died or stopped responding")

    def start(self, what: str, fn: Callable[[], object]) -> tuple[str, object]:
        """Issue fn(), an async_op collective (it runs on gloo's threads); finish() waits for it."""
        t0 = time.perf_counter()
        try:
            work = fn()
        except RuntimeError as e:  # gloo: "Connection closed by peer", ...
            raise self._lost(what, t0, e) from None
        self.seconds[what] += time.perf_counter() - t0
        return what, work

    def finish(self, pending: tuple[str, object]) -> None:
        what, work = pending
        t0 = time.perf_counter()
        try:
            if self.poll:
                while not work.is_completed():  # completes with an error too (peer lost, timeout)
                    os.sched_yield()
            work.wait()
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out waiting ..."
            raise self._lost(what, t0, e) from None
        self.seconds[what] += time.perf_counter() - t0
        self.calls[what] += 1

    def _run(self, what: str, fn: Callable[[], object]) -> None:
        self.finish(self.start(what, fn))

    def all_reduce_(self, t: Tensor, what: str) -> Tensor:
        """Sum `t` over every rank, in place (gloo has no average: callers scale before the sum)."""
        self.finish(self.start_all_reduce_(t, what))
        return t

    def start_all_reduce_(self, t: Tensor, what: str) -> tuple[str, object]:
        """all_reduce_ started: `t` holds the sum once finish() of the returned value returns."""
        return self.start(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group,
                                                        async_op=True))

    def all_gather_into(self, out: Tensor, t: Tensor, what: str) -> Tensor:
        """Every rank's `t` (n,) into `out` (R * n,), in rank order (no stacking: views of out)."""
        parts = list(out.view(self.world, -1).unbind(0))  # R views (n,)
        self._run(what, lambda: dist.all_gather(parts, t, group=self.group, async_op=True))
        return out

    def all_gather(self, t: Tensor, what: str) -> Tensor:
        """Every rank's `t`, stacked in rank order: (R, *t.shape), the same on every rank."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._run(what, lambda: dist.all_gather(out, t.contiguous(), group=self.group, async_op=True))
        return torch.stack(out)  # (R, ...)


class WorldOfOne(Comm):
    """The collectives of a single process without a process group: a sum or a gather over one rank is
    its input, so nothing is called. With it a single process runs the data-parallel native step
    (program.cpp's counted and deferred first batchnorm) and counts the collectives it would make."""

    def __init__(self):
        super().__init__(0, 1)

    def start(self, what: str, fn: Callable[[], object]) -> tuple[str, object]:  # fn is never called
        return what, None

    def finish(self, pending: tuple[str, object]) -> None:
        self.calls[pending[0]] += 1

    def all_gather_into(self, out: Tensor, t: Tensor, what: str) -> Tensor:
        self._run(what, lambda: None)
        return out.copy_(t)  # (1 * n,)


def init(env: RankEnv, device: str = "cpu", timeout: float | None = None) -> Comm:
    """Join the process group of `env` (env:// rendezvous) with the device's backend."""
    timeout = timeout_seconds() if timeout is None else timeout
    t0 = time.perf_counter()
    try:
        dist.init_process_group(BACKENDS[device], init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise PeerLost(f"rank {env.rank}: could not join the {env.world_size} ranks at {env.master} "
                       f"within {time.perf_counter() - t0:.0f}s ({_first_line(e)})") from None
    atexit.register(leave)  # a process that exits inside the group can abort in gloo's threads
    return Comm(env.rank, env.world_size, None, timeout, poll=env.ranks_here <= cores())


def leave() -> None:
    """Leave the process group (local: no collective), so the interpreter exits with its threads joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- synchronized batchnorm
def merge_moments(stats: Tensor) -> tuple[Tensor, Tensor, int]:
    """The mean and M2 (sum of squared deviations) of the union of R slices, and its row count n,
    from each slice's row count, mean and M2 (rows of `stats`: [N_r, mean_r (C), M2_r (C)]). Chan et
    al.: M2 = sum_r M2_r + sum_r N_r (mean_r - mean)^2, no cancellation as in sum(x^2) - n mean^2.
    Every rank combines the same gathered rows in rank order, so all get the same bits."""
    C = (stats.shape[1] - 1) // 2
    counts, means, m2s = stats[:, :1], stats[:, 1:1 + C], stats[:, 1 + C:]  # (R, 1) (R, C) (R, C)
    n = int(round(float(counts.sum())))
    mean = (counts * means).sum(0) / n  # (C,)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)  # (C,)
    return mean, m2, n


def global_moments(comm: Comm, rows: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, int]:
    """merge_moments over every rank from this rank's row count, mean (C,) and M2 (C,): one all-gather
    of [rows, mean, M2]."""
    mine = torch.cat([torch.full((1,), float(rows), dtype=mean.dtype, device=mean.device), mean, m2])
    return merge_moments(comm.all_gather(mine, "batchnorm forward"))  # (2C+1,) per rank


def sync_batchnorm_forward(x: Tensor, bngain: Tensor, bnbias: Tensor, eps: float, comm: Comm
                           ) -> tuple[Tensor, tuple, tuple[Tensor, Tensor]]:
    """Training-mode batchnorm whose statistics are over the rows of every rank (one all-gather of
    [N, mean, M2] per call); the normalisation itself is ops.batchnorm_normalise, local. Returns
    ops.batchnorm_forward's (out, cache, (bnmeani, bnvar)), the cache paired with the global row count n."""
    dims = tuple(range(x.dim() - 1))
    C = x.shape[-1]
    N = x.numel() // C
    local_mean = x.sum(dims) / max(N, 1)  # (C,)
    local_m2 = ((x - local_mean) ** 2).sum(dims)  # (C,)
    mean, m2, n = global_moments(comm, N, local_mean, local_m2)  # (C,) (C,)
    var = m2 / (n - 1)  # Bessel's n-1 over the global batch
    keep = (1,) * (x.dim() - 1) + (C,)
    bnmeani = mean.reshape(keep)  # (1, ..., C)
    bnvar = var.reshape(keep)  # (1, ..., C)
    out, cache = ops.batchnorm_normalise(x - bnmeani, bnvar, bngain, bnbias, eps)  # (..., C)
    return out, (cache, n), (bnmeani, bnvar)


def sync_batchnorm_backward(dout: Tensor, cache: tuple, comm: Comm) -> tuple[Tensor, Tensor, Tensor]:
    """ops.batchnorm_dx with the global n and the global sums (one all-reduce of [sum(dout),
    sum(dout * bnraw)]), so this rank's rows of dx are the rows of the single-process dx on the whole
    batch. The returned dbngain and dbnbias are this rank's share (its local sums): the data-parallel
    all-reduce of the gradients adds the shares, as for every other parameter."""
    bn_cache, n = cache
    bnraw, _, bngain = bn_cache
    C = dout.shape[-1]
    dbngain, dbnbias = ops.batchnorm_sums(dout, bnraw)  # (1, ..., C) this rank's share
    sums = comm.all_reduce_(torch.cat([dbnbias.reshape(-1), dbngain.reshape(-1)]), "batchnorm backward")
    dx = ops.batchnorm_dx(dout, bn_cache, n, sums[C:], sums[:C])  # (..., C) from the sums over all ranks
    return dx, dbngain.reshape(bngain.shape), dbnbias.reshape(bngain.shape)


class SyncBatchNorm1d(BatchNorm1d):
    """BatchNorm1d whose training statistics and backward sums are over the global batch of every
    rank of `comm`. Eval mode, running statistics and spec() are BatchNorm1d's, so a checkpoint of a
    synchronized model is a plain one (and resumes on any number of ranks)."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, dtype: torch.dtype = torch.float32,
                 comm: Comm | None = None):
        super().__init__(dim, eps, momentum, dtype)
        self.comm = comm

    @classmethod
    def sharing(cls, bn: BatchNorm1d, comm: Comm) -> SyncBatchNorm1d:
        """A synchronized layer over the same tensors as `bn` (in-place updates reach both)."""
        sync = cls.__new__(cls)
        sync.__dict__.update(bn.__dict__)
        sync.comm = comm
        return sync

    def forward(self, x: Tensor, training: bool = True) -> tuple[Tensor, object]:
        if not training:
            return super().forward(x, training)
        out, cache, stats = sync_batchnorm_forward(x, self.weight, self.bias, self.eps, self.comm)
        return out, (cache, stats)

    def backward(self, dout: Tensor, cache) -> tuple[Tensor, dict[str, Tensor]]:
        if cache is None:
            raise ValueError("SyncBatchNorm1d.backward needs a training-mode forward (eval has no cache)")
        bn_cache, _ = cache
        dx, dbngain, dbnbias = sync_batchnorm_backward(dout, bn_cache, self.comm)
        return dx, {"weight": dbngain, "bias": dbnbias}


def synchronized(model, comm: Comm):
    """A view of `model` whose BatchNorm1d layers are SyncBatchNorm1d over `comm`, sharing every
    tensor with `model` (nested Sequentials included); other layers are the same objects."""
    if isinstance(model, Sequential):
        return Sequential([synchronized(layer, comm) for layer in model.layers])
    if isinstance(model, BatchNorm1d) and not isinstance(model, SyncBatchNorm1d):
        return SyncBatchNorm1d.sharing(model, comm)
    return model


# ---------------------------------------------------------------------------- the data-parallel step
def shard(B: int, world: int, rank: int) -> slice:
    """Rank r's columns of a global batch of B: [r*B/R, (r+1)*B/R)."""
    if B % world:
        raise DistUsageError(f"{ref('batch_size')} {B} is not divisible by {world} ranks; use a multiple of "
                             f"{world} (each rank takes batch-size/{world} rows)")
    b = B // world
    return slice(rank * b, (rank + 1) * b)


def data_parallel_steps(comm: Comm) -> StepsFn:
    """train.StepsFn for one rank: each of the K steps takes this rank's slice of the global batch
    (every rank draws the same idx from the same generator), runs the hand-written forward/backward
    of the synchronized model with the loss seeded as (local rows / global rows), so the summed
    gradients are the gradients of the global mean loss, and all-reduces [loss, every gradient] in
    one flat buffer. The buffer is the same on every rank after the sum, so the non-finite check and
    the update agree everywhere and the replicas stay bit-identical. Sequences (targets (B, T)) seed
    the loss with this rank's counted positions over the batch's (every rank has the whole batch's
    targets, so no extra message); an optimizer with state (AdamW) moves every replica alike."""

    def steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor, optimizer=None) -> Tensor:
        K, B = idx.shape
        cols = shard(B, comm.world, comm.rank)
        seed = (cols.stop - cols.start) / B  # local rows / global rows: scale, then SUM
        move = optim.sgd_update if optimizer is None else optimizer.update
        synced = synchronized(model, comm)
        params = model.params()
        names, sizes = list(params), [t.numel() for t in params.values()]
        dtype = next(iter(params.values())).dtype
        flat = torch.empty(1 + sum(sizes), dtype=dtype)  # [loss share, every gradient]
        losses = torch.empty(K, dtype=torch.float64)  # (K,)
        for k in range(K):
            ix = idx[k, cols]  # (B/R,)
            if Ytr.dim() == 2:  # masked sequences: the share of the batch's counted positions
                seed = float((Ytr[ix] != ops.IGNORE).sum()) / float((Ytr[idx[k]] != ops.IGNORE).sum())
            step = models.loss_and_grads(synced, Xtr[ix], Ytr[ix], dloss=seed)
            torch.cat([(step.loss * seed).reshape(1), *(step.grads[n].reshape(-1) for n in names)], out=flat)
            comm.all_reduce_(flat, "gradients")
            if not bool(torch.isfinite(flat).all()):
                raise NonFiniteError(k, _first_bad(flat, names, sizes))
            losses[k] = flat[0]
            grads = {n: g.view(params[n].shape) for n, g in zip(names, flat[1:].split(sizes))}
            move(model, grads, float(lrs[k]))
            synced.update_buffers(step.caches)
        return losses

    return steps


class NativeCollectives:
    """The Python side of program.cpp's data-parallel hook (native.SYNC_FN), which only moves floats (the
    native step does the maths): SYNC_STATS all-gathers each rank's batchnorm mean|M2 (program.cpp
    merges them in rank order, Chan et al.), SYNC_SUMS starts the all-reduce of the batchnorm backward
    sums (SYNC_WAIT finishes it: the step computes a dW meanwhile), SYNC_GRADS all-reduces the flat
    [loss share, every gradient]; on the native step's own buffers, no copies.
    An exception (PeerLost, KeyboardInterrupt) cannot cross the C frames: it is kept, the hook returns
    1, the native step stops, and `reraise` raises it in the caller."""

    WHAT = {native.SYNC_STATS: "batchnorm forward", native.SYNC_SUMS: "batchnorm backward",
            native.SYNC_GRADS: "gradients"}  # the purposes Comm times, as for the eager step

    def __init__(self, comm: Comm):
        self.comm = comm
        self.error: BaseException | None = None
        self.pending = None  # the started SYNC_SUMS
        self.fn = native.SYNC_FN(self._call)  # kept alive as long as this object

    def _call(self, what: int, buf: int, n: int, out: int) -> int:
        try:
            if what == native.SYNC_WAIT:
                pending, self.pending = self.pending, None
                self.comm.finish(pending)
                return 0
            mine = native.floats_at(buf, n)  # (n,)
            if what == native.SYNC_STATS:
                self.comm.all_gather_into(native.floats_at(out, self.comm.world * n), mine, self.WHAT[what])
            elif what == native.SYNC_SUMS:
                self.pending = self.comm.start_all_reduce_(mine, self.WHAT[what])
            else:
                self.comm.all_reduce_(mine, self.WHAT[what])
            return 0
        except BaseException as e:  # noqa: BLE001 - handed to reraise(), never lost
            self.error = e
            return 1

    def reraise(self) -> None:
        error, self.error = self.error, None
        raise error if error is not None else PeerLost(f"rank {self.comm.rank}: a collective failed")


def native_data_parallel_steps(comm: Comm, lib, tile: int = 0, threads: int = 1) -> StepsFn:
    """train.StepsFn for one rank on the native program engine (csrc/program.cpp): the same
    data-parallel step as data_parallel_steps (this rank's slice of each global batch; batchnorm
    statistics and backward sums over the global batch; one flat all-reduce of the loss and the
    gradients), the collectives made through NativeCollectives while the native step waits.
    tile > 0: activation checkpointing per rank, the batchnorm sums still global."""
    hook = NativeCollectives(comm)
    run = native.make_program_fn(lib, tile, threads, sync=hook.fn)

    def steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor) -> Tensor:
        shard(idx.shape[1], comm.world, comm.rank)  # refuses a batch the ranks do not divide
        try:  # the native step takes its columns of idx, and counts the whole batch (program.cpp)
            return run(model, Xtr, Ytr, idx, lrs, ranks=comm.world, rank=comm.rank)
        except native.SyncFailed:
            hook.reraise()

    return steps


def _first_bad(flat: Tensor, names: list[str], sizes: list[int]) -> str:
    if not torch.isfinite(flat[0]):
        return "loss"
    bad = {n: g for n, g in zip(names, flat[1:].split(sizes))}
    return "d" + (train.first_non_finite(bad) or names[0])


# ---------------------------------------------------------------------------- agreement at the start
def fingerprints(state: TrainState, tcfg: TrainConfig, Xtr: Tensor, Ytr: Tensor) -> dict[str, int]:
    """Hashes of what every rank must share (a rank resumed from another copy of the checkpoint, or
    reading other data, would silently train another model)."""

    def h(*parts) -> int:
        m = hashlib.sha256()
        for p in parts:
            m.update(p.contiguous().cpu().numpy().tobytes() if isinstance(p, Tensor) else repr(p).encode())
        return int.from_bytes(m.digest()[:8], "little", signed=True)

    tensors = {**state.model.params(), **state.model.buffers()}
    config = json.dumps({k: v for k, v in dataclasses.asdict(tcfg).items() if k != "checkpoint_every"},
                        sort_keys=True)
    return {"the model (parameters and batchnorm statistics)": h(*tensors.keys(), *tensors.values()),
            "the step and batch generator": h(state.step, state.generator.get_state()),
            "the training data": h(Xtr, Ytr),
            "the training flags": h(config)}


def check_same(comm: Comm, state: TrainState, tcfg: TrainConfig, Xtr: Tensor, Ytr: Tensor) -> None:
    """Raise DistUsageError (on every rank) naming the first rank whose state differs from rank 0's."""
    prints = fingerprints(state, tcfg, Xtr, Ytr)
    table = comm.all_gather(torch.tensor(list(prints.values()), dtype=torch.int64), "start")  # (R, 4)
    for r in range(1, comm.world):
        for what, mine, theirs in zip(prints, table[0].tolist(), table[r].tolist()):
            if mine != theirs:
                raise DistUsageError(f"rank {r}: {what} differs from rank 0's; every rank needs the same "
                                     f"{ref('data')}, flags and {ref('resume')} checkpoint")


# ---------------------------------------------------------------------------- running local ranks
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The env:// variables of local rank `rank` of `world`, on the loopback address."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def _spawned(fn, rank: int, world: int, port: int, timeout: float, threads: int, results, args) -> None:
    torch.set_num_threads(threads)
    os.environ.update(rank_env(rank, world, port))
    try:
        comm = init(RankEnv(rank, world, rank, f"127.0.0.1:{port}"), timeout=timeout)
        out = fn(comm, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # reported to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args, timeout: float = 60.0, threads: int = 1) -> list:
    """Run fn(comm, *args) in nproc new local processes (gloo over 127.0.0.1) and return each rank's
    result (tensors, numbers, lists, dicts), in rank order. fn must be importable (module level).
    Waits as long as the ranks run (a hung collective fails after `timeout` inside them); raises
    RuntimeError with the failing rank's traceback, or naming a rank that died without one."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(fn, r, nproc, port, timeout, threads, results, args))
             for r in range(nproc)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < nproc:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} {_describe(procs[dead[0]].exitcode)} without a "
                                       "result") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(nproc)]


# ---------------------------------------------------------------------------- supervising --nproc
@dataclass(frozen=True)
class Outcome:
    code: int  # the exit code for the launcher
    message: str  # one line for the user ("" when every rank finished or all failed alike)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def supervise(procs: list, grace: float, poll: float = 0.05) -> Outcome:
    """Wait for every rank. After the first failure, the others have `grace` seconds to stop on
    their own (a dead peer breaks their next collective at once, a hung one after the timeout);
    those still running are then interrupted (SIGINT), and killed 2 s later, and named."""
    codes: dict[int, int] = {}
    first: tuple[int, float] | None = None  # (rank, time) of the first failure
    stopped: list[int] = []  # ranks that had to be stopped
    interrupted_at = None
    while len(codes) < len(procs):
        for r, p in enumerate(procs):
            if r not in codes and p.poll() is not None:
                codes[r] = p.returncode
                if p.returncode != 0 and first is None:
                    first = (r, time.monotonic())
        if first is not None and len(codes) < len(procs):
            waited = time.monotonic() - first[1]
            if interrupted_at is None and waited > grace:
                stopped = [r for r in range(len(procs)) if r not in codes]
                for r in stopped:
                    procs[r].send_signal(signal.SIGINT)
                interrupted_at = time.monotonic()
            elif interrupted_at is not None and time.monotonic() - interrupted_at > 2.0:
                for r in stopped:
                    if r not in codes:
                        procs[r].kill()
        time.sleep(poll)
    if first is None:
        return Outcome(0, "")
    bad, _ = first
    failed = {r: c for r, c in codes.items() if c != 0}
    exit_code = codes[bad] if codes[bad] > 0 else 1
    if not stopped and codes[bad] > 0 and len(set(failed.values())) == 1 and len(failed) == len(procs):
        return Outcome(exit_code, "")  # every rank failed alike (bad input, divergence): rank 0 said why
    if stopped:
        waiting = ", ".join(str(r) for r in sorted(failed) if r not in stopped)
        return Outcome(exit_code, f"rank {', '.join(map(str, stopped))} stopped responding (rank {waiting} "
                                  f"gave up waiting for it); stopped it {grace:.0f}s later")
    rest = sorted(r for r in codes if r != bad)
    msg = (f"rank {bad} {_describe(codes[bad])}; "
           + (f"the other rank{'s' if len(rest) > 1 else ''} stopped" if all(codes[r] != 0 for r in rest)
              else "rank(s) " + ", ".join(str(r) for r in rest if codes[r] == 0) + " had already finished"))
    return Outcome(exit_code, msg)


class _Terminated(Exception):
    """SIGTERM reached the launcher."""


def _terminated(signum, frame):
    raise _Terminated


def _stop(procs: list, wait: float) -> None:
    """Interrupt the ranks still running (they stop as at Ctrl-C), kill those left after `wait` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


STOP_SECONDS = 5.0  # how long ranks may take to stop when their launcher is terminated


def launch(argv: list[str], nproc: int, timeout: float, lock_fd: int | None = None) -> Outcome:
    """`handgrad train --nproc N`: run `python -m handgrad ARGV` as N local ranks (gloo on
    127.0.0.1, a free port) and supervise them. Returns the exit code and what to say about it.
    The ranks never outlive the launcher: each binds itself to it (handgrad.lifeline) and a SIGTERM
    here stops them before the launcher exits. `lock_fd`: the run directory's lock, held by the
    launcher and shared with every rank (the same open file, so the lock is held while any of them
    lives; rank 0 adopts it, LOCK_FD_ENV)."""
    port = free_port()
    base = {**os.environ, LAUNCHED_ENV: str(nproc), TIMEOUT_ENV: str(timeout), LAUNCHER_ENV: str(os.getpid())}
    if lock_fd is not None:
        base[LOCK_FD_ENV] = str(lock_fd)
    cmd = [sys.executable, "-m", "handgrad", *argv]
    procs: list = []
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(cmd, env={**base, **rank_env(r, nproc, port)},
                                          pass_fds=() if lock_fd is None else (lock_fd,)))
        return supervise(procs, grace=timeout)
    except KeyboardInterrupt:  # the terminal sent SIGINT to the ranks too; let them save and stop
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        return Outcome(130, "")
    except _Terminated:
        _stop(procs, STOP_SECONDS)
        return Outcome(128 + signal.SIGTERM, f"terminated (SIGTERM); stopped the {len(procs)} rank(s) it had "
                                             "started")
    except BaseException:  # a rank that could not be started, ...: none is left behind
        _stop(procs, 0.0)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def inherited_lock() -> int | None:
    """The run directory's lock descriptor a --nproc launcher passed to this rank, or None."""
    raw = os.environ.get(LOCK_FD_ENV, "")
    return int(raw) if raw.isdigit() and os.environ.get(LAUNCHER_ENV) else None
