"""Gradient-health diagnostics for any model of layers, measured with the hand-written forward/backward
(no autograd): per Tanh layer its activation statistics, saturation and dead units; per layer its output
and output-gradient statistics; per weight its grad:data and update:data ratios; warnings from a table of
rules; and the lecture's sanity checks on dlogits and the initial loss. References: Karpathy, "Building
makemore Part 3" (per-layer histograms, saturated tanh, dead neurons, update:data ratio ~1e-3 for
`p.ndim == 2`) and "Part 4: Becoming a Backprop Ninja" (dlogits, logit_maxes, the op-by-op graph).

Shape legend: N batch, V vocab, K probe batches, B batch size, H units of a layer (its last dim).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from handgrad import atomic, models, ops
from handgrad.check import RUN_TOL, run_tolerance
from handgrad.checkpoint import CheckpointError
from handgrad.io import atomic_write_bytes
from handgrad.layers import Sequential, Tanh
from handgrad.train import NonFiniteError

FORMAT = "handgrad-diagnostics"
FORMAT_VERSION = 2  # version 2: per-layer statistics and parameters named by position ("2.weight")


@dataclass(frozen=True)
class DiagConfig:
    every: int = 5000  # steps between measurements (a multiple of TrainConfig.chunk_steps); see the
    # overhead measured in the report of `handgrad train --diagnostics`
    probe_batches: int = 8  # the probe is this many training-size batches (K), fixed for the run
    probe_seed: int = 1234  # draws the probe rows from the training set
    saturated: float = 0.97  # |h| above this counts as a saturated tanh unit (gradient factor < 0.06)
    max_saturated: float = 0.20  # warn when more of a Tanh layer's outputs than this are saturated
    max_dead: float = 0.05  # warn when more of a Tanh layer's units than this fraction are dead
    ratio_low: float = -4.5  # log10 update:data band; warn outside it (lecture guide: -3)
    ratio_high: float = -1.5
    max_layer_decades: float = 2.0  # warn when a weight's grad:data ratio is this many decades off the last's
    max_growth_decades: float = 2.0  # warn when the gradient norm grows this many decades over the run
    sustain: int = 3  # a condition must hold in this many consecutive measurements (fewer in short histories)

    def __post_init__(self) -> None:
        for name in ("every", "probe_batches", "sustain"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.saturated < 1:
            raise ValueError(f"saturated must be in (0, 1), got {self.saturated}")
        if not self.ratio_low < self.ratio_high:
            raise ValueError(f"ratio_low must be below ratio_high, got {self.ratio_low}, {self.ratio_high}")


# ---------------------------------------------------------------------------- what one measurement keeps
@dataclass
class LayerStats:
    """One layer's output on the probe and the loss gradient with respect to that output."""

    index: int  # position in the model's layers
    kind: str  # the layer's class name
    units: int  # the output's last dimension
    mean: float
    std: float
    grad_mean: float  # of d loss / d output
    grad_std: float
    saturated: float | None = None  # Tanh only: fraction of outputs with |h| > DiagConfig.saturated
    dead: int | None = None  # Tanh only: units saturated on every probe row

    @property
    def label(self) -> str:
        return f"layer {self.index} ({self.kind})"


@dataclass
class GradStats:
    """One parameter's probe gradient (the mean over the K probe batches) against the parameter."""

    kind: str  # the class name of the layer that owns the parameter
    shape: list[int]
    mean: float
    std: float
    norm: float
    grad_data: float  # std(grad) / std(param), the lecture's grad:data ratio (NaN if std(param) is 0)
    update_ratio: float  # log10 std(lr * grad) / std(param), averaged over the K batch-size gradients

    def label(self, name: str) -> str:
        """The parameter `name` with the class of its layer: "2.weight (Linear)"."""
        return f"{name} ({self.kind})"


