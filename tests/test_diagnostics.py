"""The diagnostics measure every model per layer with the hand-written backward, find real problems
(short eager runs on the real data), stay quiet on the healthy default, run the lecture's sanity
checks, and write valid PNGs and diagnostics.json, from the library and from the CLI."""

import copy
import json
import math
import struct

import pytest
import torch

from handgrad import cli, data, diagnostics, models, ops, plots, train
from handgrad.diagnostics import Collector, DiagConfig
from handgrad.layers import Embedding, FlattenConsecutive, Linear, ReLU, Sequential, Tanh
from handgrad.train import NonFiniteError, TrainConfig

SMALL = {  # small versions of each model, so the file stays fast
    "mlp": {"n_hidden": 64},
    "deep": {"n_hidden": 64, "n_layers": 3},
    "wavenet": {"block_size": 4, "n_embd": 8, "n_hidden": 32},
}


@pytest.fixture(scope="module")
def splits4() -> data.Splits:
    return data.make_splits(data.read_words(data.default_data_path()).items, block_size=4, seed=42)


def _splits(name, names_splits, splits4):
    return splits4 if name == "wavenet" else names_splits


def _run(splits, name="mlp", steps=1000, every=250, mkw=None, **tkw):
    """Train with the collector as callback (eager: deterministic); returns (collector, state)."""
    mcfg = models.with_vocab(models.preset(name, **(mkw or {})), len(splits.vocab))
    tcfg = TrainConfig.for_model(name, steps=steps, engine="eager", chunk_steps=every, **tkw)
    c = Collector(splits.Xtr, splits.Ytr, mcfg, tcfg, DiagConfig(every=every))
    state = train.new_state(mcfg, tcfg)
    c.record(state.model, 0)
    try:
        train.train(splits, mcfg, tcfg, state, c, c.watch(train.eager_steps))
    except NonFiniteError:
        pass
    return c, state


def _kinds(c):
    return {(w.kind, w.layer) for w in c.warnings()}


# ---------------------------------------------------------------------------- measuring any model
@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_every_model_is_measured_per_layer_with_independently_checked_numbers(name, names_splits, splits4):
    splits = _splits(name, names_splits, splits4)
    mcfg = models.with_vocab(models.preset(name, **SMALL[name]), len(splits.vocab))
    model = models.build(mcfg, 3)
    X, Y = splits.Xtr[:96].view(3, 32, -1), splits.Ytr[:96].view(3, 32)
    snap, probe = diagnostics.measure(model, X, Y, lr=0.1, saturated=0.97)
    tanh = [i for i, layer in enumerate(model.layers) if isinstance(layer, Tanh)]
    assert [s.index for s in snap.tanh_layers()] == tanh and len(snap.layers) == len(model.layers)
    assert snap.weights() == [n for n, p in model.params().items() if p.dim() == 2]
    assert snap.tanh_layers()[0].label == f"layer {tanh[0]} (Tanh)"
    # the probe gradient is the mean of loss_and_grads over the batches; the ratio is part 3's formula
    steps = [models.loss_and_grads(model, X[k], Y[k]) for k in range(3)]
    for n, p in model.params().items():
        mean = sum(s.grads[n] for s in steps) / 3
        assert torch.allclose(probe.grads[n], mean) and snap.grads[n].norm == pytest.approx(mean.norm().item())
        if p.dim() == 2:
            ratio = sum(0.1 * s.grads[n].std().item() / p.std().item() for s in steps) / 3
            assert snap.grads[n].update_ratio == pytest.approx(math.log10(ratio), rel=1e-5)
    assert snap.loss == pytest.approx(sum(s.loss.item() for s in steps) / 3)
    # each Tanh layer's output, recomputed by running the layers up to it
    for i in tanh:
        h = torch.cat([Sequential(model.layers[:i + 1]).forward(X[k])[0] for k in range(3)])
        h = h.reshape(-1, h.shape[-1])
        st = snap.layers[i]
        assert torch.allclose(probe.outputs[i], h) and st.units == h.shape[1]
        assert st.saturated == pytest.approx((h.abs() > 0.97).double().mean().item())
        assert st.dead == int((h.abs() > 0.97).all(0).sum()) and st.mean == pytest.approx(h.double().mean().item())
    assert snap.nonfinite == [] and probe.dlogits.shape == (32, len(splits.vocab))


