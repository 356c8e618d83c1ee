"""budget: what a run will allocate, worked out on the meta device before anything is allocated."""

import pytest
import torch

from handgrad import budget, models
from handgrad.budget import BudgetError
from handgrad.models import ModelConfig
from handgrad.train import TrainConfig


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_model_sizes_count_the_real_parameters_and_cached_activations(name):
    cfg = models.preset(name, vocab_size=27)
    n_params, per_example = budget.model_sizes(cfg)
    model = models.layers_for(cfg)
    assert n_params == sum(p.numel() for p in model.params().values())
    for b in (3, 5):  # the per-example size predicts a real forward pass's cache at another batch
        X = torch.randint(0, 27, (b, cfg.block_size))
        out, cache = model.forward(X, training=True)
        out2, cache2 = model.forward(torch.randint(0, 27, (b + 1, cfg.block_size)), training=True)
        real = budget._numel(cache2) + out2.numel() - budget._numel(cache) - out.numel()
        assert real == per_example


def test_a_plan_grows_with_each_field_and_names_the_largest():
    cfg, tcfg = models.preset("mlp", vocab_size=27), TrainConfig()
    base = budget.train_plan(cfg, tcfg, 200_000)
    big_batch = budget.train_plan(cfg, TrainConfig(batch_size=1 << 22), 200_000)
    assert big_batch.largest() == "batch_size" and big_batch.total > base.total
    wide = ModelConfig(name="mlp", vocab_size=27, n_hidden=1 << 20)
    assert budget.train_plan(wide, tcfg, 200_000).parts["n_hidden"] > 1000 * base.parts["n_hidden"]


def _flag(field):
    return "-n" if field == "n" else "--" + field.replace("_", "-")


def test_check_train_refuses_naming_the_field_and_passes_the_defaults():
    cfg, tcfg = models.preset("wavenet", vocab_size=27), TrainConfig(batch_size=32)
    assert budget.check_train(cfg, tcfg, 228_146).total < 2**30
    with pytest.raises(BudgetError, match=r"^batch_size: this run would need about .* make batch_size") as e:
        budget.check_train(cfg, TrainConfig(batch_size=1 << 20), 228_146, available=8 << 30)
    assert e.value.render(_flag).startswith("--batch-size: ") and "make --batch-size smaller" in e.value.render(_flag)
    with pytest.raises(BudgetError, match="^block_size:"):
        budget.check_train(ModelConfig(name="mlp", vocab_size=27, block_size=1 << 16), tcfg, 228_146,
                           available=8 << 30)


def test_check_samples_says_how_many_would_fit():
    budget.check_samples(100, 3, 27, 300, 4, available=1 << 30)
    with pytest.raises(BudgetError, match=r"^n 100000000: .* at most about [0-9,]+$") as e:
        budget.check_samples(10**8, 3, 27, 300, 4, available=1 << 30)
    assert e.value.render(_flag).startswith("-n 100000000: ")


@pytest.mark.parametrize("name, overrides", [
    ("mlp", {}), ("mlp", {"n_hidden": 3, "n_embd": 50, "block_size": 7}), ("deep", {}),
    ("deep", {"n_layers": 9, "n_hidden": 7}), ("wavenet", {}), ("wavenet", {"block_size": 16, "n_embd": 200}),
    ("wavenet", {"block_size": 2, "n_hidden": 3}), ("mlp", {"vocab_size": 300}),
])
def test_the_quick_bounds_are_upper_bounds_of_the_exact_sizes(name, overrides):
    cfg = models.preset(name, **{"vocab_size": 27, **overrides})
    exact, bound = budget.model_sizes(cfg), budget.size_bounds(cfg)
    assert bound[0] >= exact[0] and bound[1] >= exact[1]


def test_a_run_the_bounds_refuse_is_decided_by_the_exact_sizes():
    cfg, tcfg = models.preset("mlp", vocab_size=27), TrainConfig(batch_size=1 << 16)
    exact = budget.train_plan(cfg, tcfg, 1000).total
    bound = budget.train_plan(cfg, tcfg, 1000, budget.size_bounds(cfg)).total
    assert bound > exact
    budget.check_train(cfg, tcfg, 1000, available=int((exact + bound) / 2 / budget.HEADROOM))
