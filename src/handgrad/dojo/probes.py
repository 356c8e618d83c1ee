"""The points at which a learner's gradients are graded, for the exercises (the grader's side: no
learner code here). A probe is a namespace of forward values, the upstream gradients fed in after each of
the learner's gradients, and the right local answer for each. Probes that cannot be fooled: the lecture's
batch, random upstream gradients (a branch whose upstream is ~0 in the lecture, like logit_maxes, shows),
a batch of another size after some training (hard-coded sizes show), float64 for the verdict and float32
against autograd bit for bit (the lecture's "exact" column).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from torch import Tensor

from handgrad import atomic
from handgrad.atomic import Params
from handgrad.dojo import graph as G
from handgrad.dojo import setup
from handgrad.dojo.framework import Probe

F64, F32 = torch.float64, torch.float32


def _params_dict(p: Params, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: t.to(dtype).clone() for k, t in p.items()}


@lru_cache(maxsize=2)
def trained_params(steps: int = 40, seed: int = 7) -> Params:
    """The lecture's network after `steps` SGD steps (lr 0.1) with the hand-written backward: a
    point where tanh saturates somewhat and the gradients are no longer those of the init."""
    p = setup.lecture_params(seed, torch.float64)
    X, Y = setup.lecture_dataset()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            ix = torch.randint(0, X.shape[0], (32,), generator=g)
            Xb, Yb = X[ix], Y[ix]
            grads = atomic.backward(p, Xb, Yb, atomic.forward(p, Xb, Yb)).params()
            for t, dt in zip(p.tensors(), grads.tensors()):
                t.sub_(0.1 * dt)
    return p


def graph_probe(
    graph: G.Graph,
    name: str,
    about: str,
    inputs: Mapping[str, object],
    *,
    random: bool,
    dtype: torch.dtype,
    seed: int = 0,
    seed_grad: Tensor | None = None,
    extras: Callable[[dict], dict] | None = None,
    **flags,
) -> Probe:
    """Run the graph forward at `inputs` (floating tensors cast to dtype) and feed either autograd's
    true gradients or seeded random upstream gradients; the references are the local VJPs."""
    ins = {
        k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in inputs.items()
    }
    vals = G.forward(graph, {k: v for k, v in ins.items() if isinstance(v, Tensor)})
    gen = torch.Generator().manual_seed(seed)
    random_up = random or (graph.seed != "loss" and seed_grad is None)
    if graph.seed != "loss" and seed_grad is None:
        seed_grad = torch.randn(vals[graph.seed].shape, generator=gen, dtype=F64).to(dtype)
    if seed_grad is not None:
        seed_grad = seed_grad.to(dtype)
    feeds: dict[str, Tensor]
    if random:
        feeds = {g: torch.randn(vals[g].shape, generator=gen, dtype=F64).to(dtype) for g in graph.grads}
    else:
        feeds = G.true_grads(graph, vals, seed_grad)
    feeds[graph.seed] = seed_grad if seed_grad is not None else torch.ones((), dtype=dtype)
    loc = G.local_vjps(graph, vals, feeds)
    if random:
        refs = {g: loc.total(g) for g in graph.grads}
    else:
        refs = {g: feeds[g] for g in graph.grads}
    values: dict[str, object] = dict(ins)
    values.update(vals)
    if extras:
        values.update(extras(values))
    if graph.seed != "loss":
        values[f"d{graph.seed}"] = feeds[graph.seed]
    return Probe(name, about, values, refs, feeds, loc, dtype=dtype, random=random_up, **flags)


# ---------------------------------------------------------------------------- the lecture's probes
def _lecture_inputs(p: Params, X: Tensor, Y: Tensor) -> dict[str, object]:
    n = X.shape[0]
    return {
        **_params_dict(p, F64),
        "Xb": X,
        "Yb": Y,
        "n": n,
        "batch_size": n,
        "n_embd": p.C.shape[1],
        "n_hidden": p.W1.shape[1],
        "block_size": X.shape[1],
        "vocab_size": p.C.shape[0],
    }


def point(p: Params | dict[str, Tensor], X: Tensor, Y: Tensor) -> dict[str, object]:
    """A probe's inputs: the 7 parameters (float64), a batch and the sizes they imply."""
    ps = p if isinstance(p, dict) else dict(p.items())
    return _lecture_inputs(
        Params(**{k: ps[k] for k in ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")}), X, Y
    )


def _points(own: dict | None = None) -> list[tuple[str, str, dict[str, object]]]:
    """(name, words, inputs): the lecture's init and batch (or a notebook's own point); after 40 steps, a
    batch of 24."""
    trained = _lecture_inputs(trained_params(), *setup.lecture_batch(seed=11, batch_size=24))
    if own is not None:
        first = ("yours", f"your parameters and batch (n={own['n']})", own)
    else:
        first = (
            "lecture",
            "the lecture's init and batch (n=32)",
            _lecture_inputs(setup.lecture_params(), *setup.lecture_batch()),
        )
    return [first, ("trained", "after 40 training steps, a batch of n=24", trained)]


def _bn_extras(values: dict) -> dict:
    return G.bn_extras(values["hprebn"])


def lecture_probes(
    graph: G.Graph = G.LECTURE, extras: Callable[[dict], dict] | None = None, own: dict | None = None
) -> list[Probe]:
    """Exercises 1 and 4 (local grading of many gradients). With `own` (a notebook's point) the first
    probes are at it, and there is no chain probe: the notebook's own values are the chain."""
    (ln, lw, lecture), (_, tw, trained) = _points(own)
    mine = own is not None
    out = [
        graph_probe(
            graph,
            ln,
            f"{lw}, true upstream, float64",
            lecture,
            random=False,
            dtype=F64,
            extras=extras,
            own=mine,
        ),
        graph_probe(
            graph,
            f"{ln}-random" if mine else "random",
            f"{lw}, random upstream gradients, float64",
            lecture,
            random=True,
            dtype=F64,
            seed=1,
            extras=extras,
            own=mine,
        ),
        graph_probe(
            graph,
            "trained",
            f"{tw}, random upstream gradients, float64",
            trained,
            random=True,
            dtype=F64,
            seed=2,
            extras=extras,
        ),
        graph_probe(
            graph,
            "float32",
            f"{lw}, float32, against autograd bit for bit",
            lecture,
            random=False,
            dtype=F32,
            extras=extras,
            verdict=False,
            exact=True,
            own=mine,
        ),
    ]
    if not mine:
        out.append(
            graph_probe(
                graph,
                "chain",
                f"{lw}: your own chain, nothing fed in, float64",
                lecture,
                random=False,
                dtype=F64,
                extras=extras,
                feed=False,
                verdict=False,
            )
        )
    return out


def cross_entropy_probes(own: dict | None = None) -> list[Probe]:
    """Exercise 2: dlogits of F.cross_entropy (only the loss seed exists: no random upstream)."""
    (ln, lw, lecture), (_, tw, trained) = _points(own)
    g = G.CROSS_ENTROPY
    ex = _bn_extras
    mine = own is not None
    return [
        graph_probe(g, ln, f"{lw}, float64", lecture, random=False, dtype=F64, extras=ex, own=mine),
        graph_probe(g, "trained", f"{tw}, float64", trained, random=False, dtype=F64, extras=ex),
        graph_probe(
            g,
            "float32",
            f"{lw}, float32, against autograd bit for bit",
            lecture,
            random=False,
            dtype=F32,
            extras=ex,
            verdict=False,
            exact=True,
            own=mine,
        ),
    ]


def batchnorm_probes(own: dict | None = None, seed_grad: Tensor | None = None) -> list[Probe]:
    """Exercise 3: dhprebn given dhpreact (the lecture's, or a notebook's own; then random ones)."""
    (ln, lw, lecture), (_, tw, trained) = _points(own)
    if seed_grad is None:
        fwd = G.forward(G.LECTURE, {k: v for k, v in lecture.items() if isinstance(v, Tensor)})
        seed_grad = G.true_grads(G.LECTURE, fwd)["hpreact"]
    mine = own is not None

    def ins(pt: dict) -> dict:
        vals = G.forward(G.CROSS_ENTROPY, {k: v for k, v in pt.items() if isinstance(v, Tensor)})
        return {**pt, "hprebn": vals["hprebn"]}

    def ex(values: dict) -> dict:
        vals = G.forward(
            G.CROSS_ENTROPY,
            {
                k: v
                for k, v in values.items()
                if isinstance(v, Tensor)
                and k in ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias", "Xb", "Yb")
            },
        )
        return {
            **G.bn_extras(values["hprebn"]),
            **{k: vals[k] for k in ("emb", "embcat", "h", "logits", "loss")},
            "hpreact_fast": values["hpreact"],
        }

    g = G.BATCHNORM
    li, ti = ins(lecture), ins(trained)
    up = "your dhpreact" if mine else "the lecture's dhpreact"
    return [
        graph_probe(
            g,
            ln,
            f"{lw}, {up}, float64",
            li,
            random=False,
            dtype=F64,
            seed_grad=seed_grad,
            extras=ex,
            own=mine,
        ),
        graph_probe(
            g,
            f"{ln}-random" if mine else "random",
            f"{lw}, a random dhpreact, float64",
            li,
            random=False,
            dtype=F64,
            seed=3,
            extras=ex,
            own=mine,
        ),
        graph_probe(
            g, "trained", f"{tw}, a random dhpreact, float64", ti, random=False, dtype=F64, seed=4, extras=ex
        ),
        graph_probe(
            g,
            "float32",
            f"{lw}, float32, against autograd bit for bit",
            li,
            random=False,
            dtype=F32,
            seed_grad=seed_grad,
            extras=ex,
            verdict=False,
            exact=True,
            own=mine,
        ),
    ]


def training_probes(own: dict | None = None) -> list[Probe]:
    """Exercise 4's local grading: the compact graph, like exercise 1."""
    return lecture_probes(G.TRAINING, _bn_extras, own)
