import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from handgrad import checkpoint, models, train
from handgrad.checkpoint import Checkpoint, CheckpointError
from handgrad.train import TrainConfig


def _run(splits, steps, name="mlp", mkw=None, **kw):
    mcfg = models.preset(name, vocab_size=len(splits.vocab), block_size=splits.Xtr.shape[1], **(mkw or {}))
    tcfg = TrainConfig(**{"steps": steps, "engine": "eager", "chunk_steps": 100, **kw})
    return mcfg, tcfg, train.train(splits, mcfg, tcfg)


def _ck(mcfg, tcfg, splits, state, inference=None, results=None):
    return Checkpoint(mcfg, tcfg, splits.vocab, None, state, inference, results or {}, mcfg.block_size)


def test_save_then_load_round_trips_every_tensor(names_splits, tmp_path):
    mcfg, tcfg, state = _run(names_splits, 200)
    inference = train.inference_buffers(state, names_splits, tcfg)
    checkpoint.save(tmp_path, _ck(mcfg, tcfg, names_splits, state, inference, {"val": 2.5}))
    ck = checkpoint.load(tmp_path)
    assert (ck.model_config, ck.train_config, ck.vocab, ck.results) == (mcfg, tcfg, names_splits.vocab,
                                                                        {"val": 2.5})
    assert ck.block_size == 3 and ck.state.model.spec() == state.model.spec()
    for (na, a), (nb, b) in zip(state.model.params().items(), ck.state.model.params().items()):
        assert na == nb and torch.equal(a, b)
    for name, t in inference.items():
        assert torch.equal(ck.inference[name], t)
    assert ck.state.step == 200
    assert torch.equal(ck.state.generator.get_state(), state.generator.get_state())
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 1


@pytest.mark.parametrize("name, engine", [("mlp", "eager"), ("mlp", "auto"), ("deep", "eager"),
                                          ("wavenet", "eager")])  # auto: fast where it can be built
def test_resume_from_a_checkpoint_is_bit_identical(names_splits, tmp_path, name, engine):
    mkw = {"n_hidden": 32, "n_layers": 2} if name == "deep" else {"n_hidden": 32} if name == "wavenet" else {}
    splits = names_splits
    if name == "wavenet":
        from handgrad import data
        splits = data.make_splits(data.read_words(data.default_data_path()).items, block_size=8, seed=42)
    mcfg, tcfg, whole = _run(splits, 600, name=name, mkw=mkw, engine=engine)
    _, tcfg_half, half = _run(splits, 300, name=name, mkw=mkw, engine=engine)
    checkpoint.save(tmp_path, _ck(mcfg, tcfg_half, splits, half))
    ck = checkpoint.load(tmp_path)
    resumed = train.train(splits, mcfg, tcfg, ck.state)
    for (na, a), (nb, b) in zip(whole.model.params().items(), resumed.model.params().items()):
        assert na == nb and torch.equal(a, b), na
    for na, a in whole.model.buffers().items():
        assert torch.equal(a, resumed.model.buffers()[na]), na
    assert torch.equal(whole.losses, resumed.losses)


@pytest.fixture()
def saved(names_splits, tmp_path):
    mcfg, tcfg, state = _run(names_splits, 100)
    checkpoint.save(tmp_path, _ck(mcfg, tcfg, names_splits, state))
    return tmp_path


def test_truncated_tensor_file_is_reported(saved):
    f = next(saved.glob("model-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(saved)


def test_truncated_meta_json_is_reported(saved):
    meta = saved / "meta.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt JSON"):
        checkpoint.load(saved)


def test_mismatched_shape_is_reported(saved):
    meta = json.loads((saved / "meta.json").read_text())
    meta["model"]["layers"][2]["fan_out"] = 100  # the spec edited: W1 is (30, 200) in the file
    meta["model"]["layers"][3]["dim"] = 100
    meta["model"]["layers"][5]["fan_in"] = 100
    meta["model_config"]["n_hidden"] = 100
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor param.2.weight has shape \(30, 200\), the model "
                       r"expects \(30, 100\)"):
        checkpoint.load(saved)
    meta["model_config"]["n_hidden"] = 200  # the config no longer matches the spec
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model_config \(mlp\) does not describe the stored model spec"):
        checkpoint.load(saved)


def test_vocabulary_of_another_size_is_reported(saved):
    meta = json.loads((saved / "meta.json").read_text())
    meta["vocab"] = meta["vocab"][:-1]
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="vocabulary has 26 characters but vocab_size is 27"):
        checkpoint.load(saved)


def test_missing_directory_and_non_checkpoint_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a handgrad checkpoint"):
        checkpoint.load(tmp_path)


@pytest.mark.slow
def test_checkpoint_survives_kill_9_during_training_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "handgrad.cli", "train", "--steps", "1000000", "--engine", "eager",
           "--chunk-steps", "50", "--checkpoint-every", "50", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for a few checkpoints, so the kill lands among writes
            meta = out / "meta.json"
            if meta.exists() and json.loads(meta.read_text() or "{}").get("step", 0) >= 300:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ck = checkpoint.load(out)  # complete and consistent whatever moment the kill hit
    assert ck.state.step >= 300 and ck.state.step % 50 == 0
    r = subprocess.run([sys.executable, "-m", "handgrad.cli", "train", "--resume", str(out), "--steps",
                        str(ck.state.step + 100), "--engine", "eager", "--quiet", "--samples", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(out).state.step == ck.state.step + 100


def test_other_format_version_and_dtype_are_reported(saved):
    meta_path = saved / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        checkpoint.load(saved)
    meta_path.write_text(json.dumps({**meta, "train_config": {**meta["train_config"], "dtype": "float64"}}))
    with pytest.raises(CheckpointError, match="tensor param.0.weight is torch.float32, expected torch.float64"):
        checkpoint.load(saved)
    meta_path.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "n_heads": 2}}))
    with pytest.raises(CheckpointError, match=r"unknown ModelConfig fields \['n_heads'\]"):
        checkpoint.load(saved)
