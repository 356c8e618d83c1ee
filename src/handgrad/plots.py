"""PNG plots of training health, drawn with matplotlib's Agg canvas (no screen, no pyplot state) and
written atomically (checkpoint.atomic_write_bytes). The pictures are the lecture's: Karpathy,
"Building makemore Part 3" (activation/gradient histograms, update:data ratios with the 1e-3 guide,
`plt.imshow(h.abs() > 0.99, cmap='gray')`) and "Part 4" (`plt.imshow(dlogits, cmap='gray')`).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from handgrad.checkpoint import atomic_write_bytes
from handgrad.diagnostics import WEIGHTS, DiagConfig, ProbeTensors, Snapshot

DPI = 100
DEFAULT = DiagConfig()
SIZES = {  # file name -> figure size in inches (pixels = inches * DPI)
    "loss.png": (8, 5), "activations.png": (10, 4), "gradients.png": (12, 6),
    "update_ratios.png": (8, 5), "saturation.png": (10, 6), "dlogits.png": (6, 7),
}


def _figure(name: str) -> Figure:
    fig = Figure(figsize=SIZES[name], dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render in memory, then write atomically (checkpoint.atomic_write_bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


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


def activation_histograms(probe: ProbeTensors, snap: Snapshot, path: str | Path,
                          saturated: float = 0.97) -> Path:
    """Histograms of the tanh input (hpreact) and output (h) on the probe, with mean/std/saturation."""
    fig = _figure("activations.png")
    for i, (name, t) in enumerate((("hpreact (tanh input)", probe.hpreact), ("h (tanh output)", probe.h))):
        ax = fig.add_subplot(1, 2, i + 1)
        v = t.double().flatten()
        v = v[torch.isfinite(v)]
        ax.hist(v.numpy(), bins=100, color="tab:blue")
        st = snap.acts["hpreact" if i == 0 else "h"]
        extra = f", saturated {st.saturated:.1%}" if st.saturated is not None else ""
        ax.set(title=f"{name}\nmean {st.mean:+.2f}, std {st.std:.2f}{extra}", xlabel="value",
               ylabel="count")
        if i == 1:
            for x in (-saturated, saturated):
                ax.axvline(x, color="tab:red", ls=":", lw=1)
    fig.suptitle(f"activations at step {snap.step:,} ({probe.h.shape[0]} probe examples)")
    fig.tight_layout()
    return save_png(fig, path)


def gradient_histograms(probe: ProbeTensors, snap: Snapshot, path: str | Path) -> Path:
    """One histogram per parameter gradient (the probe gradient), with mean, std and norm."""
    fig = _figure("gradients.png")
    items = [(n, g) for n, g in probe.grads.items() if n in snap.grads]
    cols = 4
    for i, (name, g) in enumerate(items):
        ax = fig.add_subplot((len(items) + cols - 1) // cols, cols, i + 1)
        v = g.double().flatten()
        v = v[torch.isfinite(v)]
        ax.hist(v.numpy(), bins=50, color="tab:orange")
        st = snap.grads[name]
        note = " (~0: batchnorm cancels b1)" if name == "b1" and "bngain" in snap.grads else ""
        ax.set_title(f"d{name} {tuple(g.shape)}{note}\nmean {st.mean:+.1e} std {st.std:.1e}\n"
                     f"norm {st.norm:.2e}", fontsize=8)
        ax.set_xlabel("gradient value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"parameter gradients at step {snap.step:,} (mean over the probe batches)")
    fig.tight_layout()
    return save_png(fig, path)


def update_ratios(history: list[Snapshot], path: str | Path, cfg: DiagConfig = DEFAULT) -> Path:
    """log10 of std(lr * grad) / std(param) over time for the weight matrices, with the lecture's
    -3 guide and the warning band."""
    fig = _figure("update_ratios.png")
    ax = fig.add_subplot()
    steps = [s.step for s in history]
    for name in WEIGHTS:
        ys = [s.grads[name].update_ratio if name in s.grads else float("nan") for s in history]
        ax.plot(steps, ys, marker="o" if len(steps) < 30 else None, ms=3, label=name)
    ax.axhline(-3, color="black", ls="--", lw=1, label="guide: 1e-3")
    ax.axhspan(cfg.ratio_low, cfg.ratio_high, color="tab:green", alpha=0.08,
               label=f"no-warning band\n[{cfg.ratio_low}, {cfg.ratio_high}]")
    ax.set(title="update:data ratio of the weights", xlabel="step", ylabel="log10(std(lr*grad) / std(param))")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never hides a curve
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def saturation_map(h: Tensor, path: str | Path, saturated: float = 0.97, step: int | None = None) -> Path:
    """White where |h| > saturated (examples x hidden units), as the lecture's
    `plt.imshow(h.abs() > 0.99, cmap='gray')`; an all-white column is a dead unit."""
    fig = _figure("saturation.png")
    ax = fig.add_subplot()
    sat = (h.abs() > saturated).double()  # (N, H)
    dead = int(sat.all(0).sum())
    ax.imshow(sat.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    at = f" at step {step:,}" if step is not None else ""
    ax.set(title=f"tanh saturation{at}: white where |h| > {saturated} ({sat.mean().item():.1%} of entries; "
           f"{dead} dead units = all-white columns)", xlabel="hidden unit", ylabel="probe example")
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


def write_all(out: str | Path, losses: Tensor | None, history: list[Snapshot], probe: ProbeTensors,
              cfg: DiagConfig = DEFAULT, lr_decay_step: int | None = None) -> list[Path]:
    """Every plot into the directory `out`; returns the paths written. `probe` and history[-1]
    must be from the same measurement."""
    out = Path(out)
    snap = history[-1]
    paths = []
    if losses is not None and torch.isfinite(losses).any():
        paths.append(loss_curve(losses, out / "loss.png", lr_decay_step))
    paths += [activation_histograms(probe, snap, out / "activations.png", cfg.saturated),
              gradient_histograms(probe, snap, out / "gradients.png"),
              update_ratios(history, out / "update_ratios.png", cfg),
              saturation_map(probe.h, out / "saturation.png", cfg.saturated, snap.step),
              dlogits_image(probe.dlogits, out / "dlogits.png", snap.step)]
    return paths
