"""The makemore zoo's presets (bigram, bow, bengio, rnn, gru, transformer): makemore's exact parameter
counts, every parameter gradient against autograd and float64 finite differences (check_model), a
training run equal to an autograd run of the same model (AdamW included), resume bit-identical with
AdamW's state, sampling, eval, and bad input refused in one line with exit 2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from handgrad import checkpoint, data, models, reference, run
from handgrad.check import check_model
from handgrad.cli import main
from handgrad.layers import numel
from handgrad.run import RunConfig
from handgrad.train import TrainConfig

ZOO = ("bigram", "bow", "bengio", "rnn", "gru", "transformer")
# makemore.py's "model #params" on names.txt (vocabulary 27, block size 16) with its defaults
MAKEMORE_PARAMS = {"bigram": 729, "bow": 12_827, "bengio": 69_147, "rnn": 11_803, "gru": 28_315,
                   "transformer": 204_544}
TINY = {"n_embd": 8, "n_embd2": 12, "n_head": 2, "n_layers": 2}  # small sizes: fast gradient checks


@pytest.fixture(scope="module")
def seqs() -> data.Splits:
    return data.make_sequences(data.read_words(data.default_data_path()).items, 16, 3407)


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_are_makemores(name):
    assert numel(models.build(models.preset(name), 3407)) == MAKEMORE_PARAMS[name]


def test_the_zoo_trains_with_makemores_defaults():
    for name in ZOO:
        t = TrainConfig.for_model(name)
        assert (t.optimizer, t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.batch_size, t.seed) == (
            "adamw", 5e-4, 0.9, 0.99, 1e-8, 0.01, 32, 3407)
        assert t.lr_at(10**9) == t.lr  # constant
        m = models.preset(name)
        assert (m.n_embd, m.n_embd2, m.n_layers, m.n_head, m.block_size) == (64, 64, 4, 4, 16)
    assert TrainConfig.for_model("mlp").optimizer == "sgd"  # the lectures' models keep SGD


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("gru", "transformer") else n
                                  for n in ZOO])
def test_every_gradient_of_the_model_matches_autograd_and_finite_differences(name, seqs):
    """A tiny config of each model, its init perturbed (no zero table, no unit LayerNorm gain), on 4
    sequences of the data (padding included)."""
    model = models.build(models.preset(name, **{**TINY, "n_layers": 1}), 1, torch.float64)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.params().values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    ix = torch.tensor([5, 17, 300])
    report = check_model(model, seqs.Xtr[ix], seqs.Ytr[ix], name_mistakes=False)
    assert report.passed, str(report)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_training_equals_an_autograd_run_of_the_same_model(name, dtype, tol, seqs):
    """--verify-autograd: per-step losses of the hand-written run and of an autograd run, same init and
    batches, AdamW; 30 steps (the 1000-step results are in the README)."""
    mcfg = models.preset(name, vocab_size=len(seqs.vocab), **({} if dtype == "float32" else TINY))
    tcfg = TrainConfig.for_model(name, steps=30, chunk_steps=10, dtype=dtype, engine="eager")
    v = reference.verify(seqs, mcfg, tcfg, 30)
    assert v.diff.max() <= tol, str(v)
    assert v.hand[-1] < v.hand[0]  # it learns


def _tiny_run(tmp_path, name, steps, out, **train):
    """A run of a tiny config on 200 names (the final evaluation reads every one)."""
    names = tmp_path / "names.txt"
    if not names.exists():
        names.write_text("\n".join(data.read_words(data.default_data_path()).items[::160]) + "\n")
    mcfg = models.preset(name, **TINY)
    tcfg = TrainConfig.for_model(name, steps=steps, chunk_steps=10, checkpoint_every=10, eval_every=20,
                                 **train)
    return run.new(mcfg, tcfg, RunConfig(out=str(tmp_path / out), samples=0, data=str(names)))


@pytest.mark.parametrize("name", ["bigram", "transformer"])
def test_resume_is_bit_identical_with_adamw_state(tmp_path, name):
    """40 steps == 20 steps, saved, and 20 more from the checkpoint: losses, parameters, AdamW's state."""
    whole = run.go(_tiny_run(tmp_path, name, 40, "whole")).finished.ckpt
    run.go(_tiny_run(tmp_path, name, 20, "half"))
    resumed = run.go(run.resume(tmp_path / "half", {"steps": 40},
                                RunConfig(samples=0, data=str(tmp_path / "names.txt")))).finished.ckpt
    assert torch.equal(whole.state.losses, resumed.state.losses)
    for k, p in whole.state.model.params().items():
        assert torch.equal(p, resumed.state.model.params()[k]), k
    saved = checkpoint.load(tmp_path / "half").state.optimizer
    assert saved.t == 40
    for k, t in whole.state.optimizer.state().items():
        assert torch.equal(t, saved.state()[k]), k
    # makemore_rng: evaluated after 21 updates (makemore's step index 20), in the resumed half
    assert whole.results["best_step"] == 21 and whole.results["best"] == resumed.results["best"]


