"""Where a data-parallel step's communication time goes: per step, each rank's compute, how much later
the slower rank reaches the gradient all-reduce than the faster one (the lag), and how long the
all-reduce takes after the last arrival. distributed_bench's `grad AR` column is the sum of the two, as
the faster rank sees it.

    python benchmarks/rank_lag.py --batch 16384 --steps 200

Both ranks run the mlp's native program (as `handgrad train --nproc 2` does: tiles of engines.CACHE_TILE
from engines.TILE_ROWS rows per rank), each timestamping its hook with time.perf_counter (one clock
for the processes of one machine). docs/scale.md reads the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import distributed_bench  # benchmarks/distributed_bench.py, beside this script
from handgrad import engines
from handgrad.engines import native, parallel


class TimedCollectives(parallel.NativeCollectives):
    """NativeCollectives that records (what, entered, left) for every call of the hook."""

    def __init__(self, comm):
        super().__init__(comm)
        self.marks: list[tuple[int, float, float]] = []
        self.fn = native.SYNC_FN(self._timed)  # replaces the untimed hook

    def _timed(self, what: int, buf: int, n: int, out: int) -> int:
        t0 = time.perf_counter()
        code = self._call(what, buf, n, out)
        self.marks.append((what, t0, time.perf_counter()))
        return code


def _worker(comm, B: int, tile: int, K: int) -> list[tuple[float, float]]:
    """(entered, left) of each step's gradient all-reduce on this rank, K steps after one untimed."""
    cfg = distributed_bench.BenchConfig(batches=(B,), nproc=comm.world)
    splits, model = distributed_bench._problem(cfg)
    hook = TimedCollectives(comm)
    run = native.make_program_fn(native.load_program_library(), tile, 1, sync=hook.fn)
    idx, lrs = distributed_bench._batches(cfg, splits.Xtr.shape[0], B, K + 1)
    with torch.no_grad():
        run(model, splits.Xtr, splits.Ytr, idx[:1], lrs[:1], ranks=comm.world, rank=comm.rank)
        hook.marks.clear()
        comm.all_reduce_(torch.zeros(1), "barrier")
        run(model, splits.Xtr, splits.Ytr, idx[1:], lrs[1:], ranks=comm.world, rank=comm.rank)
    return [(a, b) for what, a, b in hook.marks if what == native.SYNC_GRADS]


def split(marks: list[list[tuple[float, float]]]) -> dict[str, list[float]]:
    """Per step k >= 1, in seconds: each rank's compute (its arrival minus its previous release), the
    lag (last arrival minus first), the all-reduce after the last arrival (first release minus last
    arrival) and the whole step (last release minus the previous last release)."""
    out: dict[str, list[float]] = {f"rank {r} compute": [] for r in range(len(marks))}
    out.update({"lag": [], "all-reduce after the last arrival": [], "step": []})
    for k in range(1, len(marks[0])):
        arrive = [m[k][0] for m in marks]
        for r, m in enumerate(marks):
            out[f"rank {r} compute"].append(m[k][0] - m[k - 1][1])
        out["lag"].append(max(arrive) - min(arrive))
        out["all-reduce after the last arrival"].append(min(m[k][1] for m in marks) - max(arrive))
        out["step"].append(max(m[k][1] for m in marks) - max(m[k - 1][1] for m in marks))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/rank_lag.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16384, help="global batch (default %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="timed steps (default %(default)s)")
    p.add_argument("--tile", type=int, default=-1, help="examples per tile (default: as handgrad train)")
    args = p.parse_args(argv)
    error = (f"--nproc {args.nproc}: expected 2 or more" if args.nproc < 2 else
             f"--batch {args.batch}: expected a multiple of --nproc {args.nproc}, 2 rows per rank at least"
             if args.batch % args.nproc or args.batch < 2 * args.nproc else
             f"--steps {args.steps}: expected 2 or more" if args.steps < 2 else "")
    if error:
        print(f"rank_lag: error: {error}", file=sys.stderr)
        return 2
    cfg = distributed_bench.BenchConfig(batches=(args.batch,), nproc=args.nproc)
    tile = args.tile if args.tile >= 0 else engines.cache_tile(distributed_bench._problem(cfg)[1],
                                                            args.batch // args.nproc)
    marks = parallel.spawn(_worker, args.nproc, args.batch, tile, args.steps, timeout=300)
    print(f"mlp, global batch {args.batch:,} over {args.nproc} ranks, tiles of {tile or 'all'} rows, "
          f"{args.steps} steps; ms per step:")
    print(f"{'':<36} {'median':>7} {'mean':>7} {'p10':>7} {'p90':>7} {'p99':>7}")
    for name, xs in split(marks).items():
        q = sorted(xs)
        p10, p90, p99 = (q[int(f * (len(q) - 1))] * 1e3 for f in (0.1, 0.9, 0.99))
        print(f"{name:<36} {statistics.median(xs) * 1e3:>7.2f} {statistics.fmean(xs) * 1e3:>7.2f} "
              f"{p10:>7.2f} {p90:>7.2f} {p99:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
