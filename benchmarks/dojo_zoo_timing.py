"""A file grade of the makemore zoo's challenges against the older ones, as a learner runs it: `handgrad
dojo grade FILE` in a fresh process, wall and CPU time, the median of --repeat runs, every file measured
in the same run (interleaved, so a busy machine slows them alike). Per challenge: the reference, and
one mistake (which runs the diagnosis; for the zoo, one the edit search names). The baseline is importing
torch alone.

    .venv/bin/python benchmarks/dojo_zoo_timing.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dojo_timing import HERE, PY, timed_process  # noqa: E402

# (challenge, what is typed into its reference: old, new)
MISTAKES = {
    "linear-tanh": ("dW = x.T @ dz", "dW = x.T @ da"),
    "batchnorm": ("dbeta = dout.sum(0)", "dbeta = dout.sum(1)"),
    "layernorm": ("dx = rstd * (dxhat -", "dx = rstd * (dout -"),
    "attention": ("dmasked = att * (datt - (att * datt).sum(", "dmasked = att * (datt - (att * datt).mean("),
    "rnn": ("dh = dhs[:, t] + dh_next", "dh = dhs[:, t] - dh_next"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE / "src"))
    from handgrad import dojo

    tmp = Path(tempfile.mkdtemp(prefix="dojo-zoo-timing-"))
    cli = [PY, "-m", "handgrad.cli", "dojo", "grade"]
    runs = {"import torch alone (baseline)": [PY, "-c", "import torch"]}
    for key, (old, new) in MISTAKES.items():
        ref = dojo.solution(key)
        assert old in ref, (key, old)
        for case, text in (("reference", ref), ("one mistake", ref.replace(old, new, 1))):
            p = tmp / f"{key}-{case.replace(' ', '-')}.py"
            p.write_text(text)
            runs[f"{key}: {case}"] = cli + [str(p)]
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(args.repeat):
        for name, cmd in runs.items():
            got[name].append(timed_process(cmd))
    print(f"{'what':34s} {'wall s':>8s} {'CPU s':>8s}   (median of {args.repeat}, interleaved)")
    for name, g in got.items():
        wall, cpu = statistics.median(x[0] for x in g), statistics.median(x[1] for x in g)
        print(f"{name:34s} {wall:8.2f} {cpu:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
