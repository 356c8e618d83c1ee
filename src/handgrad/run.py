"""A run directory's whole life as library calls, the same from `handgrad train` and from a notebook: a
new run or a resumed one (with the changes a resume may make), the data's identity, the directory's
lock, periodic and final checkpoints, calibration, the final evaluation, samples, diagnostics, and N
data-parallel ranks; and what `sample`, `eval`, `check --checkpoint` and `diagnose` read from a run.
It never prints and never reads a command line: bad input raises a config.ConfigError naming the
config fields concerned (config.ref), a run that stops early raises Stopped, and progress, warnings and
notes go to the Events callbacks.

    r = run.new(models.preset("wavenet"), TrainConfig.for_model("wavenet", steps=5_000),
                RunConfig(out="runs/w"))
    done = run.go(r).finished          # done.results["val"], done.samples()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from handgrad import budget, checkpoint, data, diagnostics, engines, io, makemore, models, preflight, train
from handgrad.checkpoint import Checkpoint, CheckpointError
from handgrad.config import (
    REQUIRED,
    ConfigError,
    Expect,
    OneOf,
    named,
    option,
    options,
    ref,
    validate,
)
from handgrad.data import DataError
from handgrad.engines import parallel
from handgrad.layers import numel
from handgrad.models import ModelConfig
from handgrad.train import DTYPES, MAX_SEED, NonFiniteError, TrainConfig

DEFAULT_OUT = "runs/{model}"
# The splits a finished run reports, and the one evaluated every eval_every steps, by data kind: the
# lectures' val split; makemore's test split (its data has no val split).
FINAL_SPLITS = {"context": ("train", "val"), "sequence": ("train", "test")}
EVAL_SPLIT = {"context": "val", "sequence": "test"}
EVALS = "evals.json"  # the periodic evaluations of a run: [{"step": int, "<split>": loss}, ...]
UNFINISHED_HELP = "use a checkpoint whose training has not finished (batchnorm uses its running statistics)"
DATA_HELP = "data file (default: the bundled names.txt; required for a run trained on its own data file)"


def _positive(what: str) -> Expect:
    return Expect(lambda v: v >= 1, f"a positive number of {what}")


@dataclass(frozen=True)
class RunConfig:
    """Train a makemore model with hand-written backward passes (no autograd), save checkpoints, then print
    train/val loss and samples. Defaults reproduce the lectures: 200,000 steps, batch 32, lr 0.1 then 0.01
    from step 100,000 (mlp) or 150,000 (deep, wavenet)."""

    # where a run reads and writes and how it runs, beside the model's and the training's configs

    data: str | None = option(None, "UTF-8 text file, one item per line (default: bundled names.txt)")
    out: str | None = option(None, "checkpoint directory (default: runs/{model}, or the --resume DIR)")
    resume: str | None = option(None, "continue the run saved in DIR (its flags are kept; --steps may extend "
                                "it; --lr, --lr-decayed and --lr-decay-step may change the schedule from the "
                                "checkpoint's step on, recorded in meta.json's lr_history)", metavar="DIR")
    force: bool = option(False, "replace the run that --out already holds (a new run, or --resume DIR --out "
                         "OTHER)")
    nproc: int | None = option(None, "data-parallel training in N local processes (gloo on 127.0.0.1, "
                               "synchronized batchnorm); under torchrun leave it out", _positive("processes"),
                               metavar="N", group="optimisation")
    samples: int = option(10, "names to sample at the end (default {default})",
                          Expect(lambda v: v >= 0, "0 (none) or a positive number of names"), group="output")
    threads: int = option(1, "PyTorch CPU threads (default {default}: the step's tensors are tiny, and more "
                          "threads only add overhead)", _positive("threads"), group="output")
    verify_autograd: int | None = option(None, "instead of training: run STEPS steps with the hand-written "
                                         "gradients and with autograd from the same init on the same "
                                         "batches, and print how far the two loss curves ever are apart",
                                         _positive("steps"), metavar="STEPS", group="output")
    diagnostics: bool = option(False, "measure gradient health on a fixed probe during training "
                               "(hand-written backward, no autograd); write PNGs and diagnostics.json into "
                               "OUT/diagnostics/ and print warnings", group="diagnostics")
    diag_every: int | None = option(None, "steps between measurements, a multiple of --chunk-steps (default "
                                    "5000; implies --diagnostics)", metavar="N", group="diagnostics")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def diagnosing(self) -> bool:
        return self.diagnostics or self.diag_every is not None


@dataclass(frozen=True)
class Events:
    """What a run reports, all optional. warn(line) and note(line): one line each, a config field named
    as field_name(field) says (default: its name; the CLI: its flag); on_start(Started) once before
    training: whatever it returns, if callable, is called with the train.Progress after every chunk,
    and closed (if it has close()) when training ends."""

    warn: Callable[[str], None] = lambda line: None
    note: Callable[[str], None] = lambda line: None
    on_start: Callable[[Started], object] | None = None
    field_name: Callable[[str], str] = str

    def warning(self, text: str) -> None:
        self.warn(named(text, self.field_name))

    def notice(self, text: str) -> None:
        self.note(named(text, self.field_name))


SILENT = Events()  # reports nothing


@dataclass(frozen=True)
class Started:
    """The run about to train: for a header line (str()) and a progress bar."""

    model: str | None  # the preset's name (None: a model of the user's own)
    params: int
    examples: int
    engine: str
    dtype: str
    step: int  # the step it starts from
    steps: int  # the step it trains to
    out: Path

    def __str__(self) -> str:
        return (f"training {self.model or 'a'} model, {self.params:,} parameters on {self.examples:,} "
                f"examples ({self.engine} engine, {self.dtype}), from step {self.step:,} to {self.steps:,}; "
                f"checkpoints in {self.out}/")


@dataclass
class Run:
    """A run ready to train: its checkpoint (configs, vocabulary, data identity, state), the splits,
    the directory it writes (`out`), the directory it was resumed from, and the run's RunConfig."""

    ckpt: Checkpoint
    splits: data.Splits
    out: Path
    opts: RunConfig
    resumed_from: Path | None = None


