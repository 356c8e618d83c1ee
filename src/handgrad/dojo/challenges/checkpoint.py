"""Challenge f: gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost"): forward keeps only every `every`-th block input, backward recomputes each segment from its
checkpoint; graded on the gradients and on what was kept (a counting Stash) and recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from handgrad.dojo.catalogue import Variant
from handgrad.dojo.framework import Item, Probe, RowSpec
from handgrad.dojo.judge import Row, behaviour
from handgrad.dojo.runner import Recorder

F64 = torch.float64

STORES_ALL = "stores-everything"  # every activation kept: no memory saved
TOO_MUCH = "stores-too-much"  # more than one checkpoint per segment
WRONG_CHECKPOINT = "wrong-checkpoint"  # a segment recomputed from the wrong tensor
NOT_RECOMPUTED = "not-recomputed"  # activations not (or not properly) recomputed: stale ones used
NOT_CHAINED = "not-chained"  # a segment's (or block's) backward not fed the gradient of the one after it
RECOMPUTES_TOO_MUCH = "recomputes-too-much"  # block_forward called more than 2L times

TEXT = '''"""Challenge: gradient checkpointing -- recompute instead of store.

A stack of L blocks, h[l+1] = block_forward(h[l], Ws[l]) = tanh(h[l] @ Ws[l]), h[0] = x, out = h[L].
Plain backprop keeps all L block inputs. Checkpointing keeps only the input of every `every`-th block
(blocks 0, every, 2*every, ...: one per segment, ceil(L / every) tensors); backward walks the segments
from the last one, recomputes the segment's activations from its checkpoint with block_forward, and
backprops through the segment with block_backward.

Everything forward keeps for backward goes into `stash` (stash[key] = tensor, stash[key], key in
stash); the grader hands you a Stash that counts what it holds, runs another batch through forward
before calling your backward, and counts your calls of block_forward (at most 2L: L in forward, L
recomputed). Fill in the `None  # TODO`, run this file, then run
    handgrad dojo grade ch_checkpoint.py
"""
import torch


def block_forward(x, W):
    """One block (given): x (N, D), W (D, D) -> a (N, D)."""
    return torch.tanh(x @ W)


def block_backward(da, x, W, a):
    """The block's backward (given): its input x, its output a, da (N, D) -> dx (N, D), dW (D, D)."""
    dz = (1 - a**2) * da
    return dz @ W.T, x.T @ dz


def forward(x, Ws, stash, every):
    """Run the L = len(Ws) blocks on x (N, D); keep a checkpoint in stash every `every` blocks.
    Return out (N, D)."""
    @@0@@
    return out


def backward(dout, Ws, stash, every):
    """dout (N, D) is dloss/dout. Return dx (N, D) and dWs, a list of L tensors (D, D)."""
    @@1@@
    return dx, dWs


class Stash(dict):
    """A dict that says what it holds (the grader hands forward its own, which counts the same)."""

    def held(self):
        return len(self), sum(t.numel() for t in self.values())


