"""The full default training (200,000 steps, batch 32, lr 0.1 then 0.01 from step 100k) with the
train loop of train.py and a chosen engine; prints the training-loop time and the losses.

    .venv/bin/python benchmarks/train_full.py --engine fast [--threads 1] [--steps 200000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from handgrad import data, model, train
from handgrad.model import ModelConfig
from handgrad.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=train.ENGINES, default="fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mcfg = ModelConfig()
    tcfg = TrainConfig(steps=args.steps, engine=args.engine,
                       lr_decay_step=min(100_000, args.steps // 2))
    splits = data.make_splits(data.read_words(data.default_data_path()).items, mcfg.block_size,
                              tcfg.split_seed)
    steps_fn, engine, warning = train.select_engine(mcfg, tcfg)
    last = {}
    t0 = time.perf_counter()
    state = train.train(splits, mcfg, tcfg, steps_fn=steps_fn, callback=lambda p: last.update(t=p.elapsed))
    wall = time.perf_counter() - t0
    bn = train.inference_stats(state, splits, mcfg, tcfg)
    with torch.no_grad():
        losses = {s: model.evaluate(state.params, bn, *splits.split(s)) for s in ("train", "val")}
    print(json.dumps({"engine": engine, "warning": warning, "steps": args.steps, "threads": args.threads,
                      "loop_seconds": round(last["t"], 2), "train_call_seconds": round(wall, 2),
                      "us_per_step": round(last["t"] / args.steps * 1e6, 1),
                      "train_loss": round(losses["train"], 4), "val_loss": round(losses["val"], 4)}))


if __name__ == "__main__":
    main()
