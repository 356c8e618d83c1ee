"""The diagnostics find real problems (short eager runs on the real data), stay quiet on the healthy
default, run the lecture's sanity checks, and write valid PNGs and diagnostics.json."""

import json
import math
import struct

import pytest
import torch
from handgrad.model import ModelConfig

from handgrad import cli, diagnostics, model, plots, train
from handgrad.diagnostics import Collector, DiagConfig
from handgrad.train import NonFiniteError, TrainConfig


def _run(splits, steps=1000, every=250, mkw=None, **tkw):
    """Train with the collector as callback (eager: deterministic); returns (collector, state)."""
    mcfg = ModelConfig(vocab_size=len(splits.vocab), **(mkw or {}))
    tcfg = TrainConfig(steps=steps, engine="eager", chunk_steps=every, **tkw)
    c = Collector(splits.Xtr, splits.Ytr, mcfg, tcfg, DiagConfig(every=every))
    state = train.new_state(mcfg, tcfg)
    c.record(state.params, 0)
    try:
        train.train(splits, mcfg, tcfg, state, c, c.watch(train.eager_steps))
    except NonFiniteError:
        pass
    return c, state


def _kinds(c):
    return {(w.kind, w.layer) for w in c.warnings()}


# ---------------------------------------------------------------------------- broken configs are found
def test_healthy_default_gives_no_warning(names_splits):
    c, _ = _run(names_splits, steps=2000, every=500)
    assert c.warnings() == []
    assert len(c.history) == 5 and c.history[-1].dead == 0


def test_large_w1_init_with_batchnorm_is_caught_as_vanishing_w1_updates(names_splits):
    # batchnorm normalises W1's scale away in the forward pass (no saturation), but W1's gradient
    # shrinks by the same factor while W1 grows: its updates are ~100x too small
    c, _ = _run(names_splits, mkw={"w1_scale": 10.0})
    kinds = _kinds(c)
    assert ("vanishing_gradient", "W1") in kinds
    assert ("update_ratio_low", "W1") in kinds
    assert not any(k == "saturation" for k, _ in kinds)


def test_large_w1_init_without_batchnorm_saturates_tanh(names_splits):
    c, _ = _run(names_splits, mkw={"batchnorm": False, "w1_scale": 10.0})
    kinds = _kinds(c)
    assert ("saturation", "h (tanh)") in kinds
    assert ("vanishing_gradient", "W1") in kinds
    assert c.history[-1].acts["h"].saturated > 0.8
    w = next(w for w in c.warnings() if w.kind == "saturation")
    assert "h (tanh)" in str(w) and "batchnorm" in w.advice


@pytest.mark.parametrize("lr", [50.0, 100.0])
def test_exploding_learning_rate_is_caught(names_splits, lr):
    c, _ = _run(names_splits, lr=lr)
    kinds = _kinds(c)
    assert ("update_ratio_high", "W2") in kinds
    assert ("saturation", "h (tanh)") in kinds and ("dead_units", "h (tanh)") in kinds
    assert "learning rate" in next(w for w in c.warnings() if w.kind == "update_ratio_high").advice


def test_non_finite_training_is_reported_with_step_and_tensor(names_splits):
    mcfg = ModelConfig(vocab_size=len(names_splits.vocab))
    tcfg = TrainConfig(steps=100, engine="eager", chunk_steps=10)
    c = Collector(names_splits.Xtr, names_splits.Ytr, mcfg, tcfg, DiagConfig(every=10))
    state = train.new_state(mcfg, tcfg)
    state.params.W2[3, 5] = math.inf
    c.record(state.params, 0)
    with pytest.raises(NonFiniteError):
        train.train(names_splits, mcfg, tcfg, state, c, c.watch(train.eager_steps))
    warnings = [w for w in c.warnings() if w.kind == "non_finite"]
    assert {w.layer for w in warnings} >= {"loss", "W2"}
    assert any(w.step == 0 for w in warnings) and "learning rate" in warnings[0].advice
    assert c.failure == (0, "loss")  # recorded by watch() from the NonFiniteError training raised
    assert any(w.layer == "loss" and "stopped training" in w.message for w in warnings)


def test_a_single_bad_snapshot_is_noise_not_a_warning(names_splits):
    c, _ = _run(names_splits, steps=500, every=100)
    c.history[2].acts["h"].saturated = 0.9  # one probe out of six
    assert c.warnings() == []
    for s in c.history[2:5]:
        s.acts["h"].saturated = 0.9
    assert [w.kind for w in c.warnings()] == ["saturation"]


