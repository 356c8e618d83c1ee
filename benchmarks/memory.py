"""Peak memory of one training step at a large batch, with and without activation checkpointing.

Each variant runs in a fresh subprocess: it builds the data, parameters, batch indices and loads the
native library first, then resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs),
reads VmRSS, runs the steps and reads VmHWM. The reported peak is VmHWM - VmRSS(before): the memory
the steps themselves touched. The native workspace is also counted exactly (fast.workspace_bytes).

    .venv/bin/python benchmarks/memory.py [--batch 65536] [--steps 3] [--tile 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(variant: str, batch: int, steps: int, tile: int) -> dict:
    import torch

    from handgrad import data, fast, model, train
    from handgrad.model import ModelConfig

    torch.set_num_threads(1)
    cfg = ModelConfig()
    splits = data.make_splits(data.read_words(data.default_data_path()).items, cfg.block_size, 42)
    p, bn = model.init_params(cfg), model.init_bn_stats(cfg)
    idx = torch.randint(0, splits.Xtr.shape[0], (steps, batch), generator=torch.Generator().manual_seed(0))
    lrs = torch.full((steps,), 0.1, dtype=torch.float64)
    t = tile if variant == "fast-checkpointed" else 0
    if variant == "eager":
        fn = train.eager_steps
    else:
        fn, reason = fast.load_fast_steps(cfg, torch.float32, tile=t)
        assert fn is not None, reason
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    before = _status("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        losses = fn(p, bn, splits.Xtr, splits.Ytr, idx, lrs, cfg.bn_momentum, True)
    dt = (time.perf_counter() - t0) / steps
    peak = _status("VmHWM") - before
    out = {"variant": variant, "batch": batch, "steps": steps, "peak_delta_mib": peak / 2**20,
           "hwm_reset": reset, "ms_per_step": dt * 1e3, "last_loss": float(losses[-1])}
    if variant != "eager":
        out["workspace_mib"] = fast.workspace_bytes(cfg, batch, t) / 2**20
        out["tile"] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tile", type=int, default=1024, help="rows per recompute tile when checkpointing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.tile)))
        return
    results = []
    for variant in ("fast", "fast-checkpointed", "eager"):
        r = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                            "--steps", str(args.steps), "--tile", str(args.tile)],
                           capture_output=True, text=True, check=True)
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in results:
        ws = f"{r['workspace_mib']:8.1f}" if "workspace_mib" in r else f"{'-':>8}"
        print(f"{r['variant']:<18} peak RSS delta {r['peak_delta_mib']:8.1f} MiB  workspace {ws} MiB  "
              f"{r['ms_per_step']:8.1f} ms/step  (loss {r['last_loss']:.4f})")
    full, ck = results[0], results[1]
    print(f"checkpointing: peak {full['peak_delta_mib'] / ck['peak_delta_mib']:.2f}x smaller, "
          f"time {ck['ms_per_step'] / full['ms_per_step']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
