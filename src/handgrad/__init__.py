"""handgrad: train neural nets with hand-written gradients, and prove every gradient.
Starts from Karpathy's "Building makemore Part 4: Becoming a Backprop Ninja"."""

__version__ = "0.2.0"

from handgrad import ops  # noqa: E402
from handgrad.check import check_backward, check_function, check_op, compare, run_lecture_check  # noqa: E402
from handgrad.data import DataError, Splits, Vocab, default_data_path, make_splits, read_words  # noqa: E402
from handgrad.layers import (  # noqa: E402
    BatchNorm1d,
    Embedding,
    FlattenConsecutive,
    Layer,
    Linear,
    ReLU,
    Sequential,
    Tanh,
)
from handgrad.models import ModelConfig, build, evaluate, loss_and_grads, preset, sample  # noqa: E402

__all__ = [
    "BatchNorm1d", "DataError", "Embedding", "FlattenConsecutive", "Layer", "Linear", "ModelConfig",
    "ReLU", "Sequential", "Splits", "Tanh", "Vocab", "build", "check_backward", "check_function", "check_op",
    "compare",
    "default_data_path", "evaluate", "loss_and_grads", "make_splits", "ops", "preset", "read_words",
    "run_lecture_check", "sample",
]
