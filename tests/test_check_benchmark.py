"""Smoke test of benchmarks/gradcheck_side_by_side.py: it runs on a few cases, exits 0 and prints the
table and the summary its README line quotes. No timings are asserted."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gradcheck_side_by_side.py"


def test_the_side_by_side_benchmark_runs_and_summarises(tmp_path):
    out = tmp_path / "table.md"
    r = subprocess.run([sys.executable, str(SCRIPT), "--limit", "2", "--repeat", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("| case | mistake | handgrad |") and len([x for x in lines if x.startswith("| ")]) == 5
    assert lines[-3].startswith("2 wrong cases: handgrad flags 2 and names 2; gradcheck flags")
    assert lines[-2].startswith("2 correct cases: false alarms: handgrad 0,")
    assert "handgrad / (gradcheck + gradgradcheck) =" in lines[-1]
    assert out.read_text() == r.stdout
