"""A live experiment per conceptual question, run on real tensors of the lecture's model (Karpathy,
"Becoming a Backprop Ninja": n_embd 10, n_hidden 64, a batch of 32 names, seed 2147483647), that
shows the answer rather than telling it: the hand-written backward (atomic.py, the diagnostics) beside
autograd, as numbers and as a picture drawn on matplotlib's Agg canvas (no screen, no pyplot state),
written atomically (plots.save_png), or shown in a notebook (PNG, or HTML with the numbers).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from handgrad import atomic, data, diagnostics, models, plots
from handgrad.dojo import setup
from handgrad.layers import set_tensor

DPI = 100
SHOWN = 8  # rows and columns of a tensor drawn as a grid of numbers (the numbers use the whole tensor)


@dataclass
class Experiment:
    """What one experiment measured (`numbers`, for the tests), said in lines, and its picture."""

    question: int
    title: str
    lines: list[str]
    numbers: dict[str, object]
    draw: Callable[[], Figure] = field(repr=False)

    def text(self) -> str:
        return "\n".join([f"experiment {self.question}: {self.title}", *(f"  {ln}" for ln in self.lines)])

    def figure(self) -> Figure:
        return self.draw()

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()

    def write_png(self, path: str | Path) -> Path:
        """Render and write atomically (temp file + rename)."""
        return plots.save_png(self.figure(), path)

    def _repr_png_(self) -> bytes:
        return self.png()

    def html(self) -> str:
        img = base64.b64encode(self.png()).decode("ascii")
        lines = "".join(f"<li>{html.escape(ln)}</li>" for ln in self.lines)
        return (f"<div><b>experiment {self.question}: {html.escape(self.title)}</b><ul>{lines}</ul>"
                f'<img src="data:image/png;base64,{img}" style="max-width:100%"/></div>')

    def _repr_html_(self) -> str:
        return self.html()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------- the lecture's tensors
@dataclass
class Lecture:
    """One batch through the lecture's graph: the hand-written backward and autograd's, float64."""

    p: atomic.Params
    Xb: Tensor  # (N, T)
    Yb: Tensor  # (N,)
    f: atomic.Intermediates
    hand: atomic.Grads
    auto: dict[str, Tensor]  # autograd's gradient of every intermediate and parameter, by forward name
    itos: tuple[str, ...]


@lru_cache(maxsize=4)
def lecture(seed: int = setup.SEED) -> Lecture:
    """The lecture's parameters and the batch drawn with `seed`, in float64."""
    p = setup.lecture_params(dtype=torch.float64)
    Xb, Yb = setup.lecture_batch(seed)
    f = atomic.forward(p, Xb, Yb)
    return Lecture(p, Xb, Yb, f, atomic.backward(p, Xb, Yb, f), _autograd(p, Xb, Yb), _itos())


@lru_cache(maxsize=1)
def _itos() -> tuple[str, ...]:
    """The names' vocabulary ('.' then a-z), as the lecture's itos."""
    return data.Vocab.from_words(data.read_words(data.default_data_path()).items).itos


def _autograd(p: atomic.Params, Xb: Tensor, Yb: Tensor) -> dict[str, Tensor]:
    leaves = atomic.Params(*(t.detach().clone().requires_grad_(True) for t in p.tensors()))
    with torch.enable_grad():
        f = atomic.forward(leaves, Xb, Yb)
        inner = f.differentiable()
        for _, t in inner:
            t.retain_grad()
        f.loss.backward()
    return {name: t.grad.detach() for name, t in [*inner, *leaves.items()]}


