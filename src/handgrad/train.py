"""The training loop for any model of layers: minibatch SGD with the lecture's step schedule, run
in chunks of steps by an engine it is given (the eager hand-written step below by default; the native
and data-parallel ones are picked by handgrad.engines.plan, which this module never imports). No
autograd, no printing: progress goes to a callback. Reference: Karpathy, "Building makemore Part 4"
(and Parts 3 and 5 for the deeper models).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from handgrad import makemore, models, optim
from handgrad.config import Between, ConfigError, Count, OneOf, Positive, Range, option, ref, validate
from handgrad.data import Splits
from handgrad.models import ModelConfig, Step

DTYPES = {"float32": torch.float32, "float64": torch.float64}
BN_STATS = ("calibrate", "running")
ENGINES = ("auto", "fast", "eager")
MAX_SEED = 2**63 - 1 - 16  # torch seeds are int64
MAX_STEPS = 10**8  # the loss curve keeps one float64 per step (800 MB at the limit)
SEED = Range(0, MAX_SEED)  # seed + 1 and seed + 10 are used too: they stay in int64


@dataclass(frozen=True)
class TrainConfig:
    GROUP = "optimisation"  # the help group of its flags
    steps: int = option(200_000, "total SGD steps (default {default})", Count(hi=MAX_STEPS), resume="kept")
    batch_size: int = option(32, "examples per step (default {default})",
                             Count(lo=2, hi=1 << 40, why="batchnorm's n-1"))  # drawn with replacement
    lr: float = option(0.1, "learning rate (default {default})", Positive(), resume="kept")  # before decay
    lr_decay_step: int = option(100_000, "step from which --lr-decayed is used (default {default})",
                                Range(0, 10**12), resume="kept")
    lr_decayed: float = option(0.01, "learning rate after the decay (default {default})", Positive(),
                               resume="kept")
    seed: int = option(42, "seed for init and batch sampling (default {default})", SEED)  # init and batches
    split_seed: int = option(42, "seed of the 80/10/10 word shuffle (default {default})", SEED)
    bn_stats: str = option("calibrate", "batchnorm statistics for inference: calibrate over the training set "
                           "after training (default) or the running averages", OneOf(BN_STATS))
    dtype: str = option("float32", "float32 (default) or float64", OneOf(DTYPES))
    engine: str = option("auto", "auto: the fused native step, falling back to eager with a warning "
                         "(default); fast; eager", OneOf(ENGINES), resume="given")  # read by engines.plan
    chunk_steps: int = option(1000, "steps per engine call (default {default})", Count(hi=10**12))
    # progress and checkpoints happen between chunks
    lecture_rng: bool = option(False, "draw the init and then the batches from one generator seeded --seed, "
                               "as the lectures' torch.manual_seed does (with --model wavenet --seed 42 this "
                               "reproduces makemore part 5's run)")  # False: init from seed, batches seed + 1
    makemore_rng: bool = option(False, "draw the init, the batches and the evaluations' shuffles as "
                                "makemore.py does from torch.manual_seed(--seed), counting steps from 0 as "
                                "its loop does (the zoo's default; with --split-seed equal to --seed a run "
                                "reproduces makemore.py's run of the model)")  # handgrad.makemore
    recompute_tile: int = option(0, "activation checkpointing (fast engine): keep only embcat and recompute "
                                 "the hidden activations in backward, ROWS rows at a time; saves memory at "
                                 "large --batch-size (default {default}: keep all; the mlp runs in tiles of "
                                 "{cache_tile} anyway from {counted_rows:,} examples in one process and "
                                 "{tile_rows:,} per rank: counted, nothing recomputed)",
                                 Range(0, 1 << 40, "0 (off) or a positive number of rows"), metavar="ROWS")
    optimizer: str = option("sgd", "sgd: the lectures' p -= lr * grad (default); adamw: hand-written AdamW "
                            "(the makemore zoo's default)", OneOf(optim.OPTIMIZERS))
    beta1: float = option(0.9, "AdamW's first-moment decay (default {default:g})",
                          Between(0, 1, open_hi=True))
    beta2: float = option(0.999, "AdamW's second-moment decay (default {default:g}; the zoo: 0.99)",
                          Between(0, 1, open_hi=True))
    eps: float = option(1e-8, "AdamW's epsilon, added to sqrt(v) after its bias correction (default "
                        "{default:g})", Positive(hi=1))
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay, on every parameter (default "
                                 "{default:g}; the zoo: 0.01)", Between(0, 1))
    eval_every: int = option(0, "steps between test-loss evaluations, the best kept in the results "
                             "(default {default}: off; the zoo: 500, as makemore)", Range(0, 10**12),
                             resume="kept")
    checkpoint_every: int = option(10_000, "steps between checkpoints (default {default})", Count(hi=10**12),
                                   resume="given")  # a multiple of chunk_steps is exact

    def __post_init__(self) -> None:
        validate(self)
        if self.lecture_rng and self.makemore_rng:
            raise ConfigError(f"{ref('lecture_rng')} and {ref('makemore_rng')} draw the batches differently: "
                              f"give one (a zoo model's default is {ref('makemore_rng')}: turn it off with "
                              "--no-makemore-rng)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def for_model(cls, name: str, **overrides) -> TrainConfig:
        """The model preset's training defaults (models.PRESETS[name].train) with `overrides` applied."""
        preset = models.PRESETS.get(name)
        return cls(**{**(preset.train if preset else {}), **overrides})

    def lr_at(self, step: int) -> float:
        """The lecture's schedule: lr, then lr_decayed from lr_decay_step on."""
        return self.lr if step < self.lr_decay_step else self.lr_decayed


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite. `step` is the step index (within the chunk
    when raised by an engine, absolute once train() re-raises it); `tensor` names the culprit."""

    def __init__(self, step: int, tensor: str):
        super().__init__(f"step {step}: {tensor} is not finite (NaN or inf)")
        self.step, self.tensor = step, tensor


# ---------------------------------------------------------------------------- the eager engine
# steps(model, Xtr, Ytr, idx (K, B), lrs (K,)) -> losses (K,) float64; updates model in place. An engine
# that can run an optimizer with state (the eager ones) also takes it as optimizer=; train() passes it
# only when the state has one (SGD runs pass nothing, so every engine runs them)
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
    reference in reference.py uses the same loop, so the two differ only in their gradients) and
    moves the parameters with SGD, or with the optimizer a state passes in."""

    def steps(model, Xtr: Tensor, Ytr: Tensor, idx: Tensor, lrs: Tensor, optimizer=None) -> Tensor:
        """Run K = len(idx) steps in place. idx (K, B) row indices into Xtr/Ytr; lrs (K,)
        per-step learning rates; `optimizer` (a state's, e.g. its AdamW) moves the parameters when
        given. Returns losses (K,) float64, each the loss before its step's update. Raises
        NonFiniteError(k, name) at the first non-finite loss or gradient."""
        move = optim.sgd_update if optimizer is None else optimizer.update
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
            move(model, step.grads, float(lrs[k]))
            if hasattr(model, "update_buffers"):
                model.update_buffers(step.caches)
        return losses

    return steps