@dataclass
class Snapshot:
    """Scalar statistics of one probe at one step: what the history and diagnostics.json keep."""

    step: int  # steps done when measured
    lr: float  # the learning rate of the next update (the one the update ratio describes)
    loss: float  # training-mode loss on the probe (mean over its K batches)
    layers: list[LayerStats]  # every layer, in order
    grads: dict[str, GradStats]  # by parameter name ("2.weight")
    nonfinite: list[str] = field(default_factory=list)  # names of NaN/inf tensors, empty when healthy

    def tanh_layers(self) -> list[LayerStats]:
        return [s for s in self.layers if s.saturated is not None]

    def weights(self) -> list[str]:
        """The parameters with 2 dims, in model order: those whose update ratio part 3 plots."""
        return [name for name, g in self.grads.items() if len(g.shape) == 2]


@dataclass
class ProbeTensors:
    """The tensors of the latest probe, for the histograms and pictures (not saved)."""

    outputs: dict[int, Tensor]  # Tanh layer index -> its output (K*B*..., H)
    doutputs: dict[int, Tensor]  # Tanh layer index -> d loss / d output (K*B*..., H)
    dlogits: Tensor  # (B, V) of the first probe batch: (softmax - one_hot) / B
    grads: dict[str, Tensor]  # parameter name -> probe gradient (mean over the K batches)


def probe_rows(n: int, batches: int, batch_size: int, seed: int) -> Tensor:
    """Row indices (K, B) of a fixed probe drawn without replacement (with, if the set is small)."""
    g = torch.Generator().manual_seed(seed)
    m = batches * batch_size
    rows = torch.randperm(n, generator=g)[:m] if n >= m else torch.randint(0, n, (m,), generator=g)
    return rows.view(batches, batch_size)  # (K, B)


# ---------------------------------------------------------------------------- measuring
class _Recorder:
    """A layer seen through a window: forward and backward are the layer's own, and the last output
    and the gradient that reached it are kept for the statistics."""

    def __init__(self, layer):
        self.layer = layer
        self.out: Tensor | None = None
        self.dout: Tensor | None = None

    def params(self) -> dict[str, Tensor]:
        return self.layer.params()

    def buffers(self) -> dict[str, Tensor]:
        return self.layer.buffers()

    def forward(self, x: Tensor, training: bool = True):
        self.out, cache = self.layer.forward(x, training)
        return self.out, cache

    def backward(self, dout: Tensor, cache):
        self.dout = dout
        return self.layer.backward(dout, cache)

    def spec(self) -> dict:
        return self.layer.spec()


def layers_of(model) -> list:
    """The model's layers in order (a single layer counts as a model of one)."""
    return list(model.layers) if isinstance(model, Sequential) else [model]


def _owner_kinds(model) -> dict[str, str]:
    """Parameter name -> class name of the layer that owns it."""
    if not isinstance(model, Sequential):
        return dict.fromkeys(model.params(), type(model).__name__)
    return {f"{i}.{k}": type(layer).__name__ for i, layer in enumerate(model.layers) for k in layer.params()}


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)  # (rows, H)


def _stats(x: Tensor) -> tuple[float, float]:
    x = x.double()
    return x.mean().item(), (x.std().item() if x.numel() > 1 else 0.0)


def _spread(p: Tensor) -> float:
    """std of a parameter (its magnitude for a single number)."""
    return p.double().std().item() if p.numel() > 1 else abs(p.double().item())


