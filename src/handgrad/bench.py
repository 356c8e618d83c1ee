"""`handgrad bench --model M`: time one training step of a model by every engine, in one process, on the
same data, init and batches: the fast native program, the eager hand-written step, PyTorch autograd
(eager, optionally torch.compile) and the GEMM floor (the step's matrix products alone, torch.mm with
out=). Autograd appears here only as a baseline to beat; training never uses it. The library
measures; the CLI prints.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from handgrad import data, engines, models, ops, reference, train
from handgrad.config import Expect, OneOf, option, validate
from handgrad.engines import native
from handgrad.layers import Linear, Sequential, activation_bytes
from handgrad.report import Column, Table


@dataclass
class Row:
    name: str  # engine
    us_per_step: float | None  # median microseconds per training step (None: unavailable)
    note: str = ""  # what exactly was timed, or why it is unavailable
    q25: float | None = None  # spread: first and third quartile of the timed samples (us per step)
    q75: float | None = None
    bytes: int | None = None  # checkpointing rows: bytes the native program allocates for a step


@dataclass
class BenchResult:
    config: dict  # model, batch_size, sizes, threads, steps
    rows: list[Row]  # per-step timings at config.batch_size
    large: list[Row] = field(default_factory=list)  # per-step timings at the large batch
    large_batch: int = 0
    machine: str = ""
    gemm_flop: float = 0.0  # FLOP of the step's matrix products (2 per multiply-add), see gemm_shapes
    peak_flops: float = 0.0  # assumed FP32 FMA peak of one core (FLOP/s), see fma_peak
    peak_note: str = ""  # how peak_flops was computed
    checkpointing: list[Row] = field(default_factory=list)  # fast with and without --recompute-tile
    threads_rows: list[Row] = field(default_factory=list)  # at the large batch, 1 and 2 threads

    def us(self, name: str) -> float | None:
        return next((r.us_per_step for r in self.rows if r.name == name), None)

    def ratio(self, name: str, to: str = "fast") -> float | None:
        a, b = self.us(name), self.us(to)
        return None if a is None or b is None else a / b

    def table(self) -> str:
        c = self.config
        fast_us, floor_us = self.us("fast"), self.us(FLOOR)
        lines = [f"handgrad bench --model {c['model']}: batch {c['batch_size']}, {c['params']:,} parameters, "
                 f"{c['threads']} thread(s), median of {c['steps']} steps, {CLOCKS[c['clock']][1]}; "
                 f"{self.machine}",
                 f"matrix products per step: {self.gemm_flop / 1e6:.2f} MFLOP; FMA peak "
                 f"{self.peak_flops / 1e9:.1f} GFLOP/s ({self.peak_note})"
                 + (f"; activations cached per step: {c['activation_bytes'] / 2**20:.2f} MiB"
                    if c.get("activation_bytes") else "")]
        t = Table([Column("engine", "<", 27), Column("us/step", ">", 9), Column("q25-q75", ">", 15),
                   Column("x fast", ">", 7), Column("x floor", ">", 8), Column("GFLOP/s", ">", 8),
                   Column("%peak", ">", 6), Column("what", gap="  ")], rule="-" * 120)
        for r in self.rows:
            if r.us_per_step is None:
                t.add(r.name, "-", "", "-", "-", "-", "-", r.note)
                continue
            gflops = self.gemm_flop / (r.us_per_step * 1e-6) / 1e9
            t.add(r.name, f"{r.us_per_step:.1f}", f"{r.q25:.1f}-{r.q75:.1f}" if r.q25 is not None else "",
                  f"{r.us_per_step / fast_us:.2f}" if fast_us else "-",
                  f"{r.us_per_step / floor_us:.2f}" if floor_us else "-", f"{gflops:.1f}",
                  f"{100 * gflops * 1e9 / self.peak_flops:.0f}" if self.peak_flops else "-", r.note)
        lines += t.lines()
        floor_fast = self.ratio("fast", FLOOR)
        auto_fast = self.ratio("autograd eager")
        if floor_fast is not None and auto_fast is not None:
            lines += ["", f"ratios (this run): native / GEMM floor = {floor_fast:.2f}, "
                      f"autograd eager / native = {auto_fast:.2f}"]
        if self.checkpointing:
            t = Table([Column("run", "<", 24), Column("us/step", ">", 10), Column("MiB", ">", 9),
                       Column("time x", ">", 7), Column("mem x", ">", 6), Column("", gap="  ")],
                      rule="-" * 60,
                      title="activation checkpointing (--recompute-tile, examples per tile): time, and the "
                      "bytes the native step allocates (parameters, gradients, activations kept)")
            base = {}
            for r in self.checkpointing:
                b = base.setdefault(r.name.split(",")[0], r)
                t.add(r.name, f"{r.us_per_step:.1f}" if r.us_per_step is not None else "-",
                      f"{r.bytes / 2**20:.2f}" if r.bytes else "-",
                      f"{r.us_per_step / b.us_per_step:.2f}" if r.us_per_step and b.us_per_step else "-",
                      f"{r.bytes / b.bytes:.2f}" if r.bytes and b.bytes else "-", r.note)
            lines += ["", *t.lines()]
        if self.threads_rows:
            t = Table([Column("engine", "<", 40), Column("ms/step", ">", 9), Column("", gap="  ")],
                      rule="-" * 52,
                      title=f"threads at batch {self.large_batch} (wall clock, median ms per step)")
            for r in self.threads_rows:
                t.add(r.name, f"{r.us_per_step / 1e3:.2f}" if r.us_per_step is not None else "-", r.note)
            lines += ["", *t.lines()]
        if self.large:
            t = Table([Column("engine", "<", 27), Column("ex/s", ">", 12), Column("ms/step", ">", 9),
                       Column("x fast", ">", 7), Column("", gap="  ")], rule="-" * 56,
                      title=f"large batch {self.large_batch}: examples per second")
            fast_l = next((r.us_per_step for r in self.large if r.name == "fast"), None)
            for r in self.large:
                if r.us_per_step is None:
                    t.add(r.name, "-", "-", "-", r.note)
                else:
                    t.add(r.name, f"{self.large_batch / r.us_per_step * 1e6:,.0f}",
                          f"{r.us_per_step / 1e3:.2f}", f"{r.us_per_step / fast_l:.2f}" if fast_l else "-")
            lines += ["", *t.lines()]
        return "\n".join(lines)

    def to_json(self) -> str:
        d = asdict(self)
        d["ratios_to_fast"] = {r.name: self.ratio(r.name) for r in self.rows}
        d["ratios_to_floor"] = {r.name: self.ratio(r.name, FLOOR) for r in self.rows}
        return json.dumps(d, indent=2)


FLOOR = "GEMM floor (torch.mm)"
# How a step is timed: this thread's CPU time does not count the time other processes take the core
# (a shared machine), so it is the default with one thread; wall time counts every thread's work.
CLOCKS = {"cpu": (time.thread_time, "CPU time of the timing thread"),
          "wall": (time.perf_counter, "wall clock")}


# ---------------------------------------------------------------------------- the model's GEMMs
def gemm_shapes(model, X: Tensor) -> list[tuple[int, int, int]]:
    """(M, K, N) of every Linear's forward product x @ W, x viewed as (M, K) = (numel / fan_in, fan_in),
    found by one forward pass over the batch X (eval mode: the shapes are the same). A composite layer
    (a transformer Block, a BoWBlock, a Recurrent cell) counts the Linears inside it, each on the
    composite's rows (all of them keep its (B, T) leading dims), and its attention's two batched
    products per head, q k^T and att v, as (B nh T, hs, T) and (B nh T, T, hs)."""
    shapes: list[tuple[int, int, int]] = []

    def inner(layer, rows: int, T: int) -> None:
        for child in layer.children().values():
            if isinstance(child, Linear):
                shapes.append((rows, *child.weight.shape))
            elif hasattr(child, "children"):
                inner(child, rows, T)
            if hasattr(child, "n_head"):  # causal self-attention
                hs = child.c_proj.weight.shape[0] // child.n_head
                shapes.extend([(rows * child.n_head, hs, T), (rows * child.n_head, T, hs)])

    def walk(layer, x: Tensor) -> Tensor:
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                x = walk(sub, x)
            return x
        if isinstance(layer, Linear):
            K, N = layer.weight.shape
            shapes.append((x.numel() // K, K, N))
        elif hasattr(layer, "children"):
            inner(layer, x.numel() // x.shape[-1], x.shape[1])
        out, _ = layer.forward(x, training=True)
        return out

    with torch.no_grad():
        walk(model, X)
    return shapes


def gemm_flop(shapes: list[tuple[int, int, int]]) -> float:
    """Each Linear costs three products of 2*M*K*N FLOP: x @ W, dout @ W^T and x^T @ dout."""
    return float(sum(3 * 2 * M * K * N for M, K, N in shapes))


def _gemm_floor_fn(shapes: list[tuple[int, int, int]]) -> Callable[[], None]:
    """Every Linear's three products on preallocated buffers (torch.mm with out=), nothing else."""
    g = torch.Generator().manual_seed(0)
    calls = []
    for M, K, N in shapes:
        x, W, out, dout, dx, dW = (torch.randn(s, generator=g) for s in
                                   ((M, K), (K, N), (M, N), (M, N), (M, K), (K, N)))
        calls += [(x, W, out), (dout, W.t(), dx), (x.t(), dout, dW)]

    def run() -> None:
        for a, b, c in calls:
            torch.mm(a, b, out=c)

    return run


