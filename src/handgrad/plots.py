"""PNG plots of training health for any model of layers, drawn with matplotlib's Agg canvas (no screen,
no pyplot state) and written atomically (io.atomic_write_bytes), from what handgrad.diagnostics measured
(its Snapshot history, ProbeTensors and DiagConfig, read by attribute). The pictures are the lecture's:
Karpathy, "Building makemore Part 3" (per-layer histograms of the Tanh outputs and their gradients with
mean/std/saturation in the legend, the 2-D weights' gradients, update:data ratios with the 1e-3 guide,
`plt.imshow(h.abs() > 0.99, cmap='gray')`) and "Part 4" (`plt.imshow(dlogits, cmap='gray')`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from handgrad.io import atomic_write_bytes

DPI = 100
SIZES = {  # file name -> figure size in inches (pixels = inches * DPI)
    "loss.png": (8, 5), "activations.png": (11, 5), "gradients.png": (11, 5),
    "weight_gradients.png": (13, 5), "update_ratios.png": (11, 5), "saturation.png": (12, 7),
    "dlogits.png": (6, 7),
}
SATURATION_ROWS = 256  # probe rows shown per Tanh layer in saturation.png


def _figure(name: str) -> Figure:
    fig = Figure(figsize=SIZES[name], dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render in memory, then write atomically (io.atomic_write_bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _finite(t: Tensor) -> Tensor:
    v = t.double().flatten()
    return v[torch.isfinite(v)]


def _density(ax, t: Tensor, label: str, bins: int = 80) -> None:
    """Part 3's curve: `hy, hx = torch.histogram(t, density=True); plt.plot(hx[:-1], hy)`."""
    v = _finite(t)
    if v.numel() == 0 or v.min() == v.max():  # nothing to spread over bins (all NaN, or constant)
        ax.plot([], [], label=label + " (no spread)")
        return
    hy, hx = torch.histogram(v, bins=bins, density=True)
    ax.plot(((hx[:-1] + hx[1:]) / 2).numpy(), hy.numpy(), label=label)


def _legend(ax, n: int) -> None:
    """Inside for a few entries, to the right of the axes for many (a legend must not hide a curve)."""
    if n <= 3:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