def _maxdiff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def _grid(ax, m: Tensor, title: str, cmap: str = "RdBu_r") -> None:
    """A small matrix as coloured cells with its numbers written in (NaN cells left blank), scaled by a
    power of ten named in the title when its entries are far from 1."""
    v = m.detach().double()
    finite = v[torch.isfinite(v)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    exp = math.floor(math.log10(top)) if top > 0 else 0
    scale = 10.0**exp if not -1 <= exp <= 1 else 1.0
    ax.imshow(v.numpy(), cmap=cmap, vmin=-max(top, 1e-300), vmax=max(top, 1e-300), interpolation="nearest",
              aspect="auto")
    for (i, j), x in zip(torch.cartesian_prod(torch.arange(v.shape[0]), torch.arange(v.shape[1])).tolist(),
                         v.reshape(-1).tolist()):
        if math.isfinite(x):
            ink = "white" if abs(x) > 0.6 * top else "black"  # readable on the darkest cells
            ax.text(j, i, f"{x / scale:.2f}", ha="center", va="center", fontsize=7, color=ink)
    ax.set_title(title + (f" (numbers x 1e{exp})" if scale != 1.0 else ""), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------- Q1 routing
def routing() -> Experiment:
    """y = a + b and y = a * b (a = 2, b = 3, dy = 5) through autograd and by hand, then the lecture's
    own '+' and '*': hpreact = bngain * bnraw + bnbias."""
    a0, b0, dy0 = 2.0, 3.0, 5.0
    rows = {}
    for op, fn, by_hand in (("+", torch.add, lambda a, b, dy: (dy, dy)),
                            ("*", torch.mul, lambda a, b, dy: (b * dy, a * dy))):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            y = fn(a, b)
            y.backward(torch.tensor(dy0, dtype=torch.float64))
        rows[op] = (float(y.detach()), (float(a.grad), float(b.grad)), by_hand(a0, b0, dy0))
    L = lecture()
    dbngain_hand = (L.f.bnraw * L.hand.dhpreact).sum(0, keepdim=True)  # the '*': the other factor
    dbnbias_hand = L.hand.dhpreact.sum(0, keepdim=True)  # the '+': dhpreact itself, summed over the rows
    d_gain, d_bias = _maxdiff(dbngain_hand, L.auto["bngain"]), _maxdiff(dbnbias_hand, L.auto["bnbias"])
    lines = [f"y = a {op} b, a = 2, b = 3, dy = 5: y = {y:g}; autograd da = {ag[0]:g}, db = {ag[1]:g}; "
             f"by hand da = {bh[0]:g}, db = {bh[1]:g}" for op, (y, ag, bh) in rows.items()]
    lines += [f"the lecture's hpreact = bngain * bnraw + bnbias (batch of {L.Xb.shape[0]}): dbnbias = "
              f"dhpreact.sum(0) matches autograd to {d_bias:.1e}, dbngain = (bnraw * dhpreact).sum(0) to "
              f"{d_gain:.1e}"]
    numbers = {"add_autograd": rows["+"][1], "add_hand": rows["+"][2], "mul_autograd": rows["*"][1],
               "mul_hand": rows["*"][2], "dbngain_diff": d_gain, "dbnbias_diff": d_bias}

    def draw() -> Figure:
        fig = _figure(13, 4.2)
        for k, (op, (y, ag, _)) in enumerate(rows.items()):
            _two_node(fig.add_subplot(1, 3, k + 1), op, a0, b0, y, dy0, ag)
        ax = fig.add_subplot(1, 3, 3)
        for name, hand, auto, style in (
                ("dbngain = (bnraw * dhpreact).sum(0), the '*'", dbngain_hand, L.auto["bngain"],
                 {"marker": "o", "facecolors": "none", "edgecolors": "tab:blue", "s": 40}),
                ("dbnbias = dhpreact.sum(0), the '+'", dbnbias_hand, L.auto["bnbias"],
                 {"marker": "x", "color": "tab:orange", "s": 18})):
            ax.scatter(auto.reshape(-1).numpy(), hand.reshape(-1).numpy(), label=name, **style)
        lim = float(torch.cat([dbngain_hand, dbnbias_hand]).abs().max()) * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls=":")
        ax.set(title="the lecture's bngain * bnraw + bnbias:\nby hand against autograd (64 units each)",
               xlabel="autograd", ylabel="by hand")
        ax.legend(fontsize=8)
        fig.suptitle("black: the forward pass; red, dashed: the gradients flowing back, as autograd computes "
                     "them", fontsize=10)
        fig.tight_layout()
        return fig

    return Experiment(1, "a '+' copies dy to its inputs, a '*' swaps them and scales by dy", lines, numbers,
                      draw)


def _two_node(ax, op: str, a: float, b: float, y: float, dy: float, grads: tuple[float, float]) -> None:
    """a and b into one op node into y: forward values in black, gradients (autograd's) in red."""
    pos = {"a": (0.15, 0.75), "b": (0.15, 0.25), "op": (0.55, 0.5), "y": (0.9, 0.5)}
    fwd = {"arrowstyle": "-|>", "color": "black", "shrinkA": 22, "shrinkB": 14, "mutation_scale": 14}
    back = {"arrowstyle": "-|>", "color": "tab:red", "ls": "--", "shrinkA": 14, "shrinkB": 22,
            "mutation_scale": 12, "connectionstyle": "arc3,rad=0.25"}
    for src in ("a", "b"):
        ax.annotate("", xy=pos["op"], xytext=pos[src], arrowprops=fwd)
        ax.annotate("", xy=pos[src], xytext=pos["op"], arrowprops=back)
    ax.annotate("", xy=pos["y"], xytext=pos["op"], arrowprops={**fwd, "shrinkA": 14, "shrinkB": 22})
    ax.annotate("", xy=pos["op"], xytext=pos["y"], arrowprops={**back, "shrinkA": 22, "shrinkB": 14})
    for name, label in (("a", f"a = {a:g}"), ("b", f"b = {b:g}"), ("op", op), ("y", f"y = {y:g}")):
        ax.text(*pos[name], label, ha="center", va="center", fontsize=12,
                bbox={"boxstyle": "circle" if name == "op" else "round", "fc": "white", "ec": "black"})
    ax.text(pos["a"][0], pos["a"][1] - 0.12, f"da = {grads[0]:g}", ha="center", color="tab:red", fontsize=11)
    ax.text(pos["b"][0], pos["b"][1] - 0.12, f"db = {grads[1]:g}", ha="center", color="tab:red", fontsize=11)
    ax.text(pos["y"][0], pos["y"][1] - 0.12, f"dy = {dy:g}", ha="center", color="tab:red", fontsize=11)
    rule = "da = dy, db = dy" if op == "+" else "da = b * dy, db = a * dy"
    ax.set_title(f"y = a {op} b: {rule}", fontsize=11)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")


# ---------------------------------------------------------------------------- Q2 sparse dlogprobs
def sparse() -> Experiment:
    L = lecture()
    d = L.hand.dlogprobs  # (N, V)
    n, V = d.shape
    nz = d.nonzero()  # (nnz, 2)
    at_targets = bool(torch.equal(nz[:, 1], L.Yb)) and bool(torch.equal(nz[:, 0], torch.arange(n)))
    values = d[torch.arange(n), L.Yb]  # (N,)
    diff = _maxdiff(d, L.auto["logprobs"])
    lines = [f"dlogprobs of the lecture's batch is ({n}, {V}): {nz.shape[0]} of {n * V} entries are non-zero "
             f"({nz.shape[0] / (n * V):.1%}), one per row",
             f"each non-zero entry is at (i, Yb[i]) (all {n}: {at_targets}) and equals {float(values[0]):g} "
             f"= -1/{n}; autograd's dlogprobs agrees to {diff:.1e}",
             f"two steps down, dlogits is dense again: {int((L.hand.dlogits != 0).sum())} of {n * V} "
             "non-zero"]
    numbers = {"nonzero": nz.shape[0], "at_targets": at_targets, "values": values, "n": n, "V": V,
               "autograd_diff": diff}

    def draw() -> Figure:
        fig = _figure(12, 6.5)
        for k, (t, title) in enumerate(((d, f"dlogprobs: {nz.shape[0]} of {n * V} non-zero,\neach -1/{n}, "
                                         "at the targets (red boxes)"),
                                        (L.hand.dlogits, "dlogits, for contrast:\ndense again"))):
            ax = fig.add_subplot(1, 2, k + 1)
            vmax = float(t.abs().max())
            im = ax.imshow(t.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            for i, y in enumerate(L.Yb.tolist()):
                ax.add_patch(_box(y, i))
            ax.set_xticks(range(V))
            ax.set_xticklabels(L.itos, fontsize=7)
            ax.set(title=title, xlabel="character (column)", ylabel="example in the batch (row)")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        return fig

    return Experiment(2, "dlogprobs is non-zero only where the loss reads logprobs", lines, numbers, draw)


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="tab:red", lw=1.2)


# ---------------------------------------------------------------------------- Q3 the duality
def duality() -> Experiment:
    """The lecture's own pair on the same shapes: bnmeani's sum over the batch (N, H) -> (1, H), whose
    backward broadcasts, and bngain's broadcast over the batch (1, H) -> (N, H), whose backward sums."""
    L = lecture()
    n = L.Xb.shape[0]
    x_sum, dy_sum = L.f.hprebn, L.hand.dbnmeani / n  # the sum node's input and upstream
    dx_sum = dy_sum.expand_as(x_sum)  # (N, H) by hand: the broadcast
    auto_sum = _vjp(lambda x: x.sum(0, keepdim=True), x_sum, dy_sum)
    x_b, dy_b = L.p.bngain, L.hand.dhpreact * L.f.bnraw  # the broadcast copy's input and upstream
    dx_b = dy_b.sum(0, keepdim=True)  # (1, H) by hand: the sum
    auto_b = _vjp(lambda x: x.broadcast_to(dy_b.shape), x_b, dy_b)
    full = _vjp(torch.sum, x_sum, torch.tensor(2.5, dtype=torch.float64))  # y = x.sum() over every dim
    d1, d2 = _maxdiff(dx_sum, auto_sum), _maxdiff(dx_b, auto_b)
    lines = [f"sum: y = hprebn.sum(0, keepdim=True) {tuple(x_sum.shape)} -> {tuple(dy_sum.shape)}; backward "
             f"dx = dy broadcast to {tuple(dx_sum.shape)}, every row the same; autograd agrees to {d1:.1e}",
             f"broadcast: bngain {tuple(x_b.shape)} -> {tuple(dy_b.shape)}; backward dx = dy.sum(0, "
             f"keepdim=True) {tuple(dx_b.shape)}; autograd agrees to {d2:.1e}; it is the lecture's dbngain "
             f"(to {_maxdiff(dx_b, L.hand.dbngain):.1e})",
             f"y = x.sum() over every dim with dy = 2.5: autograd's dx is 2.5 in all {full.numel()} entries: "
             f"{bool((full == 2.5).all())}"]
    numbers = {"sum_diff": d1, "broadcast_diff": d2, "rows_equal": bool((dx_sum == dx_sum[:1]).all()),
               "dbngain_diff": _maxdiff(dx_b, L.hand.dbngain), "full_sum_all_dy": bool((full == 2.5).all())}

    def draw() -> Figure:
        fig = _figure(13, 8)
        s = slice(0, SHOWN)
        panels = (
            (x_sum[s, s], x_sum.sum(0, keepdim=True)[:, s],
             "sum, forward: y = x.sum(0, keepdim=True)\nx = hprebn (N, H) -> y (1, H)", "x", "y"),
            (dy_sum[:, s], dx_sum[s, s],
             "sum, backward: dx = dy broadcast\ndy (1, H) -> dx (N, H): rows equal", "dy", "dx"),
            (x_b[:, s], x_b.broadcast_to(dy_b.shape)[s, s], "broadcast, forward: y = x.broadcast_to((N, H))\n"
             "x = bngain (1, H) -> y (N, H)", "x", "y"),
            (dy_b[s, s], dx_b[:, s],
             "broadcast, backward: dx = dy.sum(0, keepdim=True)\ndy (N, H) -> dx (1, H)", "dy", "dx"),
        )
        for k, (top, bottom, title, tn, bn) in enumerate(panels):
            ax = fig.add_subplot(2, 2, k + 1)
            gap = torch.full((1, top.shape[1]), float("nan"), dtype=torch.float64)
            _grid(ax, torch.cat([top, gap, bottom]), title)
            ax.set_yticks([0, top.shape[0] + 1])
            ax.set_yticklabels([tn, bn])
        fig.suptitle(f"the first {SHOWN} rows and columns; the numbers above use all {n} rows: forward and "
                     "backward swap sum and broadcast", fontsize=10)
        fig.tight_layout()
        return fig

    return Experiment(3, "a sum's backward is a broadcast, a broadcast's backward is a sum", lines, numbers,
                      draw)


def _vjp(f, x: Tensor, dy: Tensor) -> Tensor:
    """autograd's dx for y = f(x) with upstream dy."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f(x).backward(dy)
    return x.grad.detach()


# ---------------------------------------------------------------------------- Q4 saturation
GAINS = {"small": 0.05, "saturated": 15.0}  # batchnorm gain: hpreact ~ N(0, gain**2), bias set to 0
PROBE_BATCHES = 8
# the mlp's layers: Embedding, FlattenConsecutive, Linear, BatchNorm1d, Tanh, Linear
TANH, BATCHNORM, FIRST_LINEAR = 4, 3, 2


@lru_cache(maxsize=1)
def _saturation_cases() -> dict[str, tuple]:
    """The lecture's model (n_hidden 64, its init) with its batchnorm gain set so that 90% of h lands in
    [-0.1, 0.1], or 90% beyond +-0.9; measured by diagnostics.measure on a fixed probe of training rows."""
    X, Y = setup.lecture_dataset("train")
    rows = diagnostics.probe_rows(X.shape[0], PROBE_BATCHES, setup.BATCH_SIZE, setup.SEED)  # (K, B)
    cfg = models.ModelConfig(n_hidden=setup.N_HIDDEN)
    out = {}
    for case, gain in GAINS.items():
        model = models.build(cfg, setup.SEED, torch.float64)
        set_tensor(model, f"{BATCHNORM}.weight", torch.full((setup.N_HIDDEN,), gain, dtype=torch.float64))
        set_tensor(model, f"{BATCHNORM}.bias", torch.zeros(setup.N_HIDDEN, dtype=torch.float64))
        with torch.no_grad():
            snap, probe = diagnostics.measure(model, X[rows], Y[rows], lr=0.1)
        out[case] = (snap, probe)
    return out


def saturation() -> Experiment:
    cases = _saturation_cases()
    numbers: dict[str, object] = {}
    lines = []
    for case, (snap, probe) in cases.items():
        h, dh = probe.outputs[TANH], probe.doutputs[TANH]  # (K*B, H)
        factor = 1 - h**2
        dhpreact = factor * dh  # what the tanh hands to the batchnorm below
        bn, th = snap.layers[BATCHNORM], snap.layers[TANH]
        numbers[case] = {
            "in_small": float((h.abs() <= 0.1).double().mean()),
            "beyond_09": float((h.abs() >= 0.9).double().mean()),
            "factor_mean": float(factor.mean()), "factor_max": float(factor.max()),
            "dh_std": th.grad_std, "dhpreact_std": bn.grad_std, "dhpreact_std_here": float(dhpreact.std()),
            "saturated": th.saturated, "dead": th.dead, "dW1_norm": snap.grads[f"{FIRST_LINEAR}.weight"].norm,
        }
        m = numbers[case]
        lines.append(f"{case} (batchnorm gain {GAINS[case]:g}): {m['in_small']:.0%} of h in [-0.1, 0.1], "
                     f"{m['beyond_09']:.0%} beyond +-0.9; mean 1 - h**2 = {m['factor_mean']:.3f}; the "
                     f"gradient that reaches the layer below: std {m['dhpreact_std']:.2e} from dh's "
                     f"{m['dh_std']:.2e} (x{m['dhpreact_std'] / m['dh_std']:.2f}); {m['dead']} of {th.units} "
                     "units dead")

    def draw() -> Figure:
        fig = _figure(12, 9.5)
        for col, (case, (_, probe)) in enumerate(cases.items()):
            h, dh = probe.outputs[TANH], probe.doutputs[TANH]
            factor = 1 - h**2
            m = numbers[case]
            ax = fig.add_subplot(3, 2, 1 + col)
            ax.hist(h.reshape(-1).numpy(), bins=60, range=(-1, 1), color="tab:blue")
            ax.set(title=f"{case}: h = tanh(hpreact), gain {GAINS[case]:g}\n{m['in_small']:.0%} in "
                   f"[-0.1, 0.1], {m['beyond_09']:.0%} beyond +-0.9", xlabel="h")
            ax = fig.add_subplot(3, 2, 3 + col)
            ax.hist(factor.reshape(-1).numpy(), bins=60, range=(0, 1), color="tab:orange")
            ax.set(title=f"1 - h**2, the factor on the gradient: mean {m['factor_mean']:.3f}",
                   xlabel="1 - h**2")
            ax = fig.add_subplot(3, 2, 5 + col)
            lim = float(dh.abs().max())
            for t, label in ((dh, f"dh (std {m['dh_std']:.1e})"),
                             (factor * dh, f"dhpreact = (1 - h**2) * dh (std {m['dhpreact_std']:.1e})")):
                ax.hist(t.reshape(-1).numpy(), bins=80, range=(-lim, lim), histtype="step", lw=1.4,
                        label=label)
            ax.set_yscale("log")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
            ax.set(title="the gradient above the tanh and what reaches the layer below", xlabel="gradient")
            ax.legend(fontsize=7)
        fig.suptitle(f"the lecture's model, {PROBE_BATCHES * setup.BATCH_SIZE} training rows, measured by "
                     "handgrad's diagnostics", fontsize=10)
        fig.tight_layout()
        return fig

    return Experiment(4, "near 0 the tanh passes the gradient on; saturated it cuts it", lines, numbers, draw)


# ---------------------------------------------------------------------------- Q5 cross-entropy's form
def cross_entropy(row: int = 0) -> Experiment:
    L = lecture()
    n, V = L.f.logits.shape
    p = F.softmax(L.f.logits[row], 0)  # (V,)
    onehot = F.one_hot(L.Yb[row], V).double()  # (V,)
    d = L.hand.dlogits[row] * n  # (V,) one row's gradient, without the mean's 1/n
    target = int(L.Yb[row])
    sums = L.hand.dlogits.sum(1)  # (N,)
    diff = _maxdiff(L.hand.dlogits, L.auto["logits"])
    lines = [f"row {row}: target {L.itos[target]!r} (column {target}) with p = {float(p[target]):.4f}: "
             f"dlogit there = (p - 1)/n = {float(L.hand.dlogits[row, target]):.5f}; every other column "
             "(p_j)/n > 0",
             f"n * dlogits[{row}] = softmax - one_hot to {_maxdiff(d, p - onehot):.1e}; autograd's dlogits "
             f"agrees to {diff:.1e}",
             f"row {row} sums to {float(sums[row]):.1e}; the largest |row sum| of the batch: "
             f"{float(sums.abs().max()):.1e} (0 up to rounding)"]
    numbers = {"row_sum": float(sums[row]), "max_row_sum": float(sums.abs().max()),
               "p_target": float(p[target]),
               "dlogit_target": float(d[target]), "form_diff": _maxdiff(d, p - onehot), "autograd_diff": diff,
               "positive_elsewhere": bool((torch.cat([d[:target], d[target + 1:]]) > 0).all())}

    def draw() -> Figure:
        fig = _figure(12, 5)
        ax = fig.add_subplot()
        x = torch.arange(V).double().numpy()
        w = 0.28
        ax.bar(x - w, p.numpy(), w, label="softmax(logits) (pushes every logit down)", color="tab:blue")
        ax.bar(x, (-onehot).numpy(), w, label="-one_hot (pulls the target up by 1)", color="tab:orange")
        ax.bar(x + w, d.numpy(), w, label="n * dlogits = softmax - one_hot", color="black")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(V))
        ax.set_xticklabels(L.itos)
        ax.set(title=f"dlogits of row {row} (target {L.itos[target]!r}): its row sum is "
               f"{float(sums[row]):.1e}", xlabel="character", ylabel="value")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        return fig

    return Experiment(5, "dlogits = (softmax - one_hot) / n, one row as bars", lines, numbers, draw)


# ---------------------------------------------------------------------------- Q6 accumulation
REPEATED, SEARCH = 10, 200


@lru_cache(maxsize=1)
def _accumulation_batch() -> tuple[int, int, int]:
    """The first batch seed from the lecture's (counting up) in which a letter appears exactly 10 times
    among the batch's context characters and another letter exactly once: (seed, t, u)."""
    for seed in range(setup.SEED, setup.SEED + SEARCH):
        Xb, _ = setup.lecture_batch(seed)
        counts = Counter(Xb.reshape(-1).tolist())
        tens = sorted(k for k, c in counts.items() if c == REPEATED and k != 0)
        ones = sorted(k for k, c in counts.items() if c == 1 and k != 0)
        if tens and ones:
            return seed, tens[0], ones[0]
    raise RuntimeError("no batch with a letter used exactly 10 times")  # not reached with names.txt


def accumulation() -> Experiment:
    seed, t, u = _accumulation_batch()
    L = lecture(seed)
    demb, Xb, dC = L.hand.demb, L.Xb, L.hand.dC  # (N, T, E), (N, T), (V, E)
    contrib = demb[Xb == t]  # (10, E) one row per use of token t
    summed = contrib.sum(0)  # (E,)
    over = torch.zeros_like(L.p.C)
    over[Xb.reshape(-1)] = demb.reshape(-1, demb.shape[-1])  # the bug: each write overwrites the one before
    kept = [i for i in range(contrib.shape[0]) if torch.equal(over[t], contrib[i])]
    single = demb[Xb == u]  # (1, E)
    ratio = float(dC[t].norm() / dC[u].norm())
    lines = [f"batch seed {seed}: token {L.itos[t]!r} ({t}) is used {contrib.shape[0]} times, {L.itos[u]!r} "
             f"({u}) once",
             f"dC[{t}] = the sum of its {contrib.shape[0]} contributions demb[Xb == {t}] (to "
             f"{_maxdiff(dC[t], summed):.1e}); autograd's dC[{t}] agrees to "
             f"{_maxdiff(L.auto['C'][t], summed):.1e}",
             f"dC[{u}] is its one contribution (to {_maxdiff(dC[u], single[0]):.1e}); |dC[{t}]| / |dC[{u}]| "
             f"= {ratio:.2f}",
             f"dC[Xb] = demb (overwriting) leaves dC[{t}] equal to contribution "
             f"{', '.join(str(k + 1) for k in kept) or 'none'} of {contrib.shape[0]}: length "
             f"{float(over[t].norm()):.4f} instead of {float(summed.norm()):.4f}"]
    numbers = {"seed": seed, "t": t, "u": u, "uses_t": contrib.shape[0], "uses_u": single.shape[0],
               "contributions": contrib, "dC_t": dC[t], "dC_u": dC[u], "single": single[0],
               "autograd_t": L.auto["C"][t],
               "overwrite_t": over[t], "overwrite_kept": kept}

    def draw() -> Figure:
        fig = _figure(13, 6.5)
        ax = fig.add_subplot(1, 2, 1)
        rows = torch.cat([contrib, torch.full((1, contrib.shape[1]), float("nan"), dtype=torch.float64),
                          summed[None], over[t][None]])
        _grid(ax, rows, f"token {L.itos[t]!r}: its {contrib.shape[0]} contributions (rows), then their sum "
              "(dC, accumulated)\nand what overwriting leaves")
        labels = [f"use {i + 1}" for i in range(contrib.shape[0])] + ["", "sum = dC", "overwritten"]
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax = fig.add_subplot(1, 2, 2)
        bars = {f"dC[{L.itos[t]!r}]\n(10 uses, summed)": float(summed.norm()),
                f"dC[{L.itos[t]!r}]\noverwritten": float(over[t].norm()),
                "one use of\n" + repr(L.itos[t]) + " (mean)": float(contrib.norm(dim=1).mean()),
                f"dC[{L.itos[u]!r}]\n(1 use)": float(dC[u].norm())}
        ax.bar(range(len(bars)), list(bars.values()), color=["tab:green", "tab:red", "tab:grey", "tab:blue"])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(list(bars), fontsize=8)
        ax.set(title="length of each row of dC", ylabel="|row|")
        fig.tight_layout()
        return fig

    return Experiment(6, "a token used 10 times gets the sum of 10 contributions", lines, numbers, draw)


EXPERIMENTS: dict[int, Callable[[], Experiment]] = {
    1: routing, 2: sparse, 3: duality, 4: saturation, 5: cross_entropy, 6: accumulation,
}


def run(question: int) -> Experiment:
    """The experiment of question 1..6."""
    return EXPERIMENTS[question]()
