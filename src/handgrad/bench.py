"""`handgrad bench`: time one training step of the makemore MLP by every engine, in one process, on
the same data and config: the fast native step, the eager hand-written step, PyTorch autograd (eager
and torch.compile) and the GEMM floor (the step's six matrix multiplies alone). Autograd appears here
only as a baseline to beat; training never uses it. The library measures; the CLI prints.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from handgrad import data, fast, model, train
from handgrad.model import ModelConfig, Params


@dataclass
class Row:
    name: str  # engine
    us_per_step: float | None  # median microseconds per training step (None: unavailable)
    note: str = ""  # what exactly was timed, or why it is unavailable


@dataclass
class BenchResult:
    config: dict  # batch_size, n_hidden, ... threads
    rows: list[Row]  # per-step timings at config.batch_size
    large: list[Row] = field(default_factory=list)  # per-step timings at the large batch
    large_batch: int = 0
    machine: str = ""

    def ratio(self, name: str, to: str = "fast") -> float | None:
        a = next((r.us_per_step for r in self.rows if r.name == name), None)
        b = next((r.us_per_step for r in self.rows if r.name == to), None)
        return None if a is None or b is None else a / b

    def table(self) -> str:
        c = self.config
        fast_us = next((r.us_per_step for r in self.rows if r.name == "fast"), None)
        lines = [f"handgrad bench: batch {c['batch_size']}, n_hidden {c['n_hidden']}, n_embd {c['n_embd']}, "
                 f"block {c['block_size']}, vocab {c['vocab_size']}, {c['threads']} thread(s), "
                 f"median of {c['steps']} steps; {self.machine}",
                 f"{'engine':<27} {'us/step':>9} {'x fast':>8}  what",
                 "-" * 100]
        for r in self.rows:
            if r.us_per_step is None:
                lines.append(f"{r.name:<27} {'-':>9} {'-':>8}  {r.note}")
            else:
                x = f"{r.us_per_step / fast_us:.2f}" if fast_us else "-"
                lines.append(f"{r.name:<27} {r.us_per_step:>9.1f} {x:>8}  {r.note}")
        if self.large:
            lines += ["", f"large batch {self.large_batch}: examples per second",
                      f"{'engine':<27} {'ex/s':>12} {'ms/step':>9}", "-" * 48]
            for r in self.large:
                if r.us_per_step is None:
                    lines.append(f"{r.name:<27} {'-':>12} {'-':>9}  {r.note}")
                else:
                    lines.append(f"{r.name:<27} {self.large_batch / r.us_per_step * 1e6:>12,.0f} "
                                 f"{r.us_per_step / 1e3:>9.2f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        d = asdict(self)
        d["ratios_to_fast"] = {r.name: self.ratio(r.name) for r in self.rows}
        return json.dumps(d, indent=2)


# ---------------------------------------------------------------------------- the timed steps
def _median_per_step(run_chunk: Callable[[int], None], steps: int, chunk: int, warmup: int) -> float:
    """Median over chunks of (chunk time / chunk steps), in microseconds, after warm-up chunks."""
    for _ in range(warmup):
        run_chunk(0)
    times = []
    done = 0
    while done < steps:
        t0 = time.perf_counter()
        run_chunk(done)
        times.append((time.perf_counter() - t0) / chunk * 1e6)
        done += chunk
    return statistics.median(times)


def _autograd_step_fn(p0: Params, Xtr: Tensor, Ytr: Tensor, lr: float) -> Callable[[Tensor], Tensor]:
    """The lecture's autograd loop: model.forward on leaves, loss.backward(), manual SGD."""
    leaves = [t.detach().clone().requires_grad_(True) for t in p0.tensors()]
    p = Params(*leaves)

    def step(ix: Tensor) -> Tensor:
        with torch.enable_grad():
            loss, _ = model.forward(p, Xtr[ix], Ytr[ix])
            for t in leaves:
                t.grad = None
            loss.backward()
        with torch.no_grad():
            for t in leaves:
                t.add_(t.grad, alpha=-lr)
        return loss

    return step


def _handwritten_step_fn(p0: Params, Xtr: Tensor, Ytr: Tensor, lr: float) -> Callable[[Tensor], Tensor]:
    """One eager hand-written step (forward, backward, SGD) as a function, for torch.compile."""
    p = p0.clone()

    def step(ix: Tensor) -> Tensor:
        with torch.no_grad():
            loss, acts = model.forward(p, Xtr[ix], Ytr[ix])
            model.sgd_update(p, model.backward(p, acts), lr)
        return loss

    return step


