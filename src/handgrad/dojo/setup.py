"""The lecture's exercise setup (Karpathy, "Becoming a Backprop Ninja"): the names dataset split as in
the notebook, the 7 parameters drawn from torch.Generator().manual_seed(2147483647), and one batch.
The exercise files call these so that a learner's own run sees the values the grader's first probe uses.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from handgrad.atomic import LectureConfig, Params, init_params
from handgrad.data import default_data_path, make_splits, read_words

SEED = 2147483647  # the notebook's generator seed
N_EMBD, N_HIDDEN, BLOCK_SIZE, VOCAB_SIZE, BATCH_SIZE = 10, 64, 3, 27, 32
LECTURE_CONFIG = LectureConfig(vocab_size=VOCAB_SIZE, block_size=BLOCK_SIZE, n_embd=N_EMBD, n_hidden=N_HIDDEN)


@lru_cache(maxsize=1)
def _splits():
    words = read_words(default_data_path())
    return make_splits(words.items, BLOCK_SIZE, 42)


def lecture_dataset(split: str = "train") -> tuple[Tensor, Tensor]:
    """(X, Y) of the lecture's split: train 182,625 / val 22,655 / test 22,866 examples."""
    return _splits().split(split)


def lecture_params(seed: int = SEED, dtype: torch.dtype = torch.float32) -> Params:
    """The notebook's C, W1, b1, W2, b2, bngain, bnbias (n_embd 10, n_hidden 64), all from one generator."""
    return init_params(LECTURE_CONFIG, seed, dtype)


def lecture_batch(
    seed: int = SEED, batch_size: int = BATCH_SIZE, split: str = "train"
) -> tuple[Tensor, Tensor]:
    """A batch (Xb, Yb) drawn with its own seeded generator."""
    X, Y = lecture_dataset(split)
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)  # (N,)
    return X[ix], Y[ix]


def lecture_setup() -> tuple[Tensor, ...]:
    """C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb as the exercise files start (float32)."""
    return (*lecture_params().tensors(), *lecture_batch())


def lecture_gradients(
    C: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    bngain: Tensor,
    bnbias: Tensor,
    Xb: Tensor,
    Yb: Tensor,
) -> dict[str, Tensor]:
    """Autograd's gradients of the lecture's loss for the 26 tensors (the upstream that exercise 3's
    file starts from when you run it yourself; the grader feeds its own)."""
    from handgrad.dojo import graph

    vals = graph.forward(
        graph.LECTURE, dict(C=C, W1=W1, b1=b1, W2=W2, b2=b2, bngain=bngain, bnbias=bnbias, Xb=Xb, Yb=Yb)
    )
    return graph.true_grads(graph.LECTURE, vals)
