"""`python benchmarks/distributed_bench.py`: examples/s of N data-parallel processes against one across batch
sizes, where each step's time goes (compute, batchnorm collectives, the gradient all-reduce), and one
all-reduce alone from 1 float to millions, fitted to the latency + bytes/bandwidth model (Hockney 1994;
ring all-reduce: Patarasuk & Yuan 2009). docs/scale.md reads the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from handgrad import data, engines, io, models, train
from handgrad.engines import native, parallel
from handgrad.engines.parallel import Comm
from handgrad.layers import numel

DEFAULT_BATCHES = tuple(2 ** k for k in range(5, 17))  # 32 .. 65,536
ALLREDUCE_SIZES = tuple(4 ** k for k in range(0, 11))  # 1 .. 1,048,576 floats, plus the model's gradient
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ENGINES = ("fast", "eager")


class BenchUsageError(ValueError):
    """A bad flag; the message is one line for the user."""


@dataclass(frozen=True)
class BenchConfig:
    model: str = "mlp"
    nproc: int = 2
    batches: tuple[int, ...] = DEFAULT_BATCHES
    seconds: float = 0.4  # timed seconds per batch size and process count (at least MIN_STEPS steps)
    dtype: str = "float32"
    seed: int = 42
    engine: str = "fast"  # fast: the ranks' native program vs one process's best native step; eager: eager
    repeat: int = 1  # alternate one process and nproc processes this many times; medians are reported
    tile: int = 0  # examples per tile of the native program; 0: as handgrad train does (engines.cache_tile)

    def __post_init__(self) -> None:
        if self.model not in models.PRESETS:
            raise BenchUsageError(f"--model {self.model}: expected one of {', '.join(models.PRESETS)}")
        if self.nproc < 2:
            raise BenchUsageError(f"--nproc {self.nproc}: expected 2 or more processes to compare with one")
        for B in self.batches:
            if B < 2 * self.nproc or B % self.nproc:
                raise BenchUsageError(f"--batches: {B} is not a multiple of --nproc {self.nproc} with at "
                                      "least 2 rows per process (batchnorm needs 2)")
        if not self.seconds > 0:
            raise BenchUsageError(f"--seconds {self.seconds}: expected a positive number")
        if self.dtype not in DTYPES:
            raise BenchUsageError(f"--dtype {self.dtype}: expected float32 or float64")
        if self.engine not in ENGINES:
            raise BenchUsageError(f"--engine {self.engine}: expected fast or eager")
        if self.engine == "fast" and self.dtype != "float32":
            raise BenchUsageError(f"--engine fast runs float32 only; give --engine eager for --dtype "
                                  f"{self.dtype}")
        if self.repeat < 1:
            raise BenchUsageError(f"--repeat {self.repeat}: expected 1 or more")
        if self.tile < 0 or (self.tile and self.engine != "fast"):
            raise BenchUsageError(f"--tile {self.tile}: expected 0 (as handgrad train) or a number of "
                                  "examples per tile, with --engine fast")


MIN_STEPS, MAX_STEPS = 3, 2000


@dataclass
class Point:
    """One batch size: a step of one process against a step of nproc processes (seconds per step)."""

    batch: int
    steps: int  # timed steps (after one untimed)
    one: float  # one process: the single-process fast engine (or the eager step with --engine eager)
    many: float  # nproc processes: the slowest rank's wall time per step
    gradients: float  # of `many`: the one flat gradient all-reduce (incl. waiting for the slowest rank)
    batchnorm: float  # of `many`: the batchnorm forward all-gathers and backward all-reduces
    loss_diff: float  # max per-step |loss(nproc) - loss(one)|: both ran the same steps
    one_step: str = "engine"  # which single-process step was the faster (see one_process_steps)

    @property
    def compute(self) -> float:
        return self.many - self.gradients - self.batchnorm

    @property
    def speedup(self) -> float:
        return self.one / self.many


@dataclass
class Fit:
    """t(bytes) = latency + bytes / bandwidth, least squares over the measured sizes."""

    latency: float  # seconds
    bandwidth: float  # bytes per second

    def predict(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass
class BenchResult:
    config: dict
    params: int  # floats in the gradient buffer (+1 for the loss)
    points: list[Point]
    allreduce: dict[int, float]  # floats -> median seconds of one all-reduce among nproc processes
    fit: Fit
    machine: str
    speedups: list[list[float]] | None = None  # per batch size, every run's speedup (with --repeat)

    def table(self) -> str:
        c, R = self.config, self.config["nproc"]
        tiles = (f", tiles of {c['tile']} examples" if c.get("tile") else
                 f" (the {c['model']} in tiles of {engines.CACHE_TILE} from {engines.TILE_ROWS:,} examples "
                 "per rank, as handgrad train)" if c["model"] == "mlp" else "")
        one = "the native program as 1 rank" + (" (untiled or tiled)" if c.get("tile") else "")
        sides = (f"1 process: the fastest of its fast engine and {one}, ranks: the native program{tiles}"
                 if c["engine"] == "fast" else "both eager")
        lines = [f"benchmarks/distributed_bench.py: {c['model']} ({self.params:,} floats all-reduced "
                 f"per step, {c['dtype']}), {R} processes vs 1 ({sides}), gloo on 127.0.0.1, 1 thread each"
                 + (f", median of {c['repeat']} alternating runs" if c["repeat"] > 1 else ""),
                 self.machine,
                 f"{'batch':>7} {'steps':>5} {'1 proc ex/s':>12} {f'{R} proc ex/s':>12} {'speedup':>7} "
                 f"{'1 proc ms':>9} {f'{R} proc ms':>9} {'compute':>8} {'bn comm':>8} {'grad AR':>8} "
                 f"{'comm %':>6} {'max|dloss|':>10} {'1 proc step':>11}"
                 + ("  speedup of each run" if self.speedups else "")]
        for j, p in enumerate(self.points):
            comm = p.gradients + p.batchnorm
            runs = "  " + " ".join(f"{x:.2f}" for x in sorted(self.speedups[j])) if self.speedups else ""
            lines.append(f"{p.batch:>7} {p.steps:>5} {p.batch / p.one:>12,.0f} {p.batch / p.many:>12,.0f} "
                         f"{p.speedup:>6.2f}x {p.one * 1e3:>9.3f} {p.many * 1e3:>9.3f} "
                         f"{p.compute * 1e3:>8.3f} {p.batchnorm * 1e3:>8.3f} {p.gradients * 1e3:>8.3f} "
                         f"{100 * comm / p.many:>5.0f}% {p.loss_diff:>10.2g} {p.one_step:>11}{runs}")
        win = next((p.batch for p in self.points if p.speedup > 1), None)
        lines.append(f"{R} processes first beat 1 at batch {win}" if win else
                     f"{R} processes never beat 1 here")
        lines.append(f"all-reduce (sum) alone among {R} processes, median:")
        size = _itemsize(c)
        for n, t in sorted(self.allreduce.items()):
            tag = "  <- the model's gradient buffer" if n == self.params else ""
            model = self.fit.predict(n * size)
            lines.append(f"  {n:>9,} floats {n * size / 1e3:>10.1f} kB {t * 1e6:>10.1f} us   "
                         f"(model: {model * 1e6:>9.1f} us){tag}")
        lines.append(f"fit t = latency + bytes/bandwidth: latency {self.fit.latency * 1e6:.1f} us, bandwidth "
                     f"{self.fit.bandwidth / 1e9:.2f} GB/s")
        return "\n".join(lines)


def _itemsize(config: dict) -> int:
    return torch.empty(0, dtype=DTYPES[config["dtype"]]).element_size()


# ---------------------------------------------------------------------------- what is timed
@functools.cache
def _splits(block_size: int) -> data.Splits:
    return data.make_splits(data.read_words(data.default_data_path()).items, block_size, seed=42)


def _problem(cfg: BenchConfig):
    """The bundled names at the model's block size, and a fresh model (same init in every process)."""
    mcfg = models.preset(cfg.model)
    splits = _splits(mcfg.block_size)
    mcfg = models.with_vocab(mcfg, len(splits.vocab))
    return splits, models.build(mcfg, cfg.seed, DTYPES[cfg.dtype])


