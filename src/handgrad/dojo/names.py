"""Finding the learner's own names for the lecture's tensors: `dL_dlogprobs` for dlogprobs,
`dlogits_maxes` for dlogit_maxes, `xb, yb` for Xb, Yb, `w1` for W1. By name first (an explicit mapping,
then the same name up to case, prefixes and underscores, then a near spelling), then, in a notebook, by
shape and value. Every name taken for another is said, so a learner can check it or pass their own
mapping (names={"dlogprobs": "my_name"}).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

# Prefixes learners put in front of a gradient's name, lower-cased, longest first ("d" is the lecture's).
PREFIXES = ("dloss_d", "dloss_", "dl_d", "dl/d", "grad_", "gradient_", "d_")
SUFFIXES = ("_grad", "_gradient", "grad")
NEAR = 0.84  # difflib ratio of two normalised names that count as one spelled differently


def norm(name: str) -> str:
    """A gradient's name reduced to what it is the gradient of: dL_dlogprobs, dlogprobs, grad_logprobs
    -> logprobs (lower case, no underscores)."""
    x = name.lower()
    for s in SUFFIXES:
        if x.endswith(s) and len(x) > len(s):
            x = x[: -len(s)]
            break
    for p in PREFIXES:
        if x.startswith(p) and len(x) > len(p):
            x = x[len(p) :]
            break
    else:
        if x.startswith("d") and len(x) > 1:
            x = x[1:]
    return x.replace("_", "")


def gradient_like(name: str) -> bool:
    low = name.lower()
    return low.startswith("d") or "grad" in low


def match(
    wanted: Mapping[str, str],
    present: Iterable[str],
    explicit: Mapping[str, str] | None = None,
    gradients: bool = True,
) -> tuple[dict[str, str], dict[str, str]]:
    """({key: the learner's name} for every key found, {key: how it was found} for those taken by another
    name). `wanted` maps each key to the lecture's name; `present` are the names the learner has."""
    present = [p for p in dict.fromkeys(present)]
    taken: set[str] = set()
    out: dict[str, str] = {}
    how: dict[str, str] = {}
    lecture = set(wanted.values())
    explicit = dict(explicit or {})
    for key, name in wanted.items():  # an explicit mapping names the lecture's name or the bare key
        mine = explicit.get(name) or explicit.get(key) or explicit.get(name.removeprefix("d"))
        if mine:
            out[key], how[key] = mine, "given"
            taken.add(mine)
    for key, name in wanted.items():
        if key not in out and name in present:
            out[key] = name
            taken.add(name)
    free = [p for p in present if p not in taken and p not in lecture and (gradient_like(p) or not gradients)]
    for key, name in wanted.items():
        if key in out:
            continue
        same = [
            p
            for p in free
            if p not in taken and (norm(p) == norm(name) if gradients else p.lower() == name.lower())
        ]
        if len(same) == 1:
            out[key], how[key] = same[0], "name"
            taken.add(same[0])
    for key, name in wanted.items():
        if key in out:
            continue
        scored = sorted(
            (
                (
                    difflib.SequenceMatcher(
                        None, norm(p) if gradients else p.lower(), norm(name) if gradients else name.lower()
                    ).ratio(),
                    p,
                )
                for p in free
                if p not in taken
            ),
            reverse=True,
        )
        if scored and scored[0][0] >= NEAR and (len(scored) == 1 or scored[1][0] < scored[0][0] - 0.05):
            out[key], how[key] = scored[0][1], "spelling"
            taken.add(scored[0][1])
    return out, how


def said(wanted: Mapping[str, str], found: Mapping[str, str], how: Mapping[str, str]) -> str:
    """One note: which of the learner's names was taken for which lecture name."""
    pairs = [f"{found[k]} for {wanted[k]}" + (" (by its value)" if how[k] == "value" else "")
             for k in wanted if k in how and how[k] != "given"]
    if not pairs:
        return ""
    shown = ", ".join(pairs[:8]) + (f", ... ({len(pairs)} in all)" if len(pairs) > 8 else "")
    return f"names: took {shown} (by name and shape; pass names={{...}} / --name LECTURE=YOURS to choose)"
