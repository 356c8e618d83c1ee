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

from handgrad import budget, checkpoint, data, distributed, io, models, train
from handgrad.budget import BudgetError
from handgrad.check import run_tolerance
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


def _samples(ck: Checkpoint, n: int, seed: int, where: str = "the model") -> list[str]:
    try:
        with torch.no_grad():
            ids = models.sample(ck.inference_model(), ck.block_size, n=n, seed=seed)
    except RuntimeError as e:  # torch.multinomial refuses NaN/inf probabilities
        if "probability" not in str(e):
            raise
        raise CheckpointError(f"{where}: the model's output probabilities are not finite (its parameters "
                              "overflow the softmax); it cannot be sampled") from None
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
                   "--steps may extend it; --lr, --lr-decayed and --lr-decay-step may change the schedule "
                   "from the checkpoint's step on, recorded in meta.json's lr_history)")
    p.add_argument("--force", action="store_true", help="replace the run that --out already holds (a new "
                   "run, or --resume DIR --out OTHER)")
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
                   "at a time; saves memory at large --batch-size (default 0: keep all; the mlp runs in "
                   "tiles of 128 anyway from 4,096 examples in one process and 1,024 per rank: counted, "
                   "nothing recomputed)")
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


def run_data(ck: Checkpoint, ckdir: str, given: str | None) -> str | None:
    """The data file to read for a saved run: the one the user names with --data; else the bundled
    names (None) for a run trained on them; else the file meta.json records, used only while it still
    holds exactly the run's data (its fingerprint matches data_sha256). A checkpoint from elsewhere
    may name any file, so nothing read from that file is printed: every problem gives the same line."""
    if given is not None:
        return given
    if ck.data_path is None:
        return None
    try:
        if ck.data_sha256 is not None and _data_identity(ck.data_path)[1] == ck.data_sha256:
            return ck.data_path
    except DataError:
        pass
    raise UsageError(f"{ckdir}: the run was trained on a data file of its own, and the file meta.json "
                     "records is missing, changed or unreadable; name the run's data with --data FILE")


def _data_identity(path: str | None) -> tuple[str | None, str]:
    """(the path to record in meta.json, checkpoint.data_fingerprint of the items) for the data at
    `path`: None stands for the bundled names, also when they are named explicitly; a file is
    recorded by its real path (/dev/stdin redirected from a file records that file)."""
    words = data.read_words(path or data.default_data_path())
    recorded = None if path is None or data.same_data(path, None) else (words.source or path)
    return recorded, checkpoint.data_fingerprint(words.items)


def _check_same_data(ck: Checkpoint, ckdir: str, path: str | None) -> tuple[str | None, str]:
    """_data_identity of the data at `path` (None: bundled), which must be the run's training data
    where the checkpoint records its fingerprint."""
    recorded, fingerprint = _data_identity(path)
    if ck.data_sha256 is not None and fingerprint != ck.data_sha256:
        what = f"--data {data.show_path(path)}" if path is not None else "the bundled names.txt"
        raise UsageError(f"{what}: not the data the run in {ckdir} was trained on (its sha256 differs from "
                         "meta.json's data_sha256); give the run's own data file")
    return recorded, fingerprint