# ---------------------------------------------------------------------------- FMA peak
# FP32 FLOP per cycle of one core, by the widest FMA the CPU reports (2 FMA pipes each). Zen 4 runs
# AVX-512 on 256-bit pipes, so its peak is that of AVX2; Intel server cores have two 512-bit pipes.
FLOP_PER_CYCLE = (  # (vendor, cpu flag, FLOP/cycle, why)
    ("AuthenticAMD", "avx512f", 32, "2 x 256-bit FMA pipes (Zen 4 runs AVX-512 as 2 x 256)"),
    ("GenuineIntel", "avx512f", 64, "2 x 512-bit FMA pipes"),
    ("", "fma", 32, "2 x 256-bit FMA pipes"),
    ("", "", 8, "no FMA flag: 2 x 128-bit mul+add assumed"),
)


def fma_peak() -> tuple[float, str]:
    """(FLOP/s, how): measured by the native FMA loop when it can be built (what this core really
    reaches, turbo included), else the nominal estimate."""
    nominal, how = nominal_fma_peak()
    try:
        lib = native.load_program_library()
    except native.FastUnavailable:
        return nominal, how
    iters, flop_per_iter = 2_000_000, 12 * native.VW * 2
    best = 0.0
    lib.hg_fma_loop(10_000)
    for _ in range(5):
        t0 = time.thread_time()
        lib.hg_fma_loop(iters)
        dt = time.thread_time() - t0
        best = max(best, iters * flop_per_iter / dt if dt > 0 else 0.0)
    note = (f"measured: 12 independent 16-float FMA chains x {iters:,} rounds, best of 5, thread CPU time; "
            f"nominal {how}")
    return best, note


