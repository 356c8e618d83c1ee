"""Peak memory of training steps at a large batch, with and without activation checkpointing, and with
the engine `handgrad train` picks at that batch.

Variants: "fast" (the lecture MLP's fused native step, untiled), "fast-checkpointed" (the fused step
with --tile rows per recompute tile), "fast-train" (engines.plan's engine at --batch: from
engines.COUNTED_ROWS examples per step the native program with its first batchnorm counted, in tiles of
engines.CACHE_TILE; below that the fused step) and "eager" (train.eager_steps).

Each variant runs in a fresh subprocess: it builds the data, the model (models.build, same seed in
every child, so the last losses are comparable), the batch indices and loads the native library
first, then resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs), reads VmRSS,
runs the steps and reads VmHWM. The reported peak is VmHWM - VmRSS(before): the memory the steps
themselves touched. The fused step's native workspace is also counted exactly (native.workspace_bytes);
the program's is not (shown as -).

    .venv/bin/python benchmarks/memory.py [--batch 65536] [--steps 3] [--tile 1024]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time

VARIANTS = ("fast", "fast-checkpointed", "fast-train", "eager")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Return the heap's free pages to the system (glibc's malloc_trim, where there is one: else the
    steps could reuse pages freed earlier without raising the peak), then reset VmHWM to the current
    RSS; False where the kernel does not allow the reset."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _steps_fn(variant: str, model, batch: int, tile: int) -> tuple:
    """(steps_fn, engine label, tile) of a variant, the native library loaded."""
    from handgrad import engines, train
    from handgrad.engines import native
    from handgrad.train import TrainConfig

    if variant == "eager":
        return train.eager_steps, "eager", 0
    if variant == "fast-train":
        fn, engine, warning = engines.plan(model, TrainConfig(batch_size=batch))
        assert engine == "fast", warning
        if fn.__name__ == "program_steps":  # engines.native_steps: the counted program in cache_tile's tiles
            t = engines.cache_tile(model, batch)
            return fn, f"program, counted, tile {t}", t
        return fn, "fused step", 0
    t = tile if variant == "fast-checkpointed" else 0
    return native.make_steps_fn(native.load_library(), t), "fused step", t


def child(variant: str, batch: int, steps: int, tile: int) -> dict:
    """Run `steps` steps of one variant in this process; its peak memory, time and last loss."""
    import torch

    from handgrad import data, models
    from handgrad.engines import native

    torch.set_num_threads(1)
    splits = data.make_splits(data.read_words(data.default_data_path()).items, 3, 42)
    mcfg = models.with_vocab(models.preset("mlp"), len(splits.vocab))
    model = models.build(mcfg, 42, torch.float32)
    idx = torch.randint(0, splits.Xtr.shape[0], (steps, batch), generator=torch.Generator().manual_seed(0))
    lrs = torch.full((steps,), 0.1, dtype=torch.float64)
    fn, engine, t = _steps_fn(variant, model, batch, tile)
    reset = _reset_hwm()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        losses = fn(model, splits.Xtr, splits.Ytr, idx, lrs)
    dt = (time.perf_counter() - t0) / steps
    peak = _status("VmHWM") - before
    out = {"variant": variant, "batch": batch, "steps": steps, "peak_delta_mib": peak / 2**20,
           "hwm_reset": reset, "ms_per_step": dt * 1e3, "last_loss": float(losses[-1])}
    if variant != "eager":
        out["engine"], out["tile"] = engine, t
    if variant in ("fast", "fast-checkpointed"):
        out["workspace_mib"] = native.workspace_bytes(model, batch, t) / 2**20
    return out


def _ratio(a: float, b: float) -> str:
    """a / b to two decimals, or n/a when b is not positive (a peak too small to measure)."""
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def report(results: list[dict]) -> None:
    """The table (one line per variant), the two comparisons and the JSON of every result."""
    for r in results:
        ws = f"{r['workspace_mib']:8.1f}" if "workspace_mib" in r else f"{'-':>8}"
        note = f"  [{r['engine']}]" if r["variant"] == "fast-train" else ""
        print(f"{r['variant']:<18} peak RSS delta {r['peak_delta_mib']:8.1f} MiB  workspace {ws} MiB  "
              f"{r['ms_per_step']:8.1f} ms/step  (loss {r['last_loss']:.4f}){note}")
    by = {r["variant"]: r for r in results}
    full, ck, tr = by["fast"], by["fast-checkpointed"], by["fast-train"]
    print(f"checkpointing: peak {_ratio(full['peak_delta_mib'], ck['peak_delta_mib'])} smaller, "
          f"time {_ratio(ck['ms_per_step'], full['ms_per_step'])}")
    print(f"fast-train vs fast: peak {_ratio(full['peak_delta_mib'], tr['peak_delta_mib'])} smaller, "
          f"time {_ratio(tr['ms_per_step'], full['ms_per_step'])}")
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tile", type=int, default=1024, help="rows per recompute tile when checkpointing")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.tile)))
        return
    results = []
    for variant in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                            "--steps", str(args.steps), "--tile", str(args.tile)],
                           capture_output=True, text=True, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    report(results)


if __name__ == "__main__":
    main()