def _resume(args, warn) -> tuple[Checkpoint, data.Splits]:
    ck = checkpoint.load(args.resume)
    given = [flag for k, flag in {**MODEL_FLAGS, **TRAIN_FLAGS, "model": "--model"}.items()
             if getattr(args, k) is not None and k not in checkpoint.LR_FIELDS]
    if given:
        raise UsageError(f"{given[0]} cannot be changed when resuming; the run keeps the flags saved in "
                         f"{args.resume} (only --steps, --lr, --lr-decayed, --lr-decay-step, --engine, --out "
                         "and output flags may be given)")
    path = run_data(ck, args.resume, args.data)
    ck.data_path, ck.data_sha256 = _check_same_data(ck, args.resume, path)
    tc = ck.train_config
    tvals = {"engine": args.engine, "checkpoint_every": args.checkpoint_every}
    tvals.update({k: getattr(args, k) for k in checkpoint.LR_FIELDS if getattr(args, k) is not None})
    if args.steps is not None:
        if args.steps < ck.state.step:
            raise UsageError(f"--steps {args.steps} is below the checkpoint's step {ck.state.step}")
        tvals["steps"] = args.steps
    try:
        ck.train_config = dataclasses.replace(tc, **tvals)
    except ValueError as e:
        field = str(e).split()[0]
        raise UsageError(f"{TRAIN_FLAGS.get(field, field)}: {str(e)[len(field) + 1:]}") from None
    ck.lr_history = lr_history(ck.lr_history, ck.train_config, ck.state.step)
    fits = None if ck.model_config is None else (
        lambda n: budget.check_train(ck.model_config, ck.train_config, n))
    splits = load_splits(path, ck.block_size, tc.split_seed, ck.vocab, warn, fits)
    return ck, splits


def lr_history(history: list[dict], tcfg: TrainConfig, step: int) -> list[dict]:
    """The learning-rate settings in force from each step, with `tcfg`'s from `step` on (an entry
    for the same step is replaced; unchanged settings add nothing)."""
    history = list(history) or [checkpoint.lr_settings(tcfg, 0)]
    new = checkpoint.lr_settings(tcfg, step)
    last = history[-1]
    if all(last[k] == new[k] for k in checkpoint.LR_FIELDS):
        return history
    if last["from_step"] == step:
        return [*history[:-1], new]
    return [*history, new]


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _cmd_train(args) -> int:
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a positive number of threads")
    if args.samples < 0:
        raise UsageError(f"--samples {args.samples}: expected 0 (none) or a positive number of names")
    torch.set_num_threads(args.threads)
    if args.verify_autograd is not None:
        mcfg, tcfg = _configs_from_args(args)
        splits = load_splits(args.data, mcfg.block_size, tcfg.split_seed, warn=warn,
                             fits=lambda n: budget.check_train(mcfg, tcfg, n))
        return _verify(args, splits, dataclasses.replace(mcfg, vocab_size=len(splits.vocab)), tcfg)
    if args.resume:
        ck, splits = _resume(args, warn)
        out = Path(args.out or args.resume)
    else:  # the data is read and checked before any directory is created
        mcfg, tcfg = _configs_from_args(args)
        splits = load_splits(args.data, mcfg.block_size, tcfg.split_seed, warn=warn,
                             fits=lambda n: budget.check_train(mcfg, tcfg, n))
        mcfg = dataclasses.replace(mcfg, vocab_size=len(splits.vocab))
        out = Path(args.out or DEFAULT_OUT.format(model=mcfg.name))
    if not args.resume:
        data_path, fingerprint = _data_identity(args.data)  # data_path None: the bundled names
        ck = Checkpoint(mcfg, tcfg, splits.vocab, data_path, train.new_state(mcfg, tcfg), None, {},
                        mcfg.block_size, fingerprint, [checkpoint.lr_settings(tcfg, 0)])
    def check_out() -> None:  # --nproc N: --out is checked once, before any rank starts
        with _output_dir(out, args):
            pass

    rank = distributed.for_train(args, ck.train_config, ck.state, splits, check_out)  # --nproc, torchrun
    if isinstance(rank, int):
        return rank
    if rank is not None and not rank.is_main:  # ranks > 0 train silently; rank 0 prints and saves
        return rank.follow(splits, ck.model_config, ck.train_config, ck.state)
    with _output_dir(out, args) as lock:
        return _train(args, ck, splits, out, lock, rank)