def nominal_fma_peak() -> tuple[float, str]:
    """(FLOP/s, how): nominal clock (cpu MHz, else the BogoMIPS/2 of a constant TSC) x FLOP/cycle."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0.0, "unknown (no /proc/cpuinfo)"
    fields_: dict[str, str] = {}
    for line in info.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields_.setdefault(k.strip(), v.strip())
    flags = set(fields_.get("flags", "").split())
    vendor = fields_.get("vendor_id", "")
    if "cpu MHz" in fields_:
        hz, clock = float(fields_["cpu MHz"]) * 1e6, "cpu MHz"
    elif "bogomips" in fields_:
        hz, clock = float(fields_["bogomips"]) / 2 * 1e6, "BogoMIPS/2"
    else:
        return 0.0, "unknown clock"
    for v, flag, per_cycle, why in FLOP_PER_CYCLE:
        if (not v or v == vendor) and (not flag or flag in flags):
            return hz * per_cycle, f"{hz / 1e9:.2f} GHz ({clock}) x {per_cycle} FLOP/cycle: {why}"
    return 0.0, "unknown"


# ---------------------------------------------------------------------------- timing
def _native(model, batch: int = 32, tile: int = 0, threads: int = 1) -> tuple[Callable | None, str]:
    """(the native engine `handgrad train` runs for `model` at `batch` examples per step, "") or
    (None, why there is none): engines.native_steps."""
    steps = engines.native_steps(model, train.TrainConfig(batch_size=batch, recompute_tile=tile),
                                 threads=threads)
    return (None, steps) if isinstance(steps, str) else (steps, "")



def _quartiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def _row(name: str, times: list[float], note: str) -> Row:
    med, q1, q3 = _quartiles(times)
    return Row(name, med, note, q1, q3)


_clock = [time.thread_time]  # set by run_bench from CLOCKS


def _time_each(call: Callable[[int], object], n: int, warmup: int, per: int = 1) -> list[float]:
    """Microseconds per step of each of n calls (call(i) runs `per` steps), after warm-up calls."""
    clock = _clock[0]
    for i in range(warmup):
        call(i)
    times = []
    for i in range(n):
        t0 = clock()
        call(i)
        times.append((clock() - t0) / per * 1e6)
    return times


def _autograd_step_fn(model, Xtr: Tensor, Ytr: Tensor, lr: float) -> Callable[[Tensor], Tensor]:
    """One autograd SGD step as a function of the batch's rows (for torch.compile): the model's
    forward on requires-grad copies of its parameters, torch.autograd.grad, p -= lr * grad."""
    from handgrad.layers import set_tensor

    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in model.params().items()}
    for k, t in leaves.items():
        set_tensor(model, k, t)

    def step(ix: Tensor) -> Tensor:
        with torch.enable_grad():
            logits, _ = model.forward(Xtr[ix], training=True)  # (B, V)
            loss, _ = ops.cross_entropy_forward(logits, Ytr[ix])
            grads = torch.autograd.grad(loss, list(leaves.values()))
        with torch.no_grad():
            for t, gr in zip(leaves.values(), grads):
                t.add_(gr, alpha=-lr)
        return loss.detach()

    return step


def _unavailable(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"unavailable: {type(e).__name__}: {msg}"


def _engines(mcfg: models.ModelConfig, splits: data.Splits, B: int, steps: int, compile_: bool, seed: int,
             fast_chunk: int, with_floor: bool, progress: Callable[[str], None]) -> list[Row]:
    Xtr, Ytr = splits.Xtr, splits.Ytr
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, Xtr.shape[0], (steps, B), generator=g)  # (steps, B)
    lr = 0.01 if models.kind(mcfg) == "context" else 5e-4  # well-behaved over thousands of timed steps
    tcfg = train.TrainConfig.for_model(mcfg.name)
    opt = lambda m: {"optimizer": train.new_optimizer(m, tcfg)} if tcfg.optimizer != "sgd" else {}  # noqa: E731
    model0 = models.build(mcfg, seed)
    fresh = lambda: models.build(mcfg, seed)  # noqa: E731 - every engine starts from the same init
    one = torch.full((1,), lr, dtype=torch.float64)  # (1,)
    rows = []

    progress("fast")
    fn, reason = _native(model0, B)  # as handgrad train runs it at batch B
    if fn is None:
        rows.append(Row("fast", None, f"unavailable: {reason}"))
    else:
        model = fresh()
        chunk = min(fast_chunk, steps)
        nchunks = max(1, steps // chunk)
        lrs = torch.full((chunk,), lr, dtype=torch.float64)

        def run_chunk(i: int) -> None:
            j = i % nchunks * chunk
            fn(model, Xtr, Ytr, idx[j:j + chunk], lrs)

        rows.append(_row("fast", _time_each(run_chunk, nchunks, warmup=1, per=chunk),
                         f"native, {chunk} steps per call, median over {nchunks} calls"))
        model = fresh()
        n1 = min(steps, 500)
        one_step = lambda i: fn(model, Xtr, Ytr, idx[i % n1:i % n1 + 1], one)  # noqa: E731
        rows.append(_row("fast, 1 step per call", _time_each(one_step, n1, warmup=20),
                         "the same native program called once per step (ctypes, copy-in/out)"))
        lecture_mlp = not native.mlp_reason(model0)
        fused = _native(model0)[0] if B >= engines.COUNTED_ROWS and lecture_mlp else None
        if fused is not None:  # what "fast" is below COUNTED_ROWS, for the ratio
            model = fresh()
            rows.append(_row("fast, fused lecture step", _time_each(
                lambda i: fused(model, Xtr, Ytr, idx[i % nchunks * chunk:i % nchunks * chunk + chunk], lrs),
                nchunks, warmup=1, per=chunk), f"the lecture MLP's fused step, {chunk} steps per call "
                f"(handgrad train's below {engines.COUNTED_ROWS:,} examples per step)"))

    progress("eager")
    model = fresh()
    update = "SGD" if tcfg.optimizer == "sgd" else "AdamW"
    kw = opt(model)
    with torch.no_grad():
        times = _time_each(lambda i: train.eager_steps(model, Xtr, Ytr, idx[i % steps:i % steps + 1], one,
                                                       **kw), steps, warmup=50)
    rows.append(_row("eager hand-written", times, f"train.eager_steps: layers' forward/backward + {update}, "
                     "PyTorch eager ops"))

    progress("autograd")
    model = fresh()
    kw = opt(model)
    times = _time_each(lambda i: reference.autograd_steps(model, Xtr, Ytr, idx[i % steps:i % steps + 1], one,
                                                          **kw), steps, warmup=50)
    rows.append(_row("autograd eager", times, f"reference.autograd_steps: the same {update} loop, gradients "
                     "from loss autograd"))

    if compile_:
        progress("autograd, torch.compile")
        try:
            cstep = torch.compile(_autograd_step_fn(fresh(), Xtr, Ytr, lr))
            rows.append(_row("autograd torch.compile", _time_each(lambda i: cstep(idx[i % steps]), steps,
                                                                  warmup=50),
                             "forward + torch.autograd.grad + SGD under torch.compile (default mode)"))
        except Exception as e:  # noqa: BLE001 - any compiler failure makes the row unavailable
            rows.append(Row("autograd torch.compile", None, _unavailable(e)))

    if with_floor:
        progress("gemm floor")
        shapes = gemm_shapes(model0, Xtr[idx[0]])
        run = _gemm_floor_fn(shapes)
        rows.append(_row(FLOOR, _time_each(lambda i: run(), steps, warmup=50),
                         f"the step's {3 * len(shapes)} matmuls alone (3 per Linear), torch.mm with out="))
    return rows


def _checkpointing(mcfg: models.ModelConfig, splits: data.Splits, B: int, steps: int, tile: int, seed: int,
                   label: str) -> list[Row]:
    """The fast engine at batch B without and with activation checkpointing (tile examples per tile):
    median us per step (chunks of steps), and the bytes its native buffers take for one step."""
    Xtr, Ytr = splits.Xtr, splits.Ytr
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, min(steps, 20))
    nchunks = max(1, steps // chunk)
    idx = torch.randint(0, Xtr.shape[0], (nchunks * chunk, B), generator=g)  # (steps, B)
    lrs = torch.full((chunk,), 0.01, dtype=torch.float64)
    rows = []
    for t in (0, tile):
        model = models.build(mcfg, seed)
        fn, reason = _native(model, tile=t)
        name = f"{label}, " + (f"tile {t}" if t else "no tile")
        if fn is None:
            rows.append(Row(name, None, f"unavailable: {reason}"))
            continue
        nbytes = native.workspace_bytes(model, B, tile=t, T=Xtr.shape[1])
        times = _time_each(lambda i, fn=fn, m=model: fn(m, Xtr, Ytr, idx[i * chunk:(i + 1) * chunk], lrs),
                           nchunks, warmup=1, per=chunk)
        rows.append(Row(name, *_quartiles(times)[:1], "recompute every activation tile by tile" if t else
                        "every activation kept for backward", *_quartiles(times)[1:], nbytes))
    return rows


def _threads(mcfg: models.ModelConfig, splits: data.Splits, B: int, steps: int, seed: int) -> list[Row]:
    """Wall-clock ms per step at batch B of the fast engine and of autograd eager with 1 and 2 threads
    (the native program splits only its large products; torch splits its ops)."""
    Xtr, Ytr = splits.Xtr, splits.Ytr
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, min(steps, 5))
    nchunks = max(1, steps // chunk)
    idx = torch.randint(0, Xtr.shape[0], (nchunks * chunk, B), generator=g)  # (steps, B)
    lrs = torch.full((chunk,), 0.01, dtype=torch.float64)
    old_clock, old_threads = _clock[0], torch.get_num_threads()
    _clock[0] = time.perf_counter
    rows = []
    try:
        for t in (1, 2):
            model = models.build(mcfg, seed)
            fn, reason = _native(model, B, threads=t)
            if fn is None:
                rows.append(Row(f"fast, {t} thread(s)", None, f"unavailable: {reason}"))
            else:
                mlp = not native.mlp_reason(model)
                note = ("products of >= 8M multiply-adds split in two" if not mlp else
                        "the MLP step runs on one thread" if B < engines.COUNTED_ROWS else
                        f"the MLP in tiles of {engines.CACHE_TILE}: no product large enough to split")
                rows.append(_row(f"fast, {t} thread(s)", _time_each(
                    lambda i, fn=fn, m=model: fn(m, Xtr, Ytr, idx[i * chunk:(i + 1) * chunk], lrs), nchunks,
                    warmup=1, per=chunk), note if t == 2 else ""))
        for t in (1, 2):
            torch.set_num_threads(t)
            model = models.build(mcfg, seed)
            rows.append(_row(f"autograd eager, {t} thread(s)", _time_each(
                lambda i, m=model: reference.autograd_steps(m, Xtr, Ytr, idx[i * chunk:(i + 1) * chunk], lrs),
                nchunks, warmup=1, per=chunk), "torch.set_num_threads"))
    finally:
        _clock[0] = old_clock
        torch.set_num_threads(old_threads)
    return rows


def run_bench(model: str = "mlp", batch_size: int = 32, steps: int = 5000, threads: int = 1,
              large_batch: int = 4096, large_steps: int = 30, compile: bool = False, seed: int = 42,
              progress: Callable[[str], None] | None = None, clock: str | None = None, tile: int = 8,
              measure_threads: bool = True, **overrides) -> BenchResult:
    """Time every engine on model `model` (its preset, with `overrides` such as n_hidden=...; median
    per step after warm-up, quartiles as the spread), then examples per second at large_batch (0: skip).
    torch runs on `threads` threads; the native program on one. clock: "cpu" (default with one thread)
    or "wall" (CLOCKS). tile > 0 adds the activation checkpointing table (tile examples per tile);
    measure_threads adds 1 vs 2 threads at large_batch (wall clock)."""
    clock = clock or ("cpu" if threads == 1 else "wall")
    _clock[0] = CLOCKS[clock][0]
    progress = progress or (lambda s: None)
    words = data.read_words(data.default_data_path())
    probe = models.preset(model, **overrides)
    splits = data.KINDS[models.kind(probe)](words.items, probe.block_size, seed)
    mcfg = models.with_vocab(probe, len(splits.vocab))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _engines(mcfg, splits, batch_size, steps, compile, seed, 20, True, progress)
        ckpt = []
        if tile:
            progress("activation checkpointing")
            ckpt = _checkpointing(mcfg, splits, batch_size, min(steps, 1000), tile, seed,
                                  f"batch {batch_size}")
            if large_batch:
                ckpt += _checkpointing(mcfg, splits, large_batch, large_steps, max(tile, large_batch // 16),
                                       seed, f"batch {large_batch}")
        thread_rows = []
        if large_batch and measure_threads:
            progress(f"threads at batch {large_batch}")
            thread_rows = _threads(mcfg, splits, large_batch, large_steps, seed)
        large = []
        if large_batch:
            progress(f"large batch {large_batch}")
            rows_l = _engines(mcfg, splits, large_batch, large_steps, False, seed, 10, False, progress)
            large = [r for r in rows_l if r.name in ("fast", "fast, fused lecture step", "eager hand-written",
                                                     "autograd eager")]
        m = models.build(mcfg, seed)
        flop = gemm_flop(gemm_shapes(m, splits.Xtr[:batch_size]))
        cached = activation_bytes(m, splits.Xtr[:batch_size].clone())  # a step keeps for backward
    finally:
        torch.set_num_threads(old_threads)
    sizes = {k: getattr(mcfg, k) for k in models.config_fields()}
    config = {"model": model, "batch_size": batch_size, **sizes,
              "params": sum(t.numel() for t in m.params().values()), "steps": steps, "threads": threads,
              "torch": torch.__version__, "clock": clock, "activation_bytes": cached}
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    peak, how = fma_peak()
    return BenchResult(config, rows, large, large_batch, machine, flop, peak, how, ckpt, thread_rows)


# ---------------------------------------------------------------------------- a whole training run
FULL_ENGINES = ("fast", "eager", "autograd")


def full_training(model: str = "wavenet", engine: str = "fast", steps: int | None = None, seed: int = 42,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Train `model` with its training preset (200k steps unless `steps`; names.txt, batch 32, one torch
    thread) on one engine: "fast" (the native step), "eager" (hand-written, PyTorch ops) or "autograd"
    (reference.autograd_steps), all drawing the same batches from the same init. Returns the training
    loop's wall time and CPU time (seconds), the last 1000 steps' mean training loss and the train/val
    losses with the inference statistics. progress(step, total) runs after every chunk."""
    if engine not in FULL_ENGINES:
        raise ValueError(f"engine must be one of {FULL_ENGINES}, got {engine!r}")
    words = data.read_words(data.default_data_path())
    probe = models.preset(model)
    splits = data.KINDS[models.kind(probe)](words.items, probe.block_size, seed)
    mcfg = models.with_vocab(probe, len(splits.vocab))
    tcfg = train.TrainConfig.for_model(model, seed=seed, split_seed=seed,
                                       **({"steps": steps} if steps else {}))
    state = train.state_of_splits(mcfg, tcfg, splits)
    if engine == "fast":
        steps_fn, reason = _native(state.model)
        if steps_fn is None:
            raise RuntimeError(f"the fast engine is unavailable: {reason}")
    else:
        steps_fn = train.eager_steps if engine == "eager" else reference.autograd_steps
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cb = (lambda pr: progress(pr.state.step, pr.total)) if progress else None
        w0, c0 = time.perf_counter(), time.thread_time()
        state = train.train(splits, mcfg, tcfg, state, callback=cb, steps_fn=steps_fn)
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        inference = models.with_buffers(state.model, train.inference_buffers(state, splits, tcfg))
        with torch.no_grad():
            losses = {split: models.evaluate(inference, *splits.split(split)) for split in ("train", "val")}
    finally:
        torch.set_num_threads(old)
    return {"model": model, "engine": engine, "steps": tcfg.steps, "wall_s": wall, "cpu_s": cpu,
            "us_per_step": wall / tcfg.steps * 1e6,
            "last_1000_train_loss": float(state.losses[-1000:].mean()),
            "train_loss": losses["train"], "val_loss": losses["val"]}