eager_steps = sgd_steps(hand_grads)  # the eager engine: PyTorch ops, hand-written gradients


# ---------------------------------------------------------------------------- the loop
@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    model: object  # a Sequential (or any layer): parameters and running statistics, updated in place
    step: int  # steps done
    generator: torch.Generator  # batch sampling; its state is saved in checkpoints
    losses: Tensor  # (steps,) float64 per-step training loss (NaN beyond `step`)
    optimizer: object = None  # an optimizer with state (optim.AdamW), saved in checkpoints; None: SGD


def new_optimizer(model, tcfg: TrainConfig):
    """The optimizer tcfg asks for, with fresh state; None for SGD (the engines' own update)."""
    return optim.make(tcfg.optimizer, model.params(), (tcfg.beta1, tcfg.beta2), tcfg.eps, tcfg.weight_decay)


def new_state(mcfg: ModelConfig, tcfg: TrainConfig, n_items: int | None = None) -> TrainState:
    """A fresh model and batch generator. With lecture_rng the batches continue the init's stream; with
    makemore_rng both come from makemore.py's global stream, which first shuffled the data's n_items
    words (sum(splits.n_items))."""
    if tcfg.makemore_rng:
        if n_items is None:
            raise ValueError("makemore_rng draws the init after makemore's shuffle of the data: give "
                             "new_state the number of items (sum(splits.n_items))")
        model, gen, _ = _makemore_streams(mcfg, tcfg, n_items)
        return state_for(model, tcfg, gen)
    g = torch.Generator().manual_seed(tcfg.seed)
    model = models.build(mcfg, g, tcfg.torch_dtype)
    return state_for(model, tcfg, g if tcfg.lecture_rng else torch.Generator().manual_seed(tcfg.seed + 1))


