"""The autograd reference for training: the same model.forward, differentiated by PyTorch autograd
instead of by hand. Checking code only (verification mode and tests); training never imports it.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from handgrad import model, train
from handgrad.model import Activations, Params


def autograd_grads(p: Params, X: Tensor, Y: Tensor, batchnorm: bool = True
                   ) -> tuple[Tensor, Params, Activations]:
    """Loss, gradients (by autograd) and activations of model.forward, on detached copies of p."""
    leaves = Params(*(t.detach().clone().requires_grad_(True) for t in p.tensors()))
    with torch.enable_grad():
        loss, acts = model.forward(leaves, X, Y, batchnorm)
        grads = torch.autograd.grad(loss, leaves.tensors(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(p.tensors(), grads)]
    detached = {f.name: None if getattr(acts, f.name) is None else getattr(acts, f.name).detach()
                for f in fields(acts)}  # no graph escapes (the running statistics read these)
    return loss.detach(), Params(*grads), Activations(**detached)


# A drop-in for train.eager_steps: the same SGD loop, with gradients from autograd.
autograd_steps = train.sgd_steps(autograd_grads)
