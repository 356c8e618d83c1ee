"""One framework for the dojo's exercises and challenges (Karpathy, "Becoming a Backprop Ninja"): an
item is data (its file with blanks, its reference, its rows, its probes, its known mistakes) and one of
two ways to run a learner's code, so that grading, the edit search, hints and the notebook work for
every item alike:

- "region": the statements between `# >>>` and `# <<<` run one by one in a namespace of forward values;
  after the last statement that writes a row's variable its value is recorded and the right upstream
  value is written in its place (local grading: one mistake shows once, where it is);
- "call": a driver (a plain function named by its module path, run in the child) calls the learner's
  functions on each probe and records what they return.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from handgrad.dojo.graph import Graph, Local

MARK = re.compile(r"^# handgrad dojo: (?:[a-z]+ )?(\S+)\s*$", re.M)  # the line naming a file's item
BEGIN = re.compile(r"^\s*# >>>")  # the line before a region the learner writes
END = re.compile(r"^\s*# <<<")  # the line after it
BLANK = "None  # TODO"  # how a row's variable starts out in a fresh file
SLOT = re.compile(r"^( *)@@(\d+)@@\n", re.M)  # where a region (blank or reference) goes in an item's text


@dataclass(frozen=True)
class RowSpec:
    """One graded row: a tensor the learner's code computes, or a behaviour judged by the item's rule."""

    key: str  # the key of its reference in a probe ("logprobs", "dx", "out(train)")
    name: str  # as the table shows it ("dlogprobs", "dx", "out(train)")
    var: (
        str  # the learner's variable that holds it ("dlogprobs", "dx", "xmean"); the edit search starts there
    )
    shape: str  # in words, e.g. "(n, vocab_size)"; "" for a behaviour
    hints: tuple[str, str, str] = ("", "", "")  # the rule, the shapes, the form (the last one gives it away)
    tensor: bool = True  # False: a behaviour (a verdict, a count), judged by Item.judge
    blank: str = ""  # the variable whose `= None  # TODO` line a fresh file has for it ('': var)


@dataclass
class Probe:
    """A point at which the learner's code runs. Region items: `inputs` is the namespace (forward values
    and sizes) and `feeds` the right upstream value for each row; call items: `inputs` are the tensors the
    driver hands the learner's functions. `refs` holds the right answer per row."""

    name: str
    about: str  # in words, for the report
    inputs: dict[str, object]
    refs: dict[str, object]
    feeds: dict[str, Tensor] = field(default_factory=dict)
    local: Local | None = None  # graph items: the right answer split by consumer
    uses: dict[str, list[tuple[int, ...]]] = field(
        default_factory=dict
    )  # row -> shapes it broadcasts against
    dtype: torch.dtype = torch.float64  # the default dtype while the learner's code runs here
    feed: bool = True  # False: the learner's own chain, nothing fed (the chain column)
    verdict: bool = True  # counts for right / wrong
    exact: bool = False  # refs are autograd's own float32 values: the exact column
    own: bool = False  # a notebook's own point (its parameters and batch)
    random: bool = False  # the upstream gradients fed in are random, not the true ones

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Tensor)}


@dataclass(frozen=True)
class Item:
    """An exercise or a challenge, as data."""

    key: str  # as typed on the command line: "1", "linear-tanh"
    kind: str  # "exercise" | "challenge" (`dojo list` groups by it; another kind can join)
    slug: str  # the file's stem
    title: str
    about: str  # one line for `dojo list`
    text: str  # the file after its mark line, with @@i@@ slots for the regions
    blanks: tuple[str, ...]  # the blank region of each slot
    solution: tuple[str, ...]  # the reference region of each slot
    rows: tuple[RowSpec, ...]
    probes: Callable[[], list[Probe]]
    mode: str = "region"  # "region" | "call"
    driver: str = ""  # call mode: "module:function", run in the child with (recorder, namespace, inputs)
    variants: Mapping[str, tuple] = field(default_factory=dict)  # row key -> catalogue.Variant entries
    graph: Graph | None = None  # region items with a graph: local answers, generic mistakes, the picture
    judge: Callable | None = None  # (spec, probes, outs, meta, row) -> Row | None: behaviours (row None), or
    # a tensor row's verdict and diagnosis looked at again with what only this item knows
    training: bool = False  # exercise 4: also trained with the learner's backward, against autograd
    alias: str = ""  # another name it answers to ("a" for the first challenge)
    notebook: Mapping[str, object] = field(default_factory=dict)  # how a notebook's namespace maps to it

    def row(self, name: str) -> RowSpec:
        """The row called `name` (its name, key or variable); ValueError names the rows there are."""
        for r in self.rows:
            if name in (r.name, r.key, r.var):
                return r
        raise ValueError(
            f"{self.kind} {self.key} has no row {name!r}; it has: {', '.join(r.name for r in self.rows)}"
        )

    @property
    def reference(self) -> str:
        """The reference as one text (the solution's regions, in order)."""
        return "\n".join(s.rstrip("\n") for s in self.solution) + "\n"


def render(item: Item, regions: tuple[str, ...] | None = None) -> str:
    """The file `dojo start` writes (regions=None: the blanks; item.solution: the reference)."""
    regions = item.blanks if regions is None else regions

    def fill(m: re.Match) -> str:
        pad = m.group(1)
        body = regions[int(m.group(2))]
        return "".join(pad + ln + "\n" if ln.strip() else "\n" for ln in body.rstrip("\n").split("\n"))

    return f"# handgrad dojo: {item.kind} {item.key}\n" + SLOT.sub(fill, item.text)


def item_of(source: str) -> str | None:
    """The item a file says it is (its `# handgrad dojo: KEY` line), or None."""
    m = MARK.search(source)
    return m.group(1) if m else None


def blank_lines(source: str) -> dict[str, int]:
    """name -> the line of its `name = None  # TODO` blank (or of its first assignment)."""
    out: dict[str, int] = {}
    for i, ln in enumerate(source.splitlines(), 1):
        m = re.match(r"^\s*([\w.]+)\s*=", ln)
        if m and (m.group(1) not in out or BLANK in ln):
            out[m.group(1)] = i
    return out