def _output_dir(out: Path, args) -> io.RunLock:
    """The run directory, checked before any work is spent: created if needed and writable (else
    OutputError, exit 2), locked against a second writer, cleared of temp files a killed run left,
    and not holding another run unless --force (or it is the run being resumed)."""
    io.prepare_dir(out, "--out")
    lock = io.RunLock(out, "--out").acquire()
    try:
        io.clean_temp_files(out)
        same = args.resume is not None and _same_dir(out, Path(args.resume))
        if (out / checkpoint.META).exists() and not same and not args.force:
            hint = f"continue it with --resume {out}, " if not args.resume else ""
            raise UsageError(f"--out {out} already holds a run; {hint}choose another --out, or add --force "
                             "to replace it")
        if args.diagnostics or args.diag_every is not None:
            io.output_subdir(out, "diagnostics")  # a real directory inside the run, not a symlink
    except BaseException:
        lock.release()
        raise
    return lock


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _train(args, ckpt: Checkpoint, splits: data.Splits, out: Path, lock: io.RunLock,
           rank: distributed.Rank | None = None) -> int:
    """Train `ckpt`'s state to its train_config's steps, saving into `out` (locked by the caller);
    `rank`: this process is rank 0 of a data-parallel group."""
    mcfg, tcfg, state = ckpt.model_config, ckpt.train_config, ckpt.state
    steps_fn, engine, fallback = ((rank.steps_fn, rank.engine, rank.warning) if rank is not None
                                  else train.select_engine(state.model, tcfg))
    if fallback:
        warn(fallback)
    if not args.quiet:
        print(f"training {mcfg.name if mcfg else 'a'} model, {numel(state.model):,} parameters on "
              f"{splits.Xtr.shape[0]:,} examples "
              f"({engine} engine, {tcfg.dtype}), from step {state.step:,} to {tcfg.steps:,}; "
              f"checkpoints in {out}/", file=sys.stderr)
    callbacks = []
    if not args.quiet:
        callbacks.append(_ProgressBar(tcfg.steps, state.step))
    resumed_here = args.resume is not None and _same_dir(out, Path(args.resume))
    last_saved = [state.step if resumed_here else None]  # the step of the newest checkpoint in `out`
    since = [state.step]  # the step of the last save, or of the start

    def save_periodically(pr: train.Progress) -> None:
        if pr.state.step - since[0] >= tcfg.checkpoint_every or pr.state.step == tcfg.steps:
            _save(out, ckpt)
            last_saved[0] = since[0] = pr.state.step

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
    except SaveError as e:
        _err(f"{e}; {kept()}")
        return 1
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
    try:
        _save(out, ckpt)
    except SaveError as e:
        _err(f"{e}; {kept()}")
        return 1
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


class SaveError(Exception):
    """A checkpoint that could not be written mid-run (disk full, directory removed...); exit 1."""


def _save(out: Path, ckpt: Checkpoint) -> None:
    try:
        checkpoint.save(out, ckpt)
    except OSError as e:
        raise SaveError(f"cannot write the checkpoint of step {ckpt.state.step} to {out}/ "
                        f"({io.describe(e)})") from None


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
    tol = run_tolerance(tcfg.torch_dtype)
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
def _load_finished(path: str, allow_unfinished: bool = False) -> Checkpoint:
    """A finished checkpoint, or with `allow_unfinished` any checkpoint (batchnorm then uses its
    running statistics, with a warning)."""
    ck = checkpoint.load(path)
    if ck.state.model.buffers() and ck.inference is None:
        if not allow_unfinished:
            raise UsageError(f"{path}: training has not finished (step {ck.state.step} of "
                             f"{ck.train_config.steps}); continue it with: handgrad train --resume {path}, "
                             "or add --allow-unfinished to use it as it is")
        warn(f"{path}: unfinished run (step {ck.state.step} of {ck.train_config.steps}); batchnorm uses "
             "its running statistics")
    return ck


def _cmd_sample(args) -> int:
    if args.n < 1:
        raise UsageError(f"-n {args.n}: expected a positive number of samples")
    if not 0 <= args.seed <= train.MAX_SEED:
        raise UsageError(f"--seed {args.seed}: expected an integer from 0 to {train.MAX_SEED}")
    ck = _load_finished(args.checkpoint, args.allow_unfinished)
    model = ck.state.model
    dtype_bytes = next(iter(model.params().values())).element_size()
    try:  # the quick upper bound first; the exact size (slower to work out) only when that fails
        bound = budget.size_bounds(ck.model_config)[1] if ck.model_config else 0
        budget.check_samples(args.n, ck.block_size, len(ck.vocab), bound, dtype_bytes)
    except BudgetError:
        per_example = budget.model_sizes(ck.model_config)[1]
        budget.check_samples(args.n, ck.block_size, len(ck.vocab), per_example, dtype_bytes)
    for s in _samples(ck, args.n, args.seed, args.checkpoint):
        print(s)
    return 0


