import math

import pytest
import torch

from handgrad import engines, layers, models, reference, train
from handgrad.models import ModelConfig
from handgrad.train import NonFiniteError, TrainConfig


def _cfg(splits, name="mlp", model_kw=None, **kw):
    mcfg = models.preset(name, vocab_size=len(splits.vocab), **(model_kw or {}))
    return mcfg, TrainConfig.for_model(name, **{"engine": "eager", **kw})


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
    assert not any(t.requires_grad or t.grad is not None for t in state.model.params().values())


def test_short_training_loss_falls_well_below_the_initial_loss(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=3000)
    state = train.train(names_splits, mcfg, tcfg)
    first, last = state.losses[:10].mean().item(), state.losses[-500:].mean().item()
    assert first > 3.0 and last < 2.6, (first, last)
    inference = models.with_buffers(state.model, train.inference_buffers(state, names_splits, tcfg))
    assert models.evaluate(inference, names_splits.Xdev, names_splits.Ydev) < 2.6


MODELS_SMALL = [("mlp", {}), ("deep", {"n_hidden": 32, "n_layers": 3}), ("wavenet", {"n_hidden": 32})]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("name, model_kw", MODELS_SMALL, ids=[m[0] for m in MODELS_SMALL])
def test_hand_written_training_curve_matches_autograd_step_for_step(names_splits, name, model_kw, dtype, tol):
    splits = names_splits if name != "wavenet" else _wavenet_splits(names_splits)
    mcfg, tcfg = _cfg(splits, name, model_kw, steps=200, dtype=dtype, chunk_steps=100)
    hand = train.train(splits, mcfg, tcfg).losses
    ref = train.train(splits, mcfg, tcfg, steps_fn=reference.autograd_steps).losses
    assert (hand - ref).abs().max().item() <= tol


def _wavenet_splits(names_splits):
    from handgrad import data

    words = data.read_words(data.default_data_path()).items[:3000]
    return data.make_splits(words, block_size=8, seed=42, vocab=names_splits.vocab)


def test_running_statistics_track_the_batch_statistics(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=2000, bn_stats="running")
    state = train.train(names_splits, mcfg, tcfg)
    calibrated = models.calibrate(state.model, names_splits.Xtr)
    running = state.model.buffers()["3.running_mean"]
    assert not torch.equal(running, torch.zeros_like(running))
    # after 2000 steps at momentum 0.001 the running mean has mostly converged
    rel = ((running - calibrated["3.running_mean"]).norm() / calibrated["3.running_mean"].norm()).item()
    assert rel < 0.3


def test_non_finite_loss_stops_training_naming_step_and_tensor(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=100, chunk_steps=10)
    state = train.new_state(mcfg, tcfg)
    state.model.params()["5.weight"][3, 5] = math.inf
    with pytest.raises(NonFiniteError) as e:
        train.train(names_splits, mcfg, tcfg, state)
    assert e.value.step == 0 and e.value.tensor == "loss"


def test_non_finite_gradient_is_named(names_splits, monkeypatch):
    mcfg, tcfg = _cfg(names_splits, steps=20, chunk_steps=10)
    real = models.loss_and_grads
    calls = []

    def grads_with_a_nan_at_step_13(model, X, Y):
        step = real(model, X, Y)
        calls.append(1)
        if len(calls) == 14:
            step.grads["2.weight"][2, 3] = math.nan
        return step

    monkeypatch.setattr(models, "loss_and_grads", grads_with_a_nan_at_step_13)
    with pytest.raises(NonFiniteError) as e:
        train.train(names_splits, mcfg, tcfg)
    assert (e.value.step, e.value.tensor) == (13, "d2.weight")


def test_resumed_chunks_draw_the_same_batches_as_one_run(names_splits):
    mcfg, tcfg = _cfg(names_splits, steps=600, chunk_steps=100)
    whole = train.train(names_splits, mcfg, tcfg)
    half = train.train(names_splits, mcfg, TrainConfig(**{**tcfg.__dict__, "steps": 300}))
    rest = train.train(names_splits, mcfg, tcfg, half)
    assert torch.equal(whole.losses, rest.losses)
    state_pairs = zip({**whole.model.params(), **whole.model.buffers()}.values(),
                      {**rest.model.params(), **rest.model.buffers()}.values())
    assert all(torch.equal(a, b) for a, b in state_pairs)


def test_lecture_rng_draws_batches_from_the_init_generator(names_splits):
    mcfg, tcfg = _cfg(names_splits, "wavenet", {"n_hidden": 8}, lecture_rng=True, seed=42)
    state = train.new_state(mcfg, tcfg)
    g = torch.Generator().manual_seed(42)
    reference_model = models.build(mcfg, g)  # torch.manual_seed(42), then the layers' draws
    assert all(torch.equal(a, b) for a, b in zip(state.model.params().values(), reference_model.params().values()))
    assert torch.equal(state.generator.get_state(), g.get_state())  # the first batch continues this stream
    other = train.new_state(mcfg, TrainConfig(seed=42))
    assert not torch.equal(other.generator.get_state(), g.get_state())


class Gelu:
    """A user's own activation layer (tanh approximation of GELU), with its hand-written backward."""

    C = (2 / math.pi) ** 0.5

    def params(self):
        return {}

    def buffers(self):
        return {}

    def forward(self, x, training=True):
        u = self.C * (x + 0.044715 * x**3)
        t = torch.tanh(u)
        return 0.5 * x * (1 + t), (x, t)

    def backward(self, dout, cache):
        x, t = cache
        du = self.C * (1 + 3 * 0.044715 * x**2)
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du), {}

    def spec(self):
        return {"type": "Gelu"}


def test_a_users_own_sequential_trains_through_the_same_api(names_splits):
    model = layers.Sequential([layers.Embedding(27, 8), layers.FlattenConsecutive(3), layers.Linear(24, 32),
                               layers.BatchNorm1d(32), Gelu(), layers.Linear(32, 27)])
    model.init_(torch.Generator().manual_seed(0))
    tcfg = TrainConfig(steps=400, engine="auto", chunk_steps=100)
    assert engines.plan(model, tcfg)[1] == "eager"  # not a pattern the native step knows
    ref = reference.autograd_steps
    twin = models.with_buffers(model, {k: v.clone() for k, v in model.buffers().items()})
    for k, v in twin.params().items():
        layers.set_tensor(twin, k, v.clone())
    state = train.train(names_splits, None, tcfg, train.state_for(model, tcfg))
    check = train.train(names_splits, None, tcfg, train.state_for(twin, tcfg), steps_fn=ref)
    assert (state.losses - check.losses).abs().max().item() <= 1e-5
    assert state.losses[-100:].mean() < state.losses[:10].mean() - 0.5


def test_activation_checkpointing_trains_like_keeping_all_activations(names_splits):
    mcfg = ModelConfig(vocab_size=len(names_splits.vocab))
    if isinstance(engines.native_steps(models.build(mcfg), TrainConfig()), str):
        pytest.skip("the fast engine is unavailable here")
    runs = [engines.fit(names_splits, mcfg, TrainConfig(steps=300, batch_size=256, engine="fast",
                                                       recompute_tile=tile)) for tile in (0, 64)]
    assert (runs[0].losses - runs[1].losses).abs().max().item() < 1e-4
    assert engines.plan(models.build(mcfg), TrainConfig(engine="eager", recompute_tile=64))[2].startswith(
        "activation checkpointing")
