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

from handgrad import data, fast, models, ops, reference, train
from handgrad.layers import Linear, Sequential


@dataclass
class Row:
    name: str  # engine
    us_per_step: float | None  # median microseconds per training step (None: unavailable)
    note: str = ""  # what exactly was timed, or why it is unavailable
    q25: float | None = None  # spread: first and third quartile of the timed samples (us per step)
    q75: float | None = None


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

    def us(self, name: str) -> float | None:
        return next((r.us_per_step for r in self.rows if r.name == name), None)

    def ratio(self, name: str, to: str = "fast") -> float | None:
        a, b = self.us(name), self.us(to)
        return None if a is None or b is None else a / b

    def table(self) -> str:
        c = self.config
        fast_us, floor_us = self.us("fast"), self.us(FLOOR)
        lines = [f"handgrad bench --model {c['model']}: batch {c['batch_size']}, {c['params']:,} parameters, "
                 f"{c['threads']} thread(s), median of {c['steps']} steps; {self.machine}",
                 f"matrix products per step: {self.gemm_flop / 1e6:.2f} MFLOP; FMA peak "
                 f"{self.peak_flops / 1e9:.1f} GFLOP/s ({self.peak_note})",
                 f"{'engine':<27} {'us/step':>9} {'q25-q75':>15} {'x fast':>7} {'x floor':>8} {'GFLOP/s':>8} "
                 f"{'%peak':>6}  what",
                 "-" * 120]
        for r in self.rows:
            if r.us_per_step is None:
                lines.append(f"{r.name:<27} {'-':>9} {'':>15} {'-':>7} {'-':>8} {'-':>8} {'-':>6}  {r.note}")
                continue
            x = f"{r.us_per_step / fast_us:.2f}" if fast_us else "-"
            xf = f"{r.us_per_step / floor_us:.2f}" if floor_us else "-"
            spread = f"{r.q25:.1f}-{r.q75:.1f}" if r.q25 is not None else ""
            gflops = self.gemm_flop / (r.us_per_step * 1e-6) / 1e9
            pct = f"{100 * gflops * 1e9 / self.peak_flops:.0f}" if self.peak_flops else "-"
            lines.append(f"{r.name:<27} {r.us_per_step:>9.1f} {spread:>15} {x:>7} {xf:>8} {gflops:>8.1f} "
                         f"{pct:>6}  {r.note}")
        if self.large:
            lines += ["", f"large batch {self.large_batch}: examples per second",
                      f"{'engine':<27} {'ex/s':>12} {'ms/step':>9}", "-" * 48]
            for r in self.large:
                if r.us_per_step is None:
                    lines.append(f"{r.name:<27} {'-':>12} {'-':>9}  {r.note}")
                else:
                    lines.append(f"{r.name:<27} {self.large_batch / r.us_per_step * 1e6:>12,.0f} "
                                 f"{r.us_per_step / 1e3:>9.2f}  {r.note}")
        return "\n".join(lines)

    def to_json(self) -> str:
        d = asdict(self)
        d["ratios_to_fast"] = {r.name: self.ratio(r.name) for r in self.rows}
        d["ratios_to_floor"] = {r.name: self.ratio(r.name, FLOOR) for r in self.rows}
        return json.dumps(d, indent=2)


FLOOR = "GEMM floor (torch.mm)"


# ---------------------------------------------------------------------------- the model's GEMMs
def gemm_shapes(model, X: Tensor) -> list[tuple[int, int, int]]:
    """(M, K, N) of every Linear's forward product x @ W, x viewed as (M, K) = (numel / fan_in, fan_in),
    found by one forward pass over the batch X (eval mode: the shapes are the same)."""
    shapes: list[tuple[int, int, int]] = []

    def walk(layer, x: Tensor) -> Tensor:
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                x = walk(sub, x)
            return x
        if isinstance(layer, Linear):
            K, N = layer.weight.shape
            shapes.append((x.numel() // K, K, N))
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
def _quartiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def _row(name: str, times: list[float], note: str) -> Row:
    med, q1, q3 = _quartiles(times)
    return Row(name, med, note, q1, q3)


def _time_each(call: Callable[[int], object], n: int, warmup: int, per: int = 1) -> list[float]:
    """Microseconds per step of each of n calls (call(i) runs `per` steps), after warm-up calls."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) / per * 1e6)
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
    lr = 0.01  # small, so thousands of timed steps stay well-behaved for every engine
    model0 = models.build(mcfg, seed)
    fresh = lambda: models.build(mcfg, seed)  # noqa: E731 - every engine starts from the same init
    one = torch.full((1,), lr, dtype=torch.float64)  # (1,)
    rows = []

    progress("fast")
    fn, reason = fast.plan(model0)
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
                         f"native program, {chunk} steps per call, median over calls"))
        model = fresh()
        n1 = min(steps, 500)
        one_step = lambda i: fn(model, Xtr, Ytr, idx[i % n1:i % n1 + 1], one)  # noqa: E731
        rows.append(_row("fast, 1 step per call", _time_each(one_step, n1, warmup=20),
                         "the same native program called once per step (ctypes, copy-in/out)"))

    progress("eager")
    model = fresh()
    with torch.no_grad():
        times = _time_each(lambda i: train.eager_steps(model, Xtr, Ytr, idx[i % steps:i % steps + 1], one),
                           steps, warmup=50)
    rows.append(_row("eager hand-written", times, "train.eager_steps: layers' forward/backward + SGD, "
                     "PyTorch eager ops"))

    progress("autograd")
    model = fresh()
    times = _time_each(lambda i: reference.autograd_steps(model, Xtr, Ytr, idx[i % steps:i % steps + 1], one),
                       steps, warmup=50)
    rows.append(_row("autograd eager", times, "reference.autograd_steps: the same SGD loop, gradients "
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


def run_bench(model: str = "mlp", batch_size: int = 32, steps: int = 5000, threads: int = 1,
              large_batch: int = 4096, large_steps: int = 30, compile: bool = False, seed: int = 42,
              progress: Callable[[str], None] | None = None, **overrides) -> BenchResult:
    """Time every engine on model `model` (its preset, with `overrides` such as n_hidden=...; median
    per step after warm-up, quartiles as the spread), then examples per second at large_batch (0: skip).
    torch runs on `threads` threads; the native program on one."""
    progress = progress or (lambda s: None)
    words = data.read_words(data.default_data_path())
    probe = models.preset(model, **overrides)
    splits = data.make_splits(words.items, probe.block_size, seed)
    mcfg = models.with_vocab(probe, len(splits.vocab))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _engines(mcfg, splits, batch_size, steps, compile, seed, 1000, True, progress)
        large = []
        if large_batch:
            progress(f"large batch {large_batch}")
            rows_l = _engines(mcfg, splits, large_batch, large_steps, False, seed, 10, False, progress)
            large = [r for r in rows_l if r.name in ("fast", "eager hand-written", "autograd eager")]
        m = models.build(mcfg, seed)
        flop = gemm_flop(gemm_shapes(m, splits.Xtr[:batch_size]))
    finally:
        torch.set_num_threads(old_threads)
    sizes = {k: getattr(mcfg, k) for k in models.config_fields()}
    config = {"model": model, "batch_size": batch_size, **sizes,
              "params": sum(t.numel() for t in m.params().values()), "steps": steps, "threads": threads,
              "torch": torch.__version__}
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    peak, how = fma_peak()
    return BenchResult(config, rows, large, large_batch, machine, flop, peak, how)