def test_the_gradient_at_a_tanh_output_is_the_one_backward_passes_down(names_splits):
    model = models.build(models.with_vocab(models.preset("mlp", n_hidden=16), 27), 0, torch.float64)
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    _, probe = diagnostics.measure(model, X[None], Y[None], lr=0.1)
    # d loss / d h = dlogits @ W2^T for the lecture MLP (the Linear after the Tanh)
    logits, _ = model.forward(X)
    dlogits = ops.cross_entropy_backward(1.0, ops.cross_entropy_forward(logits, Y)[1])  # (B, V)
    assert torch.allclose(probe.doutputs[4], dlogits @ model.layers[5].weight.T)
    assert torch.allclose(probe.dlogits, dlogits)


def test_a_users_own_sequential_is_measured_and_checked(names_splits, tmp_path):
    g = torch.Generator().manual_seed(0)
    model = Sequential([Embedding(27, 6), FlattenConsecutive(3), Linear(18, 40), ReLU(), Linear(40, 40),
                        Tanh(), Linear(40, 27)])
    model.init_(g)
    tcfg = TrainConfig(steps=200, engine="eager", chunk_steps=100)
    c = Collector(names_splits.Xtr, names_splits.Ytr, None, tcfg, DiagConfig(every=100, probe_batches=2))
    c.record(model, 100)  # no step-0 record and no model config: the initial loss is not known
    assert [s.label for s in c.history[0].tanh_layers()] == ["layer 5 (Tanh)"]
    assert c.history[0].weights() == ["0.weight", "2.weight", "4.weight", "6.weight"]
    checks = {ch.name: ch for ch in c.checks(model)}
    assert checks[diagnostics.ATOMIC_CHECK].status == "n/a" and "n/a for this model" in str(
        checks[diagnostics.ATOMIC_CHECK])
    assert checks["initial loss close to -log(1/V)"].status == "n/a"
    assert all(ch.passed for ch in checks.values() if ch.applies)
    report = diagnostics.write_report(tmp_path, c, model, 100)
    assert {p.name for p in report.paths} == set(plots.SIZES) - {"loss.png"} | {"diagnostics.json"}


# ---------------------------------------------------------------------------- broken configs are found
def test_healthy_default_mlp_gives_no_warning(names_splits):
    c, _ = _run(names_splits, steps=1000, every=250)
    assert c.warnings() == []
    assert len(c.history) == 5 and c.history[-1].tanh_layers()[0].dead == 0


def test_small_deep_and_wavenet_give_no_warning(names_splits, splits4):
    for name in ("deep", "wavenet"):
        c, _ = _run(_splits(name, names_splits, splits4), name, steps=600, every=200, mkw=SMALL[name])
        assert c.warnings() == [], name


def test_deep_without_batchnorm_and_a_large_first_init_saturates_and_starves_the_first_layer(names_splits):
    c, _ = _run(names_splits, "deep", steps=600, every=200,
                mkw={**SMALL["deep"], "batchnorm": False, "w1_scale": 10.0})
    kinds = _kinds(c)
    assert ("saturation", "layer 3 (Tanh)") in kinds  # the first Tanh: layers are Emb, Flat, Linear, Tanh
    assert ("vanishing_gradient", "2.weight (Linear)") in kinds
    w = next(w for w in c.warnings() if w.layer == "layer 3 (Tanh)")
    assert c.history[-1].layers[3].saturated > 0.8 and "batchnorm" in w.advice
    assert "8.weight (Linear)" in next(w for w in c.warnings() if w.kind == "vanishing_gradient").message


def test_the_same_deep_model_with_batchnorm_does_not_saturate(names_splits):
    c, _ = _run(names_splits, "deep", steps=600, every=200, mkw={**SMALL["deep"], "w1_scale": 10.0})
    assert not any(k == "saturation" for k, _ in _kinds(c))


def test_exploding_learning_rate_on_the_mlp_is_caught(names_splits):
    c, _ = _run(names_splits, steps=600, every=200, lr=50.0)
    kinds = _kinds(c)
    assert ("update_ratio_high", "5.weight (Linear)") in kinds
    assert ("saturation", "layer 4 (Tanh)") in kinds and ("dead_units", "layer 4 (Tanh)") in kinds
    assert "learning rate" in next(w for w in c.warnings() if w.kind == "update_ratio_high").advice


