"""Exercise 4's training run (Karpathy, "Becoming a Backprop Ninja", the last exercise): SGD on the
lecture's network with the learner's backward alone, held against the same run with autograd's
gradients: step for step over the first steps, and by the loss it reaches. The learner's steps run
where their code runs (`run_training`: the child for a file, the notebook's process for a notebook);
the grader draws the batches, runs autograd's steps and judges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo import setup
from handgrad.dojo.judge import Row

PARAMS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")  # what SGD updates, the lecture's order
STEPS, LR, SEED = 100, 0.1, 42  # the grader's training run
CURVE_STEPS = 20  # the first steps, where the loss must follow autograd's step for step
CURVE_RTOL = 1e-6  # float64: a right backward follows autograd's loss to ~1e-12
REACHED_RTOL = 1e-3  # the mean loss of the last steps, relative to autograd's
LAST = 10  # the steps averaged for "the loss it reaches"


def training_inputs(steps: int, seed: int) -> dict[str, Tensor]:
    """The lecture's init (float64) and `steps` seeded batches of 32: `p|C`, ..., `Xs`, `Ys`."""
    X, Y = setup.lecture_dataset()
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, X.shape[0], (steps, setup.BATCH_SIZE), generator=g)  # (S, N)
    p = setup.lecture_params(dtype=torch.float64)
    return {**{f"p|{k}": t.clone() for k, t in p.items()}, "Xs": X[ix], "Ys": Y[ix]}


@lru_cache(maxsize=1)
def _inputs() -> dict[str, Tensor]:
    return training_inputs(STEPS, SEED)


def inputs() -> dict[str, Tensor]:
    """The grader's run (computed once per process; a copy each time)."""
    return {k: v.clone() for k, v in _inputs().items()}


def values(params: dict[str, Tensor], Xb: Tensor, Yb: Tensor) -> dict[str, object]:
    """The learner's namespace at one step: parameters, batch, sizes and every forward value."""
    vals = G.forward(G.TRAINING, {**params, "Xb": Xb, "Yb": Yb})
    n = Xb.shape[0]
    return {
        **vals,
        **G.bn_extras(vals["hprebn"]),
        "n": n,
        "batch_size": n,
        "n_embd": params["C"].shape[1],
        "n_hidden": params["W1"].shape[1],
        "block_size": Xb.shape[1],
        "vocab_size": params["C"].shape[0],
    }


# ---------------------------------------------------------------------------- where the learner's code runs
def run_training(
    parsed, base: dict, tensors: dict[str, Tensor], rows: dict[str, str], lr: float, run_region: Callable
) -> tuple[dict[str, Tensor], dict]:
    """Train with the learner's region (nothing fed in) until the steps run out or a step cannot be
    taken; returns the losses and, if it stopped early, why. `run_region` is runner.run_region, which
    runs the region once (passed in: the runner calls this module, not the other way round)."""
    params = {k: tensors[f"p|{k}"].clone() for k in PARAMS}
    wanted = {k: rows.get(k, f"d{k}") for k in PARAMS}
    losses: list[float] = []
    stop = ""
    for s in range(tensors["Xs"].shape[0]):
        vals = values(params, tensors["Xs"][s], tensors["Ys"][s])
        losses.append(float(vals["loss"]))
        run = run_region(parsed, base, vals, {}, wanted, feed=False)
        bad = next((k for k in PARAMS if k not in run.out), None)
        if bad is not None:
            m = run.meta[bad]
            why = m.get("msg") or ("still blank" if m.get("status") == "missing" else m.get("status", "?"))
            stop = f"step {s}: {wanted[bad]} cannot be used: {why}"
            break
        shaped = next((k for k in PARAMS if run.out[k].numel() != params[k].numel()), None)
        if shaped is not None:
            stop = (
                f"step {s}: {wanted[shaped]} has shape {tuple(run.out[shaped].shape)} but {shaped} is "
                f"{tuple(params[shaped].shape)}: the update would change the parameter's shape"
            )
            break
        params = {k: params[k] - lr * run.out[k].reshape(params[k].shape).to(params[k].dtype) for k in PARAMS}
    return {"losses": torch.tensor(losses, dtype=torch.float64)}, {"stop": stop}


# ---------------------------------------------------------------------------- the grader's side
@lru_cache(maxsize=1)
def _reference() -> Tensor:
    tensors = _inputs()
    params = {k: tensors[f"p|{k}"].clone() for k in PARAMS}
    out = []
    for s in range(tensors["Xs"].shape[0]):
        vals = G.forward(G.TRAINING, {**params, "Xb": tensors["Xs"][s], "Yb": tensors["Ys"][s]})
        out.append(float(vals["loss"]))
        grads = G.true_grads(G.TRAINING, vals)
        params = {k: params[k] - LR * grads[k] for k in PARAMS}
    return torch.tensor(out, dtype=torch.float64)


def reference() -> Tensor:
    """The same run with autograd's gradients: the loss at each step."""
    return _reference().clone()


def judge_training(mine: Tensor, ref: Tensor, stop: str, curve_steps: int = CURVE_STEPS) -> list[Row]:
    """Two rows: the loss curve over the first `curve_steps` steps, and the loss reached at the end."""
    steps = ref.shape[0]
    curve = Row("loss curve", (curve_steps,), "ok", grad=False)
    reached = Row("loss reached", (steps,), "ok", grad=False)
    k = min(curve_steps, mine.shape[0])
    rel = ((mine[:k] - ref[:k]).abs() / ref[:k].abs()).tolist()
    off = next((i for i, r in enumerate(rel) if not r <= CURVE_RTOL), None)  # `not <=`: NaN is off too
    if off is not None:
        curve.status, curve.kind, curve.key = "wrong", K.OTHER, "curve"
        curve.max_rel = rel[off]
        curve.diagnosis = (
            f"leaves autograd's loss at step {off}: yours {mine[off]:.6f}, autograd's {ref[off]:.6f}"
            + (" (step 0 is the forward pass alone)" if off == 0 else "")
            + ": the gradients that update the parameters are wrong; the rows above say which"
        )
    elif mine.shape[0] < curve_steps:
        curve.status, curve.kind, curve.key = "wrong", K.OTHER, "stopped"
        curve.diagnosis = f"training stopped: {stop}"
    else:
        curve.max_rel = max(rel)
        curve.diagnosis = f"follows autograd's loss over the first {k} steps (to {max(rel):.1g} relative)"
    if mine.shape[0] < steps:
        reached.status, reached.kind, reached.key = "wrong", K.OTHER, "stopped"
        reached.diagnosis = f"training stopped after {mine.shape[0]} of {steps} steps: {stop}"
        return [curve, reached]
    a, b = float(mine[-LAST:].mean()), float(ref[-LAST:].mean())
    reached.max_rel = abs(a - b) / b
    if not math.isfinite(a):
        reached.status, reached.kind, reached.key = "wrong", K.NONFINITE, "nonfinite"
        reached.diagnosis = f"the loss became {a} (diverged): a gradient far too large, or of the wrong sign"
    elif not abs(a - b) <= REACHED_RTOL * b:
        reached.status, reached.kind, reached.key = "wrong", K.OTHER, "reached"
        worse = "higher" if a > b else "lower"
        reached.diagnosis = (
            f"mean loss of the last {LAST} of {steps} steps {a:.4f}, autograd's {b:.4f} ({worse}; "
            f"started at {float(ref[0]):.4f})"
        )
    else:
        reached.diagnosis = (
            f"mean loss of the last {LAST} of {steps} steps {a:.4f}, as autograd's (from {float(ref[0]):.4f})"
        )
    return [curve, reached]