# ---------------------------------------------------------------------------- the plots
def smooth_log10(losses: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The lecture's curve: mean of log10(loss) over consecutive windows of `window` steps
    (`torch.tensor(lossi).view(-1, 1000).mean(1)`). Non-finite steps (not run yet) are dropped.
    Returns (window centres (M,), means (M,))."""
    x = losses[torch.isfinite(losses)].double()  # (S,)
    m = x.shape[0] // window
    means = x[: m * window].log10().view(m, window).mean(1)  # (M,)
    centres = torch.arange(m, dtype=torch.float64) * window + window / 2  # (M,)
    return centres, means


def loss_curve(losses: Tensor, path: str | Path, lr_decay_step: int | None = None) -> Path:
    """Per-step training loss (faint) and its windowed mean of log10 (bold), as the lecture plots it."""
    fig = _figure("loss.png")
    ax = fig.add_subplot()
    x = losses[torch.isfinite(losses)].double()
    window = 1000 if x.shape[0] >= 20_000 else max(1, x.shape[0] // 20)
    ax.plot(torch.arange(x.shape[0]).numpy(), x.clamp_min(1e-12).log10().numpy(), lw=0.3, alpha=0.3,
            color="tab:blue", label="per step")
    if x.shape[0] >= window:
        centres, means = smooth_log10(x, window)
        ax.plot(centres.numpy(), means.numpy(), lw=2, color="tab:blue", label=f"mean over {window} steps")
    if lr_decay_step is not None and lr_decay_step < x.shape[0]:
        ax.axvline(lr_decay_step, color="gray", ls=":", label=f"lr decay (step {lr_decay_step:,})")
    ax.set(title=f"training loss ({x.shape[0]:,} steps)", xlabel="step", ylabel="log10(loss)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _no_tanh(ax) -> None:
    ax.text(0.5, 0.5, "this model has no Tanh layer", ha="center", va="center", transform=ax.transAxes)


def activation_histograms(probe, snap, path: str | Path,
                          saturated: float = 0.97) -> Path:
    """Part 3's activation distribution: the output of every Tanh layer on the probe, one curve
    per layer, with its mean, std and saturated share in the legend."""
    fig = _figure("activations.png")
    ax = fig.add_subplot()
    tanh = snap.tanh_layers()
    for st in tanh:
        _density(ax, probe.outputs[st.index], f"{st.label}: mean {st.mean:+.2f}, std {st.std:.2f}, "
                 f"saturated {st.saturated:.1%}")
    for x in (-saturated, saturated):
        ax.axvline(x, color="tab:red", ls=":", lw=1)
    if tanh:
        _legend(ax, len(tanh))
    else:
        _no_tanh(ax)
    ax.set(title=f"activation distribution: Tanh outputs at step {snap.step:,} (red: |h| = {saturated}, "
           "saturated beyond)", xlabel="tanh output h", ylabel="density")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def gradient_histograms(probe, snap, path: str | Path) -> Path:
    """Part 3's gradient distribution: d loss / d output of every Tanh layer, one curve per layer.
    Similar curves across layers: the gradient neither vanishes nor explodes on its way down."""
    fig = _figure("gradients.png")
    ax = fig.add_subplot()
    tanh = snap.tanh_layers()
    for st in tanh:
        _density(ax, probe.doutputs[st.index], f"{st.label}: mean {st.grad_mean:+.2e}, std {st.grad_std:.2e}")
    if tanh:
        _legend(ax, len(tanh))
    else:
        _no_tanh(ax)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.set(title=f"gradient distribution at the Tanh outputs, step {snap.step:,}", xlabel="d loss / d h",
           ylabel="density")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def weight_gradient_histograms(probe, snap, path: str | Path) -> Path:
    """Part 3's weight gradient distribution: the probe gradient of every 2-D parameter, with its
    shape, mean, std and grad:data ratio (std(grad) / std(weight))."""
    fig = _figure("weight_gradients.png")
    ax = fig.add_subplot()
    names = snap.weights()
    for name in names:
        g = snap.grads[name]
        _density(ax, probe.grads[name], f"{g.label(name)} {tuple(g.shape)}: mean {g.mean:+.1e}, "
                 f"std {g.std:.1e}, grad:data {g.grad_data:.1e}")
    _legend(ax, len(names))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    ax.set(title=f"weight gradient distribution (2-D parameters) at step {snap.step:,}",
           xlabel="gradient value", ylabel="density")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def update_ratios(history: list, path: str | Path, cfg) -> Path:
    """log10 of std(lr * grad) / std(param) over time for every 2-D parameter, with the lecture's
    -3 guide and the warning band."""
    fig = _figure("update_ratios.png")
    ax = fig.add_subplot()
    steps = [s.step for s in history]
    names = list(dict.fromkeys(n for s in history for n in s.weights()))
    for name in names:
        ys = [s.grads[name].update_ratio if name in s.grads else math.nan for s in history]
        label = next(s.grads[name].label(name) for s in history if name in s.grads)
        ax.plot(steps, ys, marker="o" if len(steps) < 30 else None, ms=3, label=label)
    ax.axhline(-3, color="black", ls="--", lw=1, label="guide: 1e-3")
    ax.axhspan(cfg.ratio_low, cfg.ratio_high, color="tab:green", alpha=0.08,
               label=f"no-warning band\n[{cfg.ratio_low}, {cfg.ratio_high}]")
    ax.set(title="update:data ratio of the 2-D parameters", xlabel="step",
           ylabel="log10(std(lr*grad) / std(param))")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never hides a curve
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def saturation_map(probe, snap, path: str | Path, saturated: float = 0.97) -> Path:
    """One panel per Tanh layer, white where |h| > saturated (probe rows x units), as the lecture's
    `plt.imshow(h.abs() > 0.99, cmap='gray')`; an all-white column is a dead unit."""
    fig = _figure("saturation.png")
    tanh = snap.tanh_layers()
    cols = min(3, max(1, len(tanh)))
    rows = max(1, math.ceil(len(tanh) / cols))
    for i, st in enumerate(tanh):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = probe.outputs[st.index]  # (rows, H)
        sat = (h[:SATURATION_ROWS].abs() > saturated).double()  # (R, H)
        ax.imshow(sat.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{st.label}: {st.saturated:.1%} saturated, {st.dead} of {st.units} dead", fontsize=9)
        ax.set_xlabel("unit", fontsize=8)
        ax.set_ylabel(f"probe row (first {sat.shape[0]} of {h.shape[0]})", fontsize=8)
        ax.tick_params(labelsize=7)
    if not tanh:
        _no_tanh(fig.add_subplot())
    fig.suptitle(f"tanh saturation at step {snap.step:,}: white where |h| > {saturated}; an all-white "
                 "column is a dead unit")
    fig.tight_layout()
    return save_png(fig, path)


def dlogits_image(dlogits: Tensor, path: str | Path, step: int | None = None) -> Path:
    """The lecture's picture of dlogits = (softmax - one_hot)/B: the target cell of each row is
    pulled down (dark), the other cells pushed up by their probability; each row sums to 0."""
    fig = _figure("dlogits.png")
    ax = fig.add_subplot()
    im = ax.imshow(dlogits.double().numpy(), cmap="gray", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="dloss/dlogit")
    at = f" at step {step:,}" if step is not None else ""
    ax.set(title=f"dlogits{at}\n(softmax - one_hot) / B, dark = target",
           xlabel="character (vocabulary index)", ylabel="example in batch")
    fig.tight_layout()
    return save_png(fig, path)


def write_all(out: str | Path, losses: Tensor | None, history: list, probe, cfg,
              lr_decay_step: int | None = None) -> list[Path]:
    """Every plot into the directory `out`; returns the paths written. `probe` and history[-1]
    must be from the same measurement."""
    out = Path(out)
    snap = history[-1]
    paths = []
    if losses is not None and torch.isfinite(losses).any():
        paths.append(loss_curve(losses, out / "loss.png", lr_decay_step))
    paths += [activation_histograms(probe, snap, out / "activations.png", cfg.saturated),
              gradient_histograms(probe, snap, out / "gradients.png"),
              weight_gradient_histograms(probe, snap, out / "weight_gradients.png"),
              update_ratios(history, out / "update_ratios.png", cfg),
              saturation_map(probe, snap, out / "saturation.png", cfg.saturated),
              dlogits_image(probe.dlogits, out / "dlogits.png", snap.step)]
    return paths