def measure(model, X: Tensor, Y: Tensor, lr: float, step: int = 0,
            saturated: float = 0.97) -> tuple[Snapshot, ProbeTensors]:
    """Run the hand-written forward/backward (models.loss_and_grads) on each probe batch X[k], Y[k]
    (X (K, B, ...), Y (K, B)) exactly as a training step would (batch statistics per batch), and
    summarise every layer's output and output gradient, the Tanh layers' saturation, and every
    parameter's gradient and update ratio. Nothing is modified."""
    layers = layers_of(model)
    recorders = [_Recorder(layer) for layer in layers]
    probe = Sequential(recorders) if isinstance(model, Sequential) else recorders[0]
    params = model.params()
    kinds = _owner_kinds(model)
    K = X.shape[0]
    gsum = {name: torch.zeros_like(p) for name, p in params.items()}
    ratio_sum = dict.fromkeys(params, 0.0)
    pstd = {name: _spread(p) for name, p in params.items()}
    outs: list[list[Tensor]] = [[] for _ in layers]
    douts: list[list[Tensor]] = [[] for _ in layers]
    losses, dlogits = [], None
    for k in range(K):
        st = models.loss_and_grads(probe, X[k], Y[k])
        losses.append(st.loss.item())
        for name, g in st.grads.items():
            gsum[name] += g
            ratio_sum[name] += lr * _spread(g) / pstd[name] if pstd[name] > 0 else math.nan
        for i, r in enumerate(recorders):
            outs[i].append(_rows(r.out))
            douts[i].append(_rows(r.dout))
        if k == 0:
            dlogits = recorders[-1].dout.clone()  # (B, V) as backward sees it
    grads = {name: g / K for name, g in gsum.items()}
    stats, tanh_out, tanh_dout, nonfinite = [], {}, {}, []
    for i, layer in enumerate(layers):
        out, dout = torch.cat(outs[i]), torch.cat(douts[i])  # (rows, H)
        s = LayerStats(i, type(layer).__name__, out.shape[-1], *_stats(out), *_stats(dout))
        if isinstance(layer, Tanh):
            sat = out.abs() > saturated  # (rows, H)
            s.saturated, s.dead = sat.double().mean().item(), int(sat.all(0).sum())
            tanh_out[i], tanh_dout[i] = out, dout
        if not (torch.isfinite(out).all() and torch.isfinite(dout).all()):
            nonfinite.append(s.label)
        stats.append(s)
    gstats = {}
    for name, g in grads.items():
        ratio = ratio_sum[name] / K
        gstats[name] = GradStats(kinds[name], list(g.shape), *_stats(g), g.double().norm().item(),
                                 _spread(g) / pstd[name] if pstd[name] > 0 else math.nan,
                                 math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan))
    nonfinite = ([name for name, p in params.items() if not torch.isfinite(p).all()]
                 + ["d" + name for name, g in grads.items() if not torch.isfinite(g).all()]
                 + (["loss"] if not all(math.isfinite(v) for v in losses) else []) + nonfinite)
    snap = Snapshot(step, lr, sum(losses) / K, stats, gstats, nonfinite)
    return snap, ProbeTensors(tanh_out, tanh_dout, dlogits, grads)


# ---------------------------------------------------------------------------- warnings
@dataclass(frozen=True)
class DiagWarning:
    """One problem found in the history: which layer or weight, what is wrong, what to try."""

    kind: str  # a Rule's kind, or "non_finite"
    layer: str  # the layer ("layer 4 (Tanh)"), weight ("2.weight (Linear)") or "all parameters"
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


def _tanh(s: Snapshot) -> dict[str, LayerStats]:
    return {t.label: t for t in s.tanh_layers()}


def _weights(s: Snapshot) -> dict[str, GradStats]:
    return {s.grads[n].label(n): s.grads[n] for n in s.weights()}


def _below_last(s: Snapshot) -> dict[str, float]:
    """Each weight's grad:data ratio in decades relative to the last weight's (the output layer's)."""
    w = _weights(s)
    if len(w) < 2:
        return {}
    *earlier, last = w
    return {k: _decades(w[k].grad_data, w[last].grad_data) for k in earlier}


def _total_norm(s: Snapshot) -> float:
    return math.sqrt(sum(g.norm ** 2 for g in s.grads.values()))


@dataclass(frozen=True)
class Rule:
    """A warning as data: `values` measures each subject (a layer or weight label) in a snapshot
    given the first snapshot; the rule fires when a value passes the DiagConfig field `limit`
    (above it, or below it) in `sustain` consecutive snapshots."""

    kind: str
    values: Callable[[Snapshot, Snapshot], dict[str, float]]
    limit: str
    above: bool
    message: Callable[[Snapshot, str, float, DiagConfig], str]  # (last bad snapshot, subject, value, cfg)
    advice: str


