"""The makemore models built from layers: parameter counts, the lecture's init, whole-model
hand-written gradients against autograd, calibration layer by layer, evaluation and sampling."""

import pytest
import torch

from handgrad import atomic, models
from handgrad.layers import BatchNorm1d, FlattenConsecutive, Linear, numel
from handgrad.reference import autograd_grads

F64 = torch.float64


@pytest.mark.parametrize("name, count", [("mlp", 12_297), ("deep", 47_024), ("wavenet", 76_579)])
def test_models_have_the_lectures_parameter_counts(name, count):
    assert numel(models.build(models.preset(name))) == count


def test_wavenet_halves_the_context_three_times():
    model = models.build(models.preset("wavenet"))
    X = torch.randint(0, 27, (4, 8))
    shapes = []
    for layer in model.layers:
        X, _ = layer.forward(X)
        if isinstance(layer, FlattenConsecutive):
            shapes.append(tuple(X.shape))
    assert shapes == [(4, 4, 48), (4, 2, 256), (4, 256)]
    assert tuple(X.shape) == (4, 27)


def test_mlp_init_is_the_lectures_and_its_gradients_equal_the_atomic_chain():
    cfg = models.preset("mlp", n_hidden=64)
    model = models.build(cfg, 7, F64)
    p = atomic.init_params(atomic.LectureConfig(n_hidden=64), 7, F64)
    params = model.params()
    names = {"C": "0.weight", "W1": "2.weight", "b1": "2.bias", "W2": "5.weight", "b2": "5.bias",
             "bngain": "3.weight", "bnbias": "3.bias"}
    for lecture_name, name in names.items():
        assert torch.equal(getattr(p, lecture_name).reshape(params[name].shape), params[name])
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
    step = models.loss_and_grads(model, X, Y)
    f = atomic.forward(p, X, Y)
    chain = atomic.backward(p, X, Y, f).params()
    assert step.loss.item() == pytest.approx(f.loss.item(), rel=1e-13)
    for lecture_name, name in names.items():
        torch.testing.assert_close(step.grads[name], getattr(chain, lecture_name).reshape(params[name].shape),
                                   rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, sizes, batch", [
    ("mlp", {"n_hidden": 16}, 9),
    ("mlp", {"n_hidden": 5, "batchnorm": False}, 4),
    ("deep", {"n_hidden": 12, "n_layers": 3}, 7),
    ("deep", {"n_hidden": 6, "n_layers": 2}, 2),
    ("wavenet", {"n_hidden": 10, "n_embd": 4}, 5),
    ("wavenet", {"n_hidden": 6, "n_embd": 3, "block_size": 4}, 2),
])
def test_model_backward_matches_autograd_in_float64(name, sizes, batch, seed):
    cfg = models.preset(name, vocab_size=11, **sizes)
    model = models.build(cfg, seed, F64)
    g = torch.Generator().manual_seed(seed)
    for t in model.params().values():  # move away from the init's exact ones and zeros
        t.add_(torch.randn(t.shape, generator=g, dtype=F64) * 0.2)
    X = torch.randint(0, 11, (batch, cfg.block_size), generator=g)
    X[1] = X[0]  # repeated rows: the embedding gradient must accumulate
    Y = torch.randint(0, 11, (batch,), generator=g)
    step = models.loss_and_grads(model, X, Y)
    ref = autograd_grads(model, X, Y)
    assert step.loss.item() == pytest.approx(ref.loss.item(), rel=1e-13)
    assert set(step.grads) == set(model.params())
    for k, t in model.params().items():
        assert step.grads[k].shape == t.shape, k
        torch.testing.assert_close(step.grads[k], ref.grads[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_model_gradient_matches_finite_differences_in_float64(name):
    cfg = models.preset(name, vocab_size=7, n_hidden=6, n_embd=3, **({} if name == "wavenet" else {"n_layers": 2}))
    model = models.build(cfg, 3, F64)
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randint(0, 7, (6, cfg.block_size), generator=g), torch.randint(0, 7, (6,), generator=g)
    grads = models.loss_and_grads(model, X, Y).grads
    eps = 1e-6
    for k, t in model.params().items():
        flat = t.view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:8].tolist():
            old = flat[i].item()
            flat[i] = old + eps
            up = models.loss_and_grads(model, X, Y).loss.item()
            flat[i] = old - eps
            down = models.loss_and_grads(model, X, Y).loss.item()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert abs(grads[k].view(-1)[i].item() - numeric) <= 1e-7 + 1e-5 * abs(numeric), (k, i)


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_calibration_equals_the_full_batch_statistics_layer_by_layer(name):
    cfg = models.preset(name, n_hidden=8, **({} if name == "wavenet" else {"n_layers": 2}))
    model = models.build(cfg, 1, F64)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 27, (300, cfg.block_size), generator=g), torch.randint(0, 27, (300,), generator=g)
    # a training-mode forward over the whole set uses exactly the full-batch statistics of each layer
    full = models.loss_and_grads(model, X, Y).loss.item()
    calibrated = models.with_buffers(model, models.calibrate(model, X, chunk=70))
    assert models.evaluate(calibrated, X, Y, chunk=64) == pytest.approx(full, rel=1e-10)
    n_bn = sum(isinstance(layer, BatchNorm1d) for layer in model.layers)
    assert len(models.calibrate(model, X)) == 2 * n_bn
    assert all(t.abs().sum() == 0 for k, t in model.buffers().items() if k.endswith("mean"))  # untouched


def test_evaluate_an_empty_split_is_none():
    model = models.build(models.preset("mlp", n_hidden=4))
    assert models.evaluate(model, torch.zeros((0, 3), dtype=torch.long), torch.zeros(0, dtype=torch.long)) is None


def test_sampling_is_seeded_and_ends_with_the_end_token():
    model = models.build(models.preset("wavenet", n_hidden=8))
    a = models.sample(model, 8, n=5, seed=9)
    assert a == models.sample(model, 8, n=5, seed=9)
    assert all(0 not in s and all(0 < i < 27 for i in s) for s in a)


def test_deep_init_scales_hidden_weights_and_last_gain():
    model = models.build(models.preset("deep"), 0)
    linears = [layer for layer in model.layers if isinstance(layer, Linear)]
    assert all(layer.bias is None for layer in linears) and len(linears) == 6
    assert model.layers[-1].weight.unique().tolist() == [pytest.approx(0.1)]
    std = linears[1].weight.std().item() * 100**0.5  # N(0,1)/sqrt(100) * 5/3
    assert std == pytest.approx(5 / 3, rel=0.05)


@pytest.mark.parametrize("bad, words", [
    ({"name": "resnet"}, "name must be one of"),
    ({"block_size": 6, "name": "wavenet"}, "power of two"),
    ({"n_hidden": 0}, "n_hidden"),
    ({"bn_momentum": float("nan")}, "bn_momentum"),
    ({"w1_scale": float("inf")}, "w1_scale"),
])
def test_bad_model_configs_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        models.ModelConfig(**bad)
