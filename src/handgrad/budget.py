"""What a run will allocate, worked out before anything is allocated, so that a field too big for this
machine is named in one line instead of failing deep inside an allocation (or swapping for minutes).

Sizes come from the model's layers built on PyTorch's "meta" device (shapes, no storage): the
parameters, and the per-example activations a training step caches, from a forward pass at batch 2
and 4 (their difference removes the weights some caches refer to).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from handgrad import models
from handgrad.config import ConfigError, ref
from handgrad.models import ModelConfig
from handgrad.train import TrainConfig

# A training step holds each cached activation, its gradient and temporaries; the parameters come
# with their gradients and the update's temporary. Measured: the peak RSS growth of one eager step at
# batch 65,536 is 2.8 (mlp), 4.6 (deep) and 2.1 (wavenet) times the cached activations in float32;
# 6 covers all three with room.
ACTIVATION_COPIES = 6
PARAM_COPIES = 3
HEADROOM = 0.8  # a run may plan to use this share of the machine's memory
MAX_SAMPLE_LEN = 64  # models.sample's max_len
# The evaluation after training takes the splits EVAL_ROWS rows at a time (models.evaluate's chunk):
# the logits (rows, V) and the cross-entropy's three temporaries of that shape (ops.py).
EVAL_ROWS = 32768
EVAL_COPIES = 4
SMALL_VOCAB = 27  # the names' vocabulary: what a run would need without a large one
FUSED_VOCAB = 128  # the fast engine's fused MLP step takes at most this many (engines/native.py)
# A data-parallel rank before its run's tensors: Python, torch and gloo (measured: 227 MiB RSS after
# importing the CLI and torch.distributed); a rank per core computes, more only share the cores.
RANK_BYTES = 300 * 2**20
RANKS_PER_CORE = 4


class BudgetError(ConfigError):
    """A run that cannot fit in memory; the message names the field to make smaller, in one line."""


def machine_bytes() -> int:
    """Physical memory, or the address-space limit (ulimit -v) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            total = min(total, soft)
    except (ImportError, ValueError, OSError):
        pass
    return total