def test_a_finished_zoo_run_samples_and_evaluates(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--model", "gru", "--n-embd", "8", "--n-embd2", "8", "--steps", "20", "--out",
                 str(out), "--quiet", "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "-n", "5"]) == 0
    names = capsys.readouterr().out.split("\n")[:5]
    assert len(names) == 5 and all(len(n) <= 15 and "." not in n for n in names)
    assert main(["eval", "--checkpoint", str(out)]) == 0
    text = capsys.readouterr().out
    assert "test loss" in text and "(1,000 examples)" in text


def test_sequence_sampling_stops_at_the_end_token_or_the_block(seqs):
    model = models.build(models.preset("bigram", vocab_size=27), 0)
    with torch.no_grad():
        model.params()["0.weight"][:, 0] = -1e9  # never the end token: every sample fills the block
    ids = models.sample_sequences(model, 16, n=4, seed=1)
    assert [len(s) for s in ids] == [15] * 4
    with torch.no_grad():
        model.params()["0.weight"][:, 0] = 1e9  # always the end token: empty names
    assert models.sample_sequences(model, 16, n=3, seed=1) == [[], [], []]


@pytest.mark.parametrize("argv, flag", [
    (["--model", "transformer", "--n-head", "3"], "--n-head: 3 does not divide --n-embd 64"),
    (["--model", "bigram", "--block-size", "8"], "--block-size 16 or more"),
    (["--model", "bow", "--beta2", "1"], "--beta2: must be a number from 0 to 1 (not included)"),
    (["--model", "rnn", "--weight-decay", "2"], "--weight-decay: must be a number from 0 to 1"),
    (["--model", "gru", "--eps=-1e-8"], "--eps: must be a positive finite number"),
    (["--model", "bengio", "--optimizer", "adam"], "invalid choice"),
])
def test_bad_zoo_input_is_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) if "invalid choice" in flag else _nothing():
        code = main(["train", *argv, "--out", str(tmp_path / "r")])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1] and not (tmp_path / "r").exists()
    assert "Traceback" not in "\n".join(err)


def test_a_vocabulary_too_large_is_refused_naming_the_data(tmp_path, capsys):
    path = tmp_path / "wide.txt"
    path.write_text("\n".join(chr(0x4E00 + i) * 2 for i in range(models.MAX_ZOO_VOCAB)) + "\n", encoding="utf-8")
    assert main(["train", "--model", "bigram", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("handgrad: error: --data: has 4,096 distinct characters") and "\n" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_planner_says_why_the_zoo_runs_eager(seqs):
    from handgrad import engines
    model = models.build(models.preset("transformer", vocab_size=27), 0)
    plan = engines.plan(model, TrainConfig.for_model("transformer"))
    assert plan.name == "eager" and "--optimizer adamw runs eager" in run.named(plan.warning,
                                                                               lambda f: "--" + f.replace("_", "-"))
    sgd = dataclasses.replace(TrainConfig.for_model("transformer"), optimizer="sgd")
    assert engines.plan(model, sgd).name == "eager"  # the native program does not know its layers


def test_diagnostics_refuse_a_zoo_model_in_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--model", "bigram", "--steps", "10", "--diagnostics", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("handgrad: error: --diagnostics: diagnostics measure the lectures'") and "\n" not in err
    assert main(["train", "--model", "bigram", "--steps", "10", "--out", str(out), "--quiet", "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the makemore zoo's sequence models are not measured yet (bigram)" in err and "\n" not in err


@pytest.mark.slow
def test_two_ranks_train_a_zoo_model_as_one_process_does(tmp_path, capsys):
    """--nproc 2 with AdamW on masked sequences: each rank's loss seeded by its share of the batch's
    counted positions, so the summed gradient is the global mean's (equal to float32 rounding)."""
    common = ["--model", "bigram", "--steps", "20", "--quiet", "--samples", "0", "--chunk-steps", "10"]
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["train", *common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "two")
    assert (one.state.losses - two.state.losses).abs().max() <= 1e-5
    assert two.state.optimizer.t == 20