def _cmd_eval(args) -> int:
    ck = _load_finished(args.checkpoint, args.allow_unfinished)
    path = run_data(ck, args.checkpoint, args.data)
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

    if not 0 <= args.seed <= train.MAX_SEED:
        raise UsageError(f"--seed {args.seed}: expected an integer from 0 to {train.MAX_SEED}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: expected at least 2 (batchnorm's n-1)")
    if args.model is None and args.checkpoint is None:
        report = check.run_lecture_check(train.DTYPES[args.dtype], args.seed)
    else:
        model, X, Y, what = _model_to_check(args)
        report = check.check_model(model, X, Y, seed=args.seed, title=what)
    print(report)
    return 0 if report.passed else 1


def _model_to_check(args):
    """(model, X (B, T), Y (B,), title) for `check --model` (a fresh init in --dtype) or
    `check --checkpoint` (the trained parameters, in their dtype), on a seeded batch of its data."""
    if args.checkpoint is not None:
        if args.model is not None:
            raise UsageError("--model and --checkpoint: give one (a checkpoint knows its model)")
        ck = checkpoint.load(args.checkpoint)
        path = run_data(ck, args.checkpoint, args.data)
        splits = load_splits(path, ck.block_size, ck.train_config.split_seed, ck.vocab)
        model, what = ck.state.model, f"checkpoint {args.checkpoint} at step {ck.state.step}"
    else:
        splits = load_splits(args.data, models.preset(args.model).block_size, 42)
        cfg = models.preset(args.model, vocab_size=len(splits.vocab))
        model = models.build(cfg, args.seed, train.DTYPES[args.dtype])
        what = f"{args.model} at its init (seed {args.seed}, {args.dtype})"
    g = torch.Generator().manual_seed(args.seed)
    ix = torch.randint(0, splits.Xtr.shape[0], (args.batch_size,), generator=g)
    title = f"{what}: every parameter gradient on a batch of {args.batch_size}"
    return model, splits.Xtr[ix], splits.Ytr[ix], title


# ---- bench (owned by the fast path)
def _cmd_bench(args) -> int:
    from handgrad import bench

    for name in ("batch_size", "steps", "threads"):
        if getattr(args, name) < (2 if name == "batch_size" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer"
                             + (" of at least 2 (batchnorm's n-1)" if name == "batch_size" else ""))
    if args.recompute_tile < 0:
        raise UsageError(f"--recompute-tile {args.recompute_tile}: expected 0 (skip the table) or a positive "
                         "number of examples per tile")
    if args.large_batch < 0 or args.large_batch == 1:
        raise UsageError(f"--large-batch {args.large_batch}: expected 0 (skip) or at least 2")
    if args.full_train:
        return _full_train(args, bench)
    overrides = {k: getattr(args, k) for k in ("n_hidden", "n_embd", "block_size")
                 if getattr(args, k) is not None}
    progress = None if args.json else (lambda s: print(f"timing {s} ...", file=sys.stderr, flush=True))
    try:
        result = bench.run_bench(model=args.model, batch_size=args.batch_size, steps=args.steps,
                                 threads=args.threads, large_batch=args.large_batch,
                                 compile=not args.no_compile, progress=progress, clock=args.clock,
                                 tile=args.recompute_tile, **overrides)
    except ValueError as e:  # the model config validates its sizes
        field = str(e).split()[0]
        raise UsageError(f"--{field.replace('_', '-')}: {str(e)[len(field) + 1:]}") from None
    print(result.to_json() if args.json else result.table())
    return 0


def _full_train(args, bench) -> int:
    """One whole training run of the model's preset on one engine, timed (bench --full-train)."""
    if args.full_steps is not None and args.full_steps < 1000:
        raise UsageError(f"--full-steps {args.full_steps}: expected at least 1000 (the last 1000 steps' "
                         "loss is reported)")
    import json

    shown = [-1]

    def progress(step: int, total: int) -> None:  # every 5%
        if step * 20 // total != shown[0]:
            shown[0] = step * 20 // total
            print(f"step {step:,} of {total:,}", file=sys.stderr, flush=True)

    r = bench.full_training(args.model, args.full_train, args.full_steps,
                            progress=None if args.json else progress)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['model']}, {r['steps']:,} steps on the {r['engine']} engine, one thread: training loop "
          f"{r['wall_s']:.1f} s wall ({r['cpu_s']:.1f} s CPU), {r['us_per_step']:.1f} us/step; "
          f"last 1000 steps' train loss {r['last_1000_train_loss']:.4f}; train {_loss(r['train_loss'])}, "
          f"val {_loss(r['val_loss'])}")
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
    p.add_argument("--recompute-tile", type=int, default=8, metavar="EXAMPLES",
                   help="examples per tile of the activation checkpointing table (0 skips it; default "
                   "%(default)s; at the large batch: max(this, large batch / 16))")
    p.add_argument("--clock", choices=("cpu", "wall"),
                   help="cpu: CPU time of the timing thread (default with one thread: other processes on a "
                   "shared core do not count); wall: wall clock")
    p.add_argument("--full-train", choices=("fast", "eager", "autograd"), metavar="ENGINE",
                   help="instead: time one whole training run of the model's preset (200k steps) on ENGINE "
                   "(fast, eager or autograd) and print its time and losses")
    p.add_argument("--full-steps", type=int, help="steps of --full-train (default: the preset's)")
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
    splits = load_splits(run_data(ck, args.checkpoint, args.data), ck.block_size, ck.train_config.split_seed,
                         ck.vocab)
    # a directory the user names, or a real directory inside the checkpoint (never a symlink out of it)
    out = io.prepare_dir(Path(args.out), "--out") if args.out else io.output_subdir(args.checkpoint,
                                                                                     "diagnostics")
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


