"""Sizes that do not fit and configurations that cannot train, said in one line naming what to change
before anything is spent: a vocabulary of every printable character, a data file of one 60 MB line, a
chunk of a billion steps, wavenet with --block-size 1, batchnorm statistics from 2 rows, a 1000-layer
deep model whose initial gradients overflow."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handgrad import budget, models, preflight, train
from handgrad.cli import main
from handgrad.train import TrainConfig

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
QUIET = ["--quiet", "--samples", "0"]


def _one_line(capsys, argv, code=2) -> str:
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code and err.startswith("handgrad: error: ") and "\n" not in err, (got, err)
    return err


@pytest.fixture
def small_machine(monkeypatch):
    """A machine of 4 GiB, whatever this one has."""
    monkeypatch.setattr(budget, "machine_bytes", lambda: 4 << 30)


# ---------------------------------------------------------------------------- the vocabulary
def _every_printable_character(path: Path) -> int:
    chars = [chr(c) for c in range(0x110000) if chr(c).isprintable() and chr(c) not in ". "]
    path.write_text("\n".join("".join(chars[i:i + 8]) for i in range(0, len(chars), 8)) + "\n", encoding="utf-8")
    return len(chars)


@pytest.mark.slow
def test_a_vocabulary_of_every_printable_character_is_refused_in_one_line_naming_its_size(tmp_path):
    """Run as a command under an 8 GiB address-space limit (what budget.machine_bytes reads), as a user
    with `ulimit -v` would: refused before training, not a traceback from an allocation."""
    data = tmp_path / "every.txt"
    n = _every_printable_character(data)
    limit = 8 << 30
    r = subprocess.run([PY, "-m", "handgrad", "train", "--data", str(data), "--steps", "10", "--out",
                        str(tmp_path / "o"), *QUIET], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                       text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"handgrad: error: --data {data}: its items use {n:,} distinct characters, a "
                          f"vocabulary of {n + 1:,} "), err
    assert "fused step takes up to 127; the native program and the eager engine any vocabulary" in err, err
    most = int(err.split("at most about ")[1].split()[0].replace(",", ""))
    assert 27 < most < n and not (tmp_path / "o").exists()


def test_the_vocabulary_limit_it_names_is_the_largest_that_fits():
    tcfg, n, available = TrainConfig(), 200_000, 4 << 30
    with pytest.raises(budget.BudgetError) as e:
        budget.check_train(models.preset("mlp", vocab_size=100_001), tcfg, n, available=available, data="f.txt")
    text = str(e.value)
    assert text.startswith("data f.txt: its items use 100,000 distinct characters, a vocabulary of 100,001 "), text
    most = int(text.split("at most about ")[1].split()[0].replace(",", ""))
    budget.check_train(models.preset("mlp", vocab_size=most + 1), tcfg, n, available=available)
    with pytest.raises(budget.BudgetError, match="distinct characters"):
        budget.check_train(models.preset("mlp", vocab_size=most + 2), tcfg, n, available=available)


# ---------------------------------------------------------------------------- the data, the chunk
@pytest.mark.slow
def test_a_60_mb_one_line_data_file_is_blamed_on_the_data_not_block_size(tmp_path, capsys, small_machine):
    data = tmp_path / "one-line.txt"
    data.write_bytes(b"abcdefghijklmnopqrstuvwxyz" * (60 * 2**20 // 26) + b"\n")
    err = _one_line(capsys, ["train", "--data", str(data), "--steps", "10", "--out", str(tmp_path / "o"), *QUIET])
    assert err.startswith(f"handgrad: error: --data {data}: its {60 * 2**20 // 26 * 26 + 1:,} training examples "
                          "(one per character and item end) take about "), err
    assert "at --block-size 3" in err and err.endswith("use a sample of the data"), err


def test_a_block_size_that_makes_the_data_too_big_is_still_blamed_on_block_size():
    with pytest.raises(budget.BudgetError, match="^block_size: .* make block_size smaller"):
        budget.check_train(models.preset("mlp", vocab_size=27, block_size=1 << 14), TrainConfig(), 228_146,
                           available=8 << 30)


def test_a_billion_chunk_steps_is_blamed_on_chunk_steps(tmp_path, capsys, small_machine):
    err = _one_line(capsys, ["train", "--steps", "100000000", "--chunk-steps", "1000000000", "--out",
                             str(tmp_path / "o"), *QUIET])
    assert err.startswith("handgrad: error: --chunk-steps: this run would need about "), err
    assert "make --chunk-steps smaller" in err and "--batch-size" not in err, err


def test_a_chunk_beyond_the_last_step_is_the_whole_run(tmp_path, capsys, small_machine):
    """A chunk never runs past --steps, so a huge --chunk-steps holds only --steps batches."""
    assert main(["train", "--steps", "20", "--chunk-steps", "1000000000", "--n-hidden", "8", "--out",
                 str(tmp_path / "o"), *QUIET]) == 0


# ---------------------------------------------------------------------------- the model's own fields
@pytest.mark.parametrize("block_size", ["1", "3", "6"])
def test_wavenet_with_a_block_size_not_a_power_of_two_names_block_size(tmp_path, capsys, block_size):
    err = _one_line(capsys, ["train", "--model", "wavenet", "--block-size", block_size, "--out",
                             str(tmp_path / "o"), *QUIET])
    assert err.startswith("handgrad: error: --block-size: must be a power of two for wavenet"), err
    assert err.endswith(f"got {block_size}") and "--n-layers" not in err, err


# ---------------------------------------------------------------------------- degenerate configurations
def _train(capsys, tmp_path, *flags):
    code = main(["train", "--steps", "2", "--chunk-steps", "1", "--out", str(tmp_path / "o"), *QUIET, *flags])
    return code, capsys.readouterr().err


def test_batchnorm_statistics_from_2_rows_are_said_before_training(tmp_path, capsys):
    code, err = _train(capsys, tmp_path, "--model", "deep", "--batch-size", "2", "--engine", "eager")
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("warning: --batch-size 2: "))
    assert "batchnorm statistics over 2 rows are degenerate" in line and "--batch-size 4 or more" in line, err
    assert "--no-batchnorm" in line


@pytest.mark.parametrize("flags", [["--batch-size", "4"], ["--batch-size", "2", "--no-batchnorm"], []])
def test_a_batch_batchnorm_can_use_is_not_warned_about(tmp_path, capsys, flags):
    code, err = _train(capsys, tmp_path, "--model", "deep", "--engine", "eager", *flags)
    assert code == 0 and "warning" not in err, err


@pytest.mark.slow
def test_a_1000_layer_deep_model_is_refused_before_training_naming_n_layers(tmp_path, capsys):
    err = _one_line(capsys, ["train", "--model", "deep", "--n-layers", "1000", "--steps", "10", "--out",
                             str(tmp_path / "o"), *QUIET])
    assert err.startswith("handgrad: error: --n-layers 1000: the initial gradients overflow float32 ("), err
    assert "training would diverge at step 0" in err and "try far fewer --n-layers" in err, err
    assert not (tmp_path / "o").exists()


def test_a_depth_whose_first_step_is_huge_is_warned_about_before_training(tmp_path, capsys):
    mcfg = models.preset("deep", vocab_size=27, n_layers=100, n_hidden=32)
    tcfg = TrainConfig.for_model("deep")
    state = train.new_state(mcfg, tcfg)
    X = torch.randint(0, 27, (64, mcfg.block_size), generator=torch.Generator().manual_seed(3))
    Y = torch.randint(0, 27, (64,), generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in {**state.model.params(), **state.model.buffers()}.items()}
    warnings = []
    preflight.check(state.model, mcfg, tcfg, X, Y, warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("\x00n_layers\x00 100: the initial gradients are large"), warnings
    after = {**state.model.params(), **state.model.buffers()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probe changed nothing
    preflight.check(train.new_state(models.preset("deep", vocab_size=27), tcfg).model, models.preset("deep"),
                    tcfg, X, Y, warnings.append)
    assert len(warnings) == 1  # the preset's own depth: nothing to say
