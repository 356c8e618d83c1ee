"""makemore.py's random numbers, drawn the way makemore.py draws them (TrainConfig.makemore_rng, the
zoo's default), so that a zoo run reproduces a makemore.py run of the same model and seed: the same
init, the same batches, and the same evaluation shuffles, its "best test loss" included.

Reference: karpathy/makemore, makemore.py (MIT), and torch.utils.data's DataLoader and RandomSampler.
makemore.py seeds one global generator, torch.manual_seed(seed), and from it, in this order:

1. create_datasets: torch.randperm(len(words)) orders the words (the split; data.make_sequences draws
   the same permutation from its own generator seeded split_seed);
2. the model's constructor: every nn.Embedding N(0, 1), every nn.Linear's weight (out, in) then its
   bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in construction order (the layers' init_ with init "torch");
3. InfiniteDataLoader: iter(DataLoader) draws one int64 (its workers' base seed), and the first batch
   makes its RandomSampler(replacement=True) draw one more, which seeds the sampler's own generator;
   every batch is then torch.randint(n_train, (32,)) from that generator, one long stream;
4. the loop, at step index i (0-based: after the (i + 1)-th update): if i > 0 and i % 500 == 0,
   evaluate(train) then evaluate(test), each an iter(DataLoader(shuffle=True)) that draws two int64
   (a base seed, then its sampler's seed: the sampler's torch.randperm(n) from a generator of that seed
   orders the split), its loss the mean of the first 10 batches' mean losses, 100 items a batch; then,
   if i > 0 and i % 200 == 0, print_samples grows 10 names for block_size - 1 steps, each step one
   torch.multinomial(probs, 1) that advances the global generator as exponential_ on the (10, V)
   float32 probabilities does (the Gumbel trick torch uses for one sample).

handgrad draws 1-3 exactly so (train.new_state), and the evaluations of 4 with EvalStream, which also
advances the generator for the samples makemore prints (handgrad prints none while training).
"""
from __future__ import annotations

import torch
from torch import Tensor

SAMPLE_EVERY = 200  # makemore.py prints samples every 200 steps
SAMPLE_NAMES = 10  # ... 10 of them
EVAL_BATCHES, EVAL_BATCH = 10, 100  # evaluate(model, dataset, batch_size=100, max_batches=10)


def _int64(g: torch.Generator) -> int:
    """One torch.empty((), dtype=torch.int64).random_() draw, as the DataLoader and its samplers take."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


def init_generator(seed: int, n_items: int) -> torch.Generator:
    """The global generator as makemore.py's model constructor finds it: seeded, then past the split's
    torch.randperm(n_items)."""
    g = torch.Generator().manual_seed(seed)
    torch.randperm(n_items, generator=g)
    return g


def batch_generator(g: torch.Generator) -> torch.Generator:
    """The training batches' generator: the DataLoader's base seed and then its sampler's seed are drawn
    from g (after the init); the sampler's generator is seeded with the second."""
    _int64(g)  # the workers' base seed
    return torch.Generator().manual_seed(_int64(g))


def shuffle(g: torch.Generator, n: int) -> Tensor:
    """The order in which iter(DataLoader(split, shuffle=True)) visits a split of n items: (n,) int64."""
    _int64(g)  # the base seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(_int64(g)))


def skip_shuffle(g: torch.Generator) -> None:
    """The draws shuffle() takes from g, without the order (a replayed evaluation)."""
    _int64(g)
    _int64(g)


def is_eval(i: int, every: int) -> bool:
    """Does makemore's loop evaluate at step index i (after i + 1 updates)?"""
    return every > 0 and i > 0 and i % every == 0


class EvalStream:
    """The global generator from the first training step on (g: after batch_generator), advanced as
    makemore.py's loop advances it: evaluate() at each evaluation, the printed samples in between.
    `done` steps already trained (a resumed run) are replayed without evaluating anything."""

    def __init__(self, g: torch.Generator, vocab_size: int, block_size: int, every: int, done: int = 0):
        self.g, self.V, self.T, self.every = g, vocab_size, block_size, every
        self.next = 0  # the first step index whose draws have not been taken yet
        self._replay(done)

    def _samples(self, i: int) -> None:
        if i > 0 and i % SAMPLE_EVERY == 0:
            for _ in range(self.T - 1):
                torch.empty((SAMPLE_NAMES, self.V), dtype=torch.float32).exponential_(generator=self.g)

    def _replay(self, stop: int) -> None:
        """Take the draws of step indices next .. stop-1, evaluations without their losses."""
        for i in range(self.next, stop):
            if is_eval(i, self.every):
                skip_shuffle(self.g)  # train
                skip_shuffle(self.g)  # test
            self._samples(i)
        self.next = max(self.next, stop)

    def evaluate(self, loss, n_train: int, n_test: int, step: int) -> tuple[float | None, float | None]:
        """makemore's evaluate(train) and evaluate(test) at `step` updates done (step index step - 1,
        an evaluation index): (train loss, test loss), each the mean of `loss(rows)` over the first
        EVAL_BATCHES batches of EVAL_BATCH rows of its shuffle (None for an empty split).
        loss(split, rows) -> the mean loss of those rows of the split."""
        i = step - 1
        if not is_eval(i, self.every) or i < self.next:
            raise ValueError(f"step {step} is not the next evaluation of every {self.every} steps")
        self._replay(i)
        out = []
        for split, n in (("train", n_train), ("test", n_test)):
            order = shuffle(self.g, n)
            batches = [order[b:b + EVAL_BATCH] for b in range(0, n, EVAL_BATCH)][:EVAL_BATCHES]
            out.append(sum(loss(split, rows) for rows in batches) / len(batches) if batches else None)
        self._samples(i)
        self.next = i + 1
        return out[0], out[1]
