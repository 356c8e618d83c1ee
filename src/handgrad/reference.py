"""The autograd reference for training: the same layers' forward, differentiated by PyTorch
autograd instead of by hand. Checking code only (verification mode, bench and tests); training
never imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from handgrad import engines, ops, train
from handgrad.check import run_tolerance
from handgrad.layers import set_tensor
from handgrad.models import Step
from handgrad.report import Column, Table


def autograd_grads(model, X: Tensor, Y: Tensor) -> Step:
    """Loss, gradients (by autograd) and caches of model.forward + cross-entropy (masked for
    sequences). The parameters are swapped for requires-grad copies during the call and put back
    afterwards."""
    params = model.params()
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
    for k, t in leaves.items():
        set_tensor(model, k, t)
    try:
        with torch.enable_grad():
            logits, caches = model.forward(X, training=True)  # (N, V) or (N, T, V)
            loss, _ = ops.loss_pair(Y)[0](logits, Y)  # ()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    finally:
        for k, t in params.items():
            set_tensor(model, k, t)
    named = {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(params.items(), grads)}
    detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, caches)  # no graph escapes
    return Step(loss.detach(), named, detached)


# A drop-in for train.eager_steps: the same SGD loop, with gradients from autograd.
autograd_steps = train.sgd_steps(autograd_grads)


# ---------------------------------------------------------------------------- hand-written vs autograd runs
@dataclass(frozen=True)
class Verification:
    """Two trainings from the same init on the same batches: the hand-written engine's per-step losses
    and autograd's (reference.autograd_steps), and the tolerance they must agree within."""

    title: str  # what was run: "50 steps, mlp, float32"
    engine: str  # the hand-written run's engine ("fast", "eager")
    hand: Tensor  # (steps,) float64
    ref: Tensor  # (steps,) float64
    tolerance: float  # check.run_tolerance of the dtype

    @property
    def diff(self) -> Tensor:
        return (self.hand - self.ref).abs()  # (steps,)

    @property
    def worst(self) -> int:
        return int(self.diff.argmax())

    @property
    def agree(self) -> bool:
        return bool(self.diff.max() <= self.tolerance)

    def shown(self) -> list[int]:
        """The steps worth showing: the first two, a quarter, half, the worst and the last."""
        n = self.hand.shape[0]
        return sorted({0, 1, n // 4, n // 2, self.worst, n - 1})

    def __str__(self) -> str:
        t = Table([Column("step", ">", 8), Column("hand-written", ">", 16), Column("autograd", ">", 16),
                   Column("|diff|", ">", 10)],
                  title=f"{self.title}, hand-written ({self.engine} engine) vs autograd, same init and "
                  "batches")
        for i in self.shown():
            t.add(i, f"{self.hand[i].item():.10f}", f"{self.ref[i].item():.10f}",
                  f"{self.diff[i].item():.2e}")
        return (f"{t}\nmax per-step |loss difference| {self.diff.max().item():.3e} at step {self.worst} "
                f"(tolerance {self.tolerance:g}): {'AGREE' if self.agree else 'DISAGREE'}")


def verify(splits, mcfg, tcfg: train.TrainConfig, steps: int, threads: int = 1, warn=None) -> Verification:
    """`handgrad train --verify-autograd STEPS`: train `steps` steps with the engine engines.plan picks
    (hand-written) and again with autograd's gradients, from the same init on the same batches."""
    tcfg = dataclasses.replace(tcfg, steps=steps)
    plan = engines.plan(train.state_of_splits(mcfg, tcfg, splits).model, tcfg, threads=threads)
    if plan.warning and warn is not None:
        warn(plan.warning)
    hand = train.train(splits, mcfg, tcfg, steps_fn=plan.steps).losses
    ref = train.train(splits, mcfg, tcfg, steps_fn=autograd_steps).losses
    title = f"{steps} steps, {mcfg.name}, {tcfg.dtype}"
    return Verification(title, plan.name, hand, ref, run_tolerance(tcfg.torch_dtype))
