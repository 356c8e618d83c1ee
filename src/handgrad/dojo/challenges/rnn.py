"""Challenge i: an RNN cell backpropagated through time (makemore's RNN): h_t = tanh(x_t @ Wxh + h_{t-1}
@ Whh + b) unrolled over T from a learned start state h0 (1, H). Backward runs from the last step to the
first: dh_t = dhs_t + dz_{t+1} @ Whh^T, dz_t = (1 - h_t**2) * dh_t; then each weight sums its steps.

The graph the grader holds: z (B, T, H), every step's pre-activation, is one op of x, Wxh, Whh, b, h0
and hprev (the state each step reads, a constant here); hs = recur(z) holds the recurrence:
h_t = tanh(z_t + (h_{t-1} - hprev_t) @ Whh), the same numbers as tanh(z_t), whose gradient with respect
to z is backprop through time. So dz's upstream is dhs, and dWhh, dh0, dWxh, db, dx each read dz.
"""

from __future__ import annotations

import torch
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo.catalogue import Vals, Variant
from handgrad.dojo.challenges import region
from handgrad.dojo.framework import RowSpec


def shift(hprev: Tensor, h0: Tensor) -> Tensor:
    """The state each step reads: h0 at step 0, then hs[:, t-1] (hprev's own first slice replaced)."""
    b, _, h = hprev.shape
    return torch.cat([h0.expand(b, 1, h), hprev[:, 1:]], 1)  # (B, T, H)


def pre(x: Tensor, Wxh: Tensor, hprev: Tensor, Whh: Tensor, h0: Tensor, b: Tensor) -> Tensor:
    return x @ Wxh + shift(hprev, h0) @ Whh + b  # (B, T, H)


def recur(z: Tensor, hprev: Tensor, Whh: Tensor) -> Tensor:
    """hs from the pre-activations, the recurrence kept live: each step adds (h_{t-1} - hprev_t) @ Whh,
    zero in value, so that the gradient with respect to z runs back through time."""
    h = hprev[:, 0]  # (B, H) h0, a constant
    out = []
    for t in range(z.shape[1]):
        h = torch.tanh(z[:, t] + (h - hprev[:, t]) @ Whh)  # (B, H)
        out.append(h)
    return torch.stack(out, 1)  # (B, T, H)


GRAPH = G.Graph(
    ops=(
        G.Op("z", ("x", "Wxh", "hprev", "Whh", "h0", "b"), pre),  # (B, T, H)
        G.Op("hs", ("z", "hprev", "_Whh"), recur),  # (B, T, H); _Whh: Whh's value, not a graded use
    ),
    grads=("z", "Wxh", "Whh", "b", "x", "h0"),
    seed="hs",
)
SHAPES = {"z": "(B, T, H)", "Wxh": "(D, H)", "Whh": "(H, H)", "b": "(H,)", "x": "(B, T, D)", "h0": "(1, H)"}

ABOUT = """\
A vanilla RNN cell unrolled over the sequence, as in makemore's RNN: every sequence starts from one
learned state h0 (1, H), and each step reads the previous state.
    z[:, t] = x[:, t] @ Wxh + h_prev @ Whh + b      # (B, H), h_prev = h0 at t = 0, else hs[:, t-1]
    hs[:, t] = tanh(z[:, t])
dhs (B, T, H) is the gradient of the loss with respect to every hidden state, as the loss on top of
them sends it (loss = (hs * dhs).sum()); it is only the direct part: step t's state also feeds step
t+1. dz is the gradient of every step's pre-activation, through time."""

SETUP = """\
B, T, D, H = 3, 5, 4, 6
x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
Wxh = torch.randn(D, H, generator=g, dtype=torch.float64) * 0.5
Whh = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.4
b = torch.randn(H, generator=g, dtype=torch.float64) * 0.3
h0 = torch.randn(1, H, generator=g, dtype=torch.float64) * 0.5  # the learned start state
dhs = torch.randn(B, T, H, generator=g, dtype=torch.float64)  # dloss/dhs from the loss on the states"""

