"""A model defined in the user's own Python (a Sequential of built-in and own layers) trains,
checkpoints and reloads through the same API as the built-in models."""

import pytest
import torch

from handgrad import checkpoint, layers, models, train
from handgrad.checkpoint import Checkpoint, CheckpointError
from handgrad.train import TrainConfig
from user_layers import Scale


def _model():
    model = layers.Sequential([layers.Embedding(27, 6), layers.FlattenConsecutive(3), layers.Linear(18, 20),
                               layers.BatchNorm1d(20), layers.Tanh(), Scale(20), layers.Linear(20, 27)])
    model.init_(torch.Generator().manual_seed(3))
    return model


def test_a_users_layer_trains_checkpoints_and_reloads(names_splits, tmp_path):
    tcfg = TrainConfig(steps=300, chunk_steps=100, engine="auto")
    state = train.train(names_splits, None, tcfg, train.state_for(_model(), tcfg))
    assert state.losses[-50:].mean() < state.losses[:5].mean()
    inference = train.inference_buffers(state, names_splits, tcfg)
    ck = Checkpoint(None, tcfg, names_splits.vocab, None, state, inference, {"val": 0.0}, 3)
    checkpoint.save(tmp_path, ck)
    with pytest.raises(CheckpointError, match="unknown layer type 'Scale'"):
        checkpoint.load(tmp_path)  # nothing in the file names code to import
    again = checkpoint.load(tmp_path, layer_types={"Scale": Scale})
    for k, v in state.model.params().items():
        assert torch.equal(again.state.model.params()[k], v), k
    val = models.evaluate(again.inference_model(), names_splits.Xdev, names_splits.Ydev)
    assert val == models.evaluate(ck.inference_model(), names_splits.Xdev, names_splits.Ydev)
