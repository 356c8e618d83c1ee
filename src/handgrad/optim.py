"""Hand-written optimizers: how every named parameter moves given its gradient, with no autograd and
no torch.optim. SGD is the lectures' update (`p.data += -lr * p.grad`, Karpathy, "Building makemore
Part 3/4"); the eager engine (train.sgd_steps) takes any object with update(model, grads, lr). An
optimizer with state of its own (AdamW's moments, to come) also keeps it as named tensors for
checkpoints to save beside the parameters; SGD keeps none.
"""

from __future__ import annotations

from torch import Tensor


def sgd_update(model, grads: dict[str, Tensor], lr: float) -> None:
    """Plain SGD in place: p -= lr * grad, for every named parameter."""
    for name, p in model.params().items():
        p.add_(grads[name], alpha=-lr)


class SGD:
    """Stateless SGD (the lectures'): `update` is sgd_update."""

    def update(self, model, grads: dict[str, Tensor], lr: float) -> None:
        sgd_update(model, grads, lr)