def state_of_splits(mcfg: ModelConfig, tcfg: TrainConfig, splits: Splits) -> TrainState:
    """new_state for a run on these splits (makemore_rng reads how many items they hold)."""
    return new_state(mcfg, tcfg, sum(splits.n_items) if tcfg.makemore_rng else None)


def _makemore_streams(mcfg: ModelConfig, tcfg: TrainConfig, n_items: int):
    """makemore.py's global generator through the split, the init and its training DataLoader:
    (model, batch generator, the global generator after both)."""
    g = makemore.init_generator(tcfg.seed, n_items)
    model = models.build(mcfg, g, tcfg.torch_dtype)
    return model, makemore.batch_generator(g), g


def makemore_eval_stream(mcfg: ModelConfig, tcfg: TrainConfig, n_items: int, done: int
                         ) -> makemore.EvalStream:
    """makemore.py's global stream as its loop finds it after `done` steps (the init drawn again)."""
    _, _, g = _makemore_streams(mcfg, tcfg, n_items)
    return makemore.EvalStream(g, mcfg.vocab_size, mcfg.block_size, tcfg.eval_every, done)


def chunk_end(tcfg: TrainConfig, step: int) -> int:
    """Where the chunk that starts at `step` ends: the next multiple of chunk_steps or of eval_every (an
    evaluation comes between chunks), or the last step. With makemore_rng the multiples are counted
    from step 1, as makemore's loop counts its step index from 0: chunks end after 1, then 1 + a multiple
    of chunk_steps or of eval_every updates, where makemore's loop evaluates."""
    start = 1 if tcfg.makemore_rng else 0
    ends = [step + every - (step - start) % every for every in (tcfg.chunk_steps, tcfg.eval_every) if every]
    return min(*ends, tcfg.steps)


def state_for(model, tcfg: TrainConfig, generator: torch.Generator | None = None) -> TrainState:
    """A state that trains `model` (a user's own Sequential, say) from step 0."""
    gen = generator or torch.Generator().manual_seed(tcfg.seed + 1)
    return TrainState(model, 0, gen, torch.full((tcfg.steps,), float("nan"), dtype=torch.float64),
                      new_optimizer(model, tcfg))


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
    """Train from `state` (or a fresh model of mcfg) up to tcfg.steps with the engine `steps_fn` (default:
    the eager engine; handgrad.engines.plan(model, tcfg).steps is the one tcfg.engine asks for, and
    engines.fit trains with it), in chunks that end on multiples of tcfg.chunk_steps, so a run resumed
    from any chunk boundary draws the same batches. Runs under torch.no_grad(): nothing here builds an
    autograd graph."""
    if state is None:
        if mcfg is None:
            raise ValueError("train() needs a model config or a state (train.state_for(model, tcfg))")
        state = state_of_splits(mcfg, tcfg, splits)
    if steps_fn is None:
        if tcfg.engine == "fast":
            raise ValueError("train() runs the eager engine unless it is given one; for engine 'fast' use "
                             "handgrad.engines.fit (or steps_fn=engines.plan(model, tcfg).steps)")
        steps_fn = eager_steps
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
            k = chunk_end(tcfg, s) - s
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (k, tcfg.batch_size), generator=state.generator)  # (K, B)
            lrs = torch.tensor([tcfg.lr_at(i) for i in range(s, s + k)], dtype=torch.float64)  # (K,)
            stateful = {} if state.optimizer is None else {"optimizer": state.optimizer}
            try:
                losses = steps_fn(state.model, Xtr, Ytr, idx, lrs, **stateful)
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
