"""Hand-written optimizers: how every named parameter moves given its gradient, with no autograd and
no torch.optim. SGD is the lectures' update (`p.data += -lr * p.grad`, Karpathy, "Building makemore
Part 3/4"). An optimizer with state of its own (AdamW's moments, to come) keeps it as named tensors,
which checkpoints save beside the parameters; SGD keeps none.
"""

from __future__ import annotations

from torch import Tensor


def sgd_update(model, grads: dict[str, Tensor], lr: float) -> None:
    """Plain SGD in place: p -= lr * grad, for every named parameter."""
    for name, p in model.params().items():
        p.add_(grads[name], alpha=-lr)


class SGD:
    """Stateless SGD (the lectures'): `update` is sgd_update, `state()` is empty."""

    name = "sgd"

    def update(self, model, grads: dict[str, Tensor], lr: float) -> None:
        sgd_update(model, grads, lr)

    def state(self) -> dict[str, Tensor]:
        return {}


OPTIMIZERS: dict[str, type] = {SGD.name: SGD}  # a new optimizer: one class here, registered by its name