LOWER_LR = "a smaller learning rate (--lr 10x lower)"
RULES: tuple[Rule, ...] = (
    Rule("saturation", lambda s, _: {k: t.saturated for k, t in _tanh(s).items()}, "max_saturated", True,
         lambda s, k, v, c: f"{v:.1%} of its outputs have |h| > {c.saturated} (limit {c.max_saturated:.0%}); "
         "their gradient is nearly zero",
         "a smaller init of the Linear before it (Kaiming: gain 5/3 / sqrt(fan_in), --w1-scale 1), "
         "batchnorm before the tanh, or a lower learning rate"),
    Rule("dead_units", lambda s, _: {k: t.dead / t.units for k, t in _tanh(s).items()}, "max_dead", True,
         lambda s, k, v, c: f"{_tanh(s)[k].dead} of {_tanh(s)[k].units} units are saturated on every probe "
         "row (dead: no gradient reaches their weights)",
         "a lower learning rate, a smaller init of the Linear before it, or batchnorm"),
    Rule("update_ratio_high", lambda s, _: {k: g.update_ratio for k, g in _weights(s).items()}, "ratio_high",
         True, lambda s, k, v, c: f"update:data ratio 10^{v:.3f}, above 10^{c.ratio_high} (guide 10^-3): "
         "each step changes the weights too much", LOWER_LR),
    Rule("update_ratio_low", lambda s, _: {k: g.update_ratio for k, g in _weights(s).items()}, "ratio_low",
         False, lambda s, k, v, c: f"update:data ratio 10^{v:.3f}, below 10^{c.ratio_low} (guide 10^-3): "
         "the weights barely move",
         "a larger learning rate, or a smaller init of this layer (large weights get small updates)"),
    Rule("vanishing_gradient", lambda s, _: {k: -d for k, d in _below_last(s).items()}, "max_layer_decades",
         True, lambda s, k, v, c: f"grad:data ratio {10 ** v:.0f}x smaller than the last weight's "
         f"({list(_weights(s))[-1]}): the gradient vanishes on its way down",
         "batchnorm, a smaller init of this layer's weights, or fewer saturated tanh units"),
    Rule("exploding_gradient", lambda s, _: _below_last(s), "max_layer_decades", True,
         lambda s, k, v, c: f"grad:data ratio {10 ** v:.0f}x larger than the last weight's "
         f"({list(_weights(s))[-1]}): the gradient explodes on its way down",
         "a smaller init of the layers above, or a lower learning rate"),
    Rule("exploding_gradient",
         lambda s, first: {"all parameters": _decades(_total_norm(s), _total_norm(first))},
         "max_growth_decades", True,
         lambda s, k, v, c: f"total gradient norm grew {10 ** v:.0f}x over the run, to {_total_norm(s):.3g}",
         LOWER_LR + ", or gradient clipping"),
)


def find_warnings(history: list[Snapshot], cfg: DiagConfig = DiagConfig(),
                  failure: tuple[int, str] | None = None) -> list[DiagWarning]:
    """Turn a history of snapshots into warnings. A rule must hold in `cfg.sustain` consecutive
    snapshots (a single bad probe is noise); non-finite values warn at once. `failure` (step, tensor)
    is a NonFiniteError raised by training, if any."""
    out: list[DiagWarning] = []
    if failure is not None:
        out.append(DiagWarning("non_finite", failure[1], failure[0], "became NaN or infinite and stopped "
                               "training", LOWER_LR + ", or a smaller init scale"))
    seen: set[str] = set()
    for s in history:
        for name in s.nonfinite:
            if name not in seen:
                seen.add(name)
                out.append(DiagWarning("non_finite", name, s.step, "has NaN or infinite values on the probe",
                                       LOWER_LR + ", or a smaller init scale"))
    if not history:
        return out
    for rule in RULES:
        out += _apply(rule, history, cfg)
    return out