# ---------------------------------------------------------------------------- the command's options
def _count(at_least: int, expected: str) -> Expect:
    return Expect(lambda v: v >= at_least, expected)


@dataclass(frozen=True)
class BenchOptions:
    """Time the training step of every engine on one model in one process on the same data (median per step
    after warm-up, quartiles as the spread) and report the ratio of each to the fast path and to the GEMM
    floor (the step's matrix products alone), then examples per second at a large batch."""

    # run_bench's arguments, or full_training's with full_train

    model: str = option("mlp", "model preset (default {default})", OneOf(models.PRESETS))
    batch_size: int = option(32, "examples per step (default {default})",
                             _count(2, "a positive integer of at least 2 (batchnorm's n-1)"))
    n_hidden: int | None = option(None, "hidden units (default: the model's preset)")
    n_embd: int | None = option(None, "embedding size (default: the model's preset)")
    block_size: int | None = option(None, "context length (default: the model's preset)")
    steps: int = option(5000, "timed steps per engine (default {default})", _count(1, "a positive integer"))
    threads: int = option(1, "torch threads (default {default})", _count(1, "a positive integer"))
    large_batch: int = option(4096, "batch of the examples/second table (0 skips it; default {default})",
                              Expect(lambda v: v == 0 or v >= 2, "0 (skip) or at least 2"))
    no_compile: bool = option(False, "skip the torch.compile row")
    recompute_tile: int = option(8, "examples per tile of the activation checkpointing table (0 skips it; "
                                 "default {default}; at the large batch: max(this, large batch / 16))",
                                 _count(0, "0 (skip the table) or a positive number of examples per tile"),
                                 metavar="EXAMPLES")
    clock: str | None = option(None, "cpu: CPU time of the timing thread (default with one thread: other "
                               "processes on a shared core do not count); wall: wall clock",
                               OneOf(tuple(CLOCKS)))
    full_train: str | None = option(None, "instead: time one whole training run of the model's preset "
                                    "(200k steps) on ENGINE (fast, eager or autograd) and print its time and "
                                    "losses",
                                    OneOf(FULL_ENGINES), metavar="ENGINE")
    full_steps: int | None = option(None, "steps of --full-train (default: the preset's)",
                                    _count(1000, "at least 1000 (the last 1000 steps' loss is reported)"))

    def __post_init__(self) -> None:
        validate(self)