def _numel(obj) -> int:
    """Elements of every tensor in a (nested) cache."""
    if isinstance(obj, Tensor):
        return obj.numel()
    if isinstance(obj, (tuple, list)):
        return sum(_numel(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_numel(o) for o in obj.values())
    return 0


def model_sizes(mcfg: ModelConfig) -> tuple[int, int]:
    """(parameters, cached activation elements per example) of a preset model, without allocating."""
    with torch.device("meta"):
        model = models.layers_for(mcfg)
        n_params = sum(p.numel() for p in model.params().values())
        per = []
        for b in (2, 4):
            out, cache = model.forward(torch.zeros((b, mcfg.block_size), dtype=torch.long), training=True)
            per.append(_numel(cache) + out.numel())
    return n_params, (per[1] - per[0]) // 2


def size_bounds(mcfg: ModelConfig) -> tuple[int, int]:
    """Upper bounds of model_sizes(mcfg) for the presets, from the config alone (no torch work: the
    first meta-device ops import ~1.7 s of PyTorch). With W = max(n_embd, n_hidden): the first
    Linear has at most T*W*H weights, each later one at most 2*W*H (wavenet's pairs), the output
    H*V, plus the embedding V*E and per-layer vectors; each of the L + 2 stages caches at most a few
    T*max(W, V) values per example. tests/test_budget.py holds them against model_sizes."""
    V, T, E, H, L = mcfg.vocab_size, mcfg.block_size, mcfg.n_embd, mcfg.n_hidden, mcfg.n_layers
    W = max(E, H)
    n_params = V * E + T * W * H + L * 2 * W * H + H * V + 4 * H * (L + 1) + 4 * V
    per_example = 8 * (L + 2) * T * max(W, V)
    return n_params, per_example


@dataclass(frozen=True)
class Plan:
    """Bytes a training run will hold at its peak, by the config field that sets each part."""

    parts: dict[str, int]  # field -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self) -> str:
        return max(self.parts, key=self.parts.__getitem__)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def dataset_bytes(n_examples: int, block_size: int) -> int:
    """X (N, T) and Y (N,) as int64, and twice that for data.build_dataset's temporaries (the code
    points, the padded sequence; measured: 69 bytes per example at block_size 3, 2.2x X and Y)."""
    return n_examples * (block_size + 1) * 8 * 3


def train_plan(mcfg: ModelConfig, tcfg: TrainConfig, n_examples: int,
               sizes: tuple[int, int] | None = None) -> Plan:
    """Peak bytes of a training run of these configs on n_examples (context, target) pairs, from
    `sizes` (parameters, cached activations per example; default: model_sizes(mcfg))."""
    dtype_bytes = torch.finfo(tcfg.torch_dtype).bits // 8
    n_params, per_example = sizes if sizes is not None else model_sizes(mcfg)
    return Plan({
        "n_hidden": PARAM_COPIES * n_params * dtype_bytes,
        "batch_size": ACTIVATION_COPIES * per_example * tcfg.batch_size * dtype_bytes,
        "chunk_steps": 8 * min(tcfg.chunk_steps, tcfg.steps) * tcfg.batch_size,  # a chunk's (K, B) indices
        "steps": 8 * tcfg.steps,  # the per-step loss curve, float64
        "block_size": dataset_bytes(n_examples, mcfg.block_size),
        "vocab_size": EVAL_COPIES * EVAL_ROWS * mcfg.vocab_size * dtype_bytes,  # the evaluation's logits
    })


def check_train(mcfg: ModelConfig, tcfg: TrainConfig, n_examples: int, available: int | None = None,
                data: str = "the data") -> Plan:
    """Raise BudgetError naming what takes the most memory if the run cannot fit: the vocabulary of
    `data` (the file's name for the message), the data itself, or the config field. The exact sizes
    are worked out only when the quick upper bounds do not already fit."""
    limit = HEADROOM * (available if available is not None else machine_bytes())
    plan = train_plan(mcfg, tcfg, n_examples, size_bounds(mcfg))
    if plan.total <= limit:
        return plan
    plan = train_plan(mcfg, tcfg, n_examples)
    if plan.total <= limit:
        return plan
    field = plan.largest()
    small = replace(mcfg, vocab_size=min(mcfg.vocab_size, SMALL_VOCAB))
    for_vocab = plan.total - train_plan(small, tcfg, n_examples).total
    if field == "vocab_size" or for_vocab >= plan.parts[field]:
        raise BudgetError(_vocab_message(mcfg, tcfg, n_examples, plan, for_vocab, limit, data))
    if field == "block_size":
        default = min(mcfg.block_size, models.preset(mcfg.name).block_size)
        if plan.total - plan.parts[field] + dataset_bytes(n_examples, default) > limit:  # the data's size
            raise BudgetError(f"{ref('data')} {data}: its {n_examples:,} training examples (one per "
                              f"character and item end) take about {gib(plan.parts[field])} in memory at "
                              f"{ref('block_size')} {mcfg.block_size}, and the run would need about "
                              f"{gib(plan.total)}, more than the {gib(limit)} this machine can give it; use "
                              "a sample of the data")
    flag = ref(field)
    raise BudgetError(f"{flag}: this run would need about {gib(plan.total)} ({gib(plan.parts[field])} "
                      f"of it for {flag}), more than the {gib(limit)} this machine can give it; "
                      f"make {flag} smaller")


def _vocab_message(mcfg: ModelConfig, tcfg: TrainConfig, n_examples: int, plan: Plan, for_vocab: int,
                   limit: float, data: str) -> str:
    V = mcfg.vocab_size
    lo, hi = 2, V  # the largest vocabulary that fits with these sizes: lo fits (or nothing does), hi not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = train_plan(replace(mcfg, vocab_size=mid), tcfg, n_examples).total <= limit
        lo, hi = (mid, hi) if fits else (lo, mid)
    return (f"{ref('data')} {data}: its items use {V - 1:,} distinct characters, a vocabulary of {V:,} with "
            f"the '.' token; the run would need about {gib(plan.total)} ({gib(for_vocab)} of it for the "
            f"vocabulary: embedding, output layer, logits), more than the {gib(limit)} this machine can give "
            f"it; at most about {lo - 1:,} distinct characters fit at these sizes (the fast engine's fused "
            f"step takes up to {FUSED_VOCAB - 1}; the native program and the eager engine any vocabulary "
            "that fits)")


def check_ranks(nproc: int, cores: int, mcfg: ModelConfig | None, tcfg: TrainConfig, n_examples: int,
                available: int | None = None) -> None:
    """Raise BudgetError naming nproc when this machine cannot run `nproc` local ranks of this run:
    more than RANKS_PER_CORE per core, or more than its memory holds (each rank holds the model, the
    data and its share of the batch)."""
    limit = HEADROOM * (available if available is not None else machine_bytes())
    by_cores = RANKS_PER_CORE * cores
    per_rank = RANK_BYTES
    if mcfg is not None:
        plan = train_plan(mcfg, tcfg, n_examples, size_bounds(mcfg))
        if nproc * (RANK_BYTES + plan.total) > limit:  # the bounds do not settle it: the exact sizes
            plan = train_plan(mcfg, tcfg, n_examples)
        per_rank += plan.total - plan.parts["batch_size"] * (nproc - 1) // nproc
    by_memory = int(limit // per_rank)
    most = max(min(by_cores, by_memory), 1)
    if nproc <= most:
        return
    why = (f"{RANKS_PER_CORE} per core on its {cores} core(s)" if by_cores <= by_memory else
           f"about {gib(per_rank)} each of the {gib(limit)} it can give them")
    raise BudgetError(f"{ref('nproc')} {nproc}: this machine can run at most {most} rank(s) of this run "
                      f"({why}); use {ref('nproc')} {most} or fewer")


def check_samples(n: int, block_size: int, vocab_size: int, per_example: int, dtype_bytes: int,
                  available: int | None = None) -> None:
    """Raise BudgetError if drawing n samples in parallel cannot fit."""
    need = n * (8 * (block_size + 2 * MAX_SAMPLE_LEN) + 8 * 3 * vocab_size + per_example * dtype_bytes)
    limit = HEADROOM * (available if available is not None else machine_bytes())
    if need > limit:
        most = int(limit // max(need // max(n, 1), 1))
        raise BudgetError(f"{ref('n')} {n}: drawing that many samples at once needs about {gib(need)}, more "
                          "than "
                          f"the {gib(limit)} this machine can give; at most about {most:,}")
