"""What the region challenges of the makemore zoo (layernorm, one attention head, an RNN through time)
share: the learner's file (setup and forward given, the backward between `# >>>` and `# <<<`, no
autograd anywhere in it) and the probes, built on the exercises' graph machinery (probes.graph_probe):
float64 points of several shapes, with the true upstream gradients fed in and with random ones, and one
chain probe where the learner's own values flow (the `given` column).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from handgrad.dojo import graph as G
from handgrad.dojo.framework import BLANK, Item, Probe, RowSpec
from handgrad.dojo.probes import graph_probe

F64 = torch.float64


def text(title: str, slug: str, about: str, setup: str, forward: str) -> str:
    """The file `dojo start` writes: the challenge in words, its setup and forward, the blanks."""
    return (
        f'"""Challenge: {title}.\n\n{about.strip()}\n\n'
        "Fill in every gradient between the `# >>>` and `# <<<` lines (replace each None), then run\n"
        f"    handgrad dojo grade {slug}.py\n"
        "The grader runs only the lines between the markers, statement by statement, on its own tensors "
        "(other\nshapes too), and feeds each of your gradients the correct upstream gradients, so a "
        'mistake shows once,\nwhere it is. No autograd: every gradient is yours.\n"""\n'
        "import torch\nimport torch.nn.functional as F\n\n"
        "g = torch.Generator().manual_seed(42)\n"
        f"{setup.strip()}\n\n{forward.strip()}\n\n"
        "# >>> your backward pass: d<name> is the gradient of loss with respect to <name>, same shape\n"
        "@@0@@\n# <<<\n\n"
        'if __name__ == "__main__":\n'
        f'    print(f"loss {{loss.item():.6f}}; grade it: handgrad dojo grade {{__file__}}")\n'
    )


def blanks(grads: tuple[str, ...], shapes: dict[str, str]) -> str:
    """One marked blank per gradient, with the shape it must have."""
    return "\n".join(f"d{g} = {BLANK} {shapes[g]}" for g in grads) + "\n"


def item(
    key: str,
    alias: str,
    title: str,
    about: str,
    page: tuple[str, str, str, str],
    graph: G.Graph,
    shapes: dict[str, str],
    solution: str,
    rows: tuple[RowSpec, ...],
    probes: Callable[[], list[Probe]],
    variants: dict,
) -> Item:
    """A region challenge: `page` is (the file's heading, its words, its setup, its forward)."""
    slug = f"ch_{key}"
    heading, words, setup, forward = page
    return Item(
        key,
        "challenge",
        slug,
        title,
        about,
        text(heading, slug, words, setup, forward),
        (blanks(graph.grads, shapes),),
        (solution,),
        rows,
        probes,
        "region",
        variants=variants,
        graph=graph,
        alias=alias,
    )


Point = tuple[str, str, dict[str, object]]  # (name, words, the namespace's inputs)


def probes(
    graph: G.Graph,
    points: list[Point],
    extras: Callable[[dict], dict] | None = None,
    random: bool = True,
) -> list[Probe]:
    """For each point: the true upstream gradients (the first point only; every point when not
    `random`) and random ones; then the learner's own chain at the first point. The upstream of the seed
    (dout, dy, dhs) is random and seeded, so even the true upstream gradients are not the lecture's."""
    out = []
    for i, (name, words, inputs) in enumerate(points):
        if i == 0 or not random:
            out.append(
                graph_probe(
                    graph,
                    name,
                    f"{words}, true upstream, float64",
                    inputs,
                    random=False,
                    dtype=F64,
                    seed=10 + i,
                    extras=extras,
                )
            )
        if random:
            out.append(
                graph_probe(
                    graph,
                    f"{name}-random",
                    f"{words}, random upstream gradients, float64",
                    inputs,
                    random=True,
                    dtype=F64,
                    seed=20 + i,
                    extras=extras,
                )
            )
    name, words, inputs = points[0]
    out.append(
        graph_probe(
            graph,
            "chain",
            f"{words}: your own chain, nothing fed in, float64",
            inputs,
            random=False,
            dtype=F64,
            seed=10,
            extras=extras,
            feed=False,
            verdict=False,
        )
    )
    return out


def randn(g: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """Non-trivial values (the lecture: zeros and ones can hide a wrong backward)."""
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift
