"""The same bits before and after a change: run `handgrad train` on fixed seeds and keep, per run, the
exit code, what it printed (times masked), the per-step losses and the sha256 of every saved tensor;
`--check` runs them again and names every difference.

    python benchmarks/same_bits.py --record            # writes benchmarks/results/same_bits.json
    python benchmarks/same_bits.py --check             # exit 1 when anything differs from the record
    python benchmarks/same_bits.py --check --cases mlp-fast,deep

The native engines are compiled with -march=native and torch's kernels depend on the CPU, so the record
is only comparable on the machine (CPU, torch, Python) that made it; the file says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

RECORD = Path(__file__).parent / "results" / "same_bits.json"
OUT = "{out}"  # replaced by the run's directory
# Each case: the commands it runs in order (the same --out), `handgrad` left out.
CASES: dict[str, list[list[str]]] = {
    "mlp-fast": [["train", "--steps", "3000", "--out", OUT]],
    "mlp-eager": [["train", "--steps", "3000", "--engine", "eager", "--out", OUT]],
    "wavenet": [["train", "--model", "wavenet", "--steps", "2000", "--out", OUT]],
    "deep": [["train", "--model", "deep", "--steps", "2000", "--out", OUT]],
    "nproc2": [["train", "--nproc", "2", "--batch-size", "4096", "--steps", "200", "--out", OUT]],
    "resume-lr": [["train", "--steps", "1000", "--out", OUT],
                  ["train", "--resume", OUT, "--steps", "3000", "--lr", "0.05"]],
}
# What every command prints and returns, recorded too (no tensors): help, refusals, the other commands.
BAD = "{out}/bad"  # a directory that is never a checkpoint
OUTPUT_CASES: dict[str, list[list[str]]] = {
    "help": [[c, "--help"] for c in ("train", "sample", "eval", "check", "bench", "diagnose", "dojo")]
    + [["--help"], ["dojo", "grade", "--help"]],
    "train-refusals": [["train", "--out", f"{OUT}/r{i}", *flags] for i, flags in enumerate((
        ["--steps", "0"], ["--batch-size", "1"], ["--lr", "-1"], ["--lr-decayed", "nan"], ["--n-hidden", "0"],
        ["--n-embd", str(1 << 21)], ["--model", "wavenet", "--block-size", "3"],
        ["--model", "wavenet", "--n-layers", "2"], ["--seed", "-1"], ["--split-seed", str(2**63)],
        ["--dtype", "float16"], ["--threads", "0"], ["--samples", "-1"], ["--chunk-steps", "0"],
        ["--checkpoint-every", "0"], ["--recompute-tile", "-1"], ["--bn-stats", "x"], ["--engine", "x"],
        ["--model", "x"], ["--nproc", "0"], ["--nproc", "2", "--diagnostics"],
        ["--nproc", "2", "--batch-size", "33"], ["--engine", "fast", "--dtype", "float64"],
        ["--diag-every", "7"], ["--verify-autograd", "0"], ["--data", BAD], ["--resume", BAD],
        ["--lr-decay-step", "-1", "--steps", "10", "--quiet", "--samples", "0"], ["--w1-scale", "0"],
        ["--steps", str(10**9)], ["--batch-size", str(10**9)], ["--resume", OUT, "--force"]))],
    "commands": [
        ["train", "--steps", "2000", "--checkpoint-every", "1000", "--quiet", "--out", OUT],
        ["sample", "--checkpoint", OUT, "-n", "5", "--seed", "7"],
        ["sample", "--checkpoint", OUT, "-n", "0"], ["sample", "--checkpoint", OUT, "--seed", "-1"],
        ["sample", "--checkpoint", BAD], ["eval", "--checkpoint", OUT], ["eval", "--checkpoint", BAD],
        ["check", "--checkpoint", OUT], ["check", "--checkpoint", OUT, "--model", "mlp"],
        ["check", "--batch-size", "1"], ["check", "--seed", "-1"], ["check"], ["check", "--dtype", "float64"],
        ["check", "--model", "wavenet", "--batch-size", "8"],
        ["diagnose", "--checkpoint", OUT, "--out", OUT + "/diag"],
        ["train", "--out", OUT, "--steps", "10"],
        ["train", "--resume", OUT, "--n-hidden", "5"], ["train", "--resume", OUT, "--steps", "10"],
        ["train", "--resume", OUT, "--lr", "0"], ["train", "--resume", OUT, "--model", "deep"],
        ["train", "--resume", OUT, "--steps", "3000", "--lr", "0.02", "--quiet", "--samples", "2"],
        ["train", "--verify-autograd", "30", "--engine", "eager"],
        ["train", "--verify-autograd", "30", "--model", "deep", "--dtype", "float64"],
        ["train", "--steps", "2000", "--quiet", "--diagnostics", "--diag-every", "1000", "--samples", "0",
         "--out", OUT + "/d"],
        ["train", "--steps", "1000", "--quiet", "--model", "deep", "--no-batchnorm", "--samples", "0",
         "--out", OUT + "/nobn"],
        ["train", "--steps", "1000", "--quiet", "--lr", "1e6", "--out", OUT + "/diverge"],
        ["bench", "--batch-size", "1"], ["bench", "--steps", "0"], ["bench", "--large-batch", "1"],
        ["bench", "--recompute-tile", "-1"], ["bench", "--n-hidden", "0"],
        ["bench", "--full-train", "fast", "--full-steps", "10"],
        ["dojo", "list"], ["dojo", "solution", "1"], ["dojo", "start", "99"]],
}
TQDM = re.compile(r"\d+%\||\|\s*\d+/\d+ \[")  # a progress-bar frame
TIMES = [(re.compile(r"training loop [0-9.]+(s|min)"), "training loop <time>"),
         (re.compile(r"(process|held by) [0-9]+"), r"\1 <pid>")]


def machine() -> dict:
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def _masked(text: str, out: str) -> str:
    """Printed text without progress-bar frames, with the run directory and times masked."""
    lines = [seg for line in text.split("\n") for seg in line.split("\r") if seg and not TQDM.search(seg)]
    text = "\n".join(lines).replace(out, "<out>")
    for pattern, repl in TIMES:
        text = pattern.sub(repl, text)
    return text


def _saved(out: Path) -> dict:
    """What the run directory holds: step, results, lr history, the tensor file's sha256, each tensor's
    sha256 and the per-step losses (exact floats)."""
    meta = json.loads((out / "meta.json").read_text())
    tensors = load_file(str(out / meta["tensors_file"]))
    digests = {k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()
                                 if t.dtype != torch.uint8 else t.numpy().tobytes()).hexdigest()
               for k, t in sorted(tensors.items())}
    results = {k: v for k, v in meta["results"].items() if k != "loop_seconds"}
    return {"step": meta["step"], "results": results, "lr_history": meta.get("lr_history"),
            "sha256": meta["sha256"], "tensors": digests, "losses": tensors["losses"].tolist()}


def run_case(name: str, workdir: Path) -> dict:
    out = workdir / name
    env = {**os.environ, "PYTHONHASHSEED": "0", "COLUMNS": "100"}
    runs = []
    for cmd in {**CASES, **OUTPUT_CASES}[name]:
        argv = [a.replace(OUT, str(out)) for a in cmd]
        r = subprocess.run([sys.executable, "-m", "handgrad", *argv], capture_output=True, text=True, env=env,
                           timeout=1800)
        runs.append({"argv": cmd, "rc": r.returncode, "stdout": _masked(r.stdout, str(out)),
                     "stderr": _masked(r.stderr, str(out)),
                     "saved": _saved(out) if r.returncode == 0 and name in CASES else None})
    return {"runs": runs}


def differences(want: dict, got: dict, where: str = "") -> list[str]:
    """Every path at which two records differ; for the losses, the first step that differs."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            if k not in want or k not in got:
                out.append(f"{where}.{k}: only in the {'record' if k in want else 'new run'}")
            else:
                out += differences(want[k], got[k], f"{where}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and where.endswith(".losses"):
        first = next((i for i, (a, b) in enumerate(zip(want, got))
                      if a != b and not (a != a and b != b)), None)  # NaN == NaN here
        if first is None and len(want) == len(got):
            return []
        return [f"{where}: first difference at step {first}" if first is not None else
                f"{where}: {len(want)} steps recorded, {len(got)} now"]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if want == got else [f"{where}: recorded {want!r:.200}, now {got!r:.200}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help=f"run every case and write {RECORD.name}")
    mode.add_argument("--check", action="store_true", help="run the cases and compare with the record")
    known = {**CASES, **OUTPUT_CASES}
    p.add_argument("--cases", help=f"comma-separated subset of {', '.join(known)} (default: all)")
    p.add_argument("--file", type=Path, default=RECORD, help="the record (default %(default)s)")
    args = p.parse_args(argv)
    names = args.cases.split(",") if args.cases else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--cases: unknown case {unknown[0]!r}; known: {', '.join(known)}")
    with tempfile.TemporaryDirectory(prefix="same-bits-") as tmp:
        got = {}
        for n in names:
            print(f"running {n} ...", file=sys.stderr, flush=True)
            got[n] = run_case(n, Path(tmp))
    if args.record:  # the cases run now replace theirs; the others are kept
        args.file.parent.mkdir(parents=True, exist_ok=True)
        cases = json.loads(args.file.read_text())["cases"] if args.file.exists() else {}
        args.file.write_text(json.dumps({"machine": machine(), "cases": {**cases, **got}}, indent=1) + "\n")
        print(f"recorded {', '.join(names)} in {args.file}")
        return 0
    record = json.loads(args.file.read_text())
    if record["machine"] != machine():
        print(f"note: recorded on {record['machine']}, running on {machine()}: bits may differ",
              file=sys.stderr)
    failed = 0
    for n in names:
        diffs = differences(record["cases"].get(n, {}), got[n], n)
        print(f"{n}: {'same bits' if not diffs else f'{len(diffs)} difference(s)'}")
        for d in diffs:
            print(f"  {d}")
        failed += bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
