"""How much the diagnostics collector adds to training time, as one ratio (with / without).

Trains the default model for --steps steps twice per repeat, once plain and once with the
diagnostics.Collector as callback (probe measured every --every steps, plus at step 0), same seed,
same batches, same engine (the one train selects; --engine to force one). The ratio of the
medians is printed, and the collector's own cost per measurement timed directly (less noisy).
Writing the PNGs (once, at the end of a run) is timed separately.

    .venv/bin/python benchmarks/diagnostics_overhead.py [--steps 20000] [--every 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from handgrad import data, diagnostics, engines, models, train
from handgrad.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=diagnostics.DiagConfig().every,
                    help="diagnostics interval (default %(default)s, the default of train --diagnostics)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", choices=train.ENGINES, default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    words = data.read_words(data.default_data_path())
    splits = data.make_splits(words.items, 3, 42)
    mcfg = models.with_vocab(models.preset("mlp"), len(splits.vocab))
    tcfg = TrainConfig(steps=args.steps, engine=args.engine)
    steps_fn, engine, fallback = engines.plan(train.new_state(mcfg, tcfg).model, tcfg)
    if fallback:
        print(f"note: {fallback}", file=sys.stderr)

    def plain() -> float:
        t0 = time.perf_counter()
        train.train(splits, mcfg, tcfg, steps_fn=steps_fn)
        return time.perf_counter() - t0

    def with_diagnostics() -> tuple[float, diagnostics.Collector, train.TrainState]:
        t0 = time.perf_counter()
        dcfg = diagnostics.DiagConfig(every=args.every)
        c = diagnostics.Collector(splits.Xtr, splits.Ytr, mcfg, tcfg, dcfg)
        state = train.new_state(mcfg, tcfg)
        c.record(state.model, 0)
        state = train.train(splits, mcfg, tcfg, state, callback=c, steps_fn=steps_fn)
        return time.perf_counter() - t0, c, state

    train.train(splits, mcfg, TrainConfig(steps=1000, engine=args.engine), steps_fn=steps_fn)  # warm-up
    without, with_ = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        without.append(plain())
        t, c, state = with_diagnostics()
        with_.append(t)
    a, b = statistics.median(without), statistics.median(with_)
    probe = []  # the collector's own cost, timed directly (robust to machine noise between runs)
    for _ in range(20):
        t0 = time.perf_counter()
        c.record(state.model, state.step)
        probe.append(time.perf_counter() - t0)
    probe_s = statistics.median(probe)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        diagnostics.write_report(d, c, state.model, state.step, state.losses)
        report_s = time.perf_counter() - t0
    print(f"{args.steps:,} steps, {engine} engine, {torch.get_num_threads()} thread(s), diagnostics every "
          f"{args.every} steps ({len(c.history)} probes of {c.X.shape[0]}x{c.X.shape[1]} examples)")
    print(f"without diagnostics: median {a:.2f}s  {[round(x, 2) for x in without]}")
    print(f"with diagnostics:    median {b:.2f}s  {[round(x, 2) for x in with_]}")
    print(f"overhead ratio (with / without): {b / a:.3f}  ({(b / a - 1) * 100:+.1f}%)")
    share = probe_s / (a / args.steps * args.every)
    print(f"one probe measurement: median {probe_s * 1e3:.1f} ms = {share:.1%} of the {args.every} plain "
          "steps between two measurements")
    print(f"writing the report once (6 PNGs + diagnostics.json): {report_s:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
