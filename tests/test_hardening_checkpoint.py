"""A checkpoint is untrusted input: every field of meta.json and every tensor is checked before use,
only regular files inside the checkpoint's own directory are read, nothing from a file the user did not
name is echoed, and no vocabulary entry can drive the terminal (issue 12, "Checkpoints")."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from handgrad import checkpoint, data, models, train
from handgrad.checkpoint import Checkpoint, CheckpointError
from handgrad.cli import main
from handgrad.train import TrainConfig

ESC = "\x1b"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run on a data file of its own (so eval follows meta.json's data_path)."""
    root = tmp_path_factory.mktemp("hc")
    names = root / "names.txt"
    names.write_text("".join(f"{w}\n" for w in data.read_words(data.default_data_path()).items[:400]))
    out = root / "run"
    assert main(["train", "--data", str(names), "--steps", "100", "--engine", "eager", "--quiet",
                 "--samples", "0", "--out", str(out)]) == 0
    return out


@pytest.fixture()
def run(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


def _meta(d):
    return json.loads((d / "meta.json").read_text())


def _write_meta(d, meta):
    (d / "meta.json").write_text(json.dumps(meta))


def _edit_tensors(d, edit):
    """Rewrite the tensor file through `edit(dict)` and update meta.json's sha256 to match, as a
    deliberately crafted (not merely corrupt) checkpoint would."""
    meta = _meta(d)
    path = d / meta["tensors_file"]
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path)
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_meta(d, meta)