def test_non_finite_training_is_reported_with_step_and_tensor(names_splits):
    mcfg = models.preset("mlp", n_hidden=32)
    tcfg = TrainConfig(steps=100, engine="eager", chunk_steps=10)
    c = Collector(names_splits.Xtr, names_splits.Ytr, mcfg, tcfg, DiagConfig(every=10))
    state = train.new_state(mcfg, tcfg)
    state.model.layers[5].weight[3, 5] = math.inf
    c.record(state.model, 0)
    with pytest.raises(NonFiniteError):
        train.train(names_splits, mcfg, tcfg, state, c, c.watch(train.eager_steps))
    warnings = [w for w in c.warnings() if w.kind == "non_finite"]
    assert {w.layer for w in warnings} >= {"loss", "5.weight", "layer 5 (Linear)"}
    assert any(w.step == 0 for w in warnings) and "learning rate" in warnings[0].advice
    assert c.failure == (0, "loss")  # recorded by watch() from the NonFiniteError training raised
    assert any(w.layer == "loss" and "stopped training" in w.message for w in warnings)


def test_a_single_bad_snapshot_is_noise_not_a_warning(names_splits):
    c, _ = _run(names_splits, steps=500, every=100)
    c.history[2].layers[4].saturated = 0.9  # one probe out of six
    assert c.warnings() == []
    for s in c.history[2:5]:
        s.layers[4].saturated = 0.9
    assert [(w.kind, w.layer) for w in c.warnings()] == [("saturation", "layer 4 (Tanh)")]


def test_gradient_explosion_between_layers_and_over_time_is_caught(names_splits):
    c, _ = _run(names_splits, steps=500, every=100)
    assert c.warnings() == []
    layers, growth = copy.deepcopy(c.history), copy.deepcopy(c.history)
    for s in layers[2:5]:  # the first Linear receives 1000x the grad:data ratio of the last
        s.grads["2.weight"].grad_data = s.grads["5.weight"].grad_data * 1e3
    for s in growth[2:5]:  # every gradient 1000x larger than at init
        for g in s.grads.values():
            g.norm *= 1e3
    assert {(w.kind, w.layer) for w in diagnostics.find_warnings(layers, c.cfg)} == {
        ("exploding_gradient", "2.weight (Linear)")}
    assert {(w.kind, w.layer) for w in diagnostics.find_warnings(growth, c.cfg)} == {
        ("exploding_gradient", "all parameters")}


def test_collecting_does_not_change_training(names_splits):
    _, state = _run(names_splits, steps=300, every=100)
    plain = train.train(names_splits, models.preset("mlp"), TrainConfig(steps=300, engine="eager",
                                                                         chunk_steps=100))
    assert torch.equal(state.losses, plain.losses)
    assert all(torch.equal(a, b) for a, b in zip(state.model.params().values(), plain.model.params().values()))
    assert all(torch.equal(a, b) for a, b in zip(state.model.buffers().values(), plain.model.buffers().values()))


def test_interval_must_be_a_multiple_of_chunk_steps(names_splits):
    with pytest.raises(ValueError, match="multiple of chunk_steps"):
        Collector(names_splits.Xtr, names_splits.Ytr, None, TrainConfig(chunk_steps=1000), DiagConfig(every=1500))


def test_collecting_uses_no_autograd(names_splits):
    tcfg = TrainConfig(steps=10, engine="eager", chunk_steps=10)
    c = Collector(names_splits.Xtr, names_splits.Ytr, None, tcfg, DiagConfig(every=10, probe_batches=2))
    model = models.build(models.preset("deep", **SMALL["deep"]))
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # anything needing autograd would fail or build no graph
    try:
        c.record(model, 0)
    finally:
        torch.set_grad_enabled(previous)
    assert not any(t.requires_grad for t in model.params().values())
    assert all(math.isfinite(g.norm) for g in c.history[0].grads.values())