def _batches(cfg: BenchConfig, n: int, B: int, K: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + B)
    idx = torch.randint(0, n, (K + 1, B), generator=g)  # (K+1, B): one untimed step, then K
    return idx, torch.full((K + 1,), 0.01, dtype=torch.float64)  # a small lr: no batch size diverges


def _timed(steps_fn, model, splits, idx: Tensor, lrs: Tensor, before=lambda: None) -> tuple[float, Tensor]:
    """Seconds per step over idx[1:] after one untimed step idx[:1]; and every step's loss."""
    with torch.no_grad():
        first = steps_fn(model, splits.Xtr, splits.Ytr, idx[:1], lrs[:1])
        before()
        t0 = time.perf_counter()
        rest = steps_fn(model, splits.Xtr, splits.Ytr, idx[1:], lrs[1:])
        return (time.perf_counter() - t0) / (idx.shape[0] - 1), torch.cat([first, rest])


def _steps_for(seconds_per_step: float, budget: float) -> int:
    return max(MIN_STEPS, min(MAX_STEPS, math.ceil(budget / max(seconds_per_step, 1e-7))))


def one_process_steps(cfg: BenchConfig, model, B: int) -> dict[str, object]:
    """The single-process steps to compare with at batch B, by name; the faster one counts.
    --engine eager: the eager step. fast: the step a user gets (engines.plan's at batch B: for the
    mlp the fused lecture step, or from engines.COUNTED_ROWS the counted program in tiles; the native
    program for the others), and the ranks' native program as one rank (parallel.WorldOfOne: the first
    batchnorm counted and deferred, no collective), untiled and with the ranks' --tile, which a single
    process can run too: the ranks must beat the best of them."""
    if cfg.engine == "eager":
        return {"eager": train.eager_steps}
    lib = native.load_program_library()
    as_one_rank = functools.partial(parallel.native_data_parallel_steps, parallel.WorldOfOne(), lib)
    engine = engines.plan(model, train.TrainConfig(engine="fast", batch_size=B))[0]
    steps = {"engine": engine, "1 rank": as_one_rank()}
    if cfg.tile:
        steps["1 rank tiled"] = as_one_rank(cfg.tile)
    return steps