@dataclass
class Finished:
    """A run that trained here to its last step and saved: its results and what to print about them."""

    ckpt: Checkpoint
    out: Path
    loop_seconds: float
    engine: str
    n_samples: int

    @property
    def results(self) -> dict:
        return self.ckpt.results

    @property
    def bn_stats(self) -> str:
        return self.ckpt.train_config.bn_stats if self.ckpt.state.model.buffers() else "no batchnorm"

    def samples(self) -> list[str]:
        """n_samples names from the finished model, with the run's sampling seed (its seed + 10)."""
        return draw(self.ckpt, self.n_samples, self.ckpt.train_config.seed + 10) if self.n_samples else []

    def lines(self):
        """What `handgrad train` prints at the end, line by line (the samples drawn as they are shown)."""
        t, res = self.loop_seconds, self.results
        first, second = FINAL_SPLITS[models.kind(self.ckpt.model_config)]
        best = (f"; best {EVAL_SPLIT[models.kind(self.ckpt.model_config)]} loss {res['best']:.4f} at step "
                f"{res['best_step']:,}" if res.get("best") is not None else "")
        yield (f"step {self.ckpt.state.step}: {first} loss {loss_text(res[first])}, {second} loss "
               f"{loss_text(res[second])}{best} (batchnorm stats: {self.bn_stats}; training loop "
               f"{f'{t:.1f}s' if t < 120 else f'{t / 60:.1f}min'}, {self.engine} engine)")
        if self.n_samples:
            yield "samples:"
            yield from (f"  {s}" for s in self.samples())
        out = self.out
        yield f"saved to {out}/  (handgrad sample --checkpoint {out}; handgrad eval --checkpoint {out})"


@dataclass
class Outcome:
    """How `go` ended: the exit code, one line to report ("" when nothing), and the finished run when it
    trained in this process (None for the --nproc launcher and for ranks other than 0)."""

    code: int
    message: str = ""
    finished: Finished | None = None


class Stopped(Exception):
    """Training stopped before its last step: `code` 1 (diverged, a save failed, a peer was lost) or 130
    (interrupted); `message` says why and which checkpoint is kept (fields named with config.ref);
    `resume` is the directory to continue from (None when there is nothing to continue)."""

    def __init__(self, code: int, message: str, resume: Path | None = None):
        super().__init__(named(message))
        self.code, self.message, self.resume = code, message, resume


def loss_text(value: float | None) -> str:
    return "n/a (empty split)" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------- data
def load_splits(path: str | None, block_size: int, split_seed: int, vocab: data.Vocab | None = None,
                warn=None, fits=None, kind: str = "context") -> data.Splits:
    """Read the data file (None: bundled names.txt) and build the splits of the data kind `kind`
    (data.KINDS). `fits(n_examples, vocab_size)` is called before the examples are built, to refuse a
    run that cannot fit in memory."""
    words = data.read_words(path or data.default_data_path())
    if fits is not None:
        fits(sum(len(w) + 1 for w in words.items),
             len(vocab) if vocab is not None else len(set().union(*words.items)) + 1)
    if words.blank_lines and warn:
        warn(f"{path or 'names.txt'}: skipped {words.blank_lines} blank line(s)")
    if vocab is not None:
        extra = sorted(set("".join(words.items)) - set(vocab.itos))
        if extra:
            raise DataError(f"{path}: characters {''.join(extra)!r} are not in the checkpoint's vocabulary "
                            f"({''.join(vocab.itos)!r}); use the data the model was trained on")
    splits = data.KINDS[kind](words.items, block_size, split_seed, vocab)
    if splits.Xtr.shape[0] == 0:
        raise DataError(f"{path or 'names.txt'}: {len(words.items)} item(s) leave no training examples "
                        "after the 80/10/10 split; give at least 1 item for training")
    return splits


def _data_name(path: str | None) -> str:
    return "names.txt (bundled)" if path is None else data.show_path(path)


def data_identity(path: str | None) -> tuple[str | None, str]:
    """(the path to record in meta.json, checkpoint.data_fingerprint of the items) for the data at
    `path`: None stands for the bundled names, also when they are named explicitly; a file is
    recorded by its real path (/dev/stdin redirected from a file records that file)."""
    words = data.read_words(path or data.default_data_path())
    recorded = None if path is None or data.same_data(path, None) else (words.source or path)
    return recorded, checkpoint.data_fingerprint(words.items)