# ---- dojo
def _dojo_item(name: str):
    from handgrad import dojo

    try:
        return dojo.api.get(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_dojo_list(args) -> int:
    from handgrad import dojo

    exercises, others = dojo.items("exercise"), [it for it in dojo.items() if it.kind != "exercise"]
    w = max(len(it.slug) for it in exercises)
    for it in exercises:
        print(f"{it.key}  {it.slug:<{w}}  {it.about}")
    for it in others:
        print(f"{it.alias or '-'}  {it.key:<17}  {it.about}")
    _dojo_questions_list(args)
    return 0


def _cmd_dojo_start(args) -> int:
    from handgrad import dojo

    item = _dojo_item(args.exercise)
    try:
        path = dojo.start(item.key, args.dir)
    except FileExistsError:
        raise UsageError(f"{Path(args.dir) / (item.slug + '.py')} exists already and is never "
                         "overwritten; grade it, "
                         "or start in another --dir") from None
    except OSError as e:
        raise UsageError(f"--dir {args.dir}: {e.strerror or e}") from None
    print(f"wrote {path}: fill in the blanks marked TODO, then run: handgrad dojo grade {path}")
    return 0


def _dojo_names(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        lecture, sep, yours = pair.partition("=")
        if not sep or not lecture.strip().isidentifier() or not yours.strip().isidentifier():
            raise UsageError(f"--name {pair}: write LECTURE=YOURS, e.g. --name dlogprobs=dL_dlogprobs")
        out[lecture.strip()] = yours.strip()
    return out


def _cmd_dojo_grade(args) -> int:
    import json

    from handgrad import dojo

    if not (math.isfinite(args.time_limit) and 0 < args.time_limit <= 3600):
        raise UsageError(f"--time-limit {args.time_limit:g}: give seconds between 0 and 3600 (default 20)")
    if args.graph and not args.graph.endswith(".svg"):
        raise UsageError(f"--graph {args.graph}: the picture is SVG; name the file something.svg")
    if args.graph and not Path(args.graph).resolve().parent.is_dir():
        raise UsageError(f"--graph {args.graph}: the folder {Path(args.graph).parent} does not exist")
    g = dojo.grade_file(args.file, args.exercise, strict=args.strict, names=_dojo_names(args.name),
                        time_limit=args.time_limit)
    if g.problem:
        _err(f"dojo grade {args.file}: {g.problem}")
        return 2
    print(json.dumps(g.to_json(), indent=1) if args.json else g.table())
    if args.graph and dojo.api.get(g.item).graph is not None:
        try:
            dojo.draw(g, args.graph)
        except OSError as e:
            raise UsageError(f"--graph {args.graph}: {e.strerror or e}") from None
        if not args.json:
            print(f"graph: {args.graph}")
    return g.exit_code


def _cmd_dojo_hint(args) -> int:
    from handgrad import dojo

    try:
        level, what, text = dojo.next_hint(args.file, args.name, args.exercise, args.level)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"dojo hint {args.file}: cannot read it ({type(e).__name__})") from None
    except ValueError as e:
        raise UsageError(f"dojo hint {args.file}: {e}") from None
    print(f"hint {level} of 3 for {args.name}, {what}:\n{text}")
    if level < 3:
        print(f"(ask again for hint {level + 1}: handgrad dojo hint {args.file} {args.name})")
    return 0


def _cmd_dojo_solution(args) -> int:
    from handgrad import dojo

    print(dojo.solution(_dojo_item(args.exercise).key), end="")
    return 0


def _add_dojo_parser(sub) -> None:
    p = sub.add_parser("dojo", help="the Backprop Ninja exercises and challenges: start one, fill it in, "
                       "get it graded",
                       description="The lecture's exercises and coding challenges as files you fill in, "
                                   "graded row by "
                       "row with the right upstream gradients fed in, each mistake named.")
    dsub = p.add_subparsers(dest="dojo_command", required=True, metavar="ACTION")
    q = dsub.add_parser("list", help="the exercises, challenges and questions")
    q.add_argument("--dir", default=".", help="where your questions' progress is kept (default: here)")
    q.set_defaults(func=_cmd_dojo_list)
    q = dsub.add_parser("start", help="write an exercise's or challenge's file (never overwrites)")
    q.add_argument("exercise", help="its key, letter or name (see `handgrad dojo list`)")
    q.add_argument("--dir", default=".", help="where to write it (default: here)")
    q.set_defaults(func=_cmd_dojo_start)
    q = dsub.add_parser("grade", help="grade a file: exit 0 all right, 1 something wrong, 2 cannot grade")
    q.add_argument("file", help="the exercise or challenge file")
    q.add_argument("--exercise", help="grade it as this exercise or challenge (default: its "
                   "'# handgrad dojo' line)")
    q.add_argument("--strict", action="store_true",
                   help="shapes exactly: a right value in a shape that broadcasts alike ((64,) for (1, "
                        "64)) is wrong")
    q.add_argument("--name", action="append", metavar="LECTURE=YOURS",
                   help="your name for one of the lecture's (repeatable), e.g. dlogprobs=dL_dlogprobs")
    q.add_argument("--time-limit", type=float, default=20.0,
                   help="seconds for your code (default %(default)s)")
    q.add_argument("--json", action="store_true", help="print JSON instead of the table")
    q.add_argument("--graph", metavar="OUT.svg", help="also draw the graph, each tensor coloured by grade")
    q.set_defaults(func=_cmd_dojo_grade)
    q = dsub.add_parser("hint", help="the next of three hints for a row: the rule, the shapes, the form")
    q.add_argument("file", help="your exercise or challenge file (the count of hints is kept beside it)")
    q.add_argument("name", help="the gradient or row, e.g. dprobs")
    q.add_argument("--exercise", help="the exercise or challenge (default: the file's '# handgrad dojo' "
                   "line)")
    q.add_argument("--level", type=int, choices=(1, 2, 3),
                   help="this hint instead of the next (3 gives the answer)")
    q.set_defaults(func=_cmd_dojo_hint)
    q = dsub.add_parser("solution", help="print an exercise's or a challenge's reference file")
    q.add_argument("exercise", help="its key, letter or name (see `handgrad dojo list`)")
    q.set_defaults(func=_cmd_dojo_solution)
    _add_dojo_question_parsers(dsub)


# ---- dojo questions (dojo/quiz.py): ask, answer, quiz, and their lines in `dojo list`
def _dojo_questions_list(args) -> None:
    from handgrad.dojo import quiz
    from handgrad.dojo.progress import ProgressError

    try:
        lines = quiz.list_lines(args.dir)
    except ProgressError as e:  # the list is still worth showing
        print(f"warning: {e}", file=sys.stderr)
        lines = quiz.list_lines(None)
    for line in lines:
        print(line)


def _quiz_call(where: str, fn):
    """Run a quiz call, its bad input (an unknown question, an unreadable progress file) one line."""
    from handgrad.dojo.progress import ProgressError

    try:
        return fn()
    except ProgressError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def _png_path(path: str | None) -> None:
    if path and not path.endswith(".png"):
        raise UsageError(f"--png {path}: the picture is PNG; name the file something.png")
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"--png {path}: the folder {Path(path).parent} does not exist")


