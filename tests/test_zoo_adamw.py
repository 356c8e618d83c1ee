"""AdamW by hand (optim.AdamW) against torch.optim.AdamW: the same parameters after 1000 updates with
the same gradients, float32 and float64; its state as named tensors; resume from saved state."""

from __future__ import annotations

import pytest
import torch

from handgrad import optim


class Params:
    """The smallest model: named tensors only (what an optimizer reads)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def params(self):
        return self.tensors


def _start(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (7, 5), "0.bias": (5,), "1.start": (1, 3)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}, g


def _grads(params, g, step):
    """Gradients of varied scale and sign, some exactly zero (a row an embedding did not use)."""
    out = {}
    for k, p in params.items():
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0 ** (step % 5 - 2) + 0.1 * p
        if p.dim() == 2 and step % 3 == 0:
            grad[0] = 0.0
        out[k] = grad
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed, betas, eps, wd, lr", [(0, (0.9, 0.99), 1e-8, 0.01, 5e-4),
                                                      (1, (0.8, 0.999), 1e-6, 0.1, 3e-2),
                                                      (2, (0.0, 0.5), 1e-3, 0.0, 1e-1)])
def test_adamw_equals_torch_adamw_over_1000_steps(dtype, seed, betas, eps, wd, lr):
    start, g = _start(dtype, seed)
    mine = Params({k: t.clone() for k, t in start.items()})
    theirs = {k: t.clone().requires_grad_(True) for k, t in start.items()}
    opt = optim.AdamW(mine.params(), betas, eps, wd)
    ref = torch.optim.AdamW(list(theirs.values()), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    worst = 0.0
    for step in range(1000):
        grads = _grads(mine.params(), g, step)
        opt.update(mine, grads, lr)
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        ref.step()
        for k, p in theirs.items():
            diff = (mine.params()[k] - p.detach()).abs().max().item()
            worst = max(worst, diff)
    # the same operations in the same order: equal to the last bit on this CPU
    assert worst == 0.0, f"max |difference| {worst:.3e} after 1000 steps"
    for k in start:
        assert torch.equal(opt.m[k], ref.state[theirs[k]]["exp_avg"])
        assert torch.equal(opt.v[k], ref.state[theirs[k]]["exp_avg_sq"])


def test_adamw_moves_a_parameter_the_hand_computed_amount():
    """One update from zero moments: m = (1-b1) g, v = (1-b2) g^2, the bias corrections cancel them,
    so p moves by lr * g / (|g| + eps) after the decay p * (1 - lr * wd)."""
    p = Params({"w": torch.tensor([2.0, -1.0], dtype=torch.float64)})
    opt = optim.AdamW(p.params(), (0.9, 0.99), 1e-8, 0.5)
    opt.update(p, {"w": torch.tensor([4.0, -0.25], dtype=torch.float64)}, 0.1)
    decayed = torch.tensor([2.0, -1.0], dtype=torch.float64) * (1 - 0.1 * 0.5)
    expected = decayed - 0.1 * torch.tensor([4.0 / (4.0 + 1e-8), -0.25 / (0.25 + 1e-8)], dtype=torch.float64)
    torch.testing.assert_close(p.params()["w"], expected, rtol=1e-14, atol=0)


def test_adamw_state_round_trip_resumes_bit_identically():
    """N updates == N/2, state saved and loaded into a fresh optimizer, then N/2 more."""
    start, g = _start(torch.float32, 5)
    seq = [_grads(start, g, s) for s in range(40)]
    whole = Params({k: t.clone() for k, t in start.items()})
    opt = optim.AdamW(whole.params(), (0.9, 0.99), 1e-8, 0.01)
    for grads in seq:
        opt.update(whole, grads, 5e-4)
    half = Params({k: t.clone() for k, t in start.items()})
    first = optim.AdamW(half.params(), (0.9, 0.99), 1e-8, 0.01)
    for grads in seq[:20]:
        first.update(half, grads, 5e-4)
    saved = {k: t.clone() for k, t in first.state().items()}
    assert set(saved) == {"t", *(f"{m}.{k}" for m in "mv" for k in start)}
    second = optim.AdamW(half.params(), (0.9, 0.99), 1e-8, 0.01)
    second.load_state(saved)
    for grads in seq[20:]:
        second.update(half, grads, 5e-4)
    for k in start:
        assert torch.equal(whole.params()[k], half.params()[k])


def test_adamw_refuses_state_of_another_shape():
    opt = optim.AdamW({"w": torch.zeros(3)})
    bad = {"m.w": torch.zeros(4), "v.w": torch.zeros(3), "t": torch.tensor(1)}
    with pytest.raises(ValueError, match="m.w"):
        opt.load_state(bad)
