"""A quick smoke test of `handgrad bench` (tiny step counts; never a timed assert), and the GEMM floor's
shapes and FLOP count derived from a model."""

import json

import pytest
import torch

from handgrad import bench, models
from handgrad.cli import main


@pytest.mark.parametrize("name", ["mlp", "deep", "wavenet"])
def test_run_bench_reports_every_engine(name):
    r = bench.run_bench(name, batch_size=8, n_hidden=20, steps=12, large_batch=16, large_steps=4)
    names = [row.name for row in r.rows]
    assert names[0] == "fast"
    for row in ("eager hand-written", "autograd eager", bench.FLOOR):
        assert row in names
    assert all(row.us_per_step is None or row.us_per_step > 0 for row in r.rows)
    assert all(row.us_per_step is None or row.q25 <= row.us_per_step <= row.q75 for row in r.rows)
    table = r.table()
    assert "x fast" in table and "x floor" in table and "examples per second" in table
    d = json.loads(r.to_json())
    assert d["config"]["model"] == name and d["config"]["batch_size"] == 8 and d["config"]["n_hidden"] == 20
    assert d["ratios_to_floor"][bench.FLOOR] == 1.0 and d["gemm_flop"] > 0


def test_gemm_shapes_follow_every_linear_of_wavenet():
    """wavenet (T 8, E 24, H 128, V 27) at batch 32: the first Linear sees 4 pairs of positions per
    example, the second 2, the third 1, the output layer 1."""
    m = models.build(models.preset("wavenet"), 0)
    X = torch.zeros((32, 8), dtype=torch.long)
    shapes = bench.gemm_shapes(m, X)
    assert shapes == [(128, 48, 128), (64, 256, 128), (32, 256, 128), (32, 128, 27)]
    assert bench.gemm_flop(shapes) == 6 * (128 * 48 * 128 + 64 * 256 * 128 + 32 * 256 * 128 + 32 * 128 * 27)


def test_gemm_floor_runs_the_three_products_of_each_linear():
    run = bench._gemm_floor_fn([(4, 3, 2)])
    run()  # shapes agree, or torch.mm raises


def test_cli_bench_json(capsys):
    assert main(["bench", "--json", "--model", "deep", "--steps", "6", "--batch-size", "4", "--n-hidden", "8",
                 "--large-batch", "0", "--no-compile"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["threads"] == 1 and d["large"] == [] and d["config"]["n_layers"] == 5


@pytest.mark.parametrize("argv, flag", [(["--steps", "0"], "--steps"), (["--batch-size", "1"], "--batch-size"),
                                        (["--n-hidden", "0"], "--n-hidden"),
                                        (["--model", "wavenet", "--block-size", "6"], "--block-size")])
def test_cli_bench_rejects_bad_flags(capsys, argv, flag):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
