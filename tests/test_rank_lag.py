"""benchmarks/rank_lag.py: the split of a data-parallel step's time (on made-up timestamps), and one
tiny 2-rank run of the script (never a timed assert)."""

import importlib
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "rank_lag.py"


def _module():
    """The script as the module `rank_lag` (importable by name: its spawned ranks import it again)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("rank_lag")


def test_split_names_compute_lag_and_the_collective_after_the_last_arrival():
    # rank 0 arrives at 10, rank 1 at 13; both leave at 14 and 15: lag 3, all-reduce after 13 is 1
    marks = [[(0.0, 1.0), (10.0, 14.0), (20.0, 21.0)],
             [(0.5, 2.0), (13.0, 15.0), (22.0, 23.0)]]
    got = _module().split(marks)
    assert got["rank 0 compute"] == [9.0, 6.0] and got["rank 1 compute"] == [11.0, 7.0]
    assert got["lag"] == [3.0, 2.0]
    assert got["all-reduce after the last arrival"] == [1.0, -1.0]  # rank 0 left before rank 1 came
    assert got["step"] == [13.0, 8.0]


def test_a_tiny_run_prints_every_row(capsys):
    assert _module().main(["--batch", "64", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    for row in ("rank 0 compute", "rank 1 compute", "lag", "all-reduce after the last arrival", "step"):
        assert row in out


@pytest.mark.parametrize("argv, names", [(["--batch", "63"], "--batch 63"), (["--nproc", "1"], "--nproc 1"),
                                         (["--steps", "1"], "--steps 1")])
def test_bad_flags_exit_2(argv, names, capsys):
    assert _module().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rank_lag: error: {names}: expected") and err.count("\n") == 1