FORWARD = """\
# Forward pass: the RNN through time
h = h0.expand(B, H)  # (B, H) every sequence starts from h0
zs, states = [], []
for t in range(T):
    zs.append(x[:, t] @ Wxh + h @ Whh + b)  # (B, H)
    h = torch.tanh(zs[-1])  # (B, H)
    states.append(h)
z = torch.stack(zs, 1)  # (B, T, H) the pre-activations
hs = torch.stack(states, 1)  # (B, T, H) the hidden states
hprev = torch.cat([h0.expand(B, 1, H), hs[:, :-1]], 1)  # (B, T, H) the state each step reads
loss = (hs * dhs).sum()"""

SOLUTION = """\
dz = torch.zeros_like(z)
dh_next = torch.zeros(B, H, dtype=z.dtype)  # what step t+1 sends back to h_t
for t in reversed(range(T)):
    dh = dhs[:, t] + dh_next  # (B, H) from the loss at step t and from step t+1
    dz[:, t] = (1 - hs[:, t] ** 2) * dh
    dh_next = dz[:, t] @ Whh.T
dWxh = x.reshape(-1, D).T @ dz.reshape(-1, H)
dWhh = hprev.reshape(-1, H).T @ dz.reshape(-1, H)
db = dz.sum((0, 1))
dx = dz @ Wxh.T
dh0 = (dz[:, 0] @ Whh.T).sum(0, keepdim=True)  # every sequence starts from the one h0
"""

ROWS = (
    RowSpec(
        "z",
        "dz",
        "dz",
        "(B, T, H)",
        (
            "Backprop through time: h_t is used by the loss (dhs[:, t]) and by step t+1, so its gradient "
            "adds what step t+1 sends back; go from the last step to the first, and at each step multiply "
            "by tanh's local derivative.",
            "dz, dhs and hs are (B, T, H); one step is (B, H); what step t+1 sends back to h_t is (B, H), "
            "made from dz[:, t+1] (B, H) and Whh (H, H).",
            "for t in reversed(range(T)): dh = dhs[:, t] + dh_next; dz[:, t] = (1 - hs[:, t] ** 2) * dh; "
            "dh_next = dz[:, t] @ Whh.T",
        ),
    ),
    RowSpec(
        "Wxh",
        "dWxh",
        "dWxh",
        "(D, H)",
        (
            "Wxh is used at every step by every sequence: its gradient sums x_t^T @ dz_t over the steps "
            "(and the batch).",
            "x is (B, T, D) and dz is (B, T, H): flatten B and T together, then contract over them.",
            "dWxh = x.reshape(-1, D).T @ dz.reshape(-1, H)",
        ),
    ),
    RowSpec(
        "Whh",
        "dWhh",
        "dWhh",
        "(H, H)",
        (
            "Whh multiplies the state each step reads, h_{t-1} (h0 at the first step), not the state it "
            "makes; sum over every step and sequence.",
            "hprev (B, T, H) holds h_{t-1} for every t; dz is (B, T, H); dWhh is (H, H).",
            "dWhh = hprev.reshape(-1, H).T @ dz.reshape(-1, H)",
        ),
    ),
    RowSpec(
        "b",
        "db",
        "db",
        "(H,)",
        (
            "b is added at every step of every sequence: its gradient collects every dz.",
            "dz is (B, T, H) and b is (H,): sum over the batch and the time dims.",
            "db = dz.sum((0, 1))",
        ),
    ),
    RowSpec(
        "x",
        "dx",
        "dx",
        "(B, T, D)",
        (
            "Each x_t enters only its own step, through x_t @ Wxh: the upstream times the other operand, "
            "transposed.",
            "dz is (B, T, H) and Wxh is (D, H); dx is (B, T, D).",
            "dx = dz @ Wxh.T",
        ),
    ),
    RowSpec(
        "h0",
        "dh0",
        "dh0",
        "(1, H)",
        (
            "h0 is read by the first step only, as h0 @ Whh, and every sequence of the batch starts from "
            "the same h0.",
            "dz[:, 0] is (B, H); dh0 is (1, H): sum over the batch with keepdim=True.",
            "dh0 = (dz[:, 0] @ Whh.T).sum(0, keepdim=True)",
        ),
    ),
)


