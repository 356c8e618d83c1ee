"""The autograd reference for training: the same layers' forward, differentiated by PyTorch
autograd instead of by hand. Checking code only (verification mode, bench and tests); training
never imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from handgrad import ops, train
from handgrad.layers import set_tensor
from handgrad.models import Step


def autograd_grads(model, X: Tensor, Y: Tensor) -> Step:
    """Loss, gradients (by autograd) and caches of model.forward + cross-entropy. The parameters are
    swapped for requires-grad copies during the call and put back afterwards."""
    params = model.params()
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
    for k, t in leaves.items():
        set_tensor(model, k, t)
    try:
        with torch.enable_grad():
            logits, caches = model.forward(X, training=True)  # (N, V)
            loss, _ = ops.cross_entropy_forward(logits, Y)  # ()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    finally:
        for k, t in params.items():
            set_tensor(model, k, t)
    named = {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(params.items(), grads)}
    detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, caches)  # no graph escapes
    return Step(loss.detach(), named, detached)


# A drop-in for train.eager_steps: the same SGD loop, with gradients from autograd.
autograd_steps = train.sgd_steps(autograd_grads)