def test_gradient_explosion_between_layers_and_over_time_is_caught(names_splits):
    import copy

    c, _ = _run(names_splits, steps=500, every=100)
    assert c.warnings() == []
    layers, growth = copy.deepcopy(c.history), copy.deepcopy(c.history)
    for s in layers[2:5]:  # W1 receives 1000x the grad:data ratio of W2
        s.grads["W1"].grad_data = s.grads["W2"].grad_data * 1e3
    for s in growth[2:5]:  # every gradient 1000x larger than at init
        for g in s.grads.values():
            g.norm *= 1e3
    assert {(w.kind, w.layer) for w in diagnostics.find_warnings(layers, c.cfg)} == {
        ("exploding_gradient", "W1")}
    assert {(w.kind, w.layer) for w in diagnostics.find_warnings(growth, c.cfg)} == {
        ("exploding_gradient", "all parameters")}


def test_collecting_does_not_change_training(names_splits):
    c, state = _run(names_splits, steps=300, every=100)
    mcfg = ModelConfig(vocab_size=len(names_splits.vocab))
    plain = train.train(names_splits, mcfg, TrainConfig(steps=300, engine="eager", chunk_steps=100))
    assert torch.equal(state.losses, plain.losses)
    assert all(torch.equal(a, b) for a, b in zip(state.params.tensors(), plain.params.tensors()))


def test_a_run_broken_after_init_warns_even_with_few_snapshots(names_splits):
    c, _ = _run(names_splits, steps=500, every=250, lr=50.0)  # snapshots at 0 (healthy), 250, 500
    assert ("saturation", "h (tanh)") in _kinds(c) and ("dead_units", "h (tanh)") in _kinds(c)


def test_interval_must_be_a_multiple_of_chunk_steps(names_splits):
    with pytest.raises(ValueError, match="multiple of chunk_steps"):
        Collector(names_splits.Xtr, names_splits.Ytr, ModelConfig(), TrainConfig(chunk_steps=1000),
                  DiagConfig(every=1500))


def test_collecting_uses_no_autograd(names_splits):
    mcfg, tcfg = ModelConfig(), TrainConfig(steps=10, engine="eager", chunk_steps=10)
    c = Collector(names_splits.Xtr, names_splits.Ytr, mcfg, tcfg, DiagConfig(every=10))
    p = model.init_params(mcfg)
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # anything needing autograd would fail or build no graph
    try:
        c.record(p, 0)
    finally:
        torch.set_grad_enabled(previous)
    assert not any(t.requires_grad for t in p.tensors())
    assert all(math.isfinite(g.norm) for g in c.history[0].grads.values())


# ---------------------------------------------------------------------------- the lecture's sanity checks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sanity_checks_pass_at_init_and_after_training(names_splits, dtype):
    mcfg = ModelConfig()
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    trained = _run(names_splits, steps=300, every=100)[1].params.to(dtype)
    for p in (model.init_params(mcfg, dtype=dtype), trained):
        checks = diagnostics.sanity_checks(p, X, Y, True, init_loss=3.76)
        assert all(c.passed for c in checks), [str(c) for c in checks]
        assert checks[0].value <= diagnostics.TOL[dtype] / 32


def test_sanity_checks_fail_and_say_why_when_probs_underflow(names_splits):
    p = model.init_params(ModelConfig())
    p.W2 *= 1000  # logits hundreds apart: the target's probability underflows to 0
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    rows, maxes, chain, init = diagnostics.sanity_checks(p, X, Y, True, init_loss=3.76)
    assert rows.passed  # the closed form has no division by probs
    assert not maxes.passed and not chain.passed and "NaN" in maxes.detail and "NaN" in chain.detail
    assert init.passed


def test_gradient_into_logit_maxes_is_zero_and_op_by_op_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 27, generator=g, dtype=torch.float64) * 3
    Y = torch.randint(0, 27, (16,), generator=g)
    dnorm, dmax = diagnostics.logit_maxes_backward(logits, Y)
    closed = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(Y, 27)) / 16
    assert dmax.shape == (16, 1) and dmax.abs().max() < 1e-15
    assert (dnorm - closed).abs().max() < 1e-15


def test_logit_maxes_chain_agrees_with_the_atomic_graph(names_splits):
    from handgrad import atomic

    p = model.init_params(ModelConfig(), dtype=torch.float64)
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    f = atomic.forward(p, X, Y)
    g = atomic.backward(p, X, Y, f)
    dnorm, dmax = diagnostics.logit_maxes_backward(f.logits, Y)
    assert (dmax - g.dlogit_maxes).abs().max() < 1e-15 and (dnorm - g.dnorm_logits).abs().max() < 1e-15


def test_initial_loss_check_accepts_the_lecture_init_and_flags_a_confident_one():
    assert diagnostics.check_initial_loss(3.76, 27).passed  # the lecture's H=200 init
    assert diagnostics.check_initial_loss(math.log(27), 27).passed
    assert not diagnostics.check_initial_loss(27.0, 27).passed  # Part 3's unscaled W2
    assert not diagnostics.check_initial_loss(math.nan, 27).passed


