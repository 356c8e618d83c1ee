"""The training loop for any model of layers: minibatch SGD with the lecture's step schedule, run
in chunks of steps by an engine (the eager hand-written step below, or the fused native step in
fast.py). No autograd, no printing: progress goes to a callback. Reference: Karpathy, "Building
makemore Part 4" (and Parts 3 and 5 for the deeper models).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from handgrad import models
from handgrad.data import Splits
from handgrad.models import ModelConfig, Step

DTYPES = {"float32": torch.float32, "float64": torch.float64}
BN_STATS = ("calibrate", "running")
ENGINES = ("auto", "fast", "eager")
MAX_SEED = 2**63 - 1 - 16  # torch seeds are int64
MAX_STEPS = 10**8  # the loss curve keeps one float64 per step (800 MB at the limit)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200_000  # total SGD steps
    batch_size: int = 32  # examples per step, drawn uniformly with replacement
    lr: float = 0.1  # learning rate before lr_decay_step
    lr_decay_step: int = 100_000  # the step from which lr_decayed is used
    lr_decayed: float = 0.01  # learning rate from lr_decay_step on
    seed: int = 42  # parameter init and batch sampling
    split_seed: int = 42  # shuffle of the words before the 80/10/10 split
    bn_stats: str = "calibrate"  # inference statistics: "calibrate" (whole train set) or "running"
    engine: str = "auto"  # "auto" (fast, else eager with a warning), "fast" or "eager"
    dtype: str = "float32"  # "float32" or "float64"
    chunk_steps: int = 1000  # steps per engine call; progress and checkpoints happen between chunks
    checkpoint_every: int = 10_000  # steps between checkpoints (a multiple of chunk_steps is exact)
    recompute_tile: int = 0  # activation checkpointing (fast engine): if > 0, keep only embcat and
    # per-feature statistics, and recompute the rest in backward in tiles of this many rows
    lecture_rng: bool = False  # one generator for init and batches (the lecture's torch.manual_seed(seed)
    # before the init, then one randint per step); False: init from seed, batches from seed + 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "chunk_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.recompute_tile < 0:
            raise ValueError(f"recompute_tile must be 0 (off) or a positive number of rows, "
                             f"got {self.recompute_tile}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (batchnorm's n-1), got {self.batch_size}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("lr", "lr_decayed"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        for name in ("seed", "split_seed"):  # seed + 1 and seed + 10 are used too: keep them in int64
            if not 0 <= getattr(self, name) <= MAX_SEED:
                raise ValueError(f"{name} must be an integer from 0 to {MAX_SEED}, got {getattr(self, name)}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS:,}, got {self.steps:,}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def for_model(cls, name: str, **overrides) -> TrainConfig:
        """The model's training defaults (TRAIN_PRESETS) with `overrides` applied."""
        return cls(**{**TRAIN_PRESETS.get(name, {}), **overrides})

    def lr_at(self, step: int) -> float:
        """The lecture's schedule: lr, then lr_decayed from lr_decay_step on."""
        return self.lr if step < self.lr_decay_step else self.lr_decayed


# makemore parts 3 and 5 decay at 150k and evaluate with the running statistics (momentum 0.1).
TRAIN_PRESETS: dict[str, dict] = {
    "mlp": {},
    "deep": {"lr_decay_step": 150_000, "bn_stats": "running"},
    "wavenet": {"lr_decay_step": 150_000, "bn_stats": "running"},
}


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite. `step` is the step index (within the chunk
    when raised by an engine, absolute once train() re-raises it); `tensor` names the culprit."""

    def __init__(self, step: int, tensor: str):
        super().__init__(f"step {step}: {tensor} is not finite (NaN or inf)")
        self.step, self.tensor = step, tensor


class EngineUnavailable(RuntimeError):
    """engine="fast" was asked for but cannot run here; the message says why (one line)."""


# ---------------------------------------------------------------------------- the eager engine
# steps(model, Xtr, Ytr, idx (K, B), lrs (K,)) -> losses (K,) float64; updates model in place
StepsFn = Callable[[object, Tensor, Tensor, Tensor, Tensor], Tensor]
GradFn = Callable[[object, Tensor, Tensor], Step]


def hand_grads(model, X: Tensor, Y: Tensor) -> Step:
    """Loss, gradients and caches of one batch, with the layers' hand-written backward passes."""
    return models.loss_and_grads(model, X, Y)


def first_non_finite(grads: dict[str, Tensor]) -> str | None:
    """The name of the first gradient holding a NaN or inf, else None (x*0 is NaN iff x is not finite)."""
    names = list(grads)
    finite = torch.stack([(g * 0).sum() for g in grads.values()]).isfinite()  # (P,)
    return None if bool(finite.all()) else names[int((~finite).nonzero()[0])]


def sgd_steps(grad_fn: GradFn) -> StepsFn:
    """A step engine that takes its gradients from grad_fn (hand_grads here; the autograd
    reference in reference.py uses the same loop, so the two differ only in their gradients)."""

    def steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor) -> Tensor:
        """Run K = len(idx) SGD steps in place. idx (K, B) row indices into Xtr/Ytr; lrs (K,)
        per-step learning rates. Returns losses (K,) float64, each the loss before its step's
        update. Raises NonFiniteError(k, name) at the first non-finite loss or gradient."""
        losses = torch.empty(idx.shape[0], dtype=torch.float64)  # (K,)
        for k in range(idx.shape[0]):
            ix = idx[k]  # (B,)
            step = grad_fn(model, Xtr[ix], Ytr[ix])
            losses[k] = step.loss
            if not torch.isfinite(losses[k]):
                raise NonFiniteError(k, "loss")
            bad = first_non_finite(step.grads)
            if bad is not None:
                raise NonFiniteError(k, "d" + bad)
            models.sgd_update(model, step.grads, float(lrs[k]))
            if hasattr(model, "update_buffers"):
                model.update_buffers(step.caches)
        return losses

    return steps