def _states(x, Wxh, Whh, b, h0) -> Tensor:
    """The forward as the learner's file has it, one step at a time."""
    h = h0.expand(x.shape[0], -1)  # (B, H)
    out = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ Wxh + h @ Whh + b)  # (B, H)
        out.append(h)
    return torch.stack(out, 1)  # (B, T, H)


def _point(name: str, bsz: int, t: int, d: int, h: int, seed: int) -> region.Point:
    g = torch.Generator().manual_seed(seed)
    x = region.randn(g, bsz, t, d)
    Wxh, Whh = region.randn(g, d, h, scale=0.5), region.randn(g, h, h, scale=0.4)
    b, h0 = region.randn(g, h, scale=0.3), region.randn(g, 1, h, scale=0.5)
    hs = _states(x, Wxh, Whh, b, h0)
    hprev = torch.cat([h0.expand(bsz, 1, h), hs[:, :-1]], 1)  # (B, T, H)
    inputs: dict[str, object] = {
        "x": x,
        "Wxh": Wxh,
        "Whh": Whh,
        "b": b,
        "h0": h0,
        "hprev": hprev,
        "_Whh": Whh.clone(),
        "B": bsz,
        "T": t,
        "D": d,
        "H": h,
    }
    return name, f"B={bsz}, T={t}, D={d}, H={h}, random dhs", inputs


def points() -> list[region.Point]:
    return [_point("a", 3, 5, 4, 6, 1), _point("b", 2, 7, 3, 5, 2), _point("c", 4, 3, 5, 2, 3)]


def probes(random: bool = False):
    """The upstream dz every row below it reads is the true one for a random dhs (random=False): a
    learner may accumulate dWhh, dx, ... inside the loop, from their own dz."""
    return region.probes(GRAPH, points(), random=random)