def _apply(rule: Rule, history: list[Snapshot], cfg: DiagConfig) -> list[DiagWarning]:
    """One rule over the history: a warning per subject with a sustained episode."""
    limit = getattr(cfg, rule.limit)
    values = {s.step: rule.values(s, history[0]) for s in history}
    out = []
    for subject in dict.fromkeys(k for v in values.values() for k in v):
        def bad(s: Snapshot, subject: str = subject) -> bool:
            v = values[s.step].get(subject)
            return v is not None and (v > limit if rule.above else v < limit)

        ep = _episode(history, bad, cfg.sustain)
        if ep:
            v = values[ep[1].step][subject]
            out.append(DiagWarning(rule.kind, subject, ep[0].step, rule.message(ep[1], subject, v, cfg),
                                   rule.advice))
    return out


# ---------------------------------------------------------------------------- sanity checks
TOL = RUN_TOL  # relative to the scale 1/B of a dlogits entry (one home: check.RUN_TOL)
ATOMIC_TOL = RUN_TOL  # relative to the largest gradient entry
INIT_LOSS_TOL = 0.25  # relative: |loss0 - log V| <= 0.25 log V (see check_initial_loss)


@dataclass(frozen=True)
class Check:
    name: str
    value: float  # what was measured (NaN when the check does not apply)
    expected: float
    tolerance: float  # |value - expected| <= tolerance passes
    detail: str  # how it was measured and why the tolerance; or why the check does not apply
    applies: bool = True  # False: "n/a for this model"

    @property
    def passed(self) -> bool:
        ok = math.isfinite(self.value) and abs(self.value - self.expected) <= self.tolerance
        return self.applies and ok

    @property
    def failed(self) -> bool:
        return self.applies and not self.passed

    @property
    def status(self) -> str:
        return "n/a" if not self.applies else "ok" if self.passed else "FAIL"

    def __str__(self) -> str:
        if not self.applies:
            return f"{self.name}: {self.detail}"
        return (f"{self.status}: {self.name}: {self.value:.3g} (expected {self.expected:.4g} "
                f"+- {self.tolerance:.2g})")


def not_applicable(name: str, why: str) -> Check:
    return Check(name, math.nan, 0.0, 0.0, why, applies=False)


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


def lecture_params(model):
    """The lecture's 7-tensor struct (atomic.Params) sharing the model's memory when the model has
    the lecture MLP's layers (models.lecture_tensors), else None."""
    tensors = models.lecture_tensors(model)
    return None if tensors is None else atomic.Params(**tensors)


ATOMIC_CHECK = "op-by-op backward (atomic.py) equals the layers' closed forms"


def check_atomic_graph(model, X: Tensor, Y: Tensor) -> Check:
    """The lecture's Exercise 1 graph (26 intermediates, one local derivative per line) against the
    closed-form backward the layers use, on the lecture MLP only: worst relative difference over
    the 7 parameter gradients. Any other model: n/a."""
    names = models.LECTURE_NAMES
    p = lecture_params(model)
    if p is None:
        return not_applicable(ATOMIC_CHECK, "n/a for this model (the op-by-op graph is the lecture MLP's "
                              "6 layers: Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear; "
                              f"this model has {len(layers_of(model))} layers)")
    eps = layers_of(model)[3].eps
    f = atomic.forward(p, X, Y, eps)
    op_by_op = atomic.backward(p, X, Y, f, eps=eps).params()
    closed = models.loss_and_grads(model, X, Y).grads
    # relative to the largest entry of any of the 7 gradients: db1 is 0 up to rounding in front of
    # batchnorm, so an error relative to its own size would be noise over noise
    scale = max(closed[name].abs().max().item() for name in names.values())
    worst, where = 0.0, ""
    for lecture, name in names.items():
        diff = (getattr(op_by_op, lecture).reshape(closed[name].shape) - closed[name]).abs().max().item()
        if not diff <= worst:  # NaN wins
            worst, where = diff, f"d{lecture} ({name})"
    dtype = closed[names["W1"]].dtype
    nan = "" if math.isfinite(worst) else "; NaN: the op-by-op chain divides by probs, which underflowed to 0"
    return Check(ATOMIC_CHECK, worst / scale if scale > 0 else worst, 0.0, run_tolerance(dtype),
                 f"max |op-by-op - closed| over the 7 parameter gradients (worst: {where}) / the largest "
                 f"gradient entry ({scale:.2g}); {dtype} rounding level is ~1e-7 (float32), ~1e-16 (float64)"
                 f"{nan}")