def test_collector_initial_loss_is_measured_at_the_seeded_init(names_splits):
    c, state = _run(names_splits, steps=200, every=100)
    init_check = c.checks(state.params)[-1]
    assert init_check.passed and abs(init_check.value - c.history[0].loss) < 1e-9


# ---------------------------------------------------------------------------- outputs
def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_valid_pngs_of_the_expected_size_and_json(names_splits, tmp_path):
    c, state = _run(names_splits, steps=400, every=100)
    report = diagnostics.write_report(tmp_path, c, state.params, state.step, state.losses)
    names = {p.name for p in report.paths}
    assert names == set(plots.SIZES) | {"diagnostics.json"}
    for name, (w, h) in plots.SIZES.items():
        assert _png_size(tmp_path / name) == (w * plots.DPI, h * plots.DPI)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert data["format"] == diagnostics.FORMAT and data["warnings"] == []
    assert len(data["history"]) == 5 and all(ch["passed"] for ch in data["checks"])
    back = diagnostics.load_history(tmp_path / "diagnostics.json")
    assert [s.step for s in back] == [0, 100, 200, 300, 400]
    assert back[-1].grads["W1"].update_ratio == pytest.approx(c.history[-1].grads["W1"].update_ratio)


def test_smoothed_loss_is_the_lectures_windowed_mean_of_log10():
    losses = torch.tensor([10.0, 100.0, 1.0, 1000.0, float("nan")], dtype=torch.float64)
    centres, means = plots.smooth_log10(losses, 2)
    assert means.tolist() == pytest.approx([1.5, 1.5]) and centres.tolist() == [1.0, 3.0]


def test_cli_train_with_diagnostics_then_diagnose(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "400", "--chunk-steps", "100", "--diag-every", "200", "--engine",
                     "eager", "--out", str(out), "--quiet", "--samples", "0"]) == 0
    saved = json.loads((out / "diagnostics" / "diagnostics.json").read_text())
    assert [s["step"] for s in saved["history"]] == [0, 200, 400]
    capsys.readouterr()
    assert cli.main(["diagnose", "--checkpoint", str(out), "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "3 saved measurement(s)" in text and "no warnings" in text and "FAIL" not in text
    assert (tmp_path / "d" / "update_ratios.png").is_file()


def test_cli_prints_one_line_per_warning_naming_layer_and_advice(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "300", "--chunk-steps", "100", "--diag-every", "100", "--engine",
                     "eager", "--no-batchnorm", "--w1-scale", "10", "--out", str(out), "--quiet",
                     "--samples", "0"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: h (tanh)")]
    assert len(lines) == 1 and "try " in lines[0]


@pytest.mark.parametrize("every", ["150", "0"])
def test_cli_rejects_a_diagnostics_interval_off_the_chunk_grid(tmp_path, capsys, every):
    assert cli.main(["train", "--steps", "300", "--chunk-steps", "100", "--diag-every", every, "--engine",
                     "eager", "--out", str(tmp_path / "run"), "--quiet", "--samples", "0"]) == 2
    assert f"--diag-every {every}" in capsys.readouterr().err


def test_resumed_training_continues_the_saved_history(tmp_path):
    out = str(tmp_path / "run")
    base = ["--engine", "eager", "--quiet", "--samples", "0", "--checkpoint-every", "200"]
    assert cli.main(["train", "--steps", "400", "--chunk-steps", "100", "--diag-every", "200", "--out", out,
                     *base]) == 0
    assert cli.main(["train", "--resume", out, "--steps", "600", "--diag-every", "200", *base]) == 0
    back = diagnostics.load_history(tmp_path / "run" / "diagnostics" / "diagnostics.json")
    assert [s.step for s in back] == [0, 200, 400, 600]


def test_corrupt_saved_history_gets_a_one_line_error_not_a_traceback(tmp_path, capsys):
    from handgrad.cli import main

    out = tmp_path / "run"
    assert main(["train", "--steps", "200", "--chunk-steps", "100", "--diag-every", "100", "--engine",
                 "eager", "--quiet", "--samples", "0", "--out", str(out)]) == 0
    history = out / "diagnostics" / "diagnostics.json"
    history.write_text(history.read_text()[:200])
    capsys.readouterr()
    assert main(["diagnose", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupt diagnostics history" in err and "\n" not in err
    history.write_text('{"format": "something else"}')
    assert main(["diagnose", "--checkpoint", str(out)]) == 2
    assert "not a handgrad diagnostics file" in capsys.readouterr().err
