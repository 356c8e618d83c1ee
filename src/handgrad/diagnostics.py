"""Gradient-health diagnostics: look inside training with the hand-written forward/backward (no autograd).
Activation statistics and tanh saturation, dead units, gradient statistics, the update-to-data ratio,
warnings when they go wrong, and the lecture's sanity checks on dlogits and the initial loss.
References: Karpathy, "Building makemore Part 3: Activations & Gradients, BatchNorm" (saturated tanh,
dead neurons, update:data ratio ~1e-3) and "Part 4: Becoming a Backprop Ninja" (dlogits, logit_maxes).

Shape legend: N batch, T block_size, E n_embd, H n_hidden, V vocab, K probe batches, B batch size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from handgrad import model, ops
from handgrad.checkpoint import CheckpointError, atomic_write_bytes
from handgrad.model import ModelConfig, Params

FORMAT = "handgrad-diagnostics"
FORMAT_VERSION = 1
WEIGHTS = ("C", "W1", "W2")  # the matrices whose update ratio the lecture plots (biases/gains excluded)
LAYERS = ("hpreact", "h", "logits")  # activations whose statistics are recorded


@dataclass(frozen=True)
class DiagConfig:
    every: int = 5000  # steps between snapshots (a multiple of TrainConfig.chunk_steps); 5000 keeps the
    # probe (~5 ms) under ~3% of the fast engine's time (~45 ms per 1000 steps)
    probe_batches: int = 8  # the probe is this many training-size batches (K), fixed for the run
    probe_seed: int = 1234  # draws the probe rows from the training set
    saturated: float = 0.97  # |h| above this counts as a saturated tanh unit (gradient factor < 0.06)
    max_saturated: float = 0.20  # warn when more of the hidden layer than this is saturated
    max_dead: float = 0.05  # warn when more hidden units than this fraction are dead
    ratio_low: float = -4.5  # log10 update:data band; warn outside it (lecture guide: -3)
    ratio_high: float = -1.5
    max_layer_decades: float = 2.0  # warn when W1's grad:data ratio is this many decades off W2's
    max_growth_decades: float = 2.0  # warn when the gradient norm grows this many decades over the run
    sustain: int = 3  # a condition must hold in this many consecutive snapshots (fewer in short histories)

    def __post_init__(self) -> None:
        for name in ("every", "probe_batches", "sustain"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.saturated < 1:
            raise ValueError(f"saturated must be in (0, 1), got {self.saturated}")
        if not self.ratio_low < self.ratio_high:
            raise ValueError(f"ratio_low must be below ratio_high, got {self.ratio_low}, {self.ratio_high}")


# ---------------------------------------------------------------------------- measuring
@dataclass
class ActStats:
    mean: float
    std: float
    saturated: float | None  # fraction with |h| > DiagConfig.saturated (tanh output only)


@dataclass
class GradStats:
    mean: float  # of the probe gradient (mean over the K probe batches)
    std: float
    norm: float
    grad_data: float  # std(grad) / std(param), the lecture's grad:data ratio
    update_ratio: float  # log10 std(lr * grad) / std(param), averaged over the K batch-size gradients


@dataclass
class Snapshot:
    """Scalar statistics of one probe at one step: what the history and diagnostics.json keep."""

    step: int  # steps done when measured
    lr: float  # the learning rate of the next update (the one the update ratio describes)
    loss: float  # training-mode loss on the probe (mean over its K batches)
    acts: dict[str, ActStats]  # by layer name (LAYERS)
    grads: dict[str, GradStats]  # by parameter name (Params fields)
    dead: int  # hidden units saturated on every probe example
    n_hidden: int
    nonfinite: list[str] = field(default_factory=list)  # names of NaN/inf tensors, empty when healthy


@dataclass
class ProbeTensors:
    """The tensors of the latest probe, for the histograms and pictures (not saved)."""

    hpreact: Tensor  # (K*B, H) tanh input
    h: Tensor  # (K*B, H) tanh output
    dlogits: Tensor  # (B, V) of the first probe batch: (softmax - one_hot) / B
    grads: Params  # the probe gradient (mean over the K batches)


def probe_rows(n: int, batches: int, batch_size: int, seed: int) -> Tensor:
    """Row indices (K, B) of a fixed probe drawn without replacement (with, if the set is small)."""
    g = torch.Generator().manual_seed(seed)
    m = batches * batch_size
    rows = torch.randperm(n, generator=g)[:m] if n >= m else torch.randint(0, n, (m,), generator=g)
    return rows.view(batches, batch_size)  # (K, B)


def _stats(x: Tensor) -> tuple[float, float]:
    x = x.double()
    return x.mean().item(), (x.std().item() if x.numel() > 1 else 0.0)


def measure(p: Params, X: Tensor, Y: Tensor, batchnorm: bool, lr: float, step: int = 0,
            saturated: float = 0.97) -> tuple[Snapshot, ProbeTensors]:
    """Run the hand-written model.forward/backward on each probe batch X[k], Y[k] (X (K, B, T),
    Y (K, B)) at the parameters p, exactly as a training step would (batch statistics per batch),
    and summarise activations, gradients and the update ratio. Nothing is modified."""
    K = X.shape[0]
    names = [name for name, _ in p.items()]
    gsum = [torch.zeros_like(t) for t in p.tensors()]
    ratio_sum = [0.0] * len(names)
    pstd = [t.double().std().item() if t.numel() > 1 else abs(t.double().item()) for t in p.tensors()]
    hpre, hs, losses = [], [], []
    dlogits = None
    for k in range(K):
        loss, a = model.forward(p, X[k], Y[k], batchnorm)
        g = model.backward(p, a)
        losses.append(loss.item())
        for i, t in enumerate(g.tensors()):
            gsum[i] += t
            ratio_sum[i] += lr * t.double().std().item() / pstd[i] if pstd[i] > 0 else math.inf
        if batchnorm:  # hpreact is not saved by forward; recompute it (one multiply-add)
            hpre.append(p.bngain * a.bnraw + p.bnbias)  # (B, H)
        else:
            hpre.append(a.embcat @ p.W1 + p.b1)  # (B, H)
        hs.append(a.h)
        if k == 0:
            dlogits = ops.cross_entropy_backward(1.0, (a.logprobs, a.Y))  # (B, V) as backward sees it
    hpreact, h = torch.cat(hpre), torch.cat(hs)  # (K*B, H)
    logits = h @ p.W2 + p.b2  # (K*B, V)
    grads = Params(*(t / K for t in gsum))
    sat = h.abs() > saturated  # (K*B, H)
    acts = {"hpreact": ActStats(*_stats(hpreact), None),
            "h": ActStats(*_stats(h), sat.double().mean().item()),
            "logits": ActStats(*_stats(logits), None)}
    gstats = {}
    for i, (name, t) in enumerate(grads.items()):
        if not batchnorm and name in ("bngain", "bnbias"):
            continue  # unused without the batchnorm layer
        gm, gs = _stats(t)
        ratio = ratio_sum[i] / K
        gstats[name] = GradStats(gm, gs, t.double().norm().item(), gs / pstd[i] if pstd[i] > 0 else math.inf,
                                 math.log10(ratio) if ratio > 0 else -math.inf)
    nonfinite = [name for name, t in p.items() if not torch.isfinite(t).all()]
    nonfinite += ["d" + name for name, t in grads.items() if not torch.isfinite(t).all()]
    nonfinite += [name for name, t in (("loss", torch.tensor(losses)), ("hpreact", hpreact), ("h", h),
                                        ("logits", logits)) if not torch.isfinite(t).all()]
    snap = Snapshot(step, lr, sum(losses) / K, acts, gstats, int(sat.all(0).sum()), h.shape[1], nonfinite)
    return snap, ProbeTensors(hpreact, h, dlogits, grads)


# ---------------------------------------------------------------------------- warnings
@dataclass(frozen=True)
class DiagWarning:
    """One problem found in the history: which layer, what is wrong, what to try."""

    kind: str  # "non_finite", "saturation", "dead_units", "update_ratio_high", "update_ratio_low",
    #            "vanishing_gradient", "exploding_gradient"
    layer: str  # the activation or parameter concerned
    step: int  # the first step of the episode
    message: str  # what was measured
    advice: str  # what to try

    def __str__(self) -> str:
        return f"{self.layer}: {self.message} (step {self.step:,}); try {self.advice}"


def _episode(history: list[Snapshot], bad, sustain: int) -> tuple[Snapshot, Snapshot] | None:
    """The first and last snapshots of the first run of `sustain` consecutive snapshots where
    bad(snapshot) holds, or None. A short history needs fewer: at most all but one snapshot (a run
    measured only at init and twice after it, broken after init, must still warn)."""
    need = min(sustain, max(1, len(history) - 1))
    run = 0
    for i, s in enumerate(history):
        run = run + 1 if bad(s) else 0
        if run >= need:
            return history[i - run + 1], s
    return None


def _decades(a: float, b: float) -> float:
    return math.log10(a / b) if a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b) else 0.0


def find_warnings(history: list[Snapshot], cfg: DiagConfig = DiagConfig(),
                  failure: tuple[int, str] | None = None) -> list[DiagWarning]:
    """Turn a history of snapshots into warnings. A condition must hold in `cfg.sustain`
    consecutive snapshots (a single bad probe is noise); non-finite values warn at once.
    `failure` (step, tensor) is a NonFiniteError raised by training, if any."""
    out: list[DiagWarning] = []
    lower_lr = "a smaller learning rate (--lr 10x lower)"
    if failure is not None:
        out.append(DiagWarning("non_finite", failure[1], failure[0], "became NaN or infinite and stopped "
                               "training", lower_lr + ", or a smaller init scale"))
    seen: set[str] = set()
    for s in history:
        for name in s.nonfinite:
            if name not in seen:
                seen.add(name)
                out.append(DiagWarning("non_finite", name, s.step, "has NaN or infinite values on the probe",
                                       lower_lr + ", or a smaller init scale"))
    if not history:
        return out
    ep = _episode(history, lambda s: (s.acts["h"].saturated or 0.0) > cfg.max_saturated, cfg.sustain)
    if ep:
        out.append(DiagWarning(
            "saturation", "h (tanh)", ep[0].step,
            f"{ep[1].acts['h'].saturated:.0%} of tanh outputs have |h| > {cfg.saturated} "
            f"(limit {cfg.max_saturated:.0%}); their gradient is nearly zero",
            "a smaller W1 init (Kaiming: gain 5/3 / sqrt(fan_in), --w1-scale 1) or batchnorm, "
            "or a lower learning rate"))
    ep = _episode(history, lambda s: s.dead > cfg.max_dead * s.n_hidden, cfg.sustain)
    if ep:
        out.append(DiagWarning(
            "dead_units", "h (tanh)", ep[0].step,
            f"{ep[1].dead} of {ep[1].n_hidden} hidden units are saturated on every probe example (dead: "
            "no gradient reaches their weights)", "a lower learning rate, a smaller W1 init, or batchnorm"))
    for name in WEIGHTS:
        ep = _episode(history, lambda s, n=name: s.grads[n].update_ratio > cfg.ratio_high, cfg.sustain)
        if ep:
            out.append(DiagWarning(
                "update_ratio_high", name, ep[0].step,
                f"update:data ratio 10^{ep[1].grads[name].update_ratio:.2f}, above 10^{cfg.ratio_high} "
                "(guide 10^-3): each step changes the weights too much", lower_lr))
        ep = _episode(history, lambda s, n=name: s.grads[n].update_ratio < cfg.ratio_low, cfg.sustain)
        if ep:
            out.append(DiagWarning(
                "update_ratio_low", name, ep[0].step,
                f"update:data ratio 10^{ep[1].grads[name].update_ratio:.2f}, below 10^{cfg.ratio_low} "
                "(guide 10^-3): the weights barely move",
                "a larger learning rate, or a smaller init of this layer (large weights get small updates)"))
    last = WEIGHTS[-1]  # the output layer: compare how much signal reaches the earlier ones
    for name in WEIGHTS[:-1]:
        gap = {s.step: _decades(s.grads[name].grad_data, s.grads[last].grad_data) for s in history}
        ep = _episode(history, lambda s, g=gap: g[s.step] < -cfg.max_layer_decades, cfg.sustain)
        if ep:
            out.append(DiagWarning(
                "vanishing_gradient", name, ep[0].step,
                f"grad:data ratio {10 ** -gap[ep[1].step]:.0f}x smaller than {last}'s: the gradient "
                "vanishes on its way down", "batchnorm, a smaller init of this layer's weights, or "
                "fewer saturated tanh units"))
        ep = _episode(history, lambda s, g=gap: g[s.step] > cfg.max_layer_decades, cfg.sustain)
        if ep:
            out.append(DiagWarning(
                "exploding_gradient", name, ep[0].step,
                f"grad:data ratio {10 ** gap[ep[1].step]:.0f}x larger than {last}'s: the gradient "
                "explodes on its way down", "a smaller init of the layers above, or a lower learning rate"))
    norms = {s.step: math.sqrt(sum(g.norm ** 2 for g in s.grads.values())) for s in history}
    base = norms[history[0].step]
    ep = _episode(history, lambda s: _decades(norms[s.step], base) > cfg.max_growth_decades, cfg.sustain)
    if ep:
        out.append(DiagWarning(
            "exploding_gradient", "all parameters", ep[0].step,
            f"total gradient norm grew from {base:.3g} to {norms[ep[1].step]:.3g}",
            lower_lr + ", or gradient clipping"))
    return out


# ---------------------------------------------------------------------------- sanity checks
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative to the scale 1/B of a dlogits entry
INIT_LOSS_TOL = 0.25  # relative: |loss0 - log V| <= 0.25 log V (see check_initial_loss)


@dataclass(frozen=True)
class Check:
    name: str
    value: float  # what was measured
    expected: float
    tolerance: float  # |value - expected| <= tolerance passes
    detail: str  # how it was measured and why the tolerance

    @property
    def passed(self) -> bool:
        return math.isfinite(self.value) and abs(self.value - self.expected) <= self.tolerance

    def __str__(self) -> str:
        return (f"{'ok' if self.passed else 'FAIL'}: {self.name}: {self.value:.3g} (expected "
                f"{self.expected:.4g} +- {self.tolerance:.2g})")


def logit_maxes_backward(logits: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """The lecture's op-by-op cross-entropy backward, from the loss down to logit_maxes.
    Returns (dnorm_logits (N, V), dlogit_maxes (N, 1)). Derivation (p = probs, S = counts_sum):
    dlogprobs is -1/N at the targets, so dprobs = -1/(N p_y) there; dcounts_sum_inv = -S/N;
    dcounts_sum = 1/(N S); dcounts = one_hot * dprobs / S + 1/(N S); dnorm_logits = counts * dcounts
    = (p - one_hot)/N. norm_logits = logits - logit_maxes, so dlogit_maxes = -sum_j dnorm_logits,
    which is (1 - 1)/N = 0: the max only shifts the logits and cannot change the loss."""
    n = logits.shape[0]
    rows = torch.arange(n)
    logit_maxes = logits.max(1, keepdim=True).values  # (N, 1)
    norm_logits = logits - logit_maxes  # (N, V)
    counts = norm_logits.exp()  # (N, V)
    counts_sum = counts.sum(1, keepdim=True)  # (N, 1)
    counts_sum_inv = counts_sum ** -1  # (N, 1)
    probs = counts * counts_sum_inv  # (N, V)
    dlogprobs = torch.zeros_like(logits)  # (N, V)
    dlogprobs[rows, Y] = -1.0 / n
    dprobs = dlogprobs / probs  # (N, V)  d log(p) = 1/p
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)  # (N, 1)
    dcounts = counts_sum_inv * dprobs  # (N, V)
    dcounts_sum = -counts_sum ** -2 * dcounts_sum_inv  # (N, 1)
    dcounts = dcounts + dcounts_sum  # (N, V)  counts_sum broadcasts to every column
    dnorm_logits = counts * dcounts  # (N, V)  d exp = exp
    dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)  # (N, 1)
    return dnorm_logits, dlogit_maxes


def sanity_checks(p: Params, X: Tensor, Y: Tensor, batchnorm: bool, init_loss: float) -> list[Check]:
    """The lecture's checks on one probe batch X (B, T), Y (B,) at parameters p:
    the rows of dlogits sum to 0, the gradient into logit_maxes is 0 (op by op), the op-by-op
    chain agrees with the closed form, and the loss at init is close to -log(1/V)."""
    B, V = X.shape[0], p.W2.shape[1]
    tol = TOL.get(p.W2.dtype, 1e-5) / B
    _, a = model.forward(p, X, Y, batchnorm)
    dlogits = ops.cross_entropy_backward(1.0, (a.logprobs, a.Y))  # (B, V)  the closed form training uses
    logits = a.h @ p.W2 + p.b2  # (B, V)  forward does not keep the logits; recompute them
    dnorm_logits, dlogit_maxes = logit_maxes_backward(logits, Y)
    if not torch.isfinite(dnorm_logits).all():
        chain = ("; NaN: the op-by-op chain divides by probs, which underflowed to 0 for a confidently wrong "
                 "prediction (the closed form has no such division)")
    else:
        chain = ""
    scale = f"tolerance {TOL.get(p.W2.dtype, 1e-5):g} x 1/B, the size of one dlogits entry ({p.W2.dtype})"
    return [
        Check("dlogits rows sum to 0", dlogits.sum(1).abs().max().item(), 0.0, tol,
              f"max over {B} rows of |sum_j (softmax - one_hot)/B|: probability in each row sums to 1, "
              f"the target takes 1 away; {scale}"),
        Check("gradient into logit_maxes is 0", dlogit_maxes.abs().max().item(), 0.0, tol,
              "max |dlogit_maxes| = |-sum_j dnorm_logits| through the lecture's op-by-op chain; "
              f"subtracting the row max cannot change the loss; {scale}{chain}"),
        Check("op-by-op dnorm_logits equals closed-form dlogits", (dnorm_logits - dlogits).abs().max().item(),
              0.0, tol, f"max abs difference; {scale}{chain}"),
        check_initial_loss(init_loss, V),
    ]


def check_initial_loss(loss0: float, vocab_size: int) -> Check:
    """At init the net should be unsure: loss close to -log(1/V). Random logits of spread s
    add about s^2/2 nats; the lecture's init (W2 x 0.1, 200 tanh units of variance ~0.4) gives
    s ~ 0.9, so ~3.7 for V = 27 (3.30 ideal). 25% of log V (0.82 nats, s up to ~1.3) accepts that
    and still flags a confidently wrong init (Part 3's unscaled W2 starts near 27)."""
    ideal = math.log(vocab_size)
    spread = math.sqrt(2 * max(loss0 - ideal, 0.0)) if math.isfinite(loss0) else math.inf
    return Check("initial loss close to -log(1/V)", loss0, ideal, INIT_LOSS_TOL * ideal,
                 f"training-mode loss at the init on the probe; the excess implies a logit spread of "
                 f"~{spread:.2f} (excess ~ spread^2/2); tolerance {INIT_LOSS_TOL:.0%} of log({vocab_size})")


# ---------------------------------------------------------------------------- the collector
class Collector:
    """A train() callback that measures a fixed probe every `cfg.every` steps with the hand-written
    forward/backward. Usage: `c = Collector(splits.Xtr, splits.Ytr, mcfg, tcfg); c.record(state)`
    (optional, the init), `train(..., callback=c)`, then `c.warnings()`, `c.summary(...)`."""

    def __init__(self, Xtr: Tensor, Ytr: Tensor, mcfg: ModelConfig, tcfg, cfg: DiagConfig = DiagConfig(),
                 history: list[Snapshot] | None = None):
        if cfg.every % tcfg.chunk_steps:
            raise ValueError(f"the diagnostics interval ({cfg.every}) must be a multiple of chunk_steps "
                             f"({tcfg.chunk_steps})")
        self.mcfg, self.tcfg, self.cfg = mcfg, tcfg, cfg
        rows = probe_rows(Xtr.shape[0], cfg.probe_batches, tcfg.batch_size, cfg.probe_seed)  # (K, B)
        self.X, self.Y = Xtr[rows], Ytr[rows]  # (K, B, T) (K, B)
        self.history: list[Snapshot] = list(history or [])
        self.last: ProbeTensors | None = None
        self.failure: tuple[int, str] | None = None
        self.step = self.history[-1].step if self.history else 0  # last step seen

    def record(self, params: Params, step: int) -> Snapshot:
        """Measure the probe now (e.g. at step 0, before training) and append to the history."""
        with torch.no_grad():
            snap, self.last = measure(params, self.X, self.Y, self.mcfg.batchnorm, self.tcfg.lr_at(step),
                                      step, self.cfg.saturated)
        self.history = [s for s in self.history if s.step < step] + [snap]
        self.step = step
        return snap

    def __call__(self, pr) -> None:
        """The train callback (pr: train.Progress)."""
        self.step = pr.state.step
        if pr.state.step % self.cfg.every == 0 or pr.state.step == pr.total:
            self.record(pr.state.params, pr.state.step)

    def record_failure(self, step: int, tensor: str) -> None:
        """Note a NonFiniteError (absolute step, tensor name) raised by training."""
        self.failure = (step, tensor)

    def watch(self, steps_fn):
        """Wrap a train steps_fn so that a NonFiniteError is recorded (and re-raised)."""
        from handgrad.train import NonFiniteError

        def wrapped(*args):
            try:
                return steps_fn(*args)
            except NonFiniteError as e:
                self.record_failure(self.step + e.step, e.tensor)
                raise
        return wrapped

    def warnings(self) -> list[DiagWarning]:
        return find_warnings(self.history, self.cfg, self.failure)

    def checks(self, params: Params) -> list[Check]:
        """The sanity checks at `params` on the first probe batch; the initial loss is measured at the
        run's init (recomputed from the seed, exactly as train.new_state draws it)."""
        init = model.init_params(self.mcfg, self.tcfg.seed, params.W2.dtype)
        with torch.no_grad():
            loss0 = sum(model.forward(init, self.X[k], self.Y[k], self.mcfg.batchnorm)[0].item()
                        for k in range(self.X.shape[0])) / self.X.shape[0]
            return sanity_checks(params, self.X[0], self.Y[0], self.mcfg.batchnorm, loss0)


# ---------------------------------------------------------------------------- diagnostics.json
def _clean(x):
    """JSON-safe: non-finite floats become null (the warnings say which values were non-finite)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summary(history: list[Snapshot], checks: list[Check], warnings: list[DiagWarning],
            cfg: DiagConfig = DiagConfig(), extra: dict | None = None) -> dict:
    """The machine-readable summary written as diagnostics.json."""
    return _clean({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "warnings": [dataclasses.asdict(w) | {"text": str(w)} for w in warnings],
        "checks": [dataclasses.asdict(c) | {"passed": c.passed} for c in checks],
        "history": [dataclasses.asdict(s) for s in history],
        **(extra or {}),
    })


def write_json(path: str | Path, data: dict) -> Path:
    """Write atomically (checkpoint.atomic_write_bytes: temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return path


def _num(x) -> float:
    return math.nan if x is None else float(x)


def load_history(path: str | Path) -> list[Snapshot]:
    """The history saved in a diagnostics.json (null values read back as NaN). A file that is not
    one, or is truncated, raises CheckpointError with a one-line reason (it lives in the run's dir)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a handgrad diagnostics file")
        out = []
        for s in data["history"]:
            acts = {k: ActStats(_num(v["mean"]), _num(v["std"]), v["saturated"])
                    for k, v in s["acts"].items()}
            grads = {k: GradStats(*(_num(v[f.name]) for f in dataclasses.fields(GradStats)))
                     for k, v in s["grads"].items()}
            out.append(Snapshot(s["step"], s["lr"], _num(s["loss"]), acts, grads, s["dead"], s["n_hidden"],
                                list(s["nonfinite"])))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: truncated or corrupt diagnostics history ({type(e).__name__}: {e}); "
                              "delete it to start a new history") from None
    return out


def history_until(path: str | Path | None, step: int) -> list[Snapshot]:
    """The snapshots up to `step` saved in the diagnostics.json at `path`; [] if there is none."""
    if path is None or not Path(path).is_file():
        return []
    return [s for s in load_history(path) if s.step <= step]


# ---------------------------------------------------------------------------- a whole report
HISTORY_FILE = "diagnostics.json"


@dataclass
class Report:
    warnings: list[DiagWarning]
    checks: list[Check]
    paths: list[Path]  # the PNGs and diagnostics.json written


def write_report(out: str | Path, collector: Collector, params: Params, step: int,
                 losses: Tensor | None = None, extra: dict | None = None) -> Report:
    """Measure `params` at `step` (unless the history already ends there), run the sanity checks,
    and write the PNGs and diagnostics.json into `out`."""
    from handgrad import plots  # matplotlib is imported only when plots are drawn

    if collector.last is None or not collector.history or collector.history[-1].step != step:
        collector.record(params, step)
    checks = collector.checks(params)
    warnings = collector.warnings()
    out = Path(out)
    paths = plots.write_all(out, losses, collector.history, collector.last, collector.cfg,
                            collector.tcfg.lr_decay_step)
    extra = {"step": step, "failure": list(collector.failure) if collector.failure else None, **(extra or {})}
    paths.append(write_json(out / HISTORY_FILE, summary(collector.history, checks, warnings, collector.cfg,
                                                         extra)))
    return Report(warnings, checks, paths)


def from_checkpoint(ck, Xtr: Tensor, Ytr: Tensor, history_path: str | Path | None = None,
                    cfg: DiagConfig = DiagConfig()) -> Collector:
    """A collector for a saved run (ck: checkpoint.Checkpoint) whose history is the one saved by
    training in `history_path` (if it exists), cut at the checkpoint's step."""
    history = history_until(history_path, ck.state.step)
    chunk = ck.train_config.chunk_steps
    cfg = dataclasses.replace(cfg, every=chunk * max(1, cfg.every // chunk))
    return Collector(Xtr, Ytr, ck.model_config, ck.train_config, cfg, history)
