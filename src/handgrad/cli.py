"""The `handgrad` command: parse flags, call the library, print, return an exit code.
Thin by design (httpx `_main.py` style): tests call `main([...])`.

Exit codes: 0 success, 1 a check or training failure, 2 bad input (a one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from handgrad import budget, checkpoint, data, distributed, models, train
from handgrad.budget import BudgetError
from handgrad.checkpoint import Checkpoint, CheckpointError
from handgrad.data import DataError
from handgrad.layers import numel
from handgrad.models import ModelConfig
from handgrad.train import NonFiniteError, TrainConfig


class UsageError(ValueError):
    """A bad flag value or combination; reported in one line with exit code 2."""


def _err(msg: str) -> None:
    print(f"handgrad: error: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- shared helpers
def load_splits(path: str | None, block_size: int, split_seed: int, vocab: data.Vocab | None = None,
                warn=None, fits=None) -> data.Splits:
    """Read the data file (None: bundled names.txt) and build the splits. `fits(n_examples)` is
    called before the examples are built, to refuse a run that cannot fit in memory."""
    words = data.read_words(path or data.default_data_path())
    if fits is not None:
        fits(sum(len(w) + 1 for w in words.items))
    if words.blank_lines and warn:
        warn(f"{path or 'names.txt'}: skipped {words.blank_lines} blank line(s)")
    if vocab is not None:
        extra = sorted(set("".join(words.items)) - set(vocab.itos))
        if extra:
            raise DataError(f"{path}: characters {''.join(extra)!r} are not in the checkpoint's vocabulary "
                            f"({''.join(vocab.itos)!r}); use the data the model was trained on")
    splits = data.make_splits(words.items, block_size, split_seed, vocab)
    if splits.Xtr.shape[0] == 0:
        raise DataError(f"{path or 'names.txt'}: {len(words.items)} item(s) leave no training examples "
                        "after the 80/10/10 split; give at least 1 item for training")
    return splits


def _loss(value: float | None) -> str:
    return "n/a (empty split)" if value is None else f"{value:.4f}"


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _samples(ck: Checkpoint, n: int, seed: int) -> list[str]:
    with torch.no_grad():
        ids = models.sample(ck.inference_model(), ck.block_size, n=n, seed=seed)
    return [ck.vocab.decode(s) for s in ids]


# ---------------------------------------------------------------------------- train
DEFAULT_OUT = "runs/{model}"
MODEL_FLAGS = {"n_embd": "--n-embd", "n_hidden": "--n-hidden", "block_size": "--block-size",
               "n_layers": "--n-layers", "batchnorm": "--no-batchnorm", "w1_scale": "--w1-scale"}
TRAIN_FLAGS = {"batch_size": "--batch-size", "lr": "--lr", "lr_decay_step": "--lr-decay-step",
               "lr_decayed": "--lr-decayed", "seed": "--seed", "split_seed": "--split-seed",
               "bn_stats": "--bn-stats", "dtype": "--dtype", "chunk_steps": "--chunk-steps",
               "recompute_tile": "--recompute-tile", "lecture_rng": "--lecture-rng"}


def _add_train_parser(sub) -> None:
    d, m = TrainConfig(), ModelConfig()
    p = sub.add_parser("train", help="train a model with hand-written gradients",
                       description="Train a makemore model with hand-written backward passes (no autograd), "
                       "save checkpoints, then print train/val loss and samples. Defaults reproduce "
                       "the lectures: 200,000 steps, batch 32, lr 0.1 then 0.01 from step 100,000 (mlp) "
                       "or 150,000 (deep, wavenet).")
    p.add_argument("--data", help="UTF-8 text file, one item per line (default: bundled names.txt)")
    p.add_argument("--out", help=f"checkpoint directory (default: {DEFAULT_OUT}, or the --resume DIR)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its flags are kept; "
                   "--steps may extend it)")
    p.add_argument("--force", action="store_true", help="start a new run even if --out already holds one "
                   "(it is replaced)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.MODELS, help="mlp: lecture 4's MLP (default); deep: makemore "
                   "part 3's 5-layer batchnorm net; wavenet: makemore part 5's hierarchical net")
    presets = "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items()) or 'the defaults'}"
                        for k, v in models.PRESETS.items())
    g.add_argument("--n-embd", type=int, help=f"embedding size per character (default {m.n_embd}; {presets})")
    g.add_argument("--n-hidden", type=int, help=f"hidden units per layer (default {m.n_hidden})")
    g.add_argument("--block-size", type=int, help=f"context length in characters (default {m.block_size}; "
                   "a power of two for wavenet)")
    g.add_argument("--n-layers", type=int, help="hidden blocks of the deep model (default 5)")
    g.add_argument("--no-batchnorm", dest="batchnorm", action="store_const", const=False,
                   help="drop the batchnorm layer (for experiments)")
    g.add_argument("--w1-scale", type=float, help="multiply W1's init by this (default 1; large values "
                   "saturate tanh on purpose)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"total SGD steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, help=f"examples per step (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    g.add_argument("--lr-decay-step", type=int, help=f"step from which --lr-decayed is used "
                   f"(default {d.lr_decay_step})")
    g.add_argument("--lr-decayed", type=float, help=f"learning rate after the decay (default {d.lr_decayed})")
    g.add_argument("--seed", type=int, help=f"seed for init and batch sampling (default {d.seed})")
    g.add_argument("--split-seed", type=int,
                   help=f"seed of the 80/10/10 word shuffle (default {d.split_seed})")
    g.add_argument("--bn-stats", choices=train.BN_STATS, help="batchnorm statistics for inference: "
                   "calibrate over the training set after training (default) or the running averages")
    g.add_argument("--dtype", choices=tuple(train.DTYPES), help="float32 (default) or float64")
    g.add_argument("--engine", choices=train.ENGINES, default="auto", help="auto: the fused native step, "
                   "falling back to eager with a warning (default); fast; eager")
    g.add_argument("--chunk-steps", type=int, help=f"steps per engine call (default {d.chunk_steps})")
    g.add_argument("--lecture-rng", action="store_const", const=True, help="draw the init and then the "
                   "batches from one generator seeded --seed, as the lectures' torch.manual_seed does "
                   "(with --model wavenet --seed 42 this reproduces makemore part 5's run)")
    g.add_argument("--recompute-tile", type=int, metavar="ROWS", help="activation checkpointing (fast "
                   "engine): keep only embcat and recompute the hidden activations in backward, ROWS rows "
                   "at a time; saves memory at large --batch-size (default 0: keep all)")
    g.add_argument("--nproc", type=int, metavar="N", help="data-parallel training in N local processes (gloo "
                   "on 127.0.0.1, synchronized batchnorm); under torchrun leave it out")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--samples", type=int, default=10, help="names to sample at the end (default %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (for scripts)")
    g.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default %(default)s: the "
                   "step's tensors are tiny, and more threads only add overhead)")
    g.add_argument("--verify-autograd", type=int, metavar="STEPS", help="instead of training: run STEPS "
                   "steps with the hand-written gradients and with autograd from the same init on the same "
                   "batches, and print how far the two loss curves ever are apart")
    p.set_defaults(func=_cmd_train)
    # ---- diagnose: train flags (owned by diagnostics)
    g = p.add_argument_group("diagnostics")
    g.add_argument("--diagnostics", action="store_true", help="measure gradient health on a fixed probe "
                   "during training (hand-written backward, no autograd); write PNGs and diagnostics.json "
                   "into OUT/diagnostics/ and print warnings")
    g.add_argument("--diag-every", type=int, metavar="N", help="steps between measurements, a multiple of "
                   "--chunk-steps (default 5000; implies --diagnostics)")
    # ---- end diagnose: train flags


def _configs_from_args(args) -> tuple[ModelConfig, TrainConfig]:
    mvals = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    tvals = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.steps is not None:
        tvals["steps"] = args.steps
    tvals["engine"], tvals["checkpoint_every"] = args.engine, args.checkpoint_every
    name = args.model or "mlp"
    if name == "wavenet" and "n_layers" in mvals:
        raise UsageError("--n-layers: wavenet's depth follows --block-size (log2 of it); give --block-size")
    try:
        return models.preset(name, **mvals), TrainConfig.for_model(name, **tvals)
    except ValueError as e:  # the configs validate their fields; name the flag, not the field
        field = str(e).split()[0]
        flag = {**MODEL_FLAGS, **TRAIN_FLAGS, "steps": "--steps",
                "checkpoint_every": "--checkpoint-every"}.get(field, field)
        raise UsageError(f"{flag}: {str(e)[len(field) + 1:]}") from None


def _resume(args, warn) -> tuple[Checkpoint, data.Splits]:
    ck = checkpoint.load(args.resume)
    given = [flag for k, flag in {**MODEL_FLAGS, **TRAIN_FLAGS, "model": "--model"}.items()
             if getattr(args, k) is not None]
    if given:
        raise UsageError(f"{given[0]} cannot be changed when resuming; the run keeps the flags saved in "
                         f"{args.resume} (only --steps, --engine, --out and output flags may be given)")
    if args.data is not None and args.data != ck.data_path:
        raise UsageError(f"--data {args.data} differs from the data the run was trained on ({ck.data_path})")
    tc = ck.train_config
    tvals = {"engine": args.engine, "checkpoint_every": args.checkpoint_every}
    if args.steps is not None:
        if args.steps < ck.state.step:
            raise UsageError(f"--steps {args.steps} is below the checkpoint's step {ck.state.step}")
        tvals["steps"] = args.steps
    ck.train_config = dataclasses.replace(tc, **tvals)
    fits = None if ck.model_config is None else (
        lambda n: budget.check_train(ck.model_config, ck.train_config, n))
    splits = load_splits(ck.data_path, ck.block_size, tc.split_seed, ck.vocab, warn, fits)
    return ck, splits


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _cmd_train(args) -> int:
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a positive number of threads")
    if args.samples < 0:
        raise UsageError(f"--samples {args.samples}: expected 0 (none) or a positive number of names")
    torch.set_num_threads(args.threads)
    if args.resume:
        ck, splits = _resume(args, warn)
        mcfg, tcfg, state, data_path = ck.model_config, ck.train_config, ck.state, ck.data_path
        out, block_size = Path(args.out or args.resume), ck.block_size
    else:
        mcfg, tcfg = _configs_from_args(args)
        splits = load_splits(args.data, mcfg.block_size, tcfg.split_seed, warn=warn,
                             fits=lambda n: budget.check_train(mcfg, tcfg, n))
        mcfg = dataclasses.replace(mcfg, vocab_size=len(splits.vocab))
        state, out = train.new_state(mcfg, tcfg), Path(args.out or DEFAULT_OUT.format(model=mcfg.name))
        block_size = mcfg.block_size
        data_path = str(Path(args.data).resolve()) if args.data else None  # None: the bundled names
        if (out / checkpoint.META).exists() and not args.force and args.verify_autograd is None:
            raise UsageError(f"--out {out} already holds a run; continue it with --resume {out}, choose "
                             "another --out, or add --force to replace it")
    if args.verify_autograd is not None:
        return _verify(args, splits, mcfg, tcfg)

    rank = distributed.for_train(args, tcfg, state, splits)  # --nproc N, or one rank under torchrun
    if isinstance(rank, int):
        return rank
    if rank is not None and not rank.is_main:
        return rank.follow(splits, mcfg, tcfg, state)  # ranks > 0 train silently; rank 0 prints and saves
    steps_fn, engine, fallback = ((rank.steps_fn, rank.engine, rank.warning) if rank is not None
                                  else train.select_engine(state.model, tcfg))
    if fallback:
        warn(fallback)
    ckpt = Checkpoint(mcfg, tcfg, splits.vocab, data_path, state, None, {}, block_size)
    if not args.quiet:
        print(f"training {mcfg.name if mcfg else 'a'} model, {numel(state.model):,} parameters on "
              f"{splits.Xtr.shape[0]:,} examples "
              f"({engine} engine, {tcfg.dtype}), from step {state.step:,} to {tcfg.steps:,}; "
              f"checkpoints in {out}/", file=sys.stderr)
    callbacks = []
    if not args.quiet:
        callbacks.append(_ProgressBar(tcfg.steps, state.step))
    last_saved = [state.step if args.resume else None]  # the step of the newest checkpoint on disk

    def save_periodically(pr: train.Progress) -> None:
        if pr.state.step - (last_saved[0] or 0) >= tcfg.checkpoint_every or pr.state.step == tcfg.steps:
            checkpoint.save(out, ckpt)
            last_saved[0] = pr.state.step

    callbacks.append(save_periodically)
    # ---- diagnose: train callbacks (owned by diagnostics)
    if args.diagnostics or args.diag_every is not None:
        diag = _TrainDiagnostics(args, splits, mcfg, tcfg, state, out)
        callbacks.append(diag)  # its close() writes the report, whatever way training ends
        steps_fn = diag.collector.watch(steps_fn)  # records a NonFiniteError for the report
    # ---- end diagnose: train callbacks

    def callback(pr: train.Progress) -> None:
        for cb in callbacks:
            cb(pr)

    def kept() -> str:
        if last_saved[0] is None:
            return f"no checkpoint was written yet (the first comes at step {tcfg.checkpoint_every})"
        return f"the last good checkpoint (step {last_saved[0]}) is kept in {out}/"

    t0 = time.perf_counter()
    try:
        try:
            state = train.train(splits, mcfg, tcfg, state, callback, steps_fn)
        finally:
            for cb in callbacks:  # the progress bar, and the diagnostics report (written however it ends)
                getattr(cb, "close", lambda: None)()
    except NonFiniteError as e:
        _err(f"training diverged at step {e.step}: {e.tensor} is NaN or infinite; {kept()}. "
             "Try a smaller --lr or check the init.")
        return 1
    except KeyboardInterrupt:
        _err(f"interrupted; {kept()}" + (f"; continue with: handgrad train --resume {out}"
                                          if last_saved[0] is not None else ""))
        return 130
    except distributed.PeerLost as e:
        _err(f"{e}; {kept()}" + (f"; continue with: handgrad train --resume {out}" if last_saved[0] else ""))
        return 1
    loop_time = time.perf_counter() - t0

    ckpt.state = state
    ckpt.inference = train.inference_buffers(state, splits, tcfg)
    with torch.no_grad():
        results = {split: models.evaluate(ckpt.inference_model(), *splits.split(split))
                   for split in ("train", "val")}
    results["loop_seconds"] = loop_time
    results["engine"] = engine
    ckpt.results = results
    checkpoint.save(out, ckpt)
    # ---- diagnose: after training (owned by diagnostics)
    # ---- end diagnose: after training
    bn = tcfg.bn_stats if state.model.buffers() else "no batchnorm"
    if results["val"] is None:
        warn(f"the val split is empty ({len(splits.vocab)}-character data with too few items); "
             "no val loss to report")
    uniform = math.log(len(splits.vocab))  # the loss of guessing every character equally
    if results["train"] > uniform + 1.0:
        warn(f"the final train loss {results['train']:.4g} is far above {uniform:.2f}, the loss of a uniform "
             f"guess: training did not learn; try a smaller --lr (this run: {tcfg.lr:g})")
    print(f"step {state.step}: train loss {_loss(results['train'])}, val loss {_loss(results['val'])} "
          f"(batchnorm stats: {bn}; "
          f"training loop {_fmt_time(loop_time)}, {engine} engine)")
    if args.samples:
        print("samples:")
        for s in _samples(ckpt, args.samples, tcfg.seed + 10):
            print(f"  {s}")
    print(f"saved to {out}/  (handgrad sample --checkpoint {out}; handgrad eval --checkpoint {out})")
    return 0


class _ProgressBar:
    """tqdm bar with step, loss, steps/s and time left (on stderr)."""

    def __init__(self, total: int, start: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last = start

    def __call__(self, pr: train.Progress) -> None:
        self.bar.set_postfix_str(f"loss {pr.chunk_loss:.4f} lr {pr.lr:g}", refresh=False)
        self.bar.update(pr.state.step - self.last)
        self.last = pr.state.step

    def close(self) -> None:
        self.bar.close()


def _verify(args, splits, mcfg, tcfg) -> int:
    """Hand-written vs autograd training curves from the same init on the same batches."""
    from handgrad import reference

    steps = args.verify_autograd
    if steps < 1:
        raise UsageError(f"--verify-autograd {steps}: expected a positive number of steps")
    tcfg = dataclasses.replace(tcfg, steps=steps)
    steps_fn, engine, fallback = train.select_engine(train.new_state(mcfg, tcfg).model, tcfg)
    if fallback:
        warn(fallback)
    hand = train.train(splits, mcfg, tcfg, steps_fn=steps_fn).losses
    ref = train.train(splits, mcfg, tcfg, steps_fn=reference.autograd_steps).losses
    diff = (hand - ref).abs()  # (steps,)
    tol = 1e-5 if tcfg.dtype == "float32" else 1e-12
    worst = int(diff.argmax())
    print(f"{steps} steps, {mcfg.name}, {tcfg.dtype}, hand-written ({engine} engine) vs autograd, "
          "same init and batches")
    print(f"{'step':>8} {'hand-written':>16} {'autograd':>16} {'|diff|':>10}")
    for i in sorted({0, 1, steps // 4, steps // 2, worst, steps - 1}):
        print(f"{i:>8} {hand[i].item():>16.10f} {ref[i].item():>16.10f} {diff[i].item():>10.2e}")
    ok = bool(diff.max() <= tol)
    print(f"max per-step |loss difference| {diff.max().item():.3e} at step {worst} "
          f"(tolerance {tol:g}): {'AGREE' if ok else 'DISAGREE'}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------- sample / eval
def _load_finished(path: str) -> Checkpoint:
    ck = checkpoint.load(path)
    if ck.state.model.buffers() and ck.inference is None:
        raise UsageError(f"{path}: training has not finished (step {ck.state.step} of "
                         f"{ck.train_config.steps}); continue it with: handgrad train --resume {path}")
    return ck


def _cmd_sample(args) -> int:
    if args.n < 1:
        raise UsageError(f"-n {args.n}: expected a positive number of samples")
    if not 0 <= args.seed <= train.MAX_SEED:
        raise UsageError(f"--seed {args.seed}: expected an integer from 0 to {train.MAX_SEED}")
    ck = _load_finished(args.checkpoint)
    model = ck.state.model
    per_example = budget.model_sizes(ck.model_config)[1] if ck.model_config else 0
    budget.check_samples(args.n, ck.block_size, len(ck.vocab), per_example,
                         next(iter(model.params().values())).element_size())
    for s in _samples(ck, args.n, args.seed):
        print(s)
    return 0


def _cmd_eval(args) -> int:
    ck = _load_finished(args.checkpoint)
    path = args.data if args.data is not None else ck.data_path
    splits = load_splits(path, ck.block_size, ck.train_config.split_seed, ck.vocab)
    print(f"checkpoint {args.checkpoint}: step {ck.state.step}, {numel(ck.state.model):,} parameters, "
          f"batchnorm stats: {ck.train_config.bn_stats}")
    inference = ck.inference_model()
    with torch.no_grad():
        for split in ("train", "val", "test"):
            X, Y = splits.split(split)
            loss = models.evaluate(inference, X, Y)
            print(f"{split:>5} loss {_loss(loss)}  ({X.shape[0]:,} examples)")
    return 0


def _cmd_check(args) -> int:
    from handgrad import check

    report = check.run_lecture_check(train.DTYPES[args.dtype], args.seed)
    print(report)
    return 0 if report.passed else 1


# ---- bench (owned by the fast path)
def _cmd_bench(args) -> int:
    from handgrad import bench

    for name in ("batch_size", "steps", "threads"):
        if getattr(args, name) < (2 if name == "batch_size" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer"
                             + (" of at least 2 (batchnorm's n-1)" if name == "batch_size" else ""))
    if args.large_batch < 0 or args.large_batch == 1:
        raise UsageError(f"--large-batch {args.large_batch}: expected 0 (skip) or at least 2")
    overrides = {k: getattr(args, k) for k in ("n_hidden", "n_embd", "block_size")
                 if getattr(args, k) is not None}
    progress = None if args.json else (lambda s: print(f"timing {s} ...", file=sys.stderr, flush=True))
    try:
        result = bench.run_bench(model=args.model, batch_size=args.batch_size, steps=args.steps,
                                 threads=args.threads, large_batch=args.large_batch,
                                 compile=not args.no_compile, progress=progress, **overrides)
    except ValueError as e:  # the model config validates its sizes
        field = str(e).split()[0]
        raise UsageError(f"--{field.replace('_', '-')}: {str(e)[len(field) + 1:]}") from None
    print(result.to_json() if args.json else result.table())
    return 0


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time one training step: fast, eager, autograd, GEMM floor",
                       description="Time the training step of every engine on one model in one process "
                       "on the same data (median per step after warm-up, quartiles as the spread) and report "
                       "the ratio of each to the fast path and to the GEMM floor (the step's matrix "
                       "products alone), then examples per second at a large batch.")
    p.add_argument("--model", choices=models.MODELS, default="mlp", help="model preset (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default %(default)s)")
    p.add_argument("--n-hidden", type=int, help="hidden units (default: the model's preset)")
    p.add_argument("--n-embd", type=int, help="embedding size (default: the model's preset)")
    p.add_argument("--block-size", type=int, help="context length (default: the model's preset)")
    p.add_argument("--steps", type=int, default=5000, help="timed steps per engine (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--large-batch", type=int, default=4096, help="batch of the examples/second table "
                   "(0 skips it; default %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_bench)
# ---- end bench


# ---- diagnose (owned by diagnostics)
def _print_diagnostics(report, out: Path, file=None) -> None:
    file = file or sys.stdout
    for c in report.checks:
        print(f"check {c}" + (f"; {c.detail}" if c.failed else ""), file=file)
    for w in report.warnings:
        print(f"warning: {w}", file=file)
    if not report.warnings:
        print("diagnostics: no warnings", file=file)
    print(f"diagnostics written to {out}/ ({', '.join(p.name for p in report.paths)})", file=file)


class _TrainDiagnostics:
    """The train callback of --diagnostics: measures every --diag-every steps, saves the history
    with each checkpoint, and on close() writes the PNGs and diagnostics.json and prints the warnings."""

    def __init__(self, args, splits, mcfg, tcfg, state, out: Path):
        from handgrad import diagnostics

        every = args.diag_every if args.diag_every is not None else diagnostics.DiagConfig().every
        if every < 1 or every % tcfg.chunk_steps:
            raise UsageError(f"--diag-every {every}: must be a positive multiple of --chunk-steps "
                             f"({tcfg.chunk_steps})")
        saved = Path(args.resume) / "diagnostics" / diagnostics.HISTORY_FILE if args.resume else None
        history = diagnostics.history_until(saved, state.step)
        self.dg, self.state, self.out = diagnostics, state, out / "diagnostics"
        self.collector = diagnostics.Collector(splits.Xtr, splits.Ytr, mcfg, tcfg,
                                               diagnostics.DiagConfig(every=every), history)
        self.collector.record(state.model, state.step)
        self.saved, self.every_save, self.closed = state.step, tcfg.checkpoint_every, False

    def __call__(self, pr: train.Progress) -> None:
        self.collector(pr)
        if pr.state.step - self.saved >= self.every_save:  # keep the history with the checkpoints
            c = self.collector
            data = self.dg.summary(c.history, [], c.warnings(), c.cfg)
            self.dg.write_json(self.out / self.dg.HISTORY_FILE, data)
            self.saved = pr.state.step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        report = self.dg.write_report(self.out, self.collector, self.state.model, self.state.step,
                                      self.state.losses)
        failed = [c for c in report.checks if c.failed]
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for c in failed:
            print(f"warning: sanity check {c}; {c.detail}", file=sys.stderr)
        print(f"diagnostics: {len(report.warnings)} warning(s), {len(failed)} failed check(s); PNGs and "
              f"diagnostics.json in {self.out}/", file=sys.stderr)


def _cmd_diagnose(args) -> int:
    from handgrad import diagnostics

    ck = checkpoint.load(args.checkpoint)
    splits = load_splits(ck.data_path, ck.block_size, ck.train_config.split_seed, ck.vocab)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "diagnostics"
    saved = Path(args.checkpoint) / "diagnostics" / diagnostics.HISTORY_FILE
    collector = diagnostics.from_checkpoint(ck, splits.Xtr, splits.Ytr, saved)
    print(f"checkpoint {args.checkpoint}: step {ck.state.step:,}; update-ratio history: "
          f"{len(collector.history)} saved measurement(s)" + ("" if collector.history else
                                                             " (train with --diagnostics to keep one)"))
    report = diagnostics.write_report(out, collector, ck.state.model, ck.state.step, ck.state.losses,
                                      extra={"checkpoint": str(args.checkpoint)})
    _print_diagnostics(report, out)
    return 0
# ---- end diagnose


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="handgrad", description="Train makemore models with "
                                     "hand-written gradients, and prove every gradient.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    p = sub.add_parser("sample", help="sample names from a trained checkpoint",
                       description="Sample from a finished checkpoint, one item per line.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("-n", type=int, default=20, help="how many samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=2147483657, help="sampling seed (default %(default)s)")
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("eval", help="train/val/test loss of a checkpoint",
                       description="Evaluate a finished checkpoint on the train, val and test splits.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--data", help="data file (default: the one the model was trained on)")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("check", help="verify every gradient of the lecture's graph",
                       description="Run the lecture's atomic graph (n_hidden 64, batch 32) on a seeded "
                       "batch, compare all 26 hand-written gradients with autograd, the closed forms with "
                       "the atomic chain, and everything with float64 finite differences. Exit 1 on failure.")
    p.add_argument("--dtype", choices=tuple(train.DTYPES), default="float32",
                   help="dtype of the comparison with autograd (default %(default)s)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the init and the batch (default %(default)s)")
    p.set_defaults(func=_cmd_check)
    # ---- bench: parser (owned by the fast path)
    _add_bench_parser(sub)
    # ---- end bench: parser
    # ---- diagnose: parser (owned by diagnostics)
    p = sub.add_parser("diagnose", help="gradient-health plots, sanity checks and warnings for a checkpoint",
                       description="Measure a fixed probe batch at the checkpoint's parameters with the "
                       "hand-written forward/backward; write loss, activation, gradient, update-ratio, "
                       "saturation and dlogits PNGs plus diagnostics.json; print the lecture's sanity checks "
                       "and one line per warning (layer and what to try).")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--out", metavar="DIR", help="output directory (default: DIR/diagnostics)")
    p.set_defaults(func=_cmd_diagnose)
    # ---- end diagnose: parser
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes to its ranks
        return args.func(args)
    except (DataError, CheckpointError, UsageError, BudgetError, train.EngineUnavailable) as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:  # while loading, evaluating or saving (the loop has its own message)
        _err("interrupted; files are written atomically, so any checkpoint on disk is complete")
        return 130
    except BrokenPipeError:  # `handgrad check | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