# ---------------------------------------------------------------------------- the lecture's sanity checks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sanity_checks_pass_at_init_and_after_training_on_the_mlp(names_splits, dtype):
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    trained = models.cast(_run(names_splits, steps=300, every=100)[1].model, dtype)
    for model in (models.build(models.preset("mlp"), 42, dtype), trained):
        checks = diagnostics.sanity_checks(model, X, Y, init_loss=3.76)
        assert all(c.passed for c in checks), [str(c) for c in checks]
        assert checks[0].value <= diagnostics.TOL[dtype] / 32
        assert checks[3].name == diagnostics.ATOMIC_CHECK and checks[3].value <= diagnostics.ATOMIC_TOL[dtype]


@pytest.mark.parametrize("name", ["deep", "wavenet"])
def test_the_atomic_graph_check_says_n_a_for_other_models(name, names_splits, splits4):
    splits = _splits(name, names_splits, splits4)
    model = models.build(models.with_vocab(models.preset(name, **SMALL[name]), len(splits.vocab)))
    checks = diagnostics.sanity_checks(model, splits.Xtr[:32], splits.Ytr[:32], init_loss=3.3)
    atomic_check = next(c for c in checks if c.name == diagnostics.ATOMIC_CHECK)
    assert atomic_check.status == "n/a" and not atomic_check.failed and "n/a for this model" in str(atomic_check)
    assert all(c.passed for c in checks if c.applies)
    # one layer short of the pattern, or the lecture MLP without a bias: n/a too
    mlp = models.build(models.preset("mlp", n_hidden=16))
    assert diagnostics.lecture_params(Sequential(mlp.layers[:-1])) is None
    mlp.layers[2].bias = None
    assert diagnostics.lecture_params(mlp) is None


def test_the_atomic_graph_check_fails_on_a_wrong_layer_backward(names_splits):
    model = models.build(models.preset("mlp", n_hidden=16), 0, torch.float64)
    bn = model.layers[3]
    right = bn.backward
    bn.backward = lambda dout, cache: (lambda dx, g: (dx * 1.03, g))(*right(dout, cache))  # n/(n-1)-sized slip
    check = diagnostics.check_atomic_graph(model, names_splits.Xtr[:32], names_splits.Ytr[:32])
    assert check.failed and "dW1 (2.weight)" in check.detail


def test_sanity_checks_fail_and_say_why_when_probs_underflow(names_splits):
    model = models.build(models.preset("mlp"))
    model.layers[5].weight.mul_(1000)  # logits hundreds apart: the target's probability underflows to 0
    X, Y = names_splits.Xtr[:32], names_splits.Ytr[:32]
    rows, maxes, chain, graph, init = diagnostics.sanity_checks(model, X, Y, init_loss=3.76)
    assert rows.passed  # the closed form has no division by probs
    assert not maxes.passed and not chain.passed and "NaN" in maxes.detail and "NaN" in chain.detail
    assert graph.failed and "NaN" in graph.detail
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

    p = atomic.init_params(atomic.LectureConfig(), dtype=torch.float64)
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
    init_check = c.checks(state.model)[-1]
    assert init_check.passed and abs(init_check.value - c.history[0].loss) < 1e-9
    c.history = c.history[1:]  # no step-0 record: the init is rebuilt from the config and seed
    assert c.initial_loss(torch.float32) == pytest.approx(init_check.value, abs=1e-6)


# ---------------------------------------------------------------------------- outputs
def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_valid_pngs_of_the_expected_size_and_json(names_splits, tmp_path):
    c, state = _run(names_splits, "deep", steps=400, every=100, mkw=SMALL["deep"])
    report = diagnostics.write_report(tmp_path, c, state.model, state.step, state.losses)
    names = {p.name for p in report.paths}
    assert names == set(plots.SIZES) | {"diagnostics.json"}
    for name, (w, h) in plots.SIZES.items():
        assert _png_size(tmp_path / name) == (w * plots.DPI, h * plots.DPI)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files
    data = json.loads((tmp_path / "diagnostics.json").read_text())
    assert data["format"] == diagnostics.FORMAT and data["warnings"] == []
    assert len(data["history"]) == 5 and all(ch["status"] in ("ok", "n/a") for ch in data["checks"])
    back = diagnostics.load_history(tmp_path / "diagnostics.json")
    assert [s.step for s in back] == [0, 100, 200, 300, 400]
    assert back[-1].grads["2.weight"].update_ratio == pytest.approx(c.history[-1].grads["2.weight"].update_ratio)
    assert back[-1].layers == c.history[-1].layers
    assert diagnostics.find_warnings(back, c.cfg) == c.warnings()