def plan_steps(cfg: BenchConfig) -> list[int]:
    """The timed steps at each batch size: enough to fill cfg.seconds, probed with 2 steps."""
    splits, model = _problem(cfg)
    n = splits.Xtr.shape[0]
    return [_steps_for(_timed(next(iter(one_process_steps(cfg, model, B).values())), model, splits,
                              *_batches(cfg, n, B, 2))[0], cfg.seconds)
            for B in cfg.batches]


def time_one_process(cfg: BenchConfig, steps: list[int]) -> list[tuple[int, int, float, Tensor, str]]:
    """(batch, steps, seconds per step, losses, which step) of the faster single-process step at each
    batch size."""
    splits, model = _problem(cfg)
    out = []
    for B, K in zip(cfg.batches, steps):
        best = None
        for name, steps_fn in one_process_steps(cfg, model, B).items():
            _, model = _problem(cfg)  # every batch size starts from the same init, as the ranks do
            t, losses = _timed(steps_fn, model, splits, *_batches(cfg, splits.Xtr.shape[0], B, K))
            if best is None or t < best[2]:
                best = (B, K, t, losses, name)
        out.append(best)
    return out


def _one_process_worker(comm: Comm, cfg: BenchConfig, steps: list[int]) -> list:
    """time_one_process in a fresh process of its own, as each rank is (a world of one: no collective)."""
    return time_one_process(cfg, steps)


def _barrier(comm: Comm) -> None:
    comm.all_reduce_(torch.zeros(1), "barrier")