def run_data(ck: Checkpoint, ckdir: str | Path, given: str | None) -> str | None:
    """The data file to read for a saved run: the one the user names; else the bundled names (None)
    for a run trained on them; else the file meta.json records, used only while it still holds exactly
    the run's data (its fingerprint matches data_sha256). A checkpoint from elsewhere may name any
    file, so nothing read from that file is reported: every problem gives the same line."""
    if given is not None:
        return given
    if ck.data_path is None:
        return None
    try:
        if ck.data_sha256 is not None and data_identity(ck.data_path)[1] == ck.data_sha256:
            return ck.data_path
    except DataError:
        pass
    raise ConfigError(f"{ckdir}: the run was trained on a data file of its own, and the file meta.json "
                      "records is missing, changed or unreadable; name the run's data with "
                      f"{ref('data')} FILE")


def splits_of(ck: Checkpoint, ckdir: str | Path, given: str | None) -> data.Splits:
    """The splits a saved run was trained on (run_data's file)."""
    return load_splits(run_data(ck, ckdir, given), ck.block_size, ck.train_config.split_seed, ck.vocab,
                       kind=models.kind(ck.model_config))


def _same_data(ck: Checkpoint, ckdir: str | Path, path: str | None) -> tuple[str | None, str]:
    """data_identity of the data at `path` (None: bundled), which must be the run's training data
    where the checkpoint records its fingerprint."""
    recorded, fingerprint = data_identity(path)
    if ck.data_sha256 is not None and fingerprint != ck.data_sha256:
        what = f"{ref('data')} {data.show_path(path)}" if path is not None else "the bundled names.txt"
        raise ConfigError(f"{what}: not the data the run in {ckdir} was trained on (its sha256 differs from "
                          "meta.json's data_sha256); give the run's own data file")
    return recorded, fingerprint


