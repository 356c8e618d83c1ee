"""The autograd reference for training: the same model.forward, differentiated by PyTorch autograd
instead of by hand. Checking code only (verification mode and tests); training never imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from handgrad import model
from handgrad.model import Activations, BNStats, Params
from handgrad.train import NonFiniteError


def autograd_grads(p: Params, X: Tensor, Y: Tensor, batchnorm: bool = True
                   ) -> tuple[Tensor, Params, Activations]:
    """Loss, gradients (by autograd) and activations of model.forward, on detached copies of p."""
    leaves = Params(*(t.detach().clone().requires_grad_(True) for t in p.tensors()))
    with torch.enable_grad():
        loss, acts = model.forward(leaves, X, Y, batchnorm)
        grads = torch.autograd.grad(loss, leaves.tensors(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(p.tensors(), grads)]
    return loss.detach(), Params(*grads), acts


def autograd_steps(p: Params, bn_running: BNStats | None, Xtr: Tensor, Ytr: Tensor, idx: Tensor,
                   lrs: Tensor, momentum: float, batchnorm: bool) -> Tensor:
    """A drop-in for train.eager_steps whose gradients come from autograd."""
    losses = torch.empty(idx.shape[0], dtype=torch.float64)  # (K,)
    for k in range(idx.shape[0]):
        ix = idx[k]  # (B,)
        loss, grads, acts = autograd_grads(p, Xtr[ix], Ytr[ix], batchnorm)
        losses[k] = loss
        if not torch.isfinite(losses[k]):
            raise NonFiniteError(k, "loss")
        with torch.no_grad():
            model.sgd_update(p, grads, float(lrs[k]))
            if bn_running is not None:
                model.update_running(bn_running, acts, momentum)
    return losses
