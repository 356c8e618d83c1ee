"""A quick smoke test of `handgrad bench` (tiny step counts; never a timed assert), and the GEMM floor's
shapes and FLOP count derived from a model."""

import json

import pytest
import torch

from handgrad import bench, engines, models
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
    assert [t.name for t in r.threads_rows] == ["fast, 1 thread(s)", "fast, 2 thread(s)",
                                                "autograd eager, 1 thread(s)", "autograd eager, 2 thread(s)"]
    assert all(t.us_per_step > 0 for t in r.threads_rows)
    table = r.table()
    assert "threads at batch 16" in table and "ratios (this run)" in table
    assert "x fast" in table and "x floor" in table and "examples per second" in table
    d = json.loads(r.to_json())
    assert d["config"]["model"] == name and d["config"]["batch_size"] == 8 and d["config"]["n_hidden"] == 20
    assert d["ratios_to_floor"][bench.FLOOR] == 1.0 and d["gemm_flop"] > 0


def test_the_mlp_at_a_large_batch_is_timed_as_handgrad_train_runs_it():
    """From engines.COUNTED_ROWS the mlp's fast rows are the counted program in tiles (engines.plan's
    choice), and the threads table says why a second thread does not help it."""
    r = bench.run_bench("mlp", batch_size=8, n_hidden=20, steps=6, large_batch=engines.COUNTED_ROWS, large_steps=2,
                        tile=0)
    notes = {t.name: t.note for t in r.threads_rows}
    assert f"tiles of {engines.CACHE_TILE}" in notes["fast, 2 thread(s)"]
    assert [row.name for row in r.large][:2] == ["fast", "fast, fused lecture step"]
    assert all(row.us_per_step > 0 for row in r.large) and "x fast" in r.table()


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


def test_checkpointing_table_keeps_fewer_bytes_with_a_tile():
    """At batch 64 with tiles of 4 examples the native wavenet keeps far fewer activation bytes; both runs
    are timed and the table prints both."""
    r = bench.run_bench("wavenet", batch_size=64, n_hidden=20, steps=6, large_batch=0, tile=4)
    (no_tile, tiled) = r.checkpointing
    assert no_tile.name.endswith("no tile") and tiled.name.endswith("tile 4")
    assert 0 < tiled.bytes < no_tile.bytes and tiled.us_per_step > 0 and no_tile.us_per_step > 0
    assert "activation checkpointing" in r.table() and r.config["clock"] == "cpu"


def test_fma_peak_is_measured_and_positive():
    peak, how = bench.fma_peak()
    nominal, _ = bench.nominal_fma_peak()
    assert peak > 1e9 and "measured" in how
    assert nominal == 0 or peak < 4 * nominal  # a measured peak far above the nominal one is a timing bug


def test_full_training_fast_and_eager_draw_the_same_batches():
    """bench --full-train's run, shortened to 1000 steps: the fast and eager engines train the same
    wavenet from the same init on the same batches, so their losses agree closely."""
    f = bench.full_training("wavenet", "fast", steps=1000)
    e = bench.full_training("wavenet", "eager", steps=1000)
    assert f["steps"] == e["steps"] == 1000 and f["wall_s"] > 0 and f["cpu_s"] > 0
    assert abs(f["last_1000_train_loss"] - e["last_1000_train_loss"]) < 1e-4
    assert abs(f["val_loss"] - e["val_loss"]) < 1e-3 and f["val_loss"] < 3.0  # it learned (uniform: 3.3)


def test_cli_full_train_rejects_too_few_steps(capsys):
    assert main(["bench", "--model", "wavenet", "--full-train", "fast", "--full-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "--full-steps 10" in err and len(err.strip().splitlines()) == 1
