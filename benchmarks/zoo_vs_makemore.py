"""The makemore zoo against makemore.py: for each model, `handgrad train --model M` (hand-written
backward passes and AdamW, makemore's random numbers) and then tests/makemore_replica.py (a plain-PyTorch
replica of makemore.py's loop: nn modules, autograd, torch.optim.AdamW, DataLoader), each in a fresh
process with one thread, on the same machine in the same run. Prints each one's best test loss (and its
step, counted as handgrad counts: updates done), their difference, makemore's own figure (measured with
makemore.py on this machine, the zoo issue's table), the wall times and their ratio.

    .venv/bin/python benchmarks/zoo_vs_makemore.py [--models bigram,bow,...] [--steps 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ZOO = ("bigram", "bow", "bengio", "rnn", "gru", "transformer")
MAKEMORE = {"bigram": 2.4495, "bow": 2.1530, "bengio": 2.0369, "rnn": 2.0539, "gru": 2.0029,
            "transformer": 1.9655}  # makemore.py's best test loss within 20,000 steps, its defaults
REPLICA = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import makemore_replica as R
from handgrad import data
torch.set_num_threads(1)
_, _, evals, _ = R.run({model!r}, data.read_words(data.default_data_path()).items, {steps})
i, _, best = min(evals, key=lambda e: e[2])
print(json.dumps({{"best": best, "best_step": i + 1}}))
"""


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... exited {r.returncode}: {r.stderr.strip()[-400:]}")
    return time.perf_counter() - t0, r.stdout


def measure(model: str, steps: int, tmp: Path) -> dict:
    out = tmp / model
    hand_s, _ = _timed([sys.executable, "-m", "handgrad", "train", "--model", model, "--steps", str(steps),
                        "--threads", "1", "--out", str(out), "--quiet", "--samples", "0"])
    results = json.loads((out / "meta.json").read_text())["results"]
    code = REPLICA.format(tests=str(HERE / "tests"), model=model, steps=steps)
    ref_s, stdout = _timed([sys.executable, "-c", code])
    ref = json.loads(stdout.strip().splitlines()[-1])
    return {"model": model, "steps": steps, "handgrad_best": results["best"],
            "handgrad_best_step": results["best_step"], "replica_best": ref["best"],
            "replica_best_step": ref["best_step"], "makemore": MAKEMORE[model],
            "handgrad_seconds": hand_s, "replica_seconds": ref_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated (default: all six)")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        sys.exit(f"--models: {unknown[0]!r} is not one of {', '.join(ZOO)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-vs-makemore-") as tmp:
        for m in models:
            r = measure(m, args.steps, Path(tmp))
            rows.append(r)
            print(f"{m:<12} handgrad {r['handgrad_best']:.6f} (step {r['handgrad_best_step']:,})  replica "
                  f"{r['replica_best']:.6f} (step {r['replica_best_step']:,})  |diff| "
                  f"{abs(r['handgrad_best'] - r['replica_best']):.1e}  makemore {r['makemore']:.4f}  wall "
                  f"{r['handgrad_seconds']:.0f} s vs {r['replica_seconds']:.0f} s "
                  f"(replica / handgrad {r['replica_seconds'] / r['handgrad_seconds']:.2f}x)", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
