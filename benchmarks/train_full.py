"""The full default training (200,000 steps, batch 32, lr 0.1 then 0.01 from step 100k) of the lecture
MLP with the train loop of train.py and a chosen engine; prints the training-loop time and the losses.
The losses are measured as `handgrad train` does: batchnorm calibrated over the training set
(train.inference_buffers), then models.evaluate of the model with those statistics on train and val.

    .venv/bin/python benchmarks/train_full.py --engine fast [--threads 1] [--steps 200000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from handgrad import data, engines, models, train
from handgrad.train import TrainConfig


def configs(engine: str, steps: int) -> tuple[models.ModelConfig, TrainConfig, data.Splits]:
    """The mlp preset on the bundled names, as `handgrad train` builds it; a shorter run decays the
    learning rate half-way (at step 100k in the full run)."""
    mcfg = models.preset("mlp")
    tcfg = TrainConfig.for_model("mlp", steps=steps, engine=engine, lr_decay_step=min(100_000, steps // 2))
    splits = data.make_splits(data.read_words(data.default_data_path()).items, mcfg.block_size,
                              tcfg.split_seed)
    return models.with_vocab(mcfg, len(splits.vocab)), tcfg, splits


def final_losses(state: train.TrainState, splits: data.Splits, tcfg: TrainConfig) -> dict[str, float]:
    """Train and val loss with the inference statistics, as cli.py reports them after training."""
    inference = models.with_buffers(state.model, train.inference_buffers(state, splits, tcfg))
    with torch.no_grad():
        return {s: models.evaluate(inference, *splits.split(s)) for s in ("train", "val")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=train.ENGINES, default="fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mcfg, tcfg, splits = configs(args.engine, args.steps)
    state = train.new_state(mcfg, tcfg)
    steps_fn, engine, warning = engines.plan(state.model, tcfg)
    last = {}
    t0 = time.perf_counter()
    state = train.train(splits, mcfg, tcfg, state, callback=lambda p: last.update(t=p.elapsed),
                        steps_fn=steps_fn)
    wall = time.perf_counter() - t0
    losses = final_losses(state, splits, tcfg)
    print(json.dumps({"engine": engine, "warning": warning, "steps": args.steps, "threads": args.threads,
                      "loop_seconds": round(last["t"], 2), "train_call_seconds": round(wall, 2),
                      "us_per_step": round(last["t"] / args.steps * 1e6, 1),
                      "train_loss": round(losses["train"], 4), "val_loss": round(losses["val"], 4)}))


if __name__ == "__main__":
    main()
