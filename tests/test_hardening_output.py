"""The output directory: a kill at any moment (the final save included) leaves a loadable checkpoint,
nothing the run did not write is deleted, an unusable --out is found before training, one writer per
directory, file modes follow the umask (issue 12, "Output directory")."""

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from handgrad import checkpoint, data, io, models, train
from handgrad.checkpoint import Checkpoint
from handgrad.cli import main
from handgrad.train import TrainConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = ["--engine", "eager", "--quiet", "--samples", "0"]


def _env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "handgrad.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=300, **kw)


def _one_line_error(capsys, argv, expected, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("handgrad: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    return err


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 100-step mlp run on the bundled names."""
    out = tmp_path_factory.mktemp("ho") / "run"
    assert main(["train", "--steps", "100", "--checkpoint-every", "50", *STEPS, "--out", str(out)]) == 0
    return out


@pytest.fixture()
def run(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


# ---------------------------------------------------------------------------- crashes during a save
class Killed(BaseException):
    """The process dying at a chosen moment: every later file operation fails too, so nothing is
    cleaned up, as after kill -9."""


def _killer(monkeypatch, at: int | None):
    """Count the operations that change the directory (renames and deletions); raise Killed at
    the `at`-th and after it. Returns the counter."""
    count = [0]
    real_replace, real_unlink = os.replace, os.unlink

    def step():
        count[0] += 1
        if at is not None and count[0] > at:
            raise Killed

    def replace(a, b, **kw):
        step()
        return real_replace(a, b, **kw)

    def unlink(p, **kw):
        step()
        return real_unlink(p, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return count


def _state(names_splits, steps):
    mcfg = models.preset("mlp", vocab_size=len(names_splits.vocab))
    tcfg = TrainConfig(steps=steps, engine="eager", chunk_steps=10)
    return mcfg, tcfg, train.train(names_splits, mcfg, tcfg)


def test_a_crash_between_any_two_steps_of_the_final_save_keeps_the_run(names_splits, tmp_path, monkeypatch):
    """The run saves at its last step, then saves again with the inference statistics (the final
    save): killed after any rename or deletion of that final save, the directory still loads, at
    that step, and the next save leaves only its own tensor file."""
    mcfg, tcfg, state = _state(names_splits, 30)
    ck = Checkpoint(mcfg, tcfg, names_splits.vocab, None, state, None, {}, 3)
    base = tmp_path / "base"
    checkpoint.save(base, ck)  # the periodic save at step 30
    final = Checkpoint(mcfg, tcfg, names_splits.vocab, None, state,
                       train.inference_buffers(state, names_splits, tcfg), {"train": 2.0}, 3)
    with monkeypatch.context() as m:  # how many directory changes the final save makes
        count = _killer(m, None)
        probe = tmp_path / "probe"
        shutil.copytree(base, probe)
        checkpoint.save(probe, final)
    assert count[0] >= 4  # announce meta.json, tensor file, meta.json, delete the old tensor file
    seen = set()
    for at in range(count[0] + 1):
        d = tmp_path / f"kill{at}"
        shutil.copytree(base, d)
        with monkeypatch.context() as m:
            _killer(m, at)
            try:
                checkpoint.save(d, final)
            except Killed:
                pass
        loaded = checkpoint.load(d)  # whatever the moment, a complete checkpoint
        assert loaded.state.step == 30
        seen.add(loaded.inference is not None)
        for (_, a), (_, b) in zip(loaded.state.model.params().items(), state.model.params().items()):
            assert torch.equal(a, b)
        io.clean_temp_files(d)  # what the next start does
        checkpoint.save(d, final)
        assert len(list(d.glob("model-*.safetensors"))) == 1 and not list(d.glob(f"*{io.TMP_SUFFIX}"))
    assert seen == {False, True}  # both the previous and the new checkpoint were observed


def test_saving_the_same_step_twice_never_reuses_a_file_name(names_splits, tmp_path):
    mcfg, tcfg, state = _state(names_splits, 10)
    ck = Checkpoint(mcfg, tcfg, names_splits.vocab, None, state, None, {}, 3)
    names = []
    for _ in range(3):
        checkpoint.save(tmp_path, ck)
        names.append(json.loads((tmp_path / "meta.json").read_text())["tensors_file"])
    assert len(set(names)) == 3 and [p.name for p in tmp_path.glob("model-*")] == names[-1:]


CHILD = textwrap.dedent("""
    import sys, torch
    from handgrad import checkpoint
    torch.set_num_threads(1)
    ck = checkpoint.load(sys.argv[1])
    results = dict(ck.results)
    print("ready", flush=True)
    i = 0
    while True:  # alternate the finished and the unfinished form of the same step
        ck.results = results if i % 2 else {}
        checkpoint.save(sys.argv[1], ck)
        i += 1
""")


@pytest.mark.slow
def test_readers_and_kill_9_during_saves_always_find_a_complete_checkpoint(run):
    rng = random.Random(12)
    for trial in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run)], stdout=subprocess.PIPE, env=_env())
        try:
            assert child.stdout.readline() == b"ready\n"
            if trial == 0:  # a reader while another process writes sees a complete checkpoint each time
                for _ in range(20):
                    assert checkpoint.load(run).state.step == 100
            time.sleep(rng.uniform(0.05, 0.5))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert checkpoint.load(run).state.step == 100
    r = _cli(["train", "--resume", str(run), "--steps", "120", *STEPS])  # and it continues
    assert r.returncode == 0, r.stderr
    assert not list(run.glob(f"*{io.TMP_SUFFIX}")) and len(list(run.glob("model-*.safetensors"))) == 1


def test_a_failed_save_mid_run_exits_1_keeping_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    real_save, calls = checkpoint.save, [0]

    def full_disk(d, ck):
        calls[0] += 1
        if calls[0] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(d, ck)

    monkeypatch.setattr(checkpoint, "save", full_disk)
    err = _one_line_error(capsys, ["train", "--steps", "100", "--checkpoint-every", "50", "--chunk-steps", "50",
                                   *STEPS, "--out", str(out)], "cannot write the checkpoint of step 100", code=1)
    assert "No space left on device" in err and "the last good checkpoint (step 50) is kept" in err
    monkeypatch.undo()
    assert checkpoint.load(out).state.step == 50


# ---------------------------------------------------------------------------- only the run's own files
def test_files_that_only_look_like_checkpoint_files_are_never_deleted(tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    foreign = {"model-000000050.safetensors": b"not ours", "model-000000050-deadbeef.safetensors": b"nor this",
               "notes.txt": b"keep", ".model-x.safetensors.tmp": b"someone else's temp file"}
    for name, content in foreign.items():
        (out / name).write_bytes(content)
    assert main(["train", "--steps", "100", "--checkpoint-every", "50", "--chunk-steps", "50", *STEPS,
                 "--out", str(out)]) == 0
    files = _files(out)
    assert all(files[name] == content for name, content in foreign.items())
    meta = json.loads(files["meta.json"])
    ours = [n for n in files if n.startswith("model-") and n not in foreign]
    assert ours == [meta["tensors_file"]] == meta["files"][-1:]  # (files also names those just deleted)


def test_stale_temp_files_of_a_killed_write_are_removed_on_the_next_start(run):
    stale = [".model-000000050-0123abcd.safetensors.0123456789abcdef.handgrad-tmp",
             ".meta.json.fedcba9876543210.handgrad-tmp", ".probe.00112233445566ff.handgrad-tmp"]
    kept = [".notes.handgrad-tmp", "model.handgrad-tmp"]  # not names this project writes
    for name in stale + kept:
        (run / name).write_bytes(b"x" * 1000)
    assert main(["train", "--resume", str(run), "--steps", "110", *STEPS]) == 0
    names = {p.name for p in run.iterdir()}
    assert not names & set(stale) and set(kept) <= names


# ---------------------------------------------------------------------------- another run in --out
def test_resume_into_another_runs_directory_needs_force(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--steps", "60", *STEPS, "--out", str(other)]) == 0
    before = _files(other)
    _one_line_error(capsys, ["train", "--resume", str(run), "--out", str(other), "--steps", "110", *STEPS],
                    f"--out {other} already holds a run")
    assert _files(other) == before
    assert main(["train", "--resume", str(run), "--out", str(other), "--steps", "110", "--force", *STEPS]) == 0
    assert checkpoint.load(other).state.step == 110 and checkpoint.load(run).state.step == 100
    assert len(list(other.glob("model-*.safetensors"))) == 1  # the replaced run's files went with it


# ---------------------------------------------------------------------------- an unusable --out
def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started before --out was checked")
    monkeypatch.setattr(train, "train", refuse)


def test_out_that_is_a_file_or_below_a_file_exits_2_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(capsys, ["train", "--steps", "10", *STEPS, "--out", str(f)], "is a file, expected a directory")
    _one_line_error(capsys, ["train", "--steps", "10", *STEPS, "--out", str(f / "sub")], "a parent of it is a file")
    assert f.read_text() == "x"


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_out_that_cannot_take_files_exits_2_before_training(tmp_path, capsys, monkeypatch, err):
    """A read-only directory or file system, or a full disk (simulated: tests may run as root)."""
    _no_training(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refusing_open)
    _one_line_error(capsys, ["train", "--steps", "10", *STEPS, "--out", str(out)],
                    f"--out {out}: cannot write files there ({os.strerror(err)})")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_directory_exits_2(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        _one_line_error(capsys, ["train", "--steps", "10", *STEPS, "--out", str(out)], "cannot write files there")
    finally:
        out.chmod(0o755)


def _limited(max_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def test_a_file_size_limit_below_the_probe_exits_2_before_training(tmp_path):
    """`ulimit -f 1`: the check of --out writes data, so it fails there, not after the training."""
    out = tmp_path / "o"
    r = _cli(["train", "--steps", "10", *STEPS, "--out", str(out)], preexec_fn=_limited(1024))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write files there (File too large)" in r.stderr


def test_a_disk_that_fills_mid_run_exits_1_and_keeps_the_previous_checkpoint(run):
    """The limit lets the probe and the lock through but not a tensor file (about 50 KB)."""
    before = _files(run)
    r = _cli(["train", "--resume", str(run), "--steps", "200", *STEPS], preexec_fn=_limited(io.PROBE_BYTES * 2))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write the checkpoint of step 200" in r.stderr and "File too large" in r.stderr
    assert "the last good checkpoint (step 100) is kept" in r.stderr
    after = _files(run)
    assert checkpoint.load(run).state.step == 100 and not [n for n in after if n.endswith(io.TMP_SUFFIX)]
    assert {n: b for n, b in after.items() if n.startswith("model-")} == {
        n: b for n, b in before.items() if n.startswith("model-")}


# ---------------------------------------------------------------------------- one writer per directory
HOLDER = textwrap.dedent("""
    import sys, time
    from handgrad import io
    io.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline() == b"locked\n"
        before = _files(run)
        for argv in (["train", "--resume", str(run), "--steps", "110", *STEPS],
                     ["train", "--steps", "10", "--force", *STEPS, "--out", str(run)]):
            _one_line_error(capsys, argv, f"--out {run}: in use by process {holder.pid}")
        assert _files(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / io.LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind by the kill
    assert main(["train", "--resume", str(run), "--steps", "110", *STEPS]) == 0  # taken over
    assert checkpoint.load(run).state.step == 110


# ---------------------------------------------------------------------------- rescuing a diverged run
def test_resume_with_a_new_learning_rate_is_recorded_and_equals_that_schedule(run, tmp_path):
    assert main(["train", "--resume", str(run), "--steps", "200", "--lr", "0.05", *STEPS]) == 0
    resumed = checkpoint.load(run)
    history = json.loads((run / "meta.json").read_text())["lr_history"]
    assert [(h["from_step"], h["lr"]) for h in history] == [(0, 0.1), (100, 0.05)]
    direct = tmp_path / "direct"  # lr 0.1 for steps 0-99, then 0.05: the same schedule in one run
    assert main(["train", "--steps", "200", "--lr", "0.1", "--lr-decayed", "0.05", "--lr-decay-step", "100",
                 "--checkpoint-every", "50", *STEPS, "--out", str(direct)]) == 0
    for (_, a), (_, b) in zip(resumed.state.model.params().items(),
                              checkpoint.load(direct).state.model.params().items()):
        assert torch.equal(a, b)


def test_an_unfinished_checkpoint_is_used_only_when_asked(names_splits, tmp_path, capsys):
    mcfg, tcfg, state = _state(names_splits, 30)
    tcfg = TrainConfig(steps=1000, engine="eager", chunk_steps=10)  # stopped at step 30 of 1000
    fingerprint = checkpoint.data_fingerprint(data.read_words(data.default_data_path()).items)
    checkpoint.save(tmp_path, Checkpoint(mcfg, tcfg, names_splits.vocab, None, state, None, {}, 3, fingerprint))
    for command in ("sample", "eval"):
        _one_line_error(capsys, [command, "--checkpoint", str(tmp_path)], "training has not finished")
        assert main([command, "--checkpoint", str(tmp_path), "--allow-unfinished"]) == 0
        out, err = capsys.readouterr()
        assert out and "unfinished run (step 30 of 1000); batchnorm uses its running statistics" in err


# ---------------------------------------------------------------------------- modes, pipes, data sources
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_modes_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["train", "--steps", "20", *STEPS, "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "o").iterdir():
        if p.is_file():
            assert p.stat().st_mode & 0o777 == mode, p.name


def test_a_closed_pipe_exits_0_without_a_message(finished):
    proc = subprocess.Popen([sys.executable, "-m", "handgrad.cli", "sample", "--checkpoint", str(finished),
                             "-n", "50000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_the_bundled_names_given_explicitly_are_the_bundled_names(run, tmp_path, capsys):
    bundled = str(data.default_data_path())
    assert main(["train", "--resume", str(run), "--data", bundled, "--steps", "110", *STEPS]) == 0
    assert json.loads((run / "meta.json").read_text())["data_path"] is None
    fresh = tmp_path / "fresh"
    assert main(["train", "--data", bundled, "--steps", "10", *STEPS, "--out", str(fresh)]) == 0
    assert json.loads((fresh / "meta.json").read_text())["data_path"] is None
    other = tmp_path / "other.txt"
    other.write_text("emma\nava\n")
    _one_line_error(capsys, ["train", "--resume", str(run), "--data", str(other), "--steps", "120", *STEPS],
                    "not the data the run")


def test_data_from_stdin_redirected_from_a_file_can_be_evaluated_and_resumed(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{w}\n" for w in data.read_words(data.default_data_path()).items[:300]))
    out = tmp_path / "o"
    with open(names) as stdin:
        r = _cli(["train", "--data", "/dev/stdin", "--steps", "20", *STEPS, "--out", str(out)], stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["data_path"] == str(names.resolve())
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--steps", "30", *STEPS]) == 0


def test_data_from_a_pipe_is_refused_in_one_line(tmp_path):
    r = _cli(["train", "--data", "/dev/stdin", "--steps", "20", *STEPS, "--out", str(tmp_path / "o")],
             input="emma\nava\n")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "save the data to a file first" in r.stderr and not (tmp_path / "o").exists()