eager_steps = sgd_steps(hand_grads)  # the eager engine: PyTorch ops, hand-written gradients


def select_engine(model, tcfg: TrainConfig) -> tuple[StepsFn, str, str]:
    """Pick the step engine: returns (steps_fn, name, warning). The warning is "" unless engine
    "auto" had to fall back to the eager path; engine "fast" raises EngineUnavailable instead."""
    if tcfg.engine == "eager":
        return eager_steps, "eager", ("activation checkpointing (recompute_tile) needs the fast engine; "
                                      "ignored" if tcfg.recompute_tile else "")
    try:
        from handgrad import fast  # the native step; may be unavailable (no compiler, ...)
    except ImportError as e:
        fn, reason = None, f"cannot import handgrad.fast: {e}"
    else:
        # the native program uses a second thread for large products when torch may use two (--threads)
        fn, reason = fast.plan(model, tile=tcfg.recompute_tile, threads=min(2, torch.get_num_threads()),
                               batch=tcfg.batch_size)
    if fn is not None:
        return fn, "fast", ""
    if tcfg.engine == "fast":
        raise EngineUnavailable(f"--engine fast: the fast engine is unavailable ({reason}); "
                                "use --engine auto or eager")
    return eager_steps, "eager", f"fast path unavailable ({reason}); using the eager path"


# ---------------------------------------------------------------------------- the loop
@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    model: object  # a Sequential (or any layer): parameters and running statistics, updated in place
    step: int  # steps done
    generator: torch.Generator  # batch sampling; its state is saved in checkpoints
    losses: Tensor  # (steps,) float64 per-step training loss (NaN beyond `step`)


def new_state(mcfg: ModelConfig, tcfg: TrainConfig) -> TrainState:
    """A fresh model and batch generator. With lecture_rng the batches continue the init's stream."""
    g = torch.Generator().manual_seed(tcfg.seed)
    model = models.build(mcfg, g, tcfg.torch_dtype)
    gen = g if tcfg.lecture_rng else torch.Generator().manual_seed(tcfg.seed + 1)
    return state_for(model, tcfg, gen)


def state_for(model, tcfg: TrainConfig, generator: torch.Generator | None = None) -> TrainState:
    """A state that trains `model` (a user's own Sequential, say) from step 0."""
    gen = generator or torch.Generator().manual_seed(tcfg.seed + 1)
    return TrainState(model, 0, gen, torch.full((tcfg.steps,), float("nan"), dtype=torch.float64))


@dataclass(frozen=True)
class Progress:
    """Passed to the callback after every chunk of steps."""

    state: TrainState  # live state (read it, do not modify it)
    total: int  # tcfg.steps
    chunk_loss: float  # mean training loss over the chunk just run
    lr: float  # learning rate of the last step
    elapsed: float  # seconds spent in the training loop so far (this process)


def train(splits: Splits, mcfg: ModelConfig | None, tcfg: TrainConfig, state: TrainState | None = None,
          callback: Callable[[Progress], None] | None = None, steps_fn: StepsFn | None = None
          ) -> TrainState:
    """Train from `state` (or a fresh model of mcfg) up to tcfg.steps, in chunks that end on
    multiples of tcfg.chunk_steps, so a run resumed from any chunk boundary draws the same batches.
    Runs under torch.no_grad(): nothing here builds an autograd graph."""
    if state is None:
        if mcfg is None:
            raise ValueError("train() needs a model config or a state (train.state_for(model, tcfg))")
        state = new_state(mcfg, tcfg)
    steps_fn = steps_fn or select_engine(state.model, tcfg)[0]
    if state.losses.shape[0] < tcfg.steps:  # a resumed run may be extended
        grown = torch.full((tcfg.steps,), float("nan"), dtype=torch.float64)
        grown[: state.losses.shape[0]] = state.losses
        state.losses = grown
    Xtr, Ytr = splits.Xtr, splits.Ytr
    n = Xtr.shape[0]
    elapsed = 0.0
    with torch.no_grad():
        while state.step < tcfg.steps:
            s = state.step
            k = min(tcfg.chunk_steps - s % tcfg.chunk_steps, tcfg.steps - s)
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (k, tcfg.batch_size), generator=state.generator)  # (K, B)
            lrs = torch.tensor([tcfg.lr_at(i) for i in range(s, s + k)], dtype=torch.float64)  # (K,)
            try:
                losses = steps_fn(state.model, Xtr, Ytr, idx, lrs)
            except NonFiniteError as e:
                raise NonFiniteError(s + e.step, e.tensor) from None
            state.losses[s:s + k] = losses
            state.step = s + k
            elapsed += time.perf_counter() - t0
            if callback is not None:
                callback(Progress(state, tcfg.steps, float(losses.mean()), float(lrs[-1]), elapsed))
    return state


def inference_buffers(state: TrainState, splits: Splits, tcfg: TrainConfig) -> dict[str, Tensor]:
    """The batchnorm statistics used after training: calibrated over the whole training set
    (exact for the final weights, no momentum lag) or the running estimates."""
    with torch.no_grad():
        if tcfg.bn_stats == "calibrate" and hasattr(state.model, "layers"):
            return models.calibrate(state.model, splits.Xtr)
    return {k: v.clone() for k, v in state.model.buffers().items()}
