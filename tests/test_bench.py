"""A quick smoke test of `handgrad bench` (tiny step counts; never a timed assert)."""

import json

from handgrad import bench
from handgrad.cli import main


def test_run_bench_reports_every_engine():
    r = bench.run_bench(batch_size=8, n_hidden=20, steps=40, large_batch=64, large_steps=10, compile=False)
    names = [row.name for row in r.rows]
    assert names[:2] == ["fast", "fast, 1 step per call"] or r.rows[0].us_per_step is None
    for name in ("eager hand-written", "autograd eager", "autograd torch.compile", "GEMM floor (torch.mm)"):
        assert name in names
    assert all(row.us_per_step is None or row.us_per_step > 0 for row in r.rows)
    table = r.table()
    assert "x fast" in table and "GEMM floor" in table and "examples per second" in table
    d = json.loads(r.to_json())
    assert d["config"]["batch_size"] == 8 and "ratios_to_fast" in d and len(d["large"]) == 3


def test_cli_bench_json(capsys):
    assert main(["bench", "--json", "--steps", "20", "--batch-size", "4", "--n-hidden", "8",
                 "--large-batch", "0", "--no-compile"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["threads"] == 1 and d["large"] == []


def test_cli_bench_rejects_bad_flags(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