def _one_line_error(capsys, argv, expected, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("handgrad: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err and ESC not in err  # escaped, never raw
    return err


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


# ---------------------------------------------------------------------------- meta.json fields
META_CASES = [
    (_set("step", "100"), "field 'step': expected an integer"),
    (_set("step", -1), "field 'step': expected an integer from 0"),
    (_set("step", 10**30), "field 'step': expected an integer from 0"),
    (_set("step", 99), None),  # a consistent step below steps: loads (as an unfinished-looking run)
    (_set("train_config.steps", 10**15), "field 'train_config'.steps: expected an integer from 1"),
    (_set("train_config.steps", "100"), "field 'train_config'.steps: expected an integer"),
    (_set("train_config.lr", "0.1"), "field 'train_config'.lr: expected a finite number"),
    (_set("train_config.seed", -5), "field 'train_config'.seed: expected an integer from 0"),
    (_set("train_config.dtype", "float16"), "invalid TrainConfig"),
    (_set("vocab", list(range(27))), "field 'vocab'"),
    (_set("vocab", "abc"), "field 'vocab'"),
    (lambda m: m["vocab"].__setitem__(5, ESC + "]0;pwned" + "\x07"), "field 'vocab'"),
    (lambda m: m["vocab"].__setitem__(5, ESC), "field 'vocab'[5]: expected one printable character, got '\\x1b'"),
    (lambda m: m["vocab"].__setitem__(5, "ab"), "field 'vocab'[5]: expected one printable character"),
    (lambda m: m["vocab"].__setitem__(5, "a"), "field 'vocab'"),  # a repeat
    (_set("tensors_file", "/etc/passwd"), "field 'tensors_file'"),
    (_set("tensors_file", "../run2/model-000000100-0123abcd.safetensors"), "field 'tensors_file'"),
    (_set("sha256", "x" * 64), "field 'sha256'"),
    (_set("data_path", 7), "field 'data_path'"),
    (_set("data_sha256", "zz"), "field 'data_sha256'"),
    (_set("results", [1, 2]), "field 'results'"),
    (_set("results", {"val": {"nested": 1}}), "field 'results'"),
    (_set("finished", "yes"), "field 'finished'"),
    (_set("model_config", "mlp"), "field 'model_config'"),
    (_set("model_config.vocab_size", 28), "vocabulary has 27 characters but vocab_size is 28"),
    (_set("block_size", 4), "block_size 4 differs from model_config's 3"),
    (_set("lr_history", [{"from_step": 5, "lr": 0.1, "lr_decayed": 0.01, "lr_decay_step": 100000}]),
     "lr_history"),
    (_set("lr_history", [{"from_step": 0, "lr": -1, "lr_decayed": 0.01, "lr_decay_step": 100000}]),
     "a positive number"),
    (_set("files", ["model-000000001-00000000.safetensors"]), "does not list the tensors_file"),
    (_set("evil", 1), "unknown field 'evil'"),
    (_set("model", []), "field 'model'"),
]


@pytest.mark.parametrize("edit, expected", META_CASES)
def test_every_meta_field_is_checked_before_use(run, capsys, edit, expected):
    meta = _meta(run)
    edit(meta)
    _write_meta(run, meta)
    if expected is None:
        assert checkpoint.load(run).state.step == 99
        return
    with pytest.raises(CheckpointError):
        checkpoint.load(run)
    for command in ("sample", "eval"):
        _one_line_error(capsys, [command, "--checkpoint", str(run)], expected)


def test_meta_json_that_is_not_an_object_or_not_json_is_refused(run, capsys):
    for text, expected in [("[1, 2]", "not a handgrad checkpoint"), ('{"step": NaN}', "corrupt JSON"),
                           ("\xff\xfe{", "corrupt JSON"), ("[" * 100_000, "corrupt JSON")]:
        (run / "meta.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
        _one_line_error(capsys, ["sample", "--checkpoint", str(run)], expected)


def test_a_vocabulary_of_escape_sequences_is_never_printed(run, capsys):
    meta = _meta(run)
    meta["vocab"][1:4] = [ESC, "\x9b", "\x07"]  # ESC, CSI, BEL: would retitle or recolour a terminal
    _write_meta(run, meta)
    assert main(["sample", "--checkpoint", str(run), "-n", "50"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "\\x1b" in err and all(c not in err for c in (ESC, "\x9b", "\x07"))


# ---------------------------------------------------------------------------- tensors
def _float64(key_prefix):
    def edit(t):
        for k in [k for k in t if k.startswith(key_prefix)]:
            t[k] = t[k].to(torch.float64)
    return edit


def _nan_param(t):
    t["param.2.weight"][0, 0] = float("nan")


TENSOR_CASES = [
    (lambda t: t.__setitem__("losses", t["losses"][:10]), "tensor losses has shape (10,)"),
    (lambda t: t.__setitem__("losses", torch.zeros(100, 2, dtype=torch.float64)), "tensor losses has shape"),
    (lambda t: t.__setitem__("losses", t["losses"].float()), "tensor losses is torch.float32"),
    (_float64("inference."), "is torch.float64, expected torch.float32"),  # float64 stats, float32 run
    (_float64("buffer."), "is torch.float64, expected torch.float32"),
    (_float64("param."), "is torch.float64, expected torch.float32"),
    (_nan_param, "tensor param.2.weight holds NaN or infinite values"),
    (lambda t: t["inference.3.running_var"].fill_(-1.0), "holds negative variances"),
    (lambda t: t.__setitem__("extra", torch.zeros(3)), "unexpected tensor 'extra'"),
    (lambda t: t.pop("rng_state"), "tensor rng_state is missing"),
    (lambda t: t.__setitem__("rng_state", torch.zeros(3, dtype=torch.uint8)), "tensor rng_state has shape"),
]


@pytest.mark.parametrize("edit, expected", TENSOR_CASES)
def test_every_tensor_is_checked_against_the_model(run, capsys, edit, expected):
    _edit_tensors(run, edit)
    for command in ("sample", "eval"):
        _one_line_error(capsys, [command, "--checkpoint", str(run)], expected)


def test_huge_finite_parameters_give_one_line_when_sampling(run, capsys):
    """Finite weights whose logits overflow make the probabilities NaN: one line, not a traceback."""
    _edit_tensors(run, lambda t: t["param.5.weight"].fill_(3e38))
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "not finite")


# ---------------------------------------------------------------------------- files outside the directory
def _other_run(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    return other


def test_tensor_file_symlink_to_a_valid_file_elsewhere_is_refused(run, tmp_path, capsys):
    other = _other_run(run, tmp_path)
    name = _meta(run)["tensors_file"]
    (run / name).unlink()
    (run / name).symlink_to(other / name)  # the same, valid bytes: only the link is wrong
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "is a symlink")


def test_meta_json_symlink_to_another_run_is_refused(run, tmp_path, capsys):
    other = _other_run(run, tmp_path)
    (run / "meta.json").unlink()
    (run / "meta.json").symlink_to(other / "meta.json")
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "is a symlink")


def test_tensor_file_that_is_a_fifo_or_directory_is_refused_without_blocking(run, capsys):
    name = _meta(run)["tensors_file"]
    (run / name).unlink()
    os.mkfifo(run / name)
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "not a regular file")
    (run / name).unlink()
    (run / name).mkdir()
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "not a regular file")


def test_a_tensor_file_over_its_size_bound_is_refused_before_reading(run, capsys):
    name = _meta(run)["tensors_file"]
    with open(run / name, "ab") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB for a model of 12k parameters
    _one_line_error(capsys, ["sample", "--checkpoint", str(run)], "allowed")


# ---------------------------------------------------------------------------- data_path
SECRET = "hunter2secret"


@pytest.mark.parametrize("kind", ["other file", "bad line", "/dev/zero", "fifo", "directory", "missing"])
def test_eval_never_reads_or_echoes_a_data_path_from_meta_json(run, tmp_path, capsys, kind):
    target = tmp_path / "secret.txt"
    if kind == "other file":
        target.write_text(f"{SECRET}\n")
    elif kind == "bad line":
        target.write_text(f"{SECRET}\x01\n")  # would be quoted by a data error
    elif kind == "/dev/zero":
        target = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block forever
    elif kind == "directory":
        target.mkdir()
    meta = _meta(run)
    meta["data_path"] = str(target)
    _write_meta(run, meta)
    for command in ("eval", "diagnose"):
        err = _one_line_error(capsys, [command, "--checkpoint", str(run)], "name the run's data with --data")
        assert SECRET not in err and str(target) not in err


def test_eval_reads_the_recorded_data_file_while_it_is_unchanged(run, tmp_path, capsys):
    meta = _meta(run)
    path = tmp_path / "copy.txt"  # the same items under another name: the fingerprint still matches
    shutil.copyfile(meta["data_path"], path)
    _write_meta(run, {**meta, "data_path": str(path)})
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert "val loss" in capsys.readouterr().out
    with open(path, "a") as f:
        f.write("zzzz\n")
    _one_line_error(capsys, ["eval", "--checkpoint", str(run)], "missing, changed or unreadable")


# ---------------------------------------------------------------------------- diagnose
def test_diagnose_never_writes_through_a_diagnostics_symlink(run, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "diagnostics").symlink_to(outside)
    _one_line_error(capsys, ["diagnose", "--checkpoint", str(run)], "is a symlink")
    assert list(outside.iterdir()) == []
    (run / "diagnostics").unlink()
    (run / "diagnostics").write_text("not a directory")
    _one_line_error(capsys, ["diagnose", "--checkpoint", str(run)], "is a file, expected a directory")


# ---------------------------------------------------------------------------- values the flags allow
def test_a_run_with_the_largest_seed_saves_and_loads(names_splits, tmp_path):
    mcfg = models.preset("mlp", vocab_size=len(names_splits.vocab))
    tcfg = TrainConfig(steps=20, engine="eager", chunk_steps=10, seed=train.MAX_SEED,
                       split_seed=train.MAX_SEED)
    state = train.train(names_splits, mcfg, tcfg)
    checkpoint.save(tmp_path, Checkpoint(mcfg, tcfg, names_splits.vocab, None, state, None, {}, 3))
    assert checkpoint.load(tmp_path).train_config.seed == train.MAX_SEED


@pytest.fixture(scope="module")
def finished_adamw(tmp_path_factory):
    """A short AdamW run (the zoo's bigram), whose checkpoint holds the optimizer's state."""
    out = tmp_path_factory.mktemp("hc_adamw") / "run"
    assert main(["train", "--model", "bigram", "--steps", "20", "--eval-every", "10", "--quiet",
                 "--samples", "0", "--out", str(out)]) == 0
    return out


def _first_v(t):
    return next(k for k in t if k.startswith("optim.v."))


OPTIMIZER_CASES = [
    (lambda t: t[_first_v(t)].fill_(-1.0), "holds negative variances"),
    (lambda t: t[next(k for k in t if k.startswith("optim.m."))].fill_(float("inf")), "NaN or infinite"),
    (lambda t: t.pop(_first_v(t)), "is missing"),
    (lambda t: t.__setitem__("optim.t", torch.tensor(-3, dtype=torch.int64)), "not an update count"),
    (lambda t: t.__setitem__("optim.t", torch.tensor(3.0)), "tensor optim.t is torch.float32"),
]


@pytest.mark.parametrize("edit, expected", OPTIMIZER_CASES)
def test_an_adamw_checkpoints_optimizer_state_is_checked_before_a_resume(finished_adamw, tmp_path, capsys,
                                                                        edit, expected):
    d = tmp_path / "run"
    shutil.copytree(finished_adamw, d)
    _edit_tensors(d, edit)
    _one_line_error(capsys, ["train", "--resume", str(d), "--steps", "30", "--quiet", "--samples", "0"],
                    expected)
