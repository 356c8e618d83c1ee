"""handgrad: train neural nets with hand-written gradients, and prove every gradient.
Starts from Karpathy's "Building makemore Part 4: Becoming a Backprop Ninja"."""

from handgrad import ops
from handgrad.check import check_backward, compare, run_lecture_check
from handgrad.data import DataError, Splits, Vocab, default_data_path, make_splits, read_words
from handgrad.model import (
    Activations,
    BNStats,
    ModelConfig,
    Params,
    backward,
    calibrate_bn,
    evaluate,
    forward,
    init_params,
    sample,
)

__version__ = "0.1.0"

__all__ = [
    "Activations", "BNStats", "DataError", "ModelConfig", "Params", "Splits", "Vocab",
    "backward", "calibrate_bn", "check_backward", "compare", "default_data_path", "evaluate", "forward",
    "init_params",
    "make_splits", "ops", "read_words", "run_lecture_check", "sample",
]