def sanity_checks(model, X: Tensor, Y: Tensor, init_loss: float | None) -> list[Check]:
    """The lecture's checks on one probe batch X (B, ...), Y (B,) for any model: the rows of dlogits
    sum to 0, the gradient into logit_maxes is 0 (op by op), that chain agrees with the closed form,
    the atomic graph agrees with the layers (lecture MLP only), and the loss at init is close to
    -log(1/V) (init_loss None: not known, n/a)."""
    logits, _ = model.forward(X, training=True)  # (B, V)
    B, V = logits.shape
    _, ce_cache = ops.cross_entropy_forward(logits, Y)
    dlogits = ops.cross_entropy_backward(1.0, ce_cache)  # (B, V)  the closed form training uses
    dnorm_logits, dlogit_maxes = logit_maxes_backward(logits, Y)
    chain = "" if torch.isfinite(dnorm_logits).all() else (
        "; NaN: the op-by-op chain divides by probs, which underflowed to 0 for a confidently wrong "
        "prediction (the closed form has no such division)")
    tol = run_tolerance(logits.dtype) / B
    scale = f"tolerance {run_tolerance(logits.dtype):g} x 1/B, the size of one dlogits entry ({logits.dtype})"
    initial = (check_initial_loss(init_loss, V) if init_loss is not None else
               not_applicable("initial loss close to -log(1/V)", "n/a: the run's initial loss is not known "
                              "(no measurement at step 0 and no model config to rebuild the init from)"))
    return [
        Check("dlogits rows sum to 0", dlogits.sum(1).abs().max().item(), 0.0, tol,
              f"max over {B} rows of |sum_j (softmax - one_hot)/B|: probability in each row sums to 1, "
              f"the target takes 1 away; {scale}"),
        Check("gradient into logit_maxes is 0", dlogit_maxes.abs().max().item(), 0.0, tol,
              "max |dlogit_maxes| = |-sum_j dnorm_logits| through the lecture's op-by-op chain; "
              f"subtracting the row max cannot change the loss; {scale}{chain}"),
        Check("op-by-op dnorm_logits equals closed-form dlogits", (dnorm_logits - dlogits).abs().max().item(),
              0.0, tol, f"max abs difference; {scale}{chain}"),
        check_atomic_graph(model, X, Y),
        initial,
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
    forward/backward. Usage: `c = Collector(splits.Xtr, splits.Ytr, mcfg, tcfg); c.record(model, 0)`
    (optional, the init), `train(..., callback=c)`, then `c.warnings()`, `c.checks(model)`.
    mcfg may be None (a model of the user's own): the initial loss then comes from the step-0 record."""

    def __init__(self, Xtr: Tensor, Ytr: Tensor, mcfg, tcfg, cfg: DiagConfig = DiagConfig(),
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

    def record(self, model, step: int) -> Snapshot:
        """Measure the probe now (e.g. at step 0, before training) and append to the history."""
        with torch.no_grad():
            snap, self.last = measure(model, self.X, self.Y, self.tcfg.lr_at(step), step, self.cfg.saturated)
        self.history = [s for s in self.history if s.step < step] + [snap]
        self.step = step
        return snap

    def __call__(self, pr) -> None:
        """The train callback (pr: train.Progress)."""
        self.step = pr.state.step
        if pr.state.step % self.cfg.every == 0 or pr.state.step == pr.total:
            self.record(pr.state.model, pr.state.step)

    def record_failure(self, step: int, tensor: str) -> None:
        """Note a NonFiniteError (absolute step, tensor name) raised by training."""
        self.failure = (step, tensor)

    def watch(self, steps_fn):
        """Wrap a train steps_fn so that a NonFiniteError is recorded (and re-raised)."""
        def wrapped(*args):
            try:
                return steps_fn(*args)
            except NonFiniteError as e:
                self.record_failure(self.step + e.step, e.tensor)
                raise
        return wrapped

    def warnings(self) -> list[DiagWarning]:
        return find_warnings(self.history, self.cfg, self.failure)

    def initial_loss(self, dtype: torch.dtype) -> float | None:
        """The probe loss at the run's init: the step-0 record if the history has one, else the model
        rebuilt from its config and seed (as train.new_state draws it), else None."""
        if self.history and self.history[0].step == 0:
            return self.history[0].loss
        if self.mcfg is None:
            return None
        init = models.build(self.mcfg, self.tcfg.seed, dtype)
        with torch.no_grad():
            return sum(models.loss_and_grads(init, self.X[k], self.Y[k]).loss.item()
                       for k in range(self.X.shape[0])) / self.X.shape[0]

    def checks(self, model) -> list[Check]:
        """The sanity checks on the model on the first probe batch."""
        with torch.no_grad():
            return sanity_checks(model, self.X[0], self.Y[0], self.initial_loss(models.dtype_of(model)))


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
        "checks": [dataclasses.asdict(c) | {"passed": c.passed, "status": c.status} for c in checks],
        "history": [dataclasses.asdict(s) for s in history],
        **(extra or {}),
    })


def write_json(path: str | Path, data: dict) -> Path:
    """Write atomically (io.atomic_write_bytes: temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return path


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _floats(cls, v: dict, **kept) -> object:
    """A dataclass from JSON: the fields in `kept` as given, every other field a float (null -> NaN)."""
    return cls(**{f.name: kept[f.name] if f.name in kept else _num(v[f.name])
                  for f in dataclasses.fields(cls)})


def _layer_stats(v: dict) -> LayerStats:
    return _floats(LayerStats, v, index=int(v["index"]), kind=str(v["kind"]), units=int(v["units"]),
                   saturated=None if v["saturated"] is None else float(v["saturated"]),
                   dead=None if v["dead"] is None else int(v["dead"]))


def load_history(path: str | Path) -> list[Snapshot]:
    """The history saved in a diagnostics.json (null values read back as NaN). A file that is not
    one, or is truncated, raises CheckpointError with a one-line reason (it lives in the run's dir)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a handgrad diagnostics file")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: diagnostics format version {data.get('format_version')} is not "
                                  f"supported (this handgrad reads version {FORMAT_VERSION}); delete it to "
                                  "start a new history")
        out = []
        for s in data["history"]:
            layers = [_layer_stats(v) for v in s["layers"]]
            grads = {str(k): _floats(GradStats, v, kind=str(v["kind"]), shape=[int(d) for d in v["shape"]])
                     for k, v in s["grads"].items()}
            out.append(Snapshot(int(s["step"]), float(s["lr"]), _num(s["loss"]), layers, grads,
                                [str(n) for n in s["nonfinite"]]))
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


def write_report(out: str | Path, collector: Collector, model, step: int,
                 losses: Tensor | None = None, extra: dict | None = None) -> Report:
    """Measure `model` at `step` (unless the history already ends there), run the sanity checks,
    and write the PNGs and diagnostics.json into `out`."""
    from handgrad import plots  # matplotlib is imported only when plots are drawn

    if collector.last is None or not collector.history or collector.history[-1].step != step:
        collector.record(model, step)
    checks = collector.checks(model)
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
