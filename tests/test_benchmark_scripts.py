"""Smoke tests of the benchmark scripts: each runs with tiny arguments in a subprocess, exits 0 and
prints what its readers (benchmarks/run_all.sh, PERFORMANCE.md) expect. No timings are asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from handgrad.engines import native

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


needs_fast = pytest.mark.skipif(not native.have_compiler(), reason="no C++ compiler: the fast path cannot be built")


def run_script(name: str, *args: str) -> list[str]:
    """Run benchmarks/<name> with args; assert exit code 0 and return stdout's lines."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stderr}"
    return r.stdout.strip().splitlines()


@needs_fast
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="memory.py reads /proc/self/status")
def test_memory_script():
    lines = run_script("memory.py", "--batch", "256", "--steps", "2", "--tile", "64")
    variants = ("fast", "fast-checkpointed", "fast-train", "eager")
    for line, variant in zip(lines, variants):
        assert line.split()[0] == variant
        assert "peak RSS delta" in line and "workspace" in line and "ms/step" in line
    assert lines[2].endswith("[fused step]")  # below engines.COUNTED_ROWS, handgrad train runs the fused step
    assert lines[4].startswith("checkpointing: peak ")
    assert lines[5].startswith("fast-train vs fast: peak ")
    results = json.loads(lines[6])
    assert [r["variant"] for r in results] == list(variants)
    for r in results:
        assert {"variant", "batch", "steps", "peak_delta_mib", "hwm_reset", "ms_per_step", "last_loss"} <= set(r)
        assert r["batch"] == 256 and r["steps"] == 2
        assert ("workspace_mib" in r) == (r["variant"] in ("fast", "fast-checkpointed"))
    assert results[1]["tile"] == 64 and results[0]["tile"] == 0
    losses = [r["last_loss"] for r in results]  # the same model and batches in every child
    assert max(losses) - min(losses) < 1e-3


@needs_fast
def test_train_full_script():
    lines = run_script("train_full.py", "--engine", "fast", "--steps", "20")
    r = json.loads(lines[-1])
    assert set(r) == {"engine", "warning", "steps", "threads", "loop_seconds", "train_call_seconds",
                      "us_per_step", "train_loss", "val_loss"}
    assert r["engine"] == "fast" and r["warning"] == "" and r["steps"] == 20 and r["threads"] == 1
    assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    assert r["train_loss"] < math.log(27) + 1.0  # 20 steps from the lecture's init: near the uniform loss


def test_diagnostics_overhead_script():
    lines = run_script("diagnostics_overhead.py", "--steps", "20", "--every", "1000", "--repeats", "1",
                       "--threads", "1")
    assert lines[0].startswith("20 steps, ") and "diagnostics every 1000 steps" in lines[0]
    prefixes = ("without diagnostics: median ", "with diagnostics:    median ",
                "overhead ratio (with / without): ", "one probe measurement: median ",
                "writing the report once")
    assert len(lines) == 1 + len(prefixes)
    for line, prefix in zip(lines[1:], prefixes):
        assert line.startswith(prefix)


def _same_bits():
    import importlib.util

    spec = importlib.util.spec_from_file_location("same_bits", BENCHMARKS / "same_bits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_bits_names_the_first_step_whose_loss_differs_and_masks_only_times_and_bars():
    sb = _same_bits()
    want = {"runs": [{"rc": 0, "saved": {"losses": [1.0, float("nan"), 3.0], "tensors": {"a": "x"}}}]}
    assert sb.differences(want, want) == []
    got = {"runs": [{"rc": 0, "saved": {"losses": [1.0, float("nan"), 3.5], "tensors": {"a": "y"}}}]}
    assert sb.differences(want, got) == [".runs[0].saved.losses: first difference at step 2",
                                         ".runs[0].saved.tensors.a: recorded 'x', now 'y'"]
    text = " 40%|####  | 400/1000 [00:01<00:01, 300.0step/s]\rstep 5: loss 2.0 (training loop 1.5s, fast)\n"
    assert sb._masked(text + "in /tmp/o/\n", "/tmp/o") == "step 5: loss 2.0 (training loop <time>, fast)\nin <out>/"
    record = json.loads((BENCHMARKS / "results" / "same_bits.json").read_text())
    assert set(record["cases"]) == set(sb.CASES) | set(sb.OUTPUT_CASES)


def test_zoo_vs_makemore_script():
    """One short run each of handgrad and the replica of makemore.py: the same best test loss."""
    lines = run_script("zoo_vs_makemore.py", "--models", "bigram", "--steps", "600", "--json")
    assert lines[0].startswith("bigram ") and "replica / handgrad" in lines[0]
    (r,) = json.loads(lines[-1])
    assert r["model"] == "bigram" and r["steps"] == 600 and r["makemore"] == 2.4495
    assert r["handgrad_best_step"] == r["replica_best_step"] == 501  # makemore's step index 500
    assert abs(r["handgrad_best"] - r["replica_best"]) < 1e-5
    assert r["handgrad_seconds"] > 0 and r["replica_seconds"] > 0
