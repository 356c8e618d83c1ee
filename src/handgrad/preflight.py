"""What is known about a new run before its first step: configurations that train degenerately, said
before any time is spent (a warning, with what to try) or refused when the first step cannot succeed.
Rules as data: each names the config field to change.

- Batchnorm statistics over very few rows: with n rows per statistic every feature of a batch is
  normalised to a handful of values (n = 2: exactly +-1/sqrt(2), whatever the inputs, with Bessel's
  n-1), and the statistics and their gradients jump from batch to batch. Measured here: the deep
  preset diverged at steps 62 and 102 (two seeds) at batch 2, at step 2,342 for one of two seeds at
  batch 3, and trained at batch 4 and 8 for 3,000 steps.
- Gradients that overflow at init: one hand-written forward and backward at the initial parameters
  on a probe batch (no autograd). In the deep preset the gradient grows with depth through the
  Linear -> BatchNorm -> Tanh blocks (measured at init: max |grad| 2 at 50 layers, 1.6e2 at 100,
  9e6 at 200, 3e18 at 400, inf at 1,000 in float32): non-finite gradients at step 0 are refused, and
  gradients that move a weight by more than MAX_FIRST_STEP in the first SGD step are a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from handgrad import models
from handgrad.config import ConfigError, ref
from handgrad.layers import BatchNorm1d
from handgrad.models import ModelConfig
from handgrad.train import TrainConfig, first_non_finite

MIN_BN_ROWS = 4  # fewer rows per batchnorm statistic train degenerately (see the module docstring)
PROBE_ROWS = 64  # rows of the probe batch (fewer when the run's batch is smaller)
MAX_FIRST_STEP = 1.0  # lr * max |gradient| at init beyond which the first step wrecks the weights


class Degenerate(ConfigError):
    """A configuration whose first step cannot succeed; one line naming the field to change."""


def _has_batchnorm(model) -> bool:
    return any(isinstance(layer, BatchNorm1d) for layer in getattr(model, "layers", ()))


def _default(mcfg: ModelConfig, field: str):
    return getattr(models.preset(mcfg.name), field)


@dataclass(frozen=True)
class Suspect:
    """A field that makes initial gradients large when `raised(mcfg)`, and what to try instead."""

    field: str
    raised: Callable[[ModelConfig], bool]
    advice: str


# In order: the first that applies is named.
SUSPECTS = (
    Suspect("n_layers", lambda m: m.n_layers > _default(m, "n_layers"),
            f"the gradient grows with each hidden block at init; try far fewer {ref('n_layers')}"),
    Suspect("w1_scale", lambda m: m.w1_scale > 1.0, f"try a {ref('w1_scale')} nearer 1"),
)


def _suspect(mcfg: ModelConfig | None) -> Suspect | None:
    return next((s for s in SUSPECTS if mcfg is not None and s.raised(mcfg)), None)


def probe(model, X: Tensor, Y: Tensor, rows: int) -> models.Step:
    """One training-mode forward and hand-written backward at the model's parameters, on the first
    `rows` rows of X (a fixed batch: nothing the run draws is consumed). The model is not changed."""
    with torch.no_grad():
        return models.loss_and_grads(model, X[:rows], Y[:rows])


def check(model, mcfg: ModelConfig | None, tcfg: TrainConfig, X: Tensor, Y: Tensor, warn) -> None:
    """Warn (warn(line)) about a degenerate configuration of a run about to take its first step, and
    raise Degenerate when the first step cannot succeed."""
    if _has_batchnorm(model) and tcfg.batch_size < MIN_BN_ROWS:
        warn(f"{ref('batch_size')} {tcfg.batch_size}: batchnorm statistics over {tcfg.batch_size} rows are "
             f"degenerate (with 2 rows every feature is normalised to +-0.71 whatever its values) and "
             f"training is likely to diverge; use {ref('batch_size')} {MIN_BN_ROWS} or more (the lectures "
             f"use 32), or {ref('batchnorm')}")
    step = probe(model, X, Y, min(tcfg.batch_size, PROBE_ROWS, X.shape[0]))
    suspect = _suspect(mcfg)
    blame = f"{ref(suspect.field)} {getattr(mcfg, suspect.field)}: " if suspect else ""
    advice = suspect.advice if suspect else "check the initialisation"
    if not bool(torch.isfinite(step.loss)):
        raise Degenerate(f"{blame}the initial loss is {float(step.loss)} before any step ({tcfg.dtype}); "
                         f"{advice}")
    bad = first_non_finite(step.grads)
    if bad is not None:
        raise Degenerate(f"{blame}the initial gradients overflow {tcfg.dtype} (d{bad} is not finite before "
                         f"any step), so training would diverge at step 0; {advice}")
    name, top = max(((n, float(g.abs().max())) for n, g in step.grads.items()), key=lambda t: t[1])
    lr = tcfg.lr_at(0)
    if lr * top > MAX_FIRST_STEP:
        warn(f"{blame}the initial gradients are large (|d{name}| up to {top:.3g}): the first step moves a "
             f"weight by up to {lr * top:.3g} at {ref('lr')} {lr:g} and training is likely to diverge; "
             f"{advice}, or a smaller {ref('lr')}")