def run(o: BenchOptions, say: Callable[[str], None] | None = None) -> BenchResult | dict:
    """What `handgrad bench` measures: full_training's dict with o.full_train, else run_bench's result.
    say(line) hears what is being timed ("timing eager ..."), or every 5% of a full training run."""
    say = say or (lambda line: None)
    if o.full_train:
        shown = [-1]

        def every_5_percent(step: int, total: int) -> None:
            if step * 20 // total != shown[0]:
                shown[0] = step * 20 // total
                say(f"step {step:,} of {total:,}")

        return full_training(o.model, o.full_train, o.full_steps, progress=every_5_percent)
    overrides = {k: getattr(o, k) for k in ("n_hidden", "n_embd", "block_size") if getattr(o, k) is not None}
    return run_bench(model=o.model, batch_size=o.batch_size, steps=o.steps, threads=o.threads,
                     large_batch=o.large_batch, compile=not o.no_compile, clock=o.clock,
                     progress=lambda s: say(f"timing {s} ..."),
                     tile=o.recompute_tile, **overrides)


def full_text(r: dict) -> str:
    """full_training's result in one line."""
    loss = lambda v: "n/a (empty split)" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"{r['model']}, {r['steps']:,} steps on the {r['engine']} engine, one thread: training loop "
            f"{r['wall_s']:.1f} s wall ({r['cpu_s']:.1f} s CPU), {r['us_per_step']:.1f} us/step; last 1000 "
            f"steps' train loss {r['last_1000_train_loss']:.4f}; train {loss(r['train_loss'])}, val "
            f"{loss(r['val_loss'])}")