# ---------------------------------------------------------------------------- a new run, a resumed one
def configs(model: dict, training: dict) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a new run from the fields given: the preset model["name"] (default: ModelConfig's)
    with the model values, and that preset's training defaults with the training values."""
    model = dict(model)
    name = model.pop("name", ModelConfig().name)
    return models.preset(name, **model), TrainConfig.for_model(name, **training)


def new(mcfg: ModelConfig, tcfg: TrainConfig, opts: RunConfig = RunConfig(), events: Events = SILENT) -> Run:
    """A fresh run of these configs: the data is read and checked (and the memory the run needs) before
    any directory is created; the model's vocabulary size is the data's."""
    _begin(opts, tcfg, mcfg)
    if tcfg.makemore_rng and models.kind(mcfg) != "sequence":
        zoo = ", ".join(p.name for p in models.PRESETS.values() if p.data == "sequence")
        raise ConfigError(f"{ref('makemore_rng')} draws as makemore.py does for the zoo's models ({zoo}); "
                          f"model {mcfg.name} reads the lectures' context windows: leave it off")
    splits = load_splits(opts.data, mcfg.block_size, tcfg.split_seed, warn=events.warning,
                         fits=lambda n, v: budget.check_train(dataclasses.replace(mcfg, vocab_size=v),
                                                              tcfg, n, data=_data_name(opts.data)),
                         kind=models.kind(mcfg))
    mcfg = dataclasses.replace(mcfg, vocab_size=len(splits.vocab))
    data_path, fingerprint = data_identity(opts.data)  # data_path None: the bundled names
    state = train.state_of_splits(mcfg, tcfg, splits)
    ck = Checkpoint(mcfg, tcfg, splits.vocab, data_path, state, None, {}, mcfg.block_size, fingerprint,
                    [checkpoint.lr_settings(tcfg, 0)])
    launched = os.environ.get(parallel.LAUNCHED_ENV) is not None  # a --nproc rank: its launcher warned
    preflight.check(ck.state.model, mcfg, tcfg, splits.Xtr, splits.Ytr,
                    (lambda line: None) if launched else events.warning)
    return Run(ck, splits, Path(opts.out or DEFAULT_OUT.format(model=mcfg.name)), opts)


def resume(directory: str | Path, changes: dict | None = None, opts: RunConfig = RunConfig(),
           events: Events = SILENT) -> Run:
    """The run saved in `directory`, to continue. `changes` may set the TrainConfig fields a resume may
    change (their Option.resume is "kept": kept unless given; "given": the new value or the default);
    any other field of ModelConfig or TrainConfig is refused. The learning-rate history records a new
    schedule from the checkpoint's step on."""
    changes = dict(changes or {})
    ck = checkpoint.load(directory)
    may = {k for k, o in options(TrainConfig).items() if o.resume != "fixed"}
    fixed = [k for k in changes if k not in may]
    if fixed:
        allowed = ", ".join(ref(k) for k in options(TrainConfig) if k in may)
        raise ConfigError(f"{ref(fixed[0])} cannot be changed when resuming; the run keeps the flags saved "
                          f"in {directory} (only {allowed}, {ref('out')} and output flags may be given)")
    tc = ck.train_config
    _begin(opts, tc, ck.model_config)
    path = run_data(ck, directory, opts.data)
    ck.data_path, ck.data_sha256 = _same_data(ck, directory, path)
    if changes.get("steps", ck.state.step) < ck.state.step:
        raise ConfigError(f"{ref('steps')} {changes['steps']} is below the checkpoint's step {ck.state.step}")
    fresh = {k: getattr(TrainConfig(), k) for k, o in options(TrainConfig).items() if o.resume == "given"}
    ck.train_config = dataclasses.replace(tc, **{**fresh, **changes})
    ck.lr_history = lr_history(ck.lr_history, ck.train_config, ck.state.step)
    fits = None if ck.model_config is None else (
        lambda n, v: budget.check_train(ck.model_config, ck.train_config, n, data=_data_name(path)))
    kind = models.kind(ck.model_config)
    splits = load_splits(path, ck.block_size, tc.split_seed, ck.vocab, events.warning, fits, kind)
    return Run(ck, splits, Path(opts.out or directory), opts, Path(directory))


# Why diagnostics cannot measure a model, by data kind: its probes read the lectures' (N, V) logits.
NOT_DIAGNOSED = {"sequence": "diagnostics measure the lectures' context-window models ((N, V) logits, "
                             "batchnorm); the makemore zoo's sequence models are not measured yet"}


def _diagnosable(mcfg: ModelConfig | None, where: str, advice: str) -> None:
    why = NOT_DIAGNOSED.get(models.kind(mcfg))
    if why:
        raise ConfigError(f"{where}: {why} ({mcfg.name}); {advice}")


def _begin(opts: RunConfig, tcfg: TrainConfig, mcfg: ModelConfig | None = None) -> None:
    """What holds before any work: torch's threads, a model diagnostics can measure, and a diagnostics
    interval the chunks can keep."""
    if opts.diagnosing:
        _diagnosable(mcfg, ref("diagnostics"), f"leave out {ref('diagnostics')}")
    every = opts.diag_every if opts.diag_every is not None else diagnostics.DiagConfig().every
    if opts.diagnosing and (every < 1 or every % tcfg.chunk_steps):
        raise ConfigError(f"{ref('diag_every')} {every}: must be a positive multiple of {ref('chunk_steps')} "
                          f"({tcfg.chunk_steps})")
    torch.set_num_threads(opts.threads)


def lr_history(history: list[dict], tcfg: TrainConfig, step: int) -> list[dict]:
    """The learning-rate settings in force from each step, with `tcfg`'s from `step` on (an entry
    for the same step is replaced; unchanged settings add nothing)."""
    history = list(history) or [checkpoint.lr_settings(tcfg, 0)]
    new_entry = checkpoint.lr_settings(tcfg, step)
    last = history[-1]
    if all(last[k] == new_entry[k] for k in checkpoint.LR_FIELDS):
        return history
    if last["from_step"] == step:
        return [*history[:-1], new_entry]
    return [*history, new_entry]


# ---------------------------------------------------------------------------- training it
def go(run: Run, events: Events = SILENT, command: Sequence[str] = ()) -> Outcome:
    """Train `run` to its last step in the way RunConfig says: in this process, or as one of
    `nproc` local ranks (`command`: the arguments of `python -m handgrad` that start this run, which
    the launcher runs in each rank) or of torchrun's; saving into run.out (locked while it writes)."""
    comm = _ranks(run, command)
    if isinstance(comm, Outcome):
        return comm
    model, tcfg = run.ckpt.state.model, run.ckpt.train_config
    if comm is not None:
        plan = engines.plan(model, tcfg, comm, run.opts.threads)
        if not comm.is_main:  # ranks > 0 train silently; rank 0 reports and saves
            return _follow(run, plan)
    with _output_dir(run) as lock:  # noqa: F841 - held while the run writes
        if comm is None:
            plan = engines.plan(model, tcfg, None, run.opts.threads)
        return _train(run, plan, engines.title(plan, model, comm), events)


# Why a run cannot be data-parallel, as rules: (refused?, why). One process measures diagnostics.
def _refusals(run: Run) -> list[tuple[bool, str]]:
    return [(run.opts.diagnosing, f"{ref('diagnostics')} measures one process; leave out {ref('nproc')} (or "
                                  "run without torchrun)")]


def _ranks(run: Run, command: Sequence[str]) -> parallel.Comm | Outcome | None:
    """None: one process. An Outcome: the --nproc launcher ran its ranks, or this rank (> 0) is refused
    quietly (rank 0 says why). A Comm: this process is a rank of the data-parallel group."""
    opts, tcfg, state = run.opts, run.ckpt.train_config, run.ckpt.state
    env = parallel.RankEnv.from_env()
    quiet = env is not None and env.rank != 0  # bad input: one line, not one per rank
    try:
        timeout = parallel.timeout_seconds()
        launched = env is not None and os.environ.get(parallel.LAUNCHED_ENV) == str(opts.nproc)
        if opts.nproc is not None and env is not None and not launched:
            raise ConfigError(f"{ref('nproc')} starts its own processes; under torchrun (RANK and WORLD_SIZE "
                              "are set) leave it out")
        world = opts.nproc if opts.nproc is not None else env.world_size if env is not None else 1
        if world == 1:
            return None
        why = next((why for refused, why in _refusals(run) if refused), None)
        if why:
            raise ConfigError(why)
        if tcfg.engine == "fast" and (reason := engines.program_ready(state.model)):
            raise engines.unavailable(reason)
        if not launched and env is None:
            budget.check_ranks(world, parallel.cores(), run.ckpt.model_config, tcfg,
                               sum(run.splits.sizes().values()))
        parallel.shard(tcfg.batch_size, world, 0)
        if not launched and env is None:
            if not command:
                raise ConfigError(f"{ref('nproc')} starts `handgrad train` in {world} processes: run it from "
                                  "the command line")
            with _output_dir(run) as lock:  # held (with the ranks) until the last of them ends
                outcome = parallel.launch(list(command), world, timeout, lock.fd)
            return Outcome(outcome.code, outcome.message)
        device = next(iter(state.model.params().values())).device.type
        try:
            comm = parallel.init(env, device, timeout)
            parallel.check_same(comm, state, tcfg, run.splits.Xtr, run.splits.Ytr)
        except parallel.PeerLost as e:
            return Outcome(1, str(e))
    except ConfigError:
        if quiet:
            return Outcome(2)
        raise
    return comm


def _follow(run: Run, plan: engines.Plan) -> Outcome:
    """Train as a rank other than 0: no progress, no checkpoints, nothing to report but a lost peer."""
    ck = run.ckpt
    try:
        train.train(run.splits, ck.model_config, ck.train_config, ck.state, None, plan.steps)
    except parallel.PeerLost as e:
        return Outcome(1, str(e))
    except NonFiniteError:  # rank 0 reports it; every rank sees the same summed buffer
        return Outcome(1)
    except KeyboardInterrupt:
        return Outcome(130)
    return Outcome(0)


def _output_dir(run: Run) -> io.RunLock:
    """The run directory, checked before any work is spent: created if needed and writable (else
    OutputError), locked against a second writer, cleared of temp files a killed run left, and not
    holding another run unless `force` (or it is the run being resumed)."""
    out = run.out
    io.prepare_dir(out, "out")
    lock = io.RunLock(out, "out", parallel.inherited_lock()).acquire()
    try:
        io.clean_temp_files(out)
        same = run.resumed_from is not None and _same_dir(out, run.resumed_from)
        if (out / checkpoint.META).exists() and not same and not run.opts.force:
            hint = f"continue it with {ref('resume')} {out}, " if run.resumed_from is None else ""
            raise ConfigError(f"{ref('out')} {out} already holds a run; {hint}choose another {ref('out')}, "
                              f"or add {ref('force')} to replace it")
        if run.opts.diagnosing:
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


class SaveError(Exception):
    """A checkpoint that could not be written mid-run (disk full, directory removed...)."""


def save(out: Path, ckpt: Checkpoint) -> None:
    """checkpoint.save, an OSError as a SaveError saying which step could not be written where."""
    try:
        checkpoint.save(out, ckpt)
    except OSError as e:
        raise SaveError(f"cannot write the checkpoint of step {ckpt.state.step} to {out}/ "
                        f"({io.describe(e)})") from None


def _train(run: Run, plan: engines.Plan, engine: str, events: Events) -> Outcome:
    """Train the run's state to its train_config's steps with `plan`, saving into run.out (locked by
    the caller): every checkpoint_every steps and at the end, with the inference statistics and the
    train and val losses."""
    ckpt, splits, out, opts = run.ckpt, run.splits, run.out, run.opts
    mcfg, tcfg, state = ckpt.model_config, ckpt.train_config, ckpt.state
    if plan.warning:
        events.warning(plan.warning)
    started = Started(mcfg.name if mcfg else None, numel(state.model), splits.Xtr.shape[0], engine,
                      tcfg.dtype, state.step, tcfg.steps, out)
    callbacks = [cb for cb in [events.on_start and events.on_start(started)] if callable(cb)]
    resumed_here = run.resumed_from is not None and _same_dir(out, run.resumed_from)
    last_saved = [state.step if resumed_here else None]  # the step of the newest checkpoint in `out`
    since = [state.step]  # the step of the last save, or of the start

    def save_periodically(pr: train.Progress) -> None:
        if pr.state.step - since[0] >= tcfg.checkpoint_every or pr.state.step == tcfg.steps:
            save(out, ckpt)
            last_saved[0] = since[0] = pr.state.step

    evals = _Evaluations(run, events)
    callbacks.append(save_periodically)
    if tcfg.eval_every:
        callbacks.insert(len(callbacks) - 1, evals)  # before the save: a kill leaves both consistent
    steps_fn = plan.steps
    if opts.diagnosing:
        diag = _Diagnostics(run, events)
        callbacks.append(diag)  # its close() writes the report, whatever way training ends
        steps_fn = diag.collector.watch(steps_fn)  # records a NonFiniteError for the report

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
        raise Stopped(1, f"training diverged at step {e.step}: {e.tensor} is NaN or infinite; {kept()}. "
                      f"Try a smaller {ref('lr')} or check the init.") from None
    except KeyboardInterrupt:
        raise Stopped(130, f"interrupted; {kept()}", out if last_saved[0] is not None else None) from None
    except SaveError as e:
        raise Stopped(1, f"{e}; {kept()}") from None
    except parallel.PeerLost as e:
        raise Stopped(1, f"{e}; {kept()}", out if last_saved[0] else None) from None
    loop_time = time.perf_counter() - t0

    ckpt.state = state
    ckpt.inference = train.inference_buffers(state, splits, tcfg)
    kind = models.kind(mcfg)
    with torch.no_grad():
        results = {split: models.evaluate(ckpt.inference_model(), *splits.split(split))
                   for split in FINAL_SPLITS[kind]}
    ckpt.results = {**results, **evals.best(), "loop_seconds": loop_time, "engine": engine}
    try:
        save(out, ckpt)
    except SaveError as e:
        raise Stopped(1, f"{e}; {kept()}") from None
    if results.get("val", 0.0) is None:
        events.warning(f"the val split is empty ({len(splits.vocab)}-character data with too few "
                       "items); no val loss to report")
    uniform = math.log(len(splits.vocab))  # the loss of guessing every character equally
    if results["train"] > uniform + 1.0:
        events.warning(f"the final train loss {results['train']:.4g} is far above {uniform:.2f}, the loss "
                       f"of a uniform guess: training did not learn; try a smaller {ref('lr')} (this run: "
                       f"{tcfg.lr:g})")
    return Outcome(0, "", Finished(ckpt, out, loop_time, engine, opts.samples))


class _Evaluations:
    """The train callback of TrainConfig.eval_every: the loss of the kind's EVAL_SPLIT (the whole
    split) each time training passes a multiple of eval_every steps, kept in run.out/evals.json (a
    resumed run continues the list it finds in the directory it resumes from); best() is the lowest.
    With makemore_rng the loss is makemore.py's evaluate() (10 shuffled batches of 100, drawn from its
    stream) after 1 + a multiple of eval_every steps, as makemore's loop counts its step index from 0."""

    def __init__(self, run: Run, events: Events):
        self.run, self.events = run, events
        ck = run.ckpt
        self.split = EVAL_SPLIT[models.kind(ck.model_config)]
        self.every = ck.train_config.eval_every
        self.history = _read_evals(run.resumed_from, ck.state.step) if run.resumed_from else []
        self.done = ck.state.step
        self.stream = None
        if ck.train_config.makemore_rng and self.every:
            self.stream = train.makemore_eval_stream(ck.model_config, ck.train_config,
                                                     sum(run.splits.n_items), self.done)

    def _loss(self) -> tuple[float | None, str]:
        """(the loss, what to say beside it)."""
        model, splits = self.run.ckpt.state.model, self.run.splits
        if self.stream is None:
            return models.evaluate(model, *splits.split(self.split)), ""
        n = {s: splits.split(s)[0].shape[0] for s in ("train", "test")}

        def rows_loss(split: str, rows: torch.Tensor) -> float:
            X, Y = splits.split(split)
            return models.evaluate(model, X[rows], Y[rows])

        train_loss, test_loss = self.stream.evaluate(rows_loss, n["train"], n["test"], self.done)
        return test_loss, f" (train {loss_text(train_loss)}; makemore's evaluate(), its step {self.done - 1})"

    def _due(self, step: int) -> bool:
        if self.stream is not None:  # exactly where makemore's loop evaluates (chunks end there)
            return step > self.done and makemore.is_eval(step - 1, self.every)
        return bool(self.every) and step // self.every != self.done // self.every

    def __call__(self, pr: train.Progress) -> None:
        step = pr.state.step
        if not self._due(step):
            return
        self.done = step
        with torch.no_grad():
            loss, aside = self._loss()
        if loss is None:
            return
        self.history.append({"step": step, self.split: loss})
        io.atomic_write_bytes(self.run.out / EVALS, (json.dumps(self.history, indent=1) + "\n").encode())
        self.events.notice(f"step {step:,}: {self.split} loss {loss:.4f}{aside}")

    def best(self) -> dict:
        """{"best": the lowest loss, "best_step": its step} ({} when nothing was evaluated)."""
        if not self.history:
            return {}
        top = min(self.history, key=lambda e: e[self.split])
        return {"best": top[self.split], "best_step": top["step"]}


def _read_evals(directory: Path, step: int) -> list[dict]:
    """The evaluations saved in `directory` up to `step`: entries that are not {"step": int, split:
    finite number} are dropped (the file is the run's own, but read as untrusted)."""
    try:
        entries = json.loads(io.read_inside(Path(directory), EVALS, 1 << 24))
    except (OSError, ValueError, RecursionError):
        return []
    good = []
    for e in entries if isinstance(entries, list) else []:
        if (isinstance(e, dict) and len(e) == 2 and isinstance(e.get("step"), int) and 0 < e["step"] <= step
                and all(isinstance(v, float) and math.isfinite(v) for k, v in e.items() if k != "step")):
            good.append(e)
    return good


class _Diagnostics:
    """The train callback of RunConfig.diagnostics: measures every diag_every steps, saves the history
    with each checkpoint, and on close() writes the PNGs and diagnostics.json and reports the warnings."""

    def __init__(self, run: Run, events: Events):
        tcfg, state = run.ckpt.train_config, run.ckpt.state
        cfg = diagnostics.DiagConfig()
        every = run.opts.diag_every if run.opts.diag_every is not None else cfg.every
        saved = run.resumed_from / "diagnostics" / diagnostics.HISTORY_FILE if run.resumed_from else None
        history = diagnostics.history_until(saved, state.step)
        self.dg, self.state, self.out, self.events = diagnostics, state, run.out / "diagnostics", events
        self.collector = diagnostics.Collector(run.splits.Xtr, run.splits.Ytr, run.ckpt.model_config, tcfg,
                                               dataclasses.replace(cfg, every=every), history)
        self.collector.record(state.model, state.step)
        self.saved, self.every_save, self.closed = state.step, tcfg.checkpoint_every, False

    def __call__(self, pr: train.Progress) -> None:
        self.collector(pr)
        if pr.state.step - self.saved >= self.every_save:  # keep the history with the checkpoints
            c = self.collector
            summary = self.dg.summary(c.history, [], c.warnings(), c.cfg)
            self.dg.write_json(self.out / self.dg.HISTORY_FILE, summary)
            self.saved = pr.state.step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        report = self.dg.write_report(self.out, self.collector, self.state.model, self.state.step,
                                      self.state.losses)
        failed = [c for c in report.checks if c.failed]
        for w in report.warnings:
            self.events.warning(str(w))
        for c in failed:
            self.events.warning(f"sanity check {c}; {c.detail}")
        self.events.notice(f"diagnostics: {len(report.warnings)} warning(s), {len(failed)} failed "
                           f"check(s); PNGs and diagnostics.json in {self.out}/")


# ---------------------------------------------------------------------------- reading a saved run
def load_finished(path: str | Path, allow_unfinished: bool = False, events: Events = SILENT) -> Checkpoint:
    """A finished checkpoint, or with `allow_unfinished` any checkpoint (batchnorm then uses its
    running statistics, with a warning)."""
    ck = checkpoint.load(path)
    if ck.state.model.buffers() and ck.inference is None:
        if not allow_unfinished:
            raise ConfigError(f"{path}: training has not finished (step {ck.state.step} of "
                              f"{ck.train_config.steps}); continue it with: handgrad train {ref('resume')} "
                              f"{path}, or add {ref('allow_unfinished')} to use it as it is")
        events.warning(f"{path}: unfinished run (step {ck.state.step} of {ck.train_config.steps}); "
                       "batchnorm uses its running statistics")
    return ck


def draw(ck: Checkpoint, n: int, seed: int, where: str = "the model") -> list[str]:
    """n names sampled from the checkpoint's inference model."""
    try:
        with torch.no_grad():
            sampler = models.SAMPLERS[models.kind(ck.model_config)]
            ids = sampler(ck.inference_model(), ck.block_size, n=n, seed=seed)
    except RuntimeError as e:  # torch.multinomial refuses NaN/inf probabilities
        if "probability" not in str(e):
            raise
        raise CheckpointError(f"{where}: the model's output probabilities are not finite (its parameters "
                              "overflow the softmax); it cannot be sampled") from None
    return [ck.vocab.decode(s) for s in ids]


@dataclass(frozen=True)
class SampleConfig:
    """Sample from a finished checkpoint, one item per line."""

    checkpoint: str = option(REQUIRED, "checkpoint directory", metavar="DIR")
    n: int = option(20, "how many samples (default {default})", _positive("samples"), flag="-n")
    seed: int = option(2147483657, "sampling seed (default {default})",
                       Expect(lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"))
    allow_unfinished: bool = option(False, UNFINISHED_HELP)

    def __post_init__(self) -> None:
        validate(self)


def sample(cfg: SampleConfig, events: Events = SILENT) -> list[str]:
    """`handgrad sample`: cfg.n names from a finished checkpoint, refused before drawing when they
    cannot fit in memory."""
    ck = load_finished(cfg.checkpoint, cfg.allow_unfinished, events)
    dtype_bytes = next(iter(ck.state.model.params().values())).element_size()
    try:  # the quick upper bound first; the exact size (slower to work out) only when that fails
        bound = budget.size_bounds(ck.model_config)[1] if ck.model_config else 0
        budget.check_samples(cfg.n, ck.block_size, len(ck.vocab), bound, dtype_bytes)
    except budget.BudgetError:
        per_example = budget.model_sizes(ck.model_config)[1]
        budget.check_samples(cfg.n, ck.block_size, len(ck.vocab), per_example, dtype_bytes)
    return draw(ck, cfg.n, cfg.seed, cfg.checkpoint)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a finished checkpoint on the train, val and test splits."""

    checkpoint: str = option(REQUIRED, "checkpoint directory", metavar="DIR")
    data: str | None = option(None, DATA_HELP)
    allow_unfinished: bool = option(False, UNFINISHED_HELP)


@dataclass(frozen=True)
class Evaluation:
    where: str  # the checkpoint directory
    ckpt: Checkpoint
    losses: dict[str, tuple[float | None, int]]  # split -> (mean loss or None when empty, examples)

    def __str__(self) -> str:
        ck = self.ckpt
        head = (f"checkpoint {self.where}: step {ck.state.step}, {numel(ck.state.model):,} parameters, "
                f"batchnorm stats: {ck.train_config.bn_stats}")
        return "\n".join([head, *(f"{s:>5} loss {loss_text(v)}  ({n:,} examples)"
                                 for s, (v, n) in self.losses.items())])


def evaluate(cfg: EvalConfig, events: Events = SILENT) -> Evaluation:
    """`handgrad eval`: the train, val and test loss of a finished checkpoint, on its own data."""
    ck = load_finished(cfg.checkpoint, cfg.allow_unfinished, events)
    splits = splits_of(ck, cfg.checkpoint, cfg.data)
    inference = ck.inference_model()
    with torch.no_grad():
        losses = {s: (models.evaluate(inference, *splits.split(s)), splits.split(s)[1].shape[0])
                  for s in data.SPLITS}
    return Evaluation(cfg.checkpoint, ck, losses)


@dataclass(frozen=True)
class CheckConfig:
    """Run the lecture's atomic graph (n_hidden 64, batch 32) on a seeded batch, compare all 26 hand-written
    gradients with autograd, the closed forms with the atomic chain, and everything with float64 finite
    differences. Exit 1 on failure."""

    dtype: str = option("float32", "dtype of the comparison with autograd (default {default})", OneOf(DTYPES))
    seed: int = option(42, "seed of the init and the batch (default {default})",
                       Expect(lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"))
    model: str | None = option(None, "instead: check every parameter gradient of this model (check_model) at "
                               "its init", OneOf(models.PRESETS))
    checkpoint: str | None = option(None, "instead: check a saved model's gradients where it is",
                                    metavar="DIR")
    data: str | None = option(None, "names file of the --model/--checkpoint batch (default: the run's, or "
                              "the bundled names)")
    batch_size: int = option(32, "batch of --model/--checkpoint (default {default})",
                             Expect(lambda v: v >= 2, "at least 2 (batchnorm's n-1)"))

    def __post_init__(self) -> None:
        validate(self)
        if self.model is not None and self.checkpoint is not None:
            raise ConfigError(f"{ref('model')} and {ref('checkpoint')}: give one (a checkpoint knows its "
                              "model)")


def model_to_check(cfg: CheckConfig):
    """(model, X (B, T), Y (B,), title) for `check --model` (a fresh init in cfg.dtype) or
    `check --checkpoint` (the trained parameters, in their dtype), on a seeded batch of its data."""
    if cfg.checkpoint is not None:
        ck = checkpoint.load(cfg.checkpoint)
        splits = splits_of(ck, cfg.checkpoint, cfg.data)
        model, what = ck.state.model, f"checkpoint {cfg.checkpoint} at step {ck.state.step}"
    else:
        mcfg = models.preset(cfg.model)
        splits = load_splits(cfg.data, mcfg.block_size, TrainConfig.for_model(cfg.model).split_seed,
                             kind=models.kind(mcfg))
        mcfg = models.preset(cfg.model, vocab_size=len(splits.vocab))
        model = models.build(mcfg, cfg.seed, DTYPES[cfg.dtype])
        what = f"{cfg.model} at its init (seed {cfg.seed}, {cfg.dtype})"
    g = torch.Generator().manual_seed(cfg.seed)
    ix = torch.randint(0, splits.Xtr.shape[0], (cfg.batch_size,), generator=g)
    title = f"{what}: every parameter gradient on a batch of {cfg.batch_size}"
    return model, splits.Xtr[ix], splits.Ytr[ix], title


@dataclass(frozen=True)
class DiagnoseConfig:
    """Measure a fixed probe batch at the checkpoint's parameters with the hand-written forward/backward;
    write loss, activation, gradient, update-ratio, saturation and dlogits PNGs plus diagnostics.json; print
    the lecture's sanity checks and one line per warning (layer and what to try)."""

    checkpoint: str = option(REQUIRED, "checkpoint directory", metavar="DIR")
    out: str | None = option(None, "output directory (default: DIR/diagnostics)", metavar="DIR")
    data: str | None = option(None, DATA_HELP)


@dataclass(frozen=True)
class Diagnosis:
    where: str  # the checkpoint directory
    ckpt: Checkpoint
    history: int  # measurements saved by training (--diagnostics)
    report: diagnostics.Report
    out: Path

    def __str__(self) -> str:
        r = self.report
        return "\n".join([f"checkpoint {self.where}: step {self.ckpt.state.step:,}; update-ratio history: "
                          f"{self.history} saved measurement(s)"
                          + ("" if self.history else " (train with --diagnostics to keep one)"),
                          *(f"check {c}" + (f"; {c.detail}" if c.failed else "") for c in r.checks),
                          *(f"warning: {w}" for w in r.warnings),
                          *([] if r.warnings else ["diagnostics: no warnings"]),
                          f"diagnostics written to {self.out}/ ({', '.join(p.name for p in r.paths)})"])


def diagnose(cfg: DiagnoseConfig) -> Diagnosis:
    """`handgrad diagnose`: measure a saved run's probe at its parameters and write the report into
    cfg.out (a directory the user names) or a real directory inside the checkpoint."""
    ck = checkpoint.load(cfg.checkpoint)
    _diagnosable(ck.model_config, str(cfg.checkpoint), "sample and eval read it")
    splits = splits_of(ck, cfg.checkpoint, cfg.data)
    out = io.prepare_dir(Path(cfg.out), "out") if cfg.out else io.output_subdir(cfg.checkpoint, "diagnostics")
    saved = Path(cfg.checkpoint) / "diagnostics" / diagnostics.HISTORY_FILE
    collector = diagnostics.from_checkpoint(ck, splits.Xtr, splits.Ytr, saved)
    history = len(collector.history)
    report = diagnostics.write_report(out, collector, ck.state.model, ck.state.step, ck.state.losses,
                                      extra={"checkpoint": str(cfg.checkpoint)})
    return Diagnosis(cfg.checkpoint, ck, history, report, out)

