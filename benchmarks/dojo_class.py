"""A class of 30 mixed submissions (right, wrong, crashing, hostile) graded in one command, as a teacher
runs it, and what the sandbox adds: the class's 20 files without an attack through `handgrad dojo grade
DIR` with `--sandbox basic` (rlimits, forked from the grader) and `--sandbox require` (bubblewrap, each
file forked by the sandbox's zygote), one after the other in the same run; then all 30 under bubblewrap
(an attack is never run in the basic sandbox: there a file can signal any process of yours).
Writes the last run's CSV, JSON and HTML into --out (made if missing; outputs are never overwritten).

    .venv/bin/python benchmarks/dojo_class.py --out benchmarks/results/dojo_class
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

WRONG = [  # (name, item, edits of its reference)
    ("wrong_dembcat", "1", [("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T")]),
    ("wrong_tanh_parens", "1", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = 1.0 - h**2 * dh")]),
    ("wrong_bessel", "1", [("dbndiff2 = (1.0 / (n - 1))", "dbndiff2 = (1.0 / (n + 1))")]),
    ("wrong_db2_sum_all", "1", [("db2 = dlogits.sum(0)", "db2 = dlogits.sum()")]),
    ("wrong_dh_transpose", "1", [("dh = dlogits @ W2.T", "dh = dlogits @ W2")]),
    ("wrong_power", "1", [("(-counts_sum**-2)", "(-counts_sum**-3)")]),
    ("wrong_tanh_parens_2", "1", [("dhpreact = (1.0 - h**2) * dh", "dhpreact = 1.0 - h**2 * dh")]),
    ("wrong_lt_power", "linear-tanh", [("dW = x.T @ dz", "dW = x.T @ dz * 2")]),
]
RIGHT = ["1", "1", "1", "2", "3", "linear-tanh", "cross-entropy", "embedding"]
CRASH = {  # name -> lines first in exercise 1's region
    "crash_zero_division": "x = 1 / 0",
    "crash_syntax": "dh = dlogits @@ W2.T",
    "crash_loop": "while True:\n    pass",
    "crash_exit_code": "import os\nos._exit(3)",
}
HOSTILE = ["forge_proc_fd", "forge_channel", "escapes", "autograd", "helper", "write_outside", "fill_disk",
           "stop_grader", "setsid_grandchild", "leak"]


def write_class(d: Path) -> int:
    """30 files in `d`: 8 right, 8 wrong, 4 crashing, 10 hostile."""
    import dojo_hostile as H
    from handgrad import dojo

    for i, key in enumerate(RIGHT):
        (d / f"right_{i:02d}_{key}.py").write_text(dojo.solution(key))
    for name, key, edits in WRONG:
        text = dojo.solution(key)
        for old, new in edits:
            assert old in text, (name, old)
            text = text.replace(old, new)
        (d / f"{name}.py").write_text(text)
    template = dojo.api.render(dojo.api.get("1"))
    for name, code in CRASH.items():
        (d / f"{name}.py").write_text(H.inject(template, code))
    H.write_class(d, HOSTILE)
    (d / "classmate.py").unlink()  # write_class's own classmate: the right files are the classmates here
    (d / "secret.txt").rename(d / "secret.notes")
    return len(list(d.glob("*.py")))


def grade(d: Path, mode: str, extra: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "handgrad.cli", "dojo", "grade", d.name, "--sandbox", mode,
                        "--time-limit", "5", *extra], capture_output=True, text=True, cwd=d.parent)
    return time.perf_counter() - t0, r.returncode, r.stdout + r.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where the CSV, JSON and HTML go")
    args = ap.parse_args()
    from handgrad.dojo import sandbox

    root = Path(tempfile.mkdtemp(prefix="dojo-class-"))
    d = root / "class"
    d.mkdir()
    n = write_class(d)
    safe = root / "no-attacks"  # the basic sandbox holds no attack: a file may kill any process of yours
    safe.mkdir()
    for p in d.glob("*.py"):
        if p.stem not in HOSTILE:
            (safe / p.name).write_text(p.read_text())
    m = len(list(safe.glob("*.py")))
    print(f"a class of {n} submissions in {d} ({m} of them without an attack, in {safe})")
    why = sandbox.bwrap_problem()
    t_basic, rc, _ = grade(safe, "basic", [])
    print(f"the {m} without an attack, --sandbox basic:   {t_basic:6.1f} s wall "
          f"({t_basic / m:.2f} s a file), "
          f"exit {rc}")
    if why:
        print(f"--sandbox require: not measured ({why})")
        return 0
    t_bwrap, rc, _ = grade(safe, "require", [])
    print(f"the {m} without an attack, --sandbox require: {t_bwrap:6.1f} s wall "
          f"({t_bwrap / m:.2f} s a file), "
          f"exit {rc}")
    print(f"bubblewrap / basic: {t_bwrap / t_basic:.2f}x the class's time "
          f"({(t_bwrap - t_basic) / m:+.2f} s a "
          "file, the sandbox's start included)")
    extra = []
    if args.out:
        args.out = args.out.resolve()  # the command runs beside the class
        args.out.mkdir(parents=True, exist_ok=True)
        extra = ["--csv", str(args.out / "class.csv"), "--html", str(args.out / "class.html")]
    t_all, rc, out = grade(d, "require", extra)
    print(f"all {n}, attacks included, --sandbox require: {t_all:6.1f} s wall ({t_all / n:.2f} s a file), "
          f"exit {rc}")
    if args.out:
        _, _, js = grade(d, "require", ["--json"])
        (args.out / "class.json").write_text(js)
        (args.out / "class.txt").write_text(out)
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(out[out.index("\nfile ") + 1:] if "\nfile " in out else out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
