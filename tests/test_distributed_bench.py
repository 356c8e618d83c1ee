"""The data-parallel benchmark (benchmarks/distributed_bench.py): the latency/bandwidth fit, its refusals,
and a small real run whose 2 processes take the single process's steps and whose time adds up."""

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "benchmarks"
if str(SCRIPTS) not in sys.path:  # importable by name: its spawned ranks import it again
    sys.path.insert(0, str(SCRIPTS))
distributed_bench = importlib.import_module("distributed_bench")
BenchConfig, BenchUsageError = distributed_bench.BenchConfig, distributed_bench.BenchUsageError
fit_latency_bandwidth = distributed_bench.fit_latency_bandwidth


@pytest.mark.parametrize("latency, bandwidth", [(400e-6, 2e9), (30e-6, 50e9), (1e-3, 1e8)])
def test_the_fit_recovers_latency_and_bandwidth_of_exact_times(latency, bandwidth):
    sizes = [1, 16, 1024, 65536, 1 << 20]
    fit = fit_latency_bandwidth({n: latency + 4 * n / bandwidth for n in sizes}, itemsize=4)
    assert fit.latency == pytest.approx(latency, rel=1e-6)
    assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert fit.predict(4000) == pytest.approx(latency + 4000 / bandwidth, rel=1e-6)


def test_the_fit_weighs_small_sizes_as_much_as_large_ones():
    """An unweighted fit would let the 1 MB point's noise swamp the latency; relative error does not."""
    times = {1: 400e-6, 4: 400e-6, 64: 401e-6, 1 << 20: 400e-6 + 4 * (1 << 20) / 1e9 * 1.3}
    fit = fit_latency_bandwidth(times, itemsize=4)
    assert fit.latency == pytest.approx(400e-6, rel=0.02)


@pytest.mark.parametrize("argv, expected", [
    (["--batches", "32,33"], "--batches: 33 is not a multiple of --nproc 2"),
    (["--nproc", "1"], "--nproc 1: expected 2 or more"),
    (["--model", "gpt"], "--model gpt: expected one of mlp, deep, wavenet"),
    (["--seconds", "0"], "--seconds 0.0: expected a positive number"),
    (["--engine", "jit"], "--engine jit: expected fast or eager"),
    (["--dtype", "float64"], "--engine fast runs float32 only; give --engine eager for --dtype float64"),
    (["--repeat", "0"], "--repeat 0: expected 1 or more"),
    (["--tile", "-8"], "--tile -8: expected 0 (as handgrad train) or a number of examples per tile"),
    (["--tile", "64", "--engine", "eager"], "--tile 64: expected 0 (as handgrad train) or a number of examples "
                                            "per tile, with --engine fast"),
])
def test_bad_flags_exit_2_in_one_line(capsys, argv, expected):
    assert distributed_bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("distributed_bench.py: error: ") and expected in err, err


def test_a_batch_list_that_is_not_numbers_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        distributed_bench.main(["--batches", "32,lots"])
    assert e.value.code == 2 and "expected comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("engine, repeat, tile", [("fast", 2, 0), ("eager", 1, 0), ("fast", 1, 16)])
def test_a_small_run_measures_the_same_steps_and_its_time_adds_up(tmp_path, capsys, engine, repeat, tile):
    out = tmp_path / "bench.json"
    assert distributed_bench.main(["--batches", "32,256", "--seconds", "0.02", "--json", str(out),
                                   "--engine", engine, "--repeat", str(repeat), "--tile", str(tile)]) == 0
    table = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["config"]["engine"] == engine and record["config"]["repeat"] == repeat
    runs = record["speedups_of_each_run"]
    if repeat > 1:  # every run's speedup is kept; the reported point is one of them
        assert [len(r) for r in runs] == [repeat, repeat]
        assert all(p["speedup"] in r for p, r in zip(record["points"], runs))
    else:
        assert runs is None
    assert [p["batch"] for p in record["points"]] == [32, 256]
    for p in record["points"]:
        assert p["steps"] >= distributed_bench.MIN_STEPS
        assert p["loss_diff"] <= 1e-5  # the 2 processes took the single process's steps
        assert p["one_step"] in ({"engine", "1 rank"} | ({"1 rank tiled"} if tile else set())
                                 if engine == "fast" else {"eager"})
        assert 0 < p["gradients"] and p["gradients"] + p["batchnorm"] < p["many"]
        # the mlp's native step has one collective (its batchnorm is counted and deferred); eager three
        assert p["batchnorm"] == 0 if engine == "fast" else p["batchnorm"] > 0
        assert p["compute"] == pytest.approx(p["many"] - p["gradients"] - p["batchnorm"])
        assert p["speedup"] == pytest.approx(p["one"] / p["many"])
    sizes = {int(n) for n in record["allreduce_seconds"]}
    assert {1, record["params"]} <= sizes and record["params"] == 12298  # mlp: 12,297 parameters + the loss
    assert all(t > 0 for t in record["allreduce_seconds"].values())
    assert record["fit"]["latency"] >= 0 and record["fit"]["bandwidth"] > 0
    assert "<- the model's gradient buffer" in table and f"{32:>7}" in table


def test_the_default_sweep_spans_32_to_65536_in_powers_of_two():
    assert BenchConfig().batches == tuple(2 ** k for k in range(5, 17))
    with pytest.raises(BenchUsageError):
        BenchConfig(batches=(2,))  # one row per process: batchnorm's n-1 would be 0