def test_smoothed_loss_is_the_lectures_windowed_mean_of_log10():
    losses = torch.tensor([10.0, 100.0, 1.0, 1000.0, float("nan")], dtype=torch.float64)
    centres, means = plots.smooth_log10(losses, 2)
    assert means.tolist() == pytest.approx([1.5, 1.5]) and centres.tolist() == [1.0, 3.0]


# ---------------------------------------------------------------------------- the CLI
CLI_SMALL = {
    "deep": ["--model", "deep", "--n-hidden", "32", "--n-layers", "2"],
    "wavenet": ["--model", "wavenet", "--block-size", "4", "--n-embd", "8", "--n-hidden", "32"],
}
QUIET = ["--engine", "eager", "--quiet", "--samples", "0"]


@pytest.mark.parametrize("name", ["deep", "wavenet"])
def test_cli_train_with_diagnostics_then_diagnose(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *CLI_SMALL[name], "--steps", "400", "--chunk-steps", "100", "--diag-every", "200",
                     "--out", str(out), *QUIET]) == 0
    err = capsys.readouterr().err
    assert "0 warning(s), 0 failed check(s)" in err
    saved = json.loads((out / "diagnostics" / "diagnostics.json").read_text())
    assert [s["step"] for s in saved["history"]] == [0, 200, 400]
    assert (out / "diagnostics" / "saturation.png").is_file()
    assert cli.main(["diagnose", "--checkpoint", str(out), "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "3 saved measurement(s)" in text and "no warnings" in text and "FAIL" not in text
    assert "n/a for this model" in text
    assert {p.name for p in (tmp_path / "d").iterdir()} == set(plots.SIZES) | {"diagnostics.json"}


def test_cli_prints_one_line_per_warning_naming_layer_and_advice(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *CLI_SMALL["deep"], "--steps", "300", "--chunk-steps", "100", "--diag-every", "100",
                     "--no-batchnorm", "--w1-scale", "10", "--out", str(out), *QUIET]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: layer 3 (Tanh): ")]
    assert len(lines) == 1 and "batchnorm" in lines[0].split("; try ")[1]


@pytest.mark.parametrize("every", ["150", "0"])
def test_cli_rejects_a_diagnostics_interval_off_the_chunk_grid(tmp_path, capsys, every):
    assert cli.main(["train", "--steps", "300", "--chunk-steps", "100", "--diag-every", every,
                     "--out", str(tmp_path / "run"), *QUIET]) == 2
    assert f"--diag-every {every}" in capsys.readouterr().err


def test_resumed_training_continues_the_saved_history(tmp_path):
    out = str(tmp_path / "run")
    base = [*QUIET, "--checkpoint-every", "200", "--diag-every", "200"]
    assert cli.main(["train", "--n-hidden", "32", "--steps", "400", "--chunk-steps", "100", "--out", out,
                     *base]) == 0
    assert cli.main(["train", "--resume", out, "--steps", "600", *base]) == 0
    back = diagnostics.load_history(tmp_path / "run" / "diagnostics" / "diagnostics.json")
    assert [s.step for s in back] == [0, 200, 400, 600]


def test_corrupt_or_old_saved_history_gets_a_one_line_error_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--n-hidden", "32", "--steps", "200", "--chunk-steps", "100", "--diag-every",
                     "100", "--out", str(out), *QUIET]) == 0
    history = out / "diagnostics" / "diagnostics.json"
    good = history.read_text()
    history.write_text(good[:200])
    capsys.readouterr()
    assert cli.main(["diagnose", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupt diagnostics history" in err and "\n" not in err
    history.write_text('{"format": "something else"}')
    assert cli.main(["diagnose", "--checkpoint", str(out)]) == 2
    assert "not a handgrad diagnostics file" in capsys.readouterr().err
    history.write_text(good.replace(f'"format_version": {diagnostics.FORMAT_VERSION}', '"format_version": 1'))
    assert cli.main(["diagnose", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "format version 1 is not supported" in err and "\n" not in err
