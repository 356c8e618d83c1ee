"""Every dojo item, in the order `handgrad dojo list` shows them: the lecture's exercises, then the
coding challenges. An item is found by its key ("1", "linear-tanh"), its other name ("a") or its file's
stem ("ch_linear_tanh"). Another kind of item joins by adding its tuple here.
"""

from __future__ import annotations

from handgrad.dojo.challenges import CHALLENGES
from handgrad.dojo.exercises import EXERCISES
from handgrad.dojo.framework import Item

ITEMS: tuple[Item, ...] = EXERCISES + CHALLENGES


def find(name: str) -> Item | None:
    for it in ITEMS:
        if str(name) in (it.key, it.alias, it.slug, it.slug + ".py"):
            return it
    return None


def get(name: str | int) -> Item:
    """The item called `name`; ValueError names the ones there are."""
    it = find(str(name))
    if it is None:
        raise ValueError(
            f"no exercise or challenge {str(name)!r}; there are: "
            f"{', '.join(i.key for i in ITEMS)} (see `handgrad dojo list`)"
        )
    return it