def _cmd_dojo_ask(args) -> int:
    from handgrad.dojo import quiz

    _png_path(args.png)
    asked = _quiz_call(f"dojo ask {data.show_path(args.question)}", lambda: quiz.ask(
        args.question, args.dir, experiment=bool(args.png), hint=args.hint, explain=args.explain))
    print(asked.text())
    if args.png:
        try:
            print(f"picture: {asked.experiment.write_png(args.png)}")
        except OSError as e:
            raise UsageError(f"--png {args.png}: {e.strerror or e}") from None
    q = asked.question
    print(f"answer it: handgrad dojo answer {q.number} " + " ".join(p.name.upper() for p in q.parts)
          + ("" if args.png else f"   (see it: handgrad dojo ask {q.number} --png q{q.number}.png)"))
    return 0


def _cmd_dojo_answer(args) -> int:
    import json

    from handgrad.dojo import quiz

    v = _quiz_call(f"dojo answer {data.show_path(args.question)}",
                   lambda: quiz.answer(args.question, "; ".join(args.answer), args.dir))
    if v.problem:
        raise UsageError(f"dojo answer {v.question.number}: {v.problem}")
    print(json.dumps(v.to_json(), indent=1) if args.json else v.text())
    if not v.right and not args.json:
        print(f"(answer again: handgrad dojo answer {v.question.number} ...; the next wrong answer gives the "
              f"next hint; the explanation: handgrad dojo ask {v.question.number} --explain)")
    return v.exit_code


def _cmd_dojo_quiz(args) -> int:
    from handgrad.dojo import answers, quiz

    given = None
    if args.answer:
        given = {}
        for item in args.answer:
            key, eq, text = item.partition("=")
            if not eq:
                raise UsageError(f"--answer {item!r:.60}: write Q=ANSWER, e.g. --answer '1=5; 5; 15; 10'")
            q = _quiz_call(f"--answer {item!r:.60}", lambda key=key: quiz.get(key))
            if q.key in given:
                raise UsageError(f"--answer: question {q.number} is answered twice")
            given[q.key] = text
    if args.png:
        io.prepare_dir(Path(args.png), "--png")

    echo = not sys.stdin.isatty()  # answers piped in are shown beside their prompts, as if typed

    def read(prompt: str) -> str | None:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        if echo:
            print(line)
        return line

    try:
        run = _quiz_call("dojo quiz", lambda: quiz.run_quiz(read, print, args.dir, given, args.png,
                                                            again=args.all))
    except answers.AnswerError as e:
        raise UsageError(f"dojo quiz: {e}") from None
    except KeyboardInterrupt:
        _err("quiz interrupted; every answer graded so far is saved")
        return 130
    return run.exit_code


def _add_dojo_question_parsers(dsub) -> None:
    what = "the question: 1-6, q1-q6 or its name (see `handgrad dojo list`)"
    where = "where your progress is kept (default: here)"
    q = dsub.add_parser("ask", help="show one of the lecture's six questions (and its experiment with --png)")
    q.add_argument("question", help=what)
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--png", metavar="OUT.png", help="run the question's live experiment and draw it")
    q.add_argument("--hint", action="store_true", help="the next of three hints (counted in your progress)")
    q.add_argument("--explain", action="store_true", help="the explanation")
    q.set_defaults(func=_cmd_dojo_ask)
    q = dsub.add_parser("answer", help="grade an answer to a question: exit 0 right, 1 wrong, 2 cannot grade",
                        description="Grade an answer: the parts separated by ';' (or given as separate "
                        "arguments), or some parts by name (mul.da=15). A wrong part is diagnosed and the "
                        "next of three hints shown.")
    q.add_argument("question", help=what)
    q.add_argument("answer", nargs="+", help="the answer, e.g. 5 5 15 10, or 'dy.expand_as(x); ...' (put -- "
                   "before an answer that starts with '-')")
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--json", action="store_true", help="print JSON instead of the text")
    q.set_defaults(func=_cmd_dojo_answer)
    q = dsub.add_parser("quiz", help="walk through the six questions (interactive, or --answer for scripts)",
                        description="Ask each question not yet done, part by part ('?' for a hint, "
                        "'explain', 'skip', 'quit'); with --answer, grade the given answers and ask nothing.")
    q.add_argument("--answer", "-a", action="append", metavar="Q=ANSWER", help="an answer to grade "
                   "(repeatable), e.g. -a '1=5; 5; 15; 10' -a '4=a; b; 0.19'")
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--png", metavar="DIR", help="write each answered question's experiment picture here")
    q.add_argument("--all", action="store_true", help="ask the questions done already too")
    q.set_defaults(func=_cmd_dojo_quiz)
# ---- end dojo questions
# ---- end dojo


# ---------------------------------------------------------------------------- main
UNFINISHED_HELP = ("use a checkpoint whose training has not finished (batchnorm uses its running "
                   "statistics)")


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
    p.add_argument("--allow-unfinished", action="store_true", help=UNFINISHED_HELP)
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("eval", help="train/val/test loss of a checkpoint",
                       description="Evaluate a finished checkpoint on the train, val and test splits.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--data", help="data file (default: the bundled names.txt; required for a run trained "
                   "on its own data file)")
    p.add_argument("--allow-unfinished", action="store_true", help=UNFINISHED_HELP)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("check", help="verify every gradient of the lecture's graph",
                       description="Run the lecture's atomic graph (n_hidden 64, batch 32) on a seeded "
                       "batch, compare all 26 hand-written gradients with autograd, the closed forms with "
                       "the atomic chain, and everything with float64 finite differences. Exit 1 on failure.")
    p.add_argument("--dtype", choices=tuple(train.DTYPES), default="float32",
                   help="dtype of the comparison with autograd (default %(default)s)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the init and the batch (default %(default)s)")
    p.add_argument("--model", choices=models.MODELS,
                   help="instead: check every parameter gradient of this model (check_model) at its init")
    p.add_argument("--checkpoint", metavar="DIR", help="instead: check a saved model's gradients where it is")
    p.add_argument("--data", help="names file of the --model/--checkpoint batch (default: the run's, or the "
                   "bundled names)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of --model/--checkpoint (default 32)")
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
    p.add_argument("--data", help="data file (default: the bundled names.txt; required for a run trained "
                   "on its own data file)")
    p.set_defaults(func=_cmd_diagnose)
    # ---- end diagnose: parser
    _add_dojo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes to its ranks
        return args.func(args)
    except (DataError, CheckpointError, UsageError, BudgetError, io.OutputError,
            train.EngineUnavailable) as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:  # while loading, evaluating or saving (the loop has its own message)
        _err("interrupted; files are written atomically, so any checkpoint on disk is complete")
        return 130
    except BrokenPipeError:  # `handgrad sample | head`: the reader has what it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error when stdout is flushed
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