def _unavailable(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"unavailable: {type(e).__name__}: {msg}"


def _gemm_floor_fn(cfg: ModelConfig, B: int) -> Callable[[], None]:
    """The six matrix multiplies of one step (2 forward, 4 backward) on preallocated buffers."""
    V, TE, H = cfg.vocab_size, cfg.block_size * cfg.n_embd, cfg.n_hidden
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    embcat, W1, h, W2, dlogits, dhprebn = r(B, TE), r(TE, H), r(B, H), r(H, V), r(B, V), r(B, H)
    hprebn, logits, dW2, dh, dW1, dembcat = r(B, H), r(B, V), r(H, V), r(B, H), r(TE, H), r(B, TE)
    W1T, W2T, hT, embT = W1.t(), W2.t(), h.t(), embcat.t()

    def six() -> None:
        torch.mm(embcat, W1, out=hprebn)
        torch.mm(h, W2, out=logits)
        torch.mm(hT, dlogits, out=dW2)
        torch.mm(dlogits, W2T, out=dh)
        torch.mm(embT, dhprebn, out=dW1)
        torch.mm(dhprebn, W1T, out=dembcat)

    return six


def _time_steps(step: Callable[[Tensor], object], idx: Tensor, warmup: int) -> float:
    for k in range(warmup):
        step(idx[k % idx.shape[0]])
    times = []
    for k in range(idx.shape[0]):
        t0 = time.perf_counter()
        step(idx[k])
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _engines(cfg: ModelConfig, splits: data.Splits, B: int, steps: int, compile_: bool, seed: int,
             fast_chunk: int, with_floor: bool, progress: Callable[[str], None]) -> list[Row]:
    Xtr, Ytr = splits.Xtr, splits.Ytr
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, Xtr.shape[0], (steps, B), generator=g)  # (steps, B)
    lr = 0.01  # small, so thousands of timed steps stay well-behaved for every engine
    p0 = model.init_params(cfg, seed)
    rows = []

    progress("fast")
    fn, reason = fast.load_fast_steps(cfg, torch.float32)
    if fn is None:
        rows.append(Row("fast", None, f"unavailable: {reason}"))
    else:
        p, bn = p0.clone(), model.init_bn_stats(cfg)
        chunk = min(fast_chunk, steps)
        lrs = torch.full((chunk,), lr, dtype=torch.float64)
        nchunks = max(1, steps // chunk)

        def run_chunk(i: int) -> None:
            j = (i // chunk) % nchunks * chunk
            fn(p, bn, Xtr, Ytr, idx[j:j + chunk], lrs, cfg.bn_momentum, True)

        us = _median_per_step(run_chunk, nchunks * chunk, chunk, warmup=1)
        rows.append(Row("fast", us, f"native fused step, {chunk} steps per call, median over calls"))
        p = p0.clone()
        one = torch.ones(1, dtype=torch.float64) * lr
        us1 = _time_steps(lambda ix: fn(p, bn, Xtr, Ytr, ix[None], one, cfg.bn_momentum, True),
                          idx[: min(steps, 500)], warmup=20)
        rows.append(Row("fast, 1 step per call", us1, "the same native step called once per step (ctypes, "
                        "copy-in/out)"))

    progress("eager")
    p, bn = p0.clone(), model.init_bn_stats(cfg)
    lrs1 = torch.full((1,), lr, dtype=torch.float64)

    def eager_step(ix: Tensor) -> None:
        with torch.no_grad():
            train.eager_steps(p, bn, Xtr, Ytr, ix[None], lrs1, cfg.bn_momentum, True)

    rows.append(Row("eager hand-written", _time_steps(eager_step, idx, warmup=50),
                    "train.eager_steps: model.forward/backward/sgd_update, PyTorch eager ops"))

    progress("autograd")
    step = _autograd_step_fn(p0, Xtr, Ytr, lr)
    rows.append(Row("autograd eager", _time_steps(step, idx, warmup=50),
                    "model.forward + loss.backward() + manual SGD (the lecture's loop)"))

    if compile_:
        progress("autograd, torch.compile")
        try:
            cstep = torch.compile(_autograd_step_fn(p0, Xtr, Ytr, lr))
            us = _time_steps(cstep, idx, warmup=50)
            rows.append(Row("autograd torch.compile", us, "the same step under torch.compile (default mode)"))
        except Exception as e:  # noqa: BLE001 - any compiler failure makes the row unavailable
            rows.append(Row("autograd torch.compile", None, _unavailable(e)))
        progress("hand-written, torch.compile")
        try:
            hstep = torch.compile(_handwritten_step_fn(p0, Xtr, Ytr, lr))
            us = _time_steps(hstep, idx, warmup=50)
            rows.append(Row("hand-written torch.compile", us, "model.forward/backward/sgd_update under "
                            "torch.compile (a candidate for the fast path)"))
        except Exception as e:  # noqa: BLE001
            rows.append(Row("hand-written torch.compile", None, _unavailable(e)))
    else:
        rows.append(Row("autograd torch.compile", None, "not run (--no-compile)"))

    if with_floor:
        progress("gemm floor")
        six = _gemm_floor_fn(cfg, B)
        rows.append(Row("GEMM floor (torch.mm)", _time_steps(lambda ix: six(), idx, warmup=50),
                        "the step's 6 matmuls alone, torch.mm with out= buffers, no other work"))
    return rows


def run_bench(batch_size: int = 32, n_hidden: int = 200, steps: int = 5000, threads: int = 1,
              large_batch: int = 4096, large_steps: int = 30, compile: bool = True, seed: int = 42,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Time every engine at the given config (median per step after warm-up), then examples per
    second at large_batch (0: skip). torch runs on `threads` threads; the native step is single-threaded."""
    progress = progress or (lambda s: None)
    cfg = ModelConfig(n_hidden=n_hidden)
    words = data.read_words(data.default_data_path())
    splits = data.make_splits(words.items, cfg.block_size, seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _engines(cfg, splits, batch_size, steps, compile, seed, 1000, True, progress)
        large = []
        if large_batch:
            progress(f"large batch {large_batch}")
            rows_l = _engines(cfg, splits, large_batch, large_steps, False, seed, 10, False, progress)
            large = [r for r in rows_l if r.name in ("fast", "eager hand-written", "autograd eager")]
    finally:
        torch.set_num_threads(old_threads)
    config = {"batch_size": batch_size, "n_hidden": n_hidden, "n_embd": cfg.n_embd,
              "block_size": cfg.block_size, "vocab_size": cfg.vocab_size, "steps": steps, "threads": threads,
              "torch": torch.__version__}
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    return BenchResult(config, rows, large, large_batch, machine)