def _rank_worker(comm: Comm, cfg: BenchConfig, plan: list[tuple[int, int]], sizes: list[int]) -> dict:
    """On every rank: the data-parallel step at each (batch, steps) of the plan, timed with the
    collectives' share; then one all-reduce of each size in `sizes`, timed alone."""
    splits, _ = _problem(cfg)
    points = []
    for B, K in plan:
        _, model = _problem(cfg)
        tcfg = train.TrainConfig(engine=cfg.engine, batch_size=B, recompute_tile=cfg.tile)
        steps_fn, engine, warning = engines.plan(model, tcfg, comm)  # as handgrad train's ranks
        if engine != cfg.engine:
            raise RuntimeError(f"--engine {cfg.engine}: {warning}")
        idx, lrs = _batches(cfg, splits.Xtr.shape[0], B, K)

        def reset():
            _barrier(comm)
            comm.seconds.clear()
            comm.calls.clear()

        t, losses = _timed(steps_fn, model, splits, idx, lrs, reset)
        bn = comm.seconds["batchnorm forward"] + comm.seconds["batchnorm backward"]
        points.append({"batch": B, "seconds": t, "losses": losses, "gradients": comm.seconds["gradients"] / K,
                       "batchnorm": bn / K})
    allreduce = {}
    dtype = DTYPES[cfg.dtype]
    for n in sizes:
        buf = torch.zeros(n, dtype=dtype)
        reps = max(5, min(200, int(2e6 // max(n, 1))))  # fewer repetitions of the large sizes
        times = []
        for _ in range(reps + 3):
            _barrier(comm)
            t0 = time.perf_counter()
            comm.all_reduce_(buf, "alone")
            times.append(time.perf_counter() - t0)
        allreduce[n] = statistics.median(times[3:])
    return {"points": points, "allreduce": allreduce}


def fit_latency_bandwidth(measured: dict[int, float], itemsize: int) -> Fit:
    """Least squares of t = a + b * bytes over the measured sizes in relative error (weights 1/t^2,
    so 1 float counts as much as a million): a is the latency, 1/b the bandwidth."""
    xs = [n * itemsize for n in measured]
    ys = list(measured.values())
    ws = [1 / y ** 2 for y in ys]
    sw = sum(ws)
    mx, my = sum(w * x for w, x in zip(ws, xs)) / sw, sum(w * y for w, y in zip(ws, ys)) / sw
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys))
    b = sxy / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    b = max(b, 1e-15)  # seconds per byte; noise must not make bandwidth negative
    return Fit(max(my - b * mx, 0.0), 1 / b)


def _median_point(samples: list[Point]) -> Point:
    """The run with the median speedup (its own numbers, so compute + comm still add up)."""
    return sorted(samples, key=lambda p: p.speedup)[len(samples) // 2]


def run(cfg: BenchConfig, sizes: tuple[int, ...] = ALLREDUCE_SIZES) -> BenchResult:
    torch.set_num_threads(1)
    steps = plan_steps(cfg)
    _, model = _problem(cfg)
    params = numel(model) + 1  # the flat buffer: [loss, every gradient]
    all_sizes = sorted({*sizes, params})
    samples: list[list[Point]] = [[] for _ in cfg.batches]
    allreduce_runs = []
    for _ in range(cfg.repeat):  # alternate, so a noisy minute falls on both sides
        (one,) = parallel.spawn(_one_process_worker, 1, cfg, steps, timeout=300)
        ranks = parallel.spawn(_rank_worker, cfg.nproc, cfg, list(zip(cfg.batches, steps)), all_sizes,
                                  timeout=300)
        for j, ((B, K, t1, losses1, name), *per_rank) in enumerate(zip(one, *(r["points"] for r in ranks))):
            slowest = max(per_rank, key=lambda p: p["seconds"])
            diff = max(float((p["losses"] - losses1).abs().max()) for p in per_rank)
            samples[j].append(Point(B, K, t1, slowest["seconds"], slowest["gradients"], slowest["batchnorm"],
                                    diff, name))
        allreduce_runs.append({n: max(r["allreduce"][n] for r in ranks) for n in all_sizes})
    points = [_median_point(s) for s in samples]
    allreduce = {n: statistics.median(a[n] for a in allreduce_runs) for n in all_sizes}
    config = asdict(cfg)
    fit = fit_latency_bandwidth(allreduce, _itemsize(config))
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread, torch {torch.__version__}"
    speedups = [[p.speedup for p in s] for s in samples] if cfg.repeat > 1 else None
    return BenchResult(config, params, points, allreduce, fit, machine, speedups)


# ---------------------------------------------------------------------------- the command
def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 32,1024,16384"
                                         ) from None
    return values


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python benchmarks/distributed_bench.py",
                                description="examples/s of N data-parallel processes vs 1; the all-reduce")
    p.add_argument("--model", default=d.model, help=f"mlp, deep or wavenet (default {d.model})")
    p.add_argument("--nproc", type=int, default=d.nproc,
                   help=f"processes to compare with one (default {d.nproc})")
    p.add_argument("--batches", type=_positive_ints, default=d.batches,
                   help="comma-separated global batch sizes (default 32,64,...,65536)")
    p.add_argument("--seconds", type=float, default=d.seconds,
                   help=f"timed seconds per batch size and process count (default {d.seconds})")
    p.add_argument("--dtype", default=d.dtype, help="float32 (default) or float64")
    p.add_argument("--engine", default=d.engine,
                   help="fast (default): ranks on the native program vs one process on the faster of its "
                        "fast engine and the native program as one rank; eager: both eager")
    p.add_argument("--repeat", type=int, default=d.repeat,
                   help="alternate one process and the ranks this many times and report the median run")
    p.add_argument("--tile", type=int, default=d.tile,
                   help="examples per tile of the ranks' native program (activation checkpointing: the mlp's "
                        "step is then one pass over tiles that stay in cache); the single process is timed "
                        f"with it too (default 0: as handgrad train chooses, the mlp in tiles of "
                        f"{engines.CACHE_TILE} from {engines.TILE_ROWS:,} examples per rank and the single "
                        f"process counted from {engines.COUNTED_ROWS:,})")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = BenchConfig(args.model, args.nproc, args.batches, args.seconds, args.dtype, engine=args.engine,
                          repeat=args.repeat, tile=args.tile)
    except BenchUsageError as e:
        print(f"distributed_bench.py: error: {e}", file=sys.stderr)
        return 2
    result = run(cfg)
    print(result.table())
    if args.json:
        record = {"config": result.config, "params": result.params, "machine": result.machine,
                  "points": [{**asdict(p), "compute": p.compute, "speedup": p.speedup}
                             for p in result.points],
                  "allreduce_seconds": {str(n): t for n, t in result.allreduce.items()},
                  "fit": asdict(result.fit), "speedups_of_each_run": result.speedups}
        io.atomic_write_bytes(Path(args.json), (json.dumps(record, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
