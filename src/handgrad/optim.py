"""Hand-written optimizers: how every named parameter moves given its gradient, with no autograd and
no torch.optim. SGD is the lectures' update (`p.data += -lr * p.grad`, Karpathy, "Building makemore
Part 3/4"); AdamW is makemore's optimizer (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", 2019), written in torch.optim.AdamW's order of operations so that the two agree to
the last bit on the CPU. The eager engine (train.sgd_steps) calls sgd_update, or the update(model,
grads, lr) of the optimizer a run's state holds. An optimizer with state of its own keeps it as named
tensors (`state()` / `load_state()`) that checkpoints save beside the parameters; SGD keeps none.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def sgd_update(model, grads: dict[str, Tensor], lr: float) -> None:
    """Plain SGD in place: p -= lr * grad, for every named parameter."""
    for name, p in model.params().items():
        p.add_(grads[name], alpha=-lr)


class AdamW:
    """Adam with decoupled weight decay. Per parameter p with gradient g, at update t = 1, 2, ...:

        p <- p * (1 - lr * weight_decay)              decoupled decay, before the moments
        m <- m + (g - m) * (1 - beta1)                first moment (torch's lerp)
        v <- v * beta2 + (1 - beta2) * g * g          second moment
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    eps is added after the bias correction of sqrt(v), as torch.optim.AdamW does. The moments are
    in the parameter's dtype; t counts updates (the same for every parameter). Weight decay applies
    to every parameter (makemore decays them all)."""

    def __init__(self, params: Mapping[str, Tensor], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0  # updates done
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}  # first moments, each p's shape
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}  # second moments

    def update(self, model, grads: dict[str, Tensor], lr: float) -> None:
        self.t += 1
        t, b1, b2 = self.t, self.beta1, self.beta2
        step_size = lr / (1 - b1**t)  # Python floats, as torch computes them
        bias_correction2_sqrt = (1 - b2**t) ** 0.5
        for name, p in model.params().items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.weight_decay != 0:
                p.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)  # (p's shape)
            p.addcdiv_(m, denom, value=-step_size)

    # ------------------------------------------------------------------ state as named tensors
    def state(self) -> dict[str, Tensor]:
        """The state as named tensors: "m.<param>", "v.<param>" and "t" (int64 scalar)."""
        return {**{f"m.{k}": t for k, t in self.m.items()}, **{f"v.{k}": t for k, t in self.v.items()},
                "t": torch.tensor(self.t, dtype=torch.int64)}

    def load_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Take the moments and the update count from `state()`'s tensors (copied into this
        optimizer's own, so their shapes and dtypes must match; raises ValueError otherwise)."""
        for kind, moments in (("m", self.m), ("v", self.v)):
            for k, mine in moments.items():
                given = tensors.get(f"{kind}.{k}")
                if given is None or given.shape != mine.shape or given.dtype != mine.dtype:
                    got = None if given is None else (tuple(given.shape), given.dtype)
                    raise ValueError(f"optimizer state {kind}.{k}: expected {tuple(mine.shape)} "
                                     f"{mine.dtype}, got {got}")
                mine.copy_(given)
        t = tensors.get("t")
        if t is None or t.numel() != 1 or int(t) < 0:
            raise ValueError(f"optimizer state t: expected a non-negative update count, got {t}")
        self.t = int(t)


OPTIMIZERS = ("sgd", "adamw")


def make(name: str, params: Mapping[str, Tensor], betas: tuple[float, float], eps: float,
         weight_decay: float) -> AdamW | None:
    """The optimizer `name` (OPTIMIZERS) for these parameters, with fresh state; None for "sgd", which
    keeps none (the engines call sgd_update)."""
    if name == "sgd":
        return None
    if name == "adamw":
        return AdamW(params, betas, eps, weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
