"""Where a dojo grade's time goes: a file through the command line (a fresh process, as a learner runs
it) and a notebook (in its own process), each split into its phases, with wall and CPU time, the median
of --repeat runs. The baselines are measured in the same run: importing torch alone, and the child as a
new interpreter (HANDGRAD_DOJO_SPAWN=exec) against the forked one.

    .venv/bin/python benchmarks/dojo_timing.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PY = sys.executable


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_process(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of one process and its children."""
    c0, t0 = _cpu_children(), time.perf_counter()
    subprocess.run(args, cwd=HERE, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0, _cpu_children() - c0


PHASES = r"""
import sys, time, json, os
t = time.perf_counter(); c = time.process_time()
out = {}
def mark(name):
    global t, c
    out[name] = (time.perf_counter() - t, time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
import torch
torch.set_num_threads(1)  # as grade_files does: the probes are tiny
mark("import torch")
import handgrad.cli
mark("import handgrad.cli")
from handgrad.dojo import grading, runner, child as CH
from handgrad.dojo.framework import blank_lines
item = grading.get("1"); text = open(sys.argv[1]).read()
parsed = runner.parse(text, sys.argv[1], "region"); vars_, _ = grading.region_vars(item, parsed, None)
mark("parse the file")
probes = list(grading.probes_of("1"))
mark("the probes")
import tempfile
tmp = tempfile.mkdtemp()
ch = CH.Child()
inputs, outputs = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
scalars = grading.write_inputs(probes, inputs)
rep = ch.request({"op": "load", "source": text, "filename": sys.argv[1], "mode": "region", "driver": "",
                  "inputs": inputs, "scalars": scalars}, 20)
mark("child: start and load")
rep = ch.request({"op": "run", "rows": vars_, "outputs": outputs,
                  "probes": [{"name": p.name, "feed": p.feed, "dtype": grading._dt(p)} for p in probes]}, 20)
mark("child: run on the probes")
from safetensors.torch import load_file
outs = load_file(outputs)
rows, notes = grading.assess(item, probes, outs, rep, vars_, parsed, grading.ChildRun(ch, vars_, 20, tmp),
                             lines=blank_lines(text))
mark("judge, diagnose, edit search")
ch.close()
mark("close")
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE / "src"))
    sys.path.insert(0, str(HERE / "tests"))
    from handgrad import dojo

    tmp = Path(tempfile.mkdtemp(prefix="dojo-timing-"))
    ref = tmp / "ex1_atomic.py"
    ref.write_text(dojo.solution("1"))
    wrong = tmp / "ex1_wrong.py"
    wrong.write_text(dojo.solution("1").replace("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T")
                     .replace("dhpreact = (1.0 - h**2) * dh", "dhpreact = 1.0 - h**2 * dh"))
    cli = [PY, "-m", "handgrad.cli", "dojo", "grade"]
    runs = {
        "import torch alone (baseline)": lambda: timed_process([PY, "-c", "import torch"]),
        "file: `dojo grade` of the reference, forked child": lambda: timed_process(cli + [str(ref)]),
        "file: `dojo grade` of the reference, new interpreter": lambda: timed_process(
            cli + [str(ref)], {"HANDGRAD_DOJO_SPAWN": "exec"}),
        "file: `dojo grade`, two mistakes (edit search), forked": lambda: timed_process(cli + [str(wrong)]),
    }
    print(f"{'what':58s} {'wall s':>8s} {'CPU s':>8s}   (median of {args.repeat})")
    for name, fn in runs.items():
        got = [fn() for _ in range(args.repeat)]
        wall, cpu = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
        print(f"{name:58s} {wall:8.2f} {cpu:8.2f}")
    print("\nphases of one file grade (the wrong file), in one process:")
    phases = []
    for _ in range(args.repeat):
        out = subprocess.run([PY, "-c", PHASES, str(wrong)], cwd=HERE, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(HERE / "src")}).stdout
        import json

        phases.append(json.loads(out.strip().splitlines()[-1]))
    for k in phases[0]:
        print(f"  {k:34s} {statistics.median(p[k][0] for p in phases):6.2f} wall  "
              f"{statistics.median(p[k][1] for p in phases):6.2f} CPU")
    print("\na notebook grade, in the notebook's own process (tests/dojo_notebook.py, exercise 1):")
    import dojo_notebook as NB

    base = NB.setup_namespace()
    for case, cell in (("the solution", NB.EX1), ("two mistakes", NB.edit(NB.EX1, [
            ("dembcat = dhprebn @ W1.T", "dembcat = dhpreact @ W1.T"),
            ("dhpreact = (1 - h**2) * dh", "dhpreact = 1 - h**2 * dh")]))):
        ns = NB.fork(base)
        NB.run(ns, NB.FORWARD)
        NB.run(ns, cell)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            dojo.grade(1, ns)
            times.append(time.perf_counter() - t0)
        later = statistics.median(times[1:] or times)
        print(f"  {case:14s} first {times[0]:.2f} s, then median {later:.2f} s")
    ns = NB.fork(base)
    for c in (NB.FORWARD, NB.EX1, NB.EX4.replace("STEPS", "100")):
        NB.run(ns, c)
    t0 = time.perf_counter()
    dojo.grade(4, ns)
    took = time.perf_counter() - t0
    print(f"  exercise 4 in place (13 gradients, 100 steps against autograd): {took:.2f} s")
    print(f"\nload average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
