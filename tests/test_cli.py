import json

import pytest

from handgrad.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--steps", "400", "--engine", "eager", "--quiet", "--out", str(out),
                 "--samples", "3"]) == 0
    return out


def test_train_prints_losses_and_samples(trained, capsys):
    out = trained.parent / "again"
    assert main(["train", "--steps", "300", "--engine", "eager", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train loss" in text and "val loss" in text and "samples:" in text
    results = json.loads((out / "meta.json").read_text())["results"]
    assert 2.0 < results["val"] < 3.2


def test_sample_and_eval_read_a_checkpoint(trained, capsys):
    assert main(["sample", "--checkpoint", str(trained), "-n", "7", "--seed", "3"]) == 0
    names = capsys.readouterr().out.split()
    assert 1 <= len(names) <= 7 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in names)
    assert main(["eval", "--checkpoint", str(trained)]) == 0
    text = capsys.readouterr().out
    assert all(f"{s} loss" in text for s in ("train", "val", "test"))


def test_verify_autograd_agrees_in_float64(capsys):
    assert main(["train", "--verify-autograd", "50", "--dtype", "float64", "--engine", "eager"]) == 0
    assert "AGREE" in capsys.readouterr().out


def _one_line_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("handgrad: error:") and "\n" not in err and "Traceback" not in err
    assert expected in err, err


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"), (b"", "no items"), (b"ab\n\xff\n", ":2: not valid UTF-8"),
    (b"ab\ncd.e\n", ":2: item 'cd.e' contains '.'"),
])
def test_bad_data_exits_2_with_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "d.txt"
    if content is not None:
        path.write_bytes(content)
    _one_line_error(capsys, ["train", "--data", str(path), "--steps", "10", "--quiet", "--out",
                             str(tmp_path / "o")], expected)


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "1"], "--batch-size: must be at least 2"),
    (["--lr", "0"], "--lr: must be a positive finite number"),
    (["--lr", "inf"], "--lr: must be a positive finite number"),
    (["--seed", str(2**63)], "--seed: must be an integer from 0 to"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to"),
    (["--steps", str(10**9)], "--steps: must be at most"),
    (["--samples", "-1"], "--samples -1: expected 0"),
    (["--batch-size", str(10**9)], "--batch-size: this run would need about"),
    (["--model", "deep", "--n-hidden", str(10**5)], "--n-hidden: this run would need about"),
    (["--block-size", str(10**5)], "--block-size: this run would need about"),
    (["--n-hidden", "0"], "--n-hidden: must be an integer from 1 to"),
    (["--steps", "0"], "--steps: must be a positive integer"),
])
def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, capsys, flags, expected):
    _one_line_error(capsys, ["train", "--quiet", "--out", str(tmp_path / "o"), *flags], expected)


def test_bad_checkpoints_exit_2(trained, tmp_path, capsys):
    _one_line_error(capsys, ["sample", "--checkpoint", str(tmp_path / "none")], "no such checkpoint directory")
    _one_line_error(capsys, ["train", "--resume", str(trained), "--n-hidden", "100"],
                    "--n-hidden cannot be changed when resuming")
    _one_line_error(capsys, ["train", "--out", str(trained), "--steps", "5"], "already holds a run")
    other = tmp_path / "other.txt"
    other.write_text("zoë\n")
    _one_line_error(capsys, ["eval", "--checkpoint", str(trained), "--data", str(other)],
                    "not in the checkpoint's vocabulary")


@pytest.mark.parametrize("command", ["train", "sample", "eval", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--" in capsys.readouterr().out


def test_divergence_exits_1_naming_step_and_tensor(tmp_path, capsys):
    out = tmp_path / "div"
    code = main(["train", "--lr", "1e38", "--steps", "300", "--engine", "eager", "--chunk-steps", "10",
                 "--checkpoint-every", "10", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err
    assert "training diverged at step 1: loss is NaN or infinite" in err
    assert "no checkpoint was written yet" in err and not (out / "meta.json").exists()


def test_unavailable_fast_engine_exits_2(tmp_path, capsys):
    _one_line_error(capsys, ["train", "--engine", "fast", "--dtype", "float64", "--steps", "5", "--quiet",
                             "--out", str(tmp_path / "o")], "--engine fast: the fast engine is unavailable")


def test_a_learning_rate_that_never_diverges_but_never_learns_warns(tmp_path, capsys):
    code = main(["train", "--lr", "50", "--steps", "300", "--samples", "0", "--quiet",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0 and "training did not learn; try a smaller --lr (this run: 50)" in err


def test_a_sane_run_does_not_warn(trained, capsys):
    assert "did not learn" not in capsys.readouterr().err


@pytest.mark.parametrize("n_items", [1, 2, 3])
def test_tiny_data_trains_and_evaluates_saying_what_is_empty(tmp_path, capsys, n_items):
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(["emma", "olivia", "ava"][:n_items]) + "\n")
    out = tmp_path / "o"
    assert main(["train", "--data", str(path), "--steps", "20", "--samples", "2", "--quiet",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "val loss n/a (empty split)" in captured.out and "the val split is empty" in captured.err
    assert main(["eval", "--checkpoint", str(out)]) == 0
    text = capsys.readouterr().out
    assert "val loss n/a (empty split)" in text and "train loss n/a" not in text


def test_sigint_while_loading_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    from handgrad import data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "read_words", interrupted)
    code = main(["train", "--steps", "5", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 130 and "\n" not in err and err.startswith("handgrad: error: interrupted")


@pytest.mark.parametrize("model", ["mlp", "deep", "wavenet"])
def test_check_a_model_passes_and_a_wrong_backward_fails(model, capsys, monkeypatch):
    assert main(["check", "--model", model, "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{model} at its init" in out and "PASSED" in out
    from handgrad import ops

    monkeypatch.setattr(ops, "tanh_backward", lambda dh, cache: (1.0 - cache[0]) * dh)  # 1 - h for 1 - h**2
    assert main(["check", "--model", model, "--batch-size", "8", "--dtype", "float64"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_a_checkpoint_where_it_stopped(trained, capsys):
    assert main(["check", "--checkpoint", str(trained), "--batch-size", "8"]) == 0
    assert f"checkpoint {trained} at step" in capsys.readouterr().out
    _one_line_error(capsys, ["check", "--checkpoint", str(trained), "--model", "mlp"], "give one")


@pytest.mark.parametrize("argv, expected", [
    (["check", "--model", "mlp", "--batch-size", "1"], "--batch-size 1: expected at least 2"),
    (["check", "--seed", "-1"], "--seed -1: expected an integer from 0"),
    (["check", "--model", "deep", "--data", "/no/such/names.txt"], "no such file"),
])
def test_check_refuses_bad_flags_in_one_line(capsys, argv, expected):
    _one_line_error(capsys, argv, expected)


def test_sampling_more_names_than_memory_holds_is_refused_before_drawing(trained, capsys):
    _one_line_error(capsys, ["sample", "--checkpoint", str(trained), "-n", str(10**12)],
                    f"-n {10**12}: drawing that many samples at once needs about")