if __name__ == "__main__":
    torch.manual_seed(42)
    L, every, N, D = 6, 2, 4, 5
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    Ws = [(torch.randn(D, D, dtype=torch.float64) / D**0.5).requires_grad_() for _ in range(L)]
    h = x
    for W in Ws:
        h = block_forward(h, W)
    dout = torch.randn(N, D, dtype=torch.float64)
    (h * dout).sum().backward()  # autograd, only to compare with
    stash = Stash()
    with torch.no_grad():
        out = forward(x, Ws, stash, every)
        kept = stash.held() if out is not None else None
        dx, dWs = backward(dout, Ws, stash, every)
    ok = dx is not None and dWs is not None and torch.allclose(dx, x.grad)
    ok = ok and all(torch.allclose(g, W.grad) for g, W in zip(dWs, Ws))
    print("gradients", "ok" if ok else "not yet")
    print("kept (tensors, elements):", kept, "at most:", (-(-L // every), -(-L // every) * N * D))
    print("grade it: handgrad dojo grade", __file__)
'''

BLANKS = (
    "# >>> your code\nout = None  # TODO (N, D), with a checkpoint in stash every `every` blocks\n# <<<",
    "# >>> your code\ndx = None  # TODO (N, D)\ndWs = None  # TODO a list of L tensors (D, D)\n# <<<",
)
SOLUTION = (
    "# >>> your code\n"
    "h = x\n"
    "for l, W in enumerate(Ws):\n"
    "    if l % every == 0:\n"
    "        stash[l] = h  # the checkpoint: block l's input\n"
    "    h = block_forward(h, W)\n"
    "out = h\n"
    "# <<<",
    "# >>> your code\n"
    "L = len(Ws)\n"
    "dWs = [None] * L\n"
    "dh = dout  # dloss/dh at the end of the segment being done\n"
    "for s in reversed(range(0, L, every)):\n"
    "    e = min(s + every, L)\n"
    "    hs = [stash[s]]  # recompute the segment's activations from its checkpoint\n"
    "    for l in range(s, e):\n"
    "        hs.append(block_forward(hs[-1], Ws[l]))\n"
    "    for l in reversed(range(s, e)):\n"
    "        dh, dWs[l] = block_backward(dh, hs[l - s], Ws[l], hs[l - s + 1])\n"
    "dx = dh\n"
    "# <<<",
)

ROWS = (
    RowSpec(
        "out",
        "out",
        "out",
        "(N, D)",
        (
            "out is the last block's output: h[0] = x, h[l+1] = block_forward(h[l], Ws[l]).",
            "Every h[l] is (N, D); block l's input is a checkpoint when l % every == 0.",
            "h = x; for l, W in enumerate(Ws): (if l % every == 0: stash[l] = h); h = block_forward(h, W)",
        ),
    ),
    RowSpec(
        "dx",
        "dx",
        "dx",
        "(N, D)",
        (
            "Walk the segments from the last; each one's backward starts from the gradient the segment after "
            "it produced (dout for the last), and its block 0's dx is the segment's result.",
            "Segments start at s = 0, every, 2*every, ...; the last may be shorter: e = min(s + every, L).",
            "for s in reversed(range(0, L, every)): recompute hs from stash[s]; for l in "
            "reversed(range(s, e)): "
            "dh, dWs[l] = block_backward(dh, hs[l - s], Ws[l], hs[l - s + 1])",
        ),
    ),
    RowSpec(
        "dW",
        "dW",
        "dWs",
        "(L, D, D)",
        (
            "block_backward needs block l's input and output as forward computed them: recompute the segment "
            "from its checkpoint, one block after the other, before backpropagating through it.",
            "For a segment [s, e): hs = [stash[s]] then e - s calls of block_forward give hs[0 .. e-s], "
            "block "
            "l's input hs[l - s] and output hs[l - s + 1].",
            "hs = [stash[s]]; for l in range(s, e): hs.append(block_forward(hs[-1], Ws[l])); then "
            "dh, dWs[l] = block_backward(dh, hs[l - s], Ws[l], hs[l - s + 1]) from l = e - 1 down to s",
        ),
    ),
    RowSpec(
        "stored",
        "stored",
        "out",
        "",
        (
            "Keep only what backward cannot recompute cheaply: one tensor per segment, the segment's input.",
            "ceil(L / every) tensors of (N, D), against L for plain backprop; nothing kept outside the "
            "stash.",
            "in forward, before block l: if l % every == 0: stash[l] = h",
        ),
        tensor=False,
    ),
    RowSpec(
        "recompute",
        "recompute",
        "dWs",
        "",
        (
            "Each block runs once in forward and once more when backward recomputes its segment: 2L calls.",
            "A segment [s, e) is recomputed from stash[s], not from x: e - s calls of block_forward.",
            "hs = [stash[s]]; for l in range(s, e): hs.append(block_forward(hs[-1], Ws[l]))",
        ),
        tensor=False,
    ),
)


# ---------------------------------------------------------------------------- the grader's side
def block_forward(x: Tensor, W: Tensor) -> Tensor:
    return torch.tanh(x @ W)  # (N, D)


def block_backward(da: Tensor, x: Tensor, W: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    dz = (1 - a**2) * da  # (N, D)
    return dz @ W.T, x.T @ dz


class Stash:
    """What forward keeps for backward: tensors by key, counted (how many, how many elements)."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d: dict = {}

    def __setitem__(self, key, value) -> None:
        if not isinstance(value, Tensor):
            what = type(value).__name__
            raise TypeError(f"the stash keeps tensors, one per key; stash[{key!r}] got a {what}")
        self._d[key] = value

    def __getitem__(self, key):
        return self._d[key]

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def keys(self):
        return self._d.keys()

    def held(self) -> tuple[int, int]:
        return len(self._d), sum(t.numel() for t in self._d.values())


def _acts(x: Tensor, Ws: list[Tensor]) -> list[Tensor]:
    hs = [x]  # h[0] .. h[L], each (N, D)
    for W in Ws:
        hs.append(block_forward(hs[-1], W))
    return hs


def _sim(
    i: dict,
    start: Callable[[int, int, int, int], int] | None = None,
    acts: str = "x",
    reset: bool = False,
    chain_blocks: bool = True,
    chain_recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """(dx, dW (L, D, D)) of a checkpointed backward, right by default, or with one mistake planted:
    start(s, e, L, every) the h index segment [s, e) is recomputed from; acts 'x2' the activations of
    the other batch; reset: each segment starts from dout; chain_blocks False: each block gets the segment's
    incoming gradient; chain_recompute False: each block's output recomputed from the checkpoint itself."""
    Ws, every, dout = list(i["Ws"]), int(i["every"]), i["dout"]
    L = len(Ws)
    hs = _acts(i["x2"] if acts == "x2" else i["x"], Ws)
    dWs: list[Tensor] = [torch.zeros(0)] * L
    dh = dout
    for s in reversed(range(0, L, every)):
        e = min(s + every, L)
        c = hs[start(s, e, L, every)] if start else hs[s]
        seg = [c]
        for l in range(s, e):
            seg.append(block_forward(seg[-1] if chain_recompute else c, Ws[l]))
        ins, outs = seg[:-1], seg[1:]  # unchained: block l > s gets f(c, Ws[l-1]) as its input
        d = dout if reset else dh
        for l in reversed(range(s, e)):
            dl, dWs[l] = block_backward(d, ins[l - s], Ws[l], outs[l - s])
            d = dl if chain_blocks else d
        dh = d if chain_blocks else dl
    return dh, torch.stack(dWs)


def probes() -> list[Probe]:
    out = []
    for name, (L, every, n, d), seed in (
        ("L6-every2", (6, 2, 4, 5), 1),
        ("L7-every3", (7, 3, 3, 4), 2),  # a shorter last segment
        ("L5-every1", (5, 1, 2, 3), 3),
        ("L4-every4", (4, 4, 3, 3), 4),  # one segment
    ):
        g = torch.Generator().manual_seed(seed)
        i = {
            "x": torch.randn(n, d, generator=g, dtype=F64),
            "x2": torch.randn(n, d, generator=g, dtype=F64),  # the batch run through forward in between
            "Ws": torch.randn(L, d, d, generator=g, dtype=F64) * (1.5 / d**0.5),
            "dout": torch.randn(n, d, generator=g, dtype=F64),
            "every": torch.tensor([every]),
        }
        dx, dW = _sim(i)
        about = f"L={L}, every={every}, N={n}, D={d}, random dout"
        refs = {
            "out": _acts(i["x"], list(i["Ws"]))[-1],
            "dx": dx,
            "dW": dW,
            "stored": -(-L // every),
            "recompute": 2 * L,
        }
        out.append(Probe(name, about, i, refs, random=True))
    return out


def drive(rec: Recorder, base: dict, i: dict) -> None:
    """forward(x), forward(x2) on a second stash, then backward with the first stash; block_forward
    replaced by a counting copy of the grader's, block_backward by the grader's."""
    calls = [0]

    def counted(x, W):
        calls[0] += 1
        return block_forward(x, W)

    base["block_forward"], base["block_backward"] = counted, block_backward
    every, Ws = int(i["every"]), list(i["Ws"])
    fwd_rows, bwd_rows = ["out", "stored"], ["dx", "dW", "recompute"]
    f = rec.fn(base, "forward", fwd_rows + bwd_rows)
    b = rec.fn(base, "backward", bwd_rows)
    stash = Stash()
    out = rec.call(fwd_rows + bwd_rows, f, i["x"].clone(), list(Ws), stash, every)
    n_fwd = calls[0]
    rec.put("out", out)
    held = stash.held()
    if out is None:
        rec.put("stored", None)
    else:
        rec.meta["stored"] = {"status": "value", "scalar": list(held)}
    rec.call(bwd_rows, f, i["x2"].clone(), list(Ws), Stash(), every)
    calls[0] = 0
    got = rec.call(bwd_rows, b, i["dout"].clone(), [W.clone() for W in Ws], stash, every)
    dx, dWs = rec.unpack(bwd_rows, got, 2, "backward")
    rec.put("dx", dx)
    rec.put("dW", _stacked(rec, dWs, len(Ws)))
    if dx is None and dWs is None:
        rec.put("recompute", None)
    else:
        rec.meta["recompute"] = {"status": "value", "scalar": [n_fwd, calls[0]]}


def _stacked(rec: Recorder, dWs: object, L: int) -> object:
    if dWs is None or isinstance(dWs, Tensor):
        return dWs  # missing, or a (L, D, D) tensor
    if not isinstance(dWs, (list, tuple)) or len(dWs) != L:
        got = type(dWs).__name__ + (f" of {len(dWs)}" if isinstance(dWs, (list, tuple)) else "")
        rec.meta["dW"] = {"status": "notensor", "msg": f"dWs must be a list of L={L} tensors; it is a {got}"}
        return None
    bad = [k for k, t in enumerate(dWs) if not isinstance(t, Tensor)]
    if bad:
        rec.meta["dW"] = {
            "status": "error",
            "line": None,
            "msg": f"dWs[{bad[0]}] is a {type(dWs[bad[0]]).__name__}, not a tensor: "
            "each block's backward must fill its entry",
        }
        return None
    try:
        return torch.stack(list(dWs))
    except RuntimeError:
        shapes = ", ".join(str(tuple(t.shape)) for t in dWs[:4])
        rec.meta["dW"] = {"status": "error", "line": None, "msg": f"the dWs differ in shape: {shapes}"}
        return None


VARIANT_TABLE = (  # (key, kind, words, the planted mistake as _sim's arguments)
    (
        "ckpt-output",
        WRONG_CHECKPOINT,
        "each segment recomputed from the output of its first block, not its "
        "input: the checkpoint was stored after block_forward instead of before (off by one block)",
        {"start": lambda s, e, L, k: s + 1},
    ),
    (
        "ckpt-last-input",
        WRONG_CHECKPOINT,
        "each segment recomputed from the input of its last block: the "
        "checkpoint was overwritten at every block of the segment (store it only when l % every == 0)",
        {"start": lambda s, e, L, k: e - 1},
    ),
    (
        "ckpt-next",
        WRONG_CHECKPOINT,
        "each segment recomputed from the next segment's checkpoint (off by "
        "one segment): segment [s, s + every) starts from its own, the input of block s",
        {"start": lambda s, e, L, k: e if e < L else s},
    ),
    (
        "ckpt-prev",
        WRONG_CHECKPOINT,
        "each segment recomputed from the previous segment's checkpoint (off by "
        "one segment): segment [s, s + every) starts from its own, the input of block s",
        {"start": lambda s, e, L, k: s - k if s > 0 else s},
    ),
    (
        "stale",
        NOT_RECOMPUTED,
        "these are the gradients of the other batch the grader ran through forward "
        "before your backward: activations kept outside the stash (a global, an attribute) went stale; keep "
        "the checkpoints in the stash and recompute the rest",
        {"acts": "x2"},
    ),
    (
        "no-chain-recompute",
        NOT_RECOMPUTED,
        "every block of a segment recomputed from the segment's "
        "checkpoint itself: recompute block after block, each from the previous block's output",
        {"chain_recompute": False},
    ),
    (
        "reset",
        NOT_CHAINED,
        "each segment's backward starts from dout, not from the dx of the segment after "
        "it: the segments' gradients are not chained",
        {"reset": True},
    ),
    (
        "no-chain-blocks",
        NOT_CHAINED,
        "every block of a segment was given the segment's incoming gradient: "
        "pass each block's dx on to the block before it",
        {"chain_blocks": False},
    ),
)


def _variant(words_key: str, kind: str, says: str, kw: dict, which: int) -> Variant:
    return Variant(words_key, kind, says, lambda i: _sim(i, **kw)[which])


VARIANTS = {
    row: tuple(_variant(k, kind, says, kw, which) for k, kind, says, kw in VARIANT_TABLE)
    for which, row in enumerate(("dx", "dW"))
}


def _blocks(probes: list[Probe], outs: dict) -> str:
    """Which blocks' dW are wrong, on the first probe where some are."""
    from handgrad.check import autograd_tolerance

    tol = autograd_tolerance(F64)
    for p in probes:
        a, ref = outs.get(f"{p.name}|dW"), p.refs["dW"]
        if a is None or a.shape != ref.shape:
            return ""
        bad = [
            k
            for k in range(ref.shape[0])
            if not bool(((a[k] - ref[k]).abs() <= tol.atol + tol.rtol * ref[k].abs()).all())
        ]
        if bad:
            right = [k for k in range(ref.shape[0]) if k not in bad]
            return (
                f"wrong on blocks {', '.join(map(str, bad))} of {ref.shape[0]}"
                + (f" (right: {', '.join(map(str, right))})" if right else "")
                + f" at {p.about}"
            )
    return ""


def _judge(spec: RowSpec, probes: list[Probe], outs: dict, meta: dict, row: Row | None) -> Row | None:
    if spec.key == "dW":
        if row is not None and row.status == "wrong" and (where := _blocks(probes, outs)):
            rows_only = row.key == "where"  # the generic words name rows; here a row of dW is a block
            row.diagnosis = f"{where}: {row.diagnosis}" if rows_only else f"{row.diagnosis}; {where}"
        return row
    if spec.key not in ("stored", "recompute"):
        return row
    got = behaviour(spec, probes, meta)
    if isinstance(got, Row):
        return got
    row, vals = got
    for p in probes:
        v = vals.get(p.name)
        if not isinstance(v, list) or len(v) != 2:
            continue
        L, every = p.inputs["Ws"].shape[0], int(p.inputs["every"])
        n, d = p.inputs["x"].shape
        words = (_stored if spec.key == "stored" else _calls)(row, v, L, every, n * d, p.about)
        row.diagnosis = row.diagnosis or words  # when right: what the first probe kept
        if row.status == "wrong":
            row.diagnosis = words
            return row
    return row


def _stored(row: Row, v: list, L: int, every: int, size: int, about: str) -> str:
    k, elems = v
    kmax = math.ceil(L / every)
    kept = (
        f"kept {k} tensor{'s' * (k != 1)}, {elems} elements (checkpoints: {kmax}, {kmax * size}; "
        f"every activation: {L}, {L * size}) at {about}"
    )
    if k <= kmax and elems <= kmax * size:
        return kept
    row.status = "wrong"
    if k >= L or elems >= L * size:
        row.kind, row.key = STORES_ALL, "stores-all"
        return (
            f"{kept}: every activation stored, no memory saved; keep only block l's input when "
            "l % every == 0 and recompute the rest in backward"
        )
    row.kind, row.key = TOO_MUCH, "too-much"
    return f"{kept}: more than one (N, D) checkpoint per segment"


def _calls(row: Row, v: list, L: int, every: int, size: int, about: str) -> str:
    f, b = v
    said = f"block_forward called {f} times in forward and {b} in backward (at most {L} and {L}) at {about}"
    if f <= L and f + b <= 2 * L:
        return said
    row.status, row.kind = "wrong", RECOMPUTES_TOO_MUCH
    prefix = sum(min(s + every, L) for s in range(0, L, every))
    if b == prefix and every < L:
        row.key = "from-x"
        return f"{said}: each segment was recomputed from x; recompute it from its own checkpoint stash[s]"
    row.key = "too-many"
    return f"{said}: recompute each segment once, from its checkpoint"


ITEM = Item(
    "checkpoint",
    "challenge",
    "ch_checkpoint",
    "gradient checkpointing (recompute instead of store)",
    "a stack of L blocks: keep a checkpoint every k blocks, recompute in backward; graded on the "
    "gradients and on what is kept",
    TEXT,
    BLANKS,
    SOLUTION,
    ROWS,
    probes,
    "call",
    f"{__name__}:drive",
    VARIANTS,
    judge=_judge,
    alias="f",
)
