import math

import pytest
import torch

from handgrad import model, reference, train
from handgrad.model import ModelConfig
from handgrad.train import NonFiniteError, TrainConfig


def _cfg(splits, **kw):
    return ModelConfig(vocab_size=len(splits.vocab)), TrainConfig(**{"engine": "eager", **kw})


def test_lr_schedule_is_the_lectures():
    t = TrainConfig()
    assert [t.lr_at(s) for s in (0, 99_999, 100_000, 199_999)] == [0.1, 0.1, 0.01, 0.01]


def test_training_runs_with_autograd_disabled_globally(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=200, chunk_steps=50)
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        state = train.train(names_splits, mcfg, tcfg)
    finally:
        torch.set_grad_enabled(previous)
    assert state.step == 200 and torch.isfinite(state.losses).all()
    assert not any(t.requires_grad or t.grad is not None for t in state.params.tensors())


def test_short_training_loss_falls_well_below_the_initial_loss(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=3000)
    state = train.train(names_splits, mcfg, tcfg)
    first, last = state.losses[:10].mean().item(), state.losses[-500:].mean().item()
    assert first > 3.0 and last < 2.6, (first, last)
    bn = train.inference_stats(state, names_splits, mcfg, tcfg)
    assert model.evaluate(state.params, bn, names_splits.Xdev, names_splits.Ydev) < 2.6


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_hand_written_training_curve_matches_autograd_step_for_step(names_splits, dtype, tol):
    mcfg, tcfg = _cfg(names_splits, steps=300, dtype=dtype, chunk_steps=100)
    hand = train.train(names_splits, mcfg, tcfg).losses
    ref = train.train(names_splits, mcfg, tcfg, steps_fn=reference.autograd_steps).losses
    assert (hand - ref).abs().max().item() <= tol


def test_running_statistics_track_the_batch_statistics(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=2000, bn_stats="running")
    state = train.train(names_splits, mcfg, tcfg)
    calibrated = model.calibrate_bn(state.params, names_splits.Xtr)
    assert not torch.equal(state.bn_running.mean, torch.zeros_like(state.bn_running.mean))
    # after 2000 steps at momentum 0.001 the running mean has mostly converged
    rel = ((state.bn_running.mean - calibrated.mean).norm() / calibrated.mean.norm()).item()
    assert rel < 0.3


def test_non_finite_loss_stops_training_naming_step_and_tensor(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=100, chunk_steps=10)
    state = train.new_state(mcfg, tcfg)
    state.params.W2[3, 5] = math.inf
    with pytest.raises(NonFiniteError) as e:
        train.train(names_splits, mcfg, tcfg, state)
    assert e.value.step == 0 and e.value.tensor == "loss"


def test_non_finite_gradient_is_named(names_splits, monkeypatch):
    mcfg, tcfg = _cfg(names_splits, steps=20, chunk_steps=10)
    real_backward = model.backward
    calls = []

    def backward_with_a_nan_at_step_13(p, acts, dloss=1.0):
        grads = real_backward(p, acts, dloss)
        calls.append(1)
        if len(calls) == 14:
            grads.W1[2, 3] = math.nan
        return grads

    monkeypatch.setattr(model, "backward", backward_with_a_nan_at_step_13)
    with pytest.raises(NonFiniteError) as e:
        train.train(names_splits, mcfg, tcfg)
    assert (e.value.step, e.value.tensor) == (13, "dW1")


def test_resumed_chunks_draw_the_same_batches_as_one_run(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=600, chunk_steps=100)
    whole = train.train(names_splits, mcfg, tcfg)
    half = train.train(names_splits, mcfg, TrainConfig(**{**tcfg.__dict__, "steps": 300}))
    rest = train.train(names_splits, mcfg, tcfg, half)
    assert torch.equal(whole.losses, rest.losses)
    assert all(torch.equal(a, b) for a, b in zip(whole.params.tensors(), rest.params.tensors()))


def test_activation_checkpointing_trains_like_keeping_all_activations(names_splits):
    fast = pytest.importorskip("handgrad.fast")
    mcfg = ModelConfig(vocab_size=len(names_splits.vocab))
    if fast.load_fast_steps(mcfg, torch.float32)[0] is None:
        pytest.skip("the fast engine is unavailable here")
    runs = [train.train(names_splits, mcfg, TrainConfig(steps=300, batch_size=256, engine="fast",
                                                        recompute_tile=tile)) for tile in (0, 64)]
    assert (runs[0].losses - runs[1].losses).abs().max().item() < 1e-4
    assert train.select_engine(mcfg, TrainConfig(engine="eager", recompute_tile=64))[2].startswith(
        "activation checkpointing")
