"""Draw the figures of the documentation site from gradand itself.

Run from the repository root (needs matplotlib, the ``experiments`` extra)::

    python docs/figures/make_figures.py            # writes docs/figures/*.png
    python docs/figures/make_figures.py OUT_DIR    # writes them elsewhere

The test suite runs this script into a temporary folder, so the figures
cannot drift from the code that the pages describe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gradand
from gradand.consistency import arithmetic_mean, inconsistency, karcher_mean
from gradand.experiments.patchwork import inputs, train

OR_COLOR, AND_COLOR = "#d95f02", "#1b9e77"


def or_vs_and(path: Path) -> None:
    """Per-environment gradients, their mean (OR) and AND-mask, and the weights they train."""
    x, y = inputs()
    grads = (x @ np.zeros(5) - y)[:, None] * x  # each environment's gradient at w = 0
    mean = gradand.combine(grads, gradand.Mean())
    masked = gradand.combine(grads, gradand.AndMask(threshold=1.0, rescale=False))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.25, 1, 1.1]})
    ax = axes[0]
    width = 0.2
    components = np.arange(5)
    for e in range(4):
        ax.bar(components + (e - 1.5) * width, -grads[e], width, label=f"environment {e + 1}", alpha=0.8)
    ax.set_xticks(components, ["$w_1$", "$w_2$", "$w_3$", "$w_4$", "$w_5$\n(shared)"])
    ax.set_ylabel("−gradient at w = 0")
    ax.set_title("Each environment pushes its own shortcut")
    ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=2)
    ax.set_ylim(0, 3.9)

    ax = axes[1]
    ax.bar(components - 0.18, -mean, 0.36, color=OR_COLOR, label="mean (OR)")
    ax.bar(components + 0.18, -masked, 0.36, color=AND_COLOR, label="AND-mask, τ = 1")
    ax.set_xticks(components, ["$w_1$", "$w_2$", "$w_3$", "$w_4$", "$w_5$\n(shared)"])
    ax.set_title("Combined update")
    ax.set_ylim(0, 0.95)
    ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=2)

    ax = axes[2]
    for combiner, color, name in [
        (gradand.Mean(), OR_COLOR, "mean"),
        (gradand.AndMask(threshold=1.0, rescale=False), AND_COLOR, "AND"),
    ]:
        trajectory = train(combiner).trajectory
        steps = np.arange(1, len(trajectory))
        ax.plot(steps, trajectory[1:, 0], color=color, ls="--", label=f"{name}: shortcut weight $w_1$")
        ax.plot(steps, trajectory[1:, 4], color=color, label=f"{name}: shared weight $w_5$")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.set_title("Training: patchwork vs invariant")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ellipse(h: np.ndarray, epsilon: float) -> np.ndarray:
    """Boundary of {δ : ½ δᵀ H δ ≤ ε}, shape (2, n)."""
    t = np.linspace(0, 2 * np.pi, 200)
    w, u = np.linalg.eigh(h)
    return u @ (np.sqrt(2 * epsilon / w)[:, None] * np.stack([np.cos(t), np.sin(t)]))


def hessian_means(path: Path) -> None:
    """Sublevel sets of two environments, of the arithmetic (OR) and of the geometric (AND) mean."""
    epsilon = 1.0
    rotation = np.array([[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]])
    cases = {
        "consistent minimum": np.stack([np.diag([1.0, 0.4]), rotation @ np.diag([0.9, 0.5]) @ rotation.T]),
        "inconsistent minimum": np.stack([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])]),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), layout="constrained")
    for ax, (title, h) in zip(axes, cases.items()):
        for curve, style, label in [
            (_ellipse(h[0], epsilon), dict(color="0.45", ls=":"), "$L_A \\leq \\varepsilon$"),
            (_ellipse(h[1], epsilon), dict(color="0.45", ls="-."), "$L_B \\leq \\varepsilon$"),
            (_ellipse(arithmetic_mean(h), epsilon), dict(color=OR_COLOR), "arithmetic mean (OR)"),
            (_ellipse(karcher_mean(h), epsilon), dict(color=AND_COLOR), "geometric mean (AND)"),
        ]:
            ax.plot(*curve, lw=2, label=label, **style)
        ax.set_aspect("equal")
        ax.set_title(f"{title}: $I^\\varepsilon$ = {inconsistency(h, epsilon=epsilon):.3g}")
        lim = 1.15 * max(np.abs(_ellipse(m, epsilon)).max() for m in h)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {"or_vs_and.png": or_vs_and, "hessian_means.png": hessian_means}


def main(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        draw(out / name)
        written.append(out / name)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    for p in main(target):
        print(p)
