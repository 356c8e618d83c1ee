"""Data-parallel runs under a hostile user: the ranks of `handgrad train --nproc N` never outlive their
launcher (SIGTERM or kill -9 to it stops them at once), the run directory's lock covers every rank
(held by the launcher and shared with the ranks, so a second run or a resume there is refused naming
the launcher while any of them lives), and a rank count the machine cannot run is refused in one line
before anything starts. Ranks are real processes talking gloo over 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handgrad import budget, io, lifeline, models
from handgrad.cli import main
from handgrad.train import TrainConfig

PY = sys.executable
SRC = str(Path(__file__).resolve().parents[1] / "src")
LONG = ["train", "--nproc", "2", "--steps", "1000000", "--n-hidden", "16", "--engine", "eager", "--chunk-steps",
        "50", "--checkpoint-every", "50", "--quiet", "--samples", "0"]


def _handgrad(*argv):
    return subprocess.Popen([PY, "-m", "handgrad", *argv], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line(capsys, argv, code=2) -> str:
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code and err.startswith("handgrad: error: ") and "\n" not in err, (got, err)
    return err


def _ranks_of(launcher: int) -> list[int]:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(c) for c in children]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _step(out: Path) -> int:
    try:
        return json.loads((out / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _training(out: Path, p, step: int = 50, limit: float = 180) -> list[int]:
    """Wait until the run saved `step`; the pids of its ranks."""
    t0 = time.monotonic()
    while _step(out) < step:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < limit, f"no checkpoint at step {step} within {limit}s"
        time.sleep(0.05)
    ranks = _ranks_of(p.pid)
    assert len(ranks) == 2
    return ranks


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# ---------------------------------------------------------------------------- how many ranks
def test_nproc_999_is_refused_in_one_line_before_any_rank_starts(tmp_path, capsys):
    out = tmp_path / "o"
    err = _one_line(capsys, ["train", "--nproc", "999", "--batch-size", "999", "--steps", "10", "--quiet",
                             "--out", str(out)])
    assert err.startswith("handgrad: error: --nproc 999: this machine can run at most "), err
    assert f"{budget.RANKS_PER_CORE} per core" in err and "use --nproc" in err, err
    assert not out.exists()


def test_a_rank_count_beyond_the_memory_is_refused_naming_the_memory():
    mcfg, tcfg = models.preset("mlp", vocab_size=27), TrainConfig(batch_size=64)
    budget.check_ranks(4, 2, mcfg, tcfg, 228_146, available=8 << 30)
    with pytest.raises(budget.BudgetError) as e:  # 8 ranks fit 2 cores, not 2 GiB
        budget.check_ranks(8, 2, mcfg, tcfg, 228_146, available=2 << 30)
    text = e.value.render(lambda f: "--" + f.replace("_", "-"))
    assert text.startswith("--nproc 8: this machine can run at most ") and "GiB it can give them" in text, text
    most = int(text.split("at most ")[1].split()[0])
    assert 1 <= most < 8
    budget.check_ranks(most, 2, mcfg, tcfg, 228_146, available=2 << 30)  # the count it names does fit


# ---------------------------------------------------------------------------- the lock covers the ranks
def test_an_inherited_lock_is_adopted_and_a_foreign_descriptor_is_not(tmp_path):
    held = io.RunLock(tmp_path).acquire()
    try:
        adopted = io.RunLock(tmp_path, inherited=os.dup(held.fd)).acquire()  # the same open file
        assert (tmp_path / io.LOCK_FILE).read_text().strip() == str(os.getpid())
        adopted.release()
        other = tmp_path / "other"
        other.write_text("")
        with pytest.raises(io.LockedError, match="in use by process"):  # not this directory's lock file
            io.RunLock(tmp_path, inherited=os.open(other, os.O_RDONLY)).acquire()
    finally:
        held.release()


@needs_proc
@pytest.mark.slow
def test_two_nproc_runs_started_together_on_one_out_one_trains_and_the_other_names_its_launcher(tmp_path):
    out = tmp_path / "run"
    argv = [a if a != "1000000" else "200" for a in LONG]
    runs = [_handgrad(*argv, "--out", str(out)) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in runs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], results
    (winner, *_), (_, _, err, _) = sorted(results, key=lambda r: r[3])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"handgrad: error: --out {out}: in use by process {winner} "), err
    assert _step(out) == 200


# ---------------------------------------------------------------------------- the launcher dies
@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_ranks_stop_with_their_launcher_which_holds_the_directory_for_them(tmp_path, sig, capsys):
    out = tmp_path / "run"
    p = _handgrad(*LONG, "--out", str(out))
    ranks = _training(out, p)
    try:
        if sig == signal.SIGKILL:  # while the ranks run, a second run or a resume there names the launcher
            for argv in (["--resume", str(out), "--steps", "2000000"], ["--out", str(out), "--force"]):
                err = _one_line(capsys, ["train", *argv, "--quiet", "--samples", "0"])
                assert f"in use by process {p.pid} " in err, err
        os.kill(p.pid, sig)
        _, err = p.communicate(timeout=60)
        t0 = time.monotonic()
        while any(_alive(r) for r in ranks):
            assert time.monotonic() - t0 < 5, f"ranks still running {time.monotonic() - t0:.1f}s after the launcher"
            time.sleep(0.02)
    finally:  # nothing left behind, whatever failed (ranks first: they hold the launcher's pipes)
        for r in ranks:
            if _alive(r):
                os.kill(r, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "handgrad: error: terminated (SIGTERM); stopped the 2 rank(s) it had started"
    else:
        assert p.returncode == -signal.SIGKILL
    step = _step(out)
    time.sleep(1.0)
    assert _step(out) == step  # nobody writes the directory any more
    io.RunLock(out).acquire().release()  # and it is free: a resume may take it
    assert main(["train", "--resume", str(out), "--steps", str(step + 50), "--quiet", "--samples", "0"]) == 0
    assert _step(out) == step + 50


def test_a_process_whose_launcher_is_already_gone_exits_at_once(tmp_path):
    """follow_launcher in a process whose parent is not the launcher it names (the launcher died before
    the process bound itself to it) ends the process before it does anything."""
    code = "from handgrad import lifeline; lifeline.follow_launcher(); print('ran')"
    env = {**os.environ, "PYTHONPATH": SRC, lifeline.LAUNCHER_ENV: str(os.getpid() + 10**6)}
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == lifeline.ORPHANED and "ran" not in r.stdout
    env[lifeline.LAUNCHER_ENV] = str(os.getpid())  # its parent: it runs
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ran"
