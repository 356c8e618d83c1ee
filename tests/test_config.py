"""Config fields as data (config.py): each rule's valid values and its message, errors that name fields
(shown as fields in the library, as flags on the command line), the checkpoint schema's ranges and the
CLI's flags read from the same Option of each field."""

import argparse
from dataclasses import dataclass

import pytest

from handgrad import checkpoint, cli, config, models, run
from handgrad.config import (
    REQUIRED,
    ConfigError,
    Count,
    Expect,
    FieldError,
    OneOf,
    Positive,
    Range,
    option,
    ref,
)
from handgrad.models import ModelConfig
from handgrad.train import MAX_STEPS, TrainConfig


@pytest.mark.parametrize("rule, good, bad, message", [
    (Count(), [1, 7], [0, -3, 1.5, True], "must be a positive integer, got 0"),
    (Count(lo=2, why="batchnorm's n-1"), [2, 99], [1], "must be at least 2 (batchnorm's n-1), got 1"),
    (Count(hi=10), [10], [11], "must be at most 10, got 11"),
    (Range(0, 5), [0, 5], [-1, 6, "3", None], "must be an integer from 0 to 5, got -1"),
    (Range(0, 9, "0 (off) or a positive number of rows"), [0], [-1], "must be 0 (off) or a positive number of rows"),
    (Positive(), [1e-9, 3, 2.5], [0, -1.0, float("nan"), float("inf"), True], "must be a positive finite number"),
    (Positive(hi=1), [1], [1.5], "must be at most 1, got 1.5"),
    (OneOf(("a", "b")), ["a"], ["c", None], "must be one of ('a', 'b'), got 'c'"),
    (Expect(lambda v: v >= 1, "a positive number of threads"), [1], [0, 2.0], "expected a positive number of threads"),
])
def test_each_rule_accepts_its_values_and_says_what_is_wrong(rule, good, bad, message):
    assert all(rule.problem(v) is None for v in good)
    assert all(rule.problem(v) is not None for v in bad)
    assert message in rule.problem(bad[0])


def test_a_field_error_names_the_field_in_the_library_and_its_flag_on_the_command_line():
    with pytest.raises(FieldError) as e:
        TrainConfig(steps=0)
    assert str(e.value) == "steps must be a positive integer, got 0"  # as the library always said
    assert e.value.render({"steps": "--steps"}.get) == "--steps: must be a positive integer, got 0"
    with pytest.raises(ConfigError) as e:
        run.RunConfig(threads=0)
    assert str(e.value) == "threads 0: expected a positive number of threads"
    assert e.value.render(lambda f: "--" + f) == "--threads 0: expected a positive number of threads"


def test_a_message_names_other_fields_with_ref():
    e = ConfigError(f"{ref('n_layers')}: follows {ref('block_size')}; give {ref('block_size')}")
    assert str(e) == "n_layers: follows block_size; give block_size"
    assert e.render(lambda f: "--" + f.replace("_", "-")) == "--n-layers: follows --block-size; give --block-size"
    assert config.named("a path {x} with braces", str.upper) == "a path {x} with braces"


def test_the_configs_keep_their_messages():
    cases = [(dict(batch_size=1), "batch_size must be at least 2 (batchnorm's n-1), got 1"),
             (dict(lr=-1.0), "lr must be a positive finite number, got -1.0"),
             (dict(seed=-1), f"seed must be an integer from 0 to {2**63 - 17}, got -1"),
             (dict(steps=10**9), f"steps must be at most {MAX_STEPS:,}, got 1,000,000,000"),
             (dict(bn_stats="x"), "bn_stats must be one of ('calibrate', 'running'), got 'x'"),
             (dict(recompute_tile=-1), "recompute_tile must be 0 (off) or a positive number of rows, got -1"),
             (dict(lr_decay_step=-1), "lr_decay_step must be an integer from 0 to 1000000000000, got -1")]
    for kw, message in cases:
        with pytest.raises(ValueError) as e:
            TrainConfig(**kw)
        assert str(e.value) == message
    with pytest.raises(ValueError, match=r"^n_hidden must be an integer from 1 to 1048576, got 0$"):
        ModelConfig(n_hidden=0)
    with pytest.raises(ValueError, match=r"^block_size must be a power of two for wavenet"):
        ModelConfig(name="wavenet", block_size=6, n_layers=2)
    with pytest.raises(ValueError, match=r"^batchnorm must be True or False, got 'yes'$"):
        ModelConfig(batchnorm="yes")


def test_a_derived_field_of_a_preset_cannot_be_given():
    with pytest.raises(FieldError) as e:
        models.preset("wavenet", n_layers=2)
    assert e.value.field == "n_layers" and "block_size" in str(e.value)
    assert models.preset("wavenet", block_size=16).n_layers == 4


def test_the_checkpoint_schema_reads_its_integer_ranges_from_the_rules():
    assert config.int_bounds(TrainConfig, "steps") == (1, MAX_STEPS)
    assert config.int_bounds(TrainConfig, "batch_size") == (2, 1 << 40)
    assert config.int_bounds(ModelConfig, "vocab_size") == (2, 1 << 20)
    check = checkpoint.SCHEMA["train_config"][0]
    with pytest.raises(checkpoint.CheckpointError, match=rf"'train_config'.steps: expected an integer from 1 to {MAX_STEPS}"):
        check({"steps": MAX_STEPS + 1}, "field 'train_config'")
    assert check({"steps": 5}, "x").steps == 5


@dataclass(frozen=True)
class _Options:
    """A command of its own."""

    where: str = option(REQUIRED, "the directory", metavar="DIR")
    size: int = option(3, "how many (default {default})", Count())
    colour: str = option("red", "which one", OneOf(("red", "blue")))
    loud: bool = option(False, "say it loud")
    quiet: bool = option(True, "drop the quiet", flag="--no-quiet")
    hidden: int = option(1, "no flag", flag="")
    rate: float | None = option(None, "a rate", Positive(), group="tuning")


def test_flags_come_from_the_fields_help_type_choices_and_groups():
    p = argparse.ArgumentParser()
    groups = cli.add_fields(p, (_Options,))
    text = p.format_help()
    assert "--where DIR" in text and "how many (default 3)" in text and "{red,blue}" in text
    assert "--no-quiet" in text and "--hidden" not in text and "tuning:" in text and set(groups) == {None, "tuning"}
    args = p.parse_args(["--where", "d", "--size", "4", "--loud", "--no-quiet", "--rate", "0.5"])
    assert cli.given(args, _Options) == {"where": "d", "size": 4, "loud": True, "quiet": False, "rate": 0.5}
    assert cli.given(p.parse_args(["--where", "d"]), _Options) == {"where": "d"}
    with pytest.raises(SystemExit):
        p.parse_args(["--size", "4"])  # --where is required


def test_every_config_field_with_a_flag_is_on_the_train_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for cls in (ModelConfig, TrainConfig, run.RunConfig):
        for name, opt in config.options(cls).items():
            if opt.flag != "":
                assert config.flag_of(name, opt) in text, name
    assert "--vocab-size" not in text and "--bn-eps" not in text
