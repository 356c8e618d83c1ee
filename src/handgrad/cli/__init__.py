"""The `handgrad` command: parse, call the library, print, return an exit code (pip's cli/main.py +
commands; tests call `main([...])`). It decides nothing: every flag comes from a config dataclass field
(its config.Option: help, valid values, flag), a command's description is its first dataclass's
docstring, and the library's one-line errors name fields, printed here as the fields' flags.

Exit codes: 0 success, 1 a check or training failure, 2 bad input (a one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys

from handgrad import bench, check, config, engines, models, reference, run
from handgrad.checkpoint import CheckpointError
from handgrad.cli import common, dojo
from handgrad.cli.common import FLAGS
from handgrad.config import ConfigError
from handgrad.data import DataError
from handgrad.models import ModelConfig
from handgrad.run import CheckConfig, DiagnoseConfig, EvalConfig, RunConfig, SampleConfig
from handgrad.train import DTYPES, TrainConfig

_flag, _err = common.flag, common.err


EVENTS = run.Events(warn=lambda line: print(f"warning: {line}", file=sys.stderr),
                    note=lambda line: print(line, file=sys.stderr), field_name=_flag)


# ---------------------------------------------------------------------------- flags from config fields
class _Keep(dict):
    def __missing__(self, key: str) -> str:  # "{model}" in a help stays as written
        return "{" + key + "}"


GROUPS = (None, "model", "optimisation", "output", "diagnostics")  # help groups in order (None: ungrouped)


def _group(cls, f: dataclasses.Field) -> str | None:
    return f.metadata["option"].group or getattr(cls, "GROUP", None)


def _order(cls, f: dataclasses.Field) -> tuple[int, bool]:
    """GROUPS order; within a group, the fields of the class it belongs to first."""
    g = _group(cls, f)
    return GROUPS.index(g) if g in GROUPS else len(GROUPS), g != getattr(cls, "GROUP", None)


def add_fields(parser, classes: tuple) -> dict:
    """A flag for each field of `classes` that has one (Option.flag not ""), in its help group, with its
    help, type or choices. Flags default to None: only what is given reaches a config. Returns the
    groups by title (None: the parser)."""
    values = _Keep(**models.help_values(), **engines.THRESHOLDS)
    groups = {None: parser}
    fields = [(cls, f) for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("option")]
    for cls, f in sorted(fields, key=lambda cf: _order(*cf)):
        opt = f.metadata["option"]
        if opt.flag == "":
            continue
        kw = {"dest": f.name, "help": opt.help.format_map(_Keep(values, default=f.default))}
        if config.value_type(cls, f.name) is bool and _preset_sets(f):  # on for some model: --no-X too
            kw.update(action=argparse.BooleanOptionalAction)
        elif config.value_type(cls, f.name) is bool:
            kw.update(action="store_const", const=not f.default)
        else:
            kw.update(type=config.value_type(cls, f.name), metavar=opt.metavar,
                      choices=getattr(opt.rule, "options", None))
        if f.default is config.REQUIRED:
            kw["required"] = True
        g = _group(cls, f)
        where = groups[g] if g in groups else groups.setdefault(g, parser.add_argument_group(g))
        where.add_argument(FLAGS.setdefault(f.name, config.flag_of(f.name, opt)), **kw)
    return groups


def given(args, cls) -> dict:
    """The fields of `cls` whose flags were given."""
    return {k: getattr(args, k) for k in config.options(cls) if getattr(args, k, None) is not None}


# ---------------------------------------------------------------------------- the commands
def _cmd_train(args) -> int:
    opts = RunConfig(**given(args, RunConfig))
    model, training = given(args, ModelConfig), given(args, TrainConfig)
    if opts.resume and opts.verify_autograd is None:
        r = run.resume(opts.resume, {**model, **training}, opts, EVENTS)
    else:
        r = run.new(*run.configs(model, training), opts, EVENTS)
    if opts.verify_autograd is not None:
        v = reference.verify(r.splits, r.ckpt.model_config, r.ckpt.train_config, opts.verify_autograd,
                             opts.threads, EVENTS.warning)
        print(v)
        return 0 if v.agree else 1
    outcome = run.go(r, dataclasses.replace(EVENTS, on_start=None if args.quiet else _start), args.argv)
    if outcome.message:
        _err(outcome.message)
    for line in outcome.finished.lines() if outcome.finished else ():
        print(line)
    return outcome.code


def _start(started: run.Started):
    """The header line, and a tqdm bar (step, loss, lr, steps/s, time left) as the progress callback."""
    from tqdm import tqdm

    print(started, file=sys.stderr)
    bar = tqdm(total=started.steps, initial=started.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def progress(pr) -> None:
        bar.set_postfix_str(f"loss {pr.chunk_loss:.4f} lr {pr.lr:g}", refresh=False)
        bar.update(pr.state.step - bar.n)

    progress.close = bar.close
    return progress


def _cmd_sample(args) -> int:
    print("\n".join(run.sample(SampleConfig(**given(args, SampleConfig)), EVENTS)))
    return 0


def _cmd_eval(args) -> int:
    print(run.evaluate(EvalConfig(**given(args, EvalConfig)), EVENTS))
    return 0


def _cmd_check(args) -> int:
    cfg = CheckConfig(**given(args, CheckConfig))
    if cfg.model is None and cfg.checkpoint is None:
        report = check.run_lecture_check(DTYPES[cfg.dtype], cfg.seed)
    else:
        model, X, Y, title = run.model_to_check(cfg)
        report = check.check_model(model, X, Y, seed=cfg.seed, title=title)
    print(report)
    return 0 if report.passed else 1


def _cmd_diagnose(args) -> int:
    print(run.diagnose(DiagnoseConfig(**given(args, DiagnoseConfig))))
    return 0


def _cmd_bench(args) -> int:
    r = bench.run(bench.BenchOptions(**given(args, bench.BenchOptions)),
                  None if args.json else lambda line: print(line, file=sys.stderr, flush=True))
    if isinstance(r, bench.BenchResult):
        print(r.to_json() if args.json else r.table())
    else:
        print(json.dumps(r, indent=2) if args.json else bench.full_text(r))
    return 0


# ---------------------------------------------------------------------------- main
COMMANDS = {  # command -> (help, the dataclasses of its flags (the first's docstring describes it), handler)
    "train": ("train a model with hand-written gradients", (RunConfig, ModelConfig, TrainConfig), _cmd_train),
    "sample": ("sample names from a trained checkpoint", (SampleConfig,), _cmd_sample),
    "eval": ("train/val/test loss of a checkpoint", (EvalConfig,), _cmd_eval),
    "check": ("verify every gradient of the lecture's graph", (CheckConfig,), _cmd_check),
    "bench": ("time one training step: fast, eager, autograd, GEMM floor", (bench.BenchOptions,), _cmd_bench),
    "diagnose": ("gradient-health plots, sanity checks and warnings for a checkpoint", (DiagnoseConfig,),
                 _cmd_diagnose),
}
MORE = {"train": ("output", "--quiet", "no progress bar (for scripts)"),  # flags of the CLI's own printing
        "bench": (None, "--json", "print JSON instead of a table")}


def _preset_sets(f: dataclasses.Field) -> bool:
    """Does some model's preset give this training field a value other than its default?"""
    return any(p.train.get(f.name, f.default) != f.default for p in models.PRESETS.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="handgrad", description="Train makemore models with "
                                     "hand-written gradients, and prove every gradient.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (short, classes, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=short, description=" ".join(inspect.getdoc(classes[0]).split()))
        p.set_defaults(func=handler)
        groups = add_fields(p, classes)
        if name in MORE:
            group, flag, text = MORE[name]
            groups[group].add_argument(flag, action="store_true", help=text)
    dojo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc passes to its ranks
        return args.func(args)
    except run.Stopped as e:
        _err(e.message + (f"; continue with: handgrad train --resume {e.resume}" if e.resume else ""))
        return e.code
    except (DataError, CheckpointError, ConfigError) as e:
        _err(e.render(_flag) if isinstance(e, ConfigError) else str(e))
        return 2
    except KeyboardInterrupt:  # while loading, evaluating or saving (the loop has its own message)
        _err("interrupted; files are written atomically, so any checkpoint on disk is complete")
        return 130
    except BrokenPipeError:  # `handgrad sample | head`: the reader has what it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error when stdout is flushed
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