# ---------------------------------------------------------------------------- the catalogue
def _bptt(
    v: Vals,
    *,
    carry: bool = True,
    backward: bool = True,
    local: str = "1-h**2",
    own_only: bool = False,
    carry_dh: bool = False,
    transpose: bool = True,
) -> Tensor:
    """Backprop through time with one part changed: nothing carried from the next step, the steps in
    forward order, another local derivative (or applied to the step's own dhs only), dh sent back
    instead of dz, Whh untransposed."""
    hs, dhs = v.hs, v.dhs
    W = v.Whh.T if transpose else v.Whh
    steps = range(hs.shape[1])
    nxt = torch.zeros_like(hs[:, 0])  # (B, H)
    dz = torch.zeros_like(hs)  # (B, T, H)
    for t in reversed(steps) if backward else steps:
        h = hs[:, t]
        d = {"1-h**2": 1 - h**2, "1-h": 1 - h, "none": torch.ones_like(h), "1-z**2": 1 - v.z[:, t] ** 2}[
            local
        ]
        dh = dhs[:, t] + (nxt if carry else 0)  # (B, H)
        dz[:, t] = d * dhs[:, t] + nxt if own_only else d * dh
        nxt = (dh if carry_dh else dz[:, t]) @ W
    return dz


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "z": (
        Variant(
            "no-carry",
            K.THROUGH_TIME,
            "dh from the next step is not accumulated: h_t also feeds step t+1, so dh_t = dhs[:, t] + "
            "dz[:, t+1] @ Whh.T (carried back from the last step to the first)",
            lambda v: _bptt(v, carry=False),
        ),
        Variant(
            "forward-in-time",
            K.TIME_DIRECTION,
            "the gradient flows forward in time (t = 0, 1, ...): h_t is read by step t+1, so step t's "
            "gradient comes from step t+1; loop over reversed(range(T))",
            lambda v: _bptt(v, backward=False),
        ),
        Variant(
            "no-tanh",
            K.NO_LOCAL,
            "tanh's local derivative (1 - hs[:, t]**2) is missing: dz[:, t] = (1 - hs[:, t]**2) * dh",
            lambda v: _bptt(v, local="none"),
        ),
        Variant(
            "one-minus-h",
            K.TANH,
            "(1 - h) where tanh's derivative is 1 - h**2 (h squared)",
            lambda v: _bptt(v, local="1-h"),
        ),
        Variant(
            "at-z",
            K.INPUT_OUTPUT,
            "1 - z**2 at the pre-activation: tanh's derivative is 1 - tanh(z)**2 = 1 - hs**2, at the output",
            lambda v: _bptt(v, local="1-z**2"),
        ),
        Variant(
            "tanh-own-only",
            K.TANH,
            "tanh's (1 - h**2) applied to dhs[:, t] only: what step t+1 sends back reaches z_t through "
            "the same tanh, so multiply the whole dh = dhs[:, t] + dh_next",
            lambda v: _bptt(v, own_only=True),
        ),
        Variant(
            "dh-sent-back",
            K.TANH,
            "dh @ Whh.T sent back to the previous step: step t reads h_{t-1} through z_t, so what goes back "
            "is dz[:, t] @ Whh.T, after tanh's (1 - h**2)",
            lambda v: _bptt(v, carry_dh=True),
        ),
        Variant(
            "Whh-untransposed",
            K.TRANSPOSED,
            "Whh untransposed in what goes back: z_t = ... + h_{t-1} @ Whh, so h_{t-1} gets dz[:, t] @ Whh.T",
            lambda v: _bptt(v, transpose=False),
        ),
    ),
    "Whh": (
        Variant(
            "hs-for-hprev",
            K.INPUT_OUTPUT,
            "multiplied by hs, the state each step makes: Whh multiplies the state the step reads, hprev "
            "(h0 first, then hs shifted by one step)",
            lambda v: _flat(v.hs).T @ _flat(v.dz),
        ),
        Variant(
            "no-first-step",
            K.MISSING_BRANCH,
            "the first step's term is missing: step 0 reads h0, so it adds h0.T @ dz[:, 0] too",
            lambda v: _flat(v.hs[:, :-1]).T @ _flat(v.dz[:, 1:]),
        ),
    ),
    "b": (
        Variant(
            "sum-dim0",
            K.WRONG_DIM,
            "summed over the batch only: b is added at every step too, so sum over dims 0 and 1",
            lambda v: v.dz.sum(0),
        ),
        Variant(
            "sum-dim1",
            K.WRONG_DIM,
            "summed over time only: b is added for every sequence too, so sum over dims 0 and 1",
            lambda v: v.dz.sum(1),
        ),
    ),
    "h0": (
        Variant(
            "not-summed",
            K.SHAPE,
            "the start state's gradient is not summed over the batch: every sequence starts from the one "
            "h0 (1, H), so sum over dim 0 with keepdim=True",
            lambda v: v.dz[:, 0] @ v.Whh.T,
        ),
        Variant(
            "last-step",
            K.TIME_DIRECTION,
            "taken from the last step: h0 is read by the first step only, so dh0 comes from dz[:, 0]",
            lambda v: (v.dz[:, -1] @ v.Whh.T).sum(0, keepdim=True),
        ),
        Variant(
            "no-Whh",
            K.WRONG_FACTOR,
            "dz[:, 0] summed without Whh: h0 reaches z_0 as h0 @ Whh, so multiply by Whh.T",
            lambda v: v.dz[:, 0].sum(0, keepdim=True),
        ),
        Variant(
            "Whh-untransposed",
            K.TRANSPOSED,
            "Whh untransposed: h0 reaches z_0 as h0 @ Whh, so dh0 = (dz[:, 0] @ Whh.T).sum(0, keepdim=True)",
            lambda v: (v.dz[:, 0] @ v.Whh).sum(0, keepdim=True),
        ),
        Variant(
            "mean",
            K.SCALE_N,
            "averaged over the batch: the loss sums over the sequences, so the gradient sums too",
            lambda v: (v.dz[:, 0] @ v.Whh.T).mean(0, keepdim=True),
        ),
    ),
}

TITLE = "an RNN cell through time: dz (backprop through time), dWxh, dWhh, db, dx, dh0"
LISTED = "an RNN cell unrolled over T with a learned start state h0: backprop through time by hand"
PAGE = ("an RNN cell backpropagated through time", ABOUT, SETUP, FORWARD)
ITEM = region.item("rnn", "i", TITLE, LISTED, PAGE, GRAPH, SHAPES, SOLUTION, ROWS, probes, VARIANTS)
