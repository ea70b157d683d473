"""The reference notebook's linear regression: patchwork (OR) versus invariant (AND) solutions.

Inputs ``x = 3 · [I₄ | 0.1 · 1]``, targets ``y = 1``: four one-point
environments. Feature ``i < 4`` is present only in environment ``i`` (a
per-environment shortcut); feature 4 is present, weakly, in all of them (the
invariant mechanism). Averaging gradients sews the four shortcuts together
(weights ≈ [0.32, 0.32, 0.32, 0.32, 0.13]); the AND-mask and the geometric mean
only move the weight on which all environments agree (≈ [0, 0, 0, 0, 3]), which
is also the one that transfers to environments not seen in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from gradand._combine import combine
from gradand._combiners import AndMask, Combiner, GeometricMean, Mean
from gradand.experiments import TRAINING_MODULES
from gradand.experiments.training import get_backend

__all__ = [
    "GRADIENTS",
    "MEAN_WEIGHTS",
    "SETTINGS",
    "PatchworkResult",
    "default_combiners",
    "gradient",
    "inputs",
    "reproduce",
    "train",
]


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """The four environments' inputs (4, 5) and targets (4,).

    Example:
        >>> from gradand.experiments.patchwork import inputs
        >>> x, y = inputs()
        >>> x[0].round(3).tolist(), y.tolist()
        ([3.0, 0.0, 0.0, 0.0, 0.3], [1.0, 1.0, 1.0, 1.0])
    """
    x = 3.0 * np.hstack([np.eye(4), 0.1 * np.ones((4, 1))])
    return x, np.ones(4)


class PatchworkResult(NamedTuple):
    """Weights after training, their trajectory, and losses.

    Attributes:
        weights: final weights (5,).
        trajectory: weights at every step, (steps + 1, 5).
        train_loss: mean loss on the training environments.
        heldout_loss: mean loss on the other environments (NaN if none).
    """

    weights: np.ndarray
    trajectory: np.ndarray
    train_loss: float
    heldout_loss: float


def default_combiners() -> dict[str, Combiner]:
    """The three methods the notebook compares, by name.

    Example:
        >>> from gradand.experiments.patchwork import default_combiners
        >>> sorted(default_combiners())
        ['and_mask', 'geometric_mean', 'mean']
    """
    return {
        "mean": Mean(),
        "and_mask": AndMask(threshold=1.0, rescale=False),
        "geometric_mean": GeometricMean(threshold=1.0, rescale=False),
    }


def gradient(
    combiner: Combiner, x: np.ndarray, y: np.ndarray, *, device: str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """The reference: ``gradient(w)``, the numpy core's ``combine`` of the gradients of ``½ (x_e·w - y_e)²``.

    Each environment's gradient is written out by hand, ``(x_e·w - y_e) x_e``;
    the backends' :meth:`~gradand.experiments.training.Backend.patchwork_gradient`
    compute the same with their autodiff and combiners, and are compared with this.

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.patchwork import gradient, inputs
        >>> x, y = inputs()
        >>> gradient(gradand.Mean(), x, y)(np.zeros(5)).round(3).tolist()
        [-0.75, -0.75, -0.75, -0.75, -0.3]
    """
    if device != "cpu":
        raise ValueError(f"the numpy backend runs on the CPU; got --device {device!r}")

    def combined(w: np.ndarray) -> np.ndarray:
        residual = x @ w - y  # (E,)
        return combine(residual[:, None] * x, combiner)  # (E, 5): one gradient per environment

    return combined


#: Where each backend's patchwork gradient comes from (frameworks imported only when used).
GRADIENTS: dict[str, Callable[[], Callable[..., Callable[[np.ndarray], np.ndarray]]]] = {
    "numpy": lambda: gradient,
    **{name: (lambda name=name: get_backend(name).patchwork_gradient) for name in TRAINING_MODULES},
}


def train(
    combiner: Combiner,
    *,
    environments: Sequence[int] = (0, 1, 2, 3),
    steps: int = 1000,
    lr: float = 0.3,
    lr_decay: float = 0.9995,
    weight_decay: float = 0.01,
    backend: str = "numpy",
    device: str = "cpu",
) -> PatchworkResult:
    """Gradient descent on ``½ (x·w - y)²`` per environment, combined with ``combiner``.

    Weight decay is added after combining (it is not masked), the learning
    rate decays by ``lr_decay`` per step, as in the reference notebook. The
    weights are float64 numpy; ``backend`` computes the combined gradient
    (:data:`GRADIENTS`: ``numpy``, the reference, or a framework's
    :meth:`~gradand.experiments.training.Backend.patchwork_gradient`, on ``device``).

    Example:
        >>> import gradand
        >>> from gradand.experiments.patchwork import train
        >>> train(gradand.Mean()).weights.round(2).tolist()
        [0.32, 0.32, 0.32, 0.32, 0.13]
        >>> train(gradand.AndMask(threshold=1.0, rescale=False)).weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    x, y = inputs()
    env = list(environments)
    if not env or any(not 0 <= e < 4 for e in env):
        raise ValueError(f"environments must be a non-empty subset of 0..3; got {environments!r}")
    if backend not in GRADIENTS:
        raise ValueError(
            f"backend {backend!r} is not supported for the patchwork experiment; use {', '.join(GRADIENTS)}"
        )
    combined = GRADIENTS[backend]()(combiner, x[env], y[env], device=device)
    w = np.zeros(5)
    trajectory = [w.copy()]
    for _ in range(steps):
        w = w - lr * (combined(w) + weight_decay * w)
        lr *= lr_decay
        trajectory.append(w.copy())
    losses = 0.5 * (x @ w - y) ** 2
    held = [e for e in range(4) if e not in env]
    return PatchworkResult(
        weights=w,
        trajectory=np.stack(trajectory),
        train_loss=float(losses[env].mean()),
        heldout_loss=float(losses[held].mean()) if held else float("nan"),
    )


#: The expected weights of the notebook (paper Fig. 1 discussion).
MEAN_WEIGHTS: tuple[float, ...] = (0.32, 0.32, 0.32, 0.32, 0.13)
SETTINGS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (0, 1))


def reproduce(
    *, backend: str = "numpy", device: str = "cpu", steps: int = 1000, record_every: int = 10
) -> Any:
    """Train the three methods on all four and on two of the four environments; a report.

    Returns a :class:`gradand.experiments._report.Report` with the weights,
    losses and (every ``record_every`` steps) the weight trajectories, the
    summary table, the paper's claims checked, and a plot of the trajectories.

    Example:
        >>> from gradand.experiments.patchwork import reproduce
        >>> report = reproduce()
        >>> report.results["4 envs"]["and_mask"]["weights"]
        [0.0, 0.0, 0.0, 0.0, 3.0]
        >>> all(c.passed for c in report.checks)
        True
    """
    from gradand.experiments._report import Check, Report, format_table

    results: dict[str, dict[str, Any]] = {}
    rows = []
    for envs in SETTINGS:
        key = f"{len(envs)} envs"
        results[key] = {}
        for name, combiner in default_combiners().items():
            r = train(combiner, environments=envs, steps=steps, backend=backend, device=device)
            results[key][name] = {
                "environments": list(envs),
                "weights": [round(float(w), 4) for w in r.weights],
                "train_loss": r.train_loss,
                "heldout_loss": r.heldout_loss,
                "trajectory_steps": list(range(0, steps + 1, record_every)),
                "trajectory": r.trajectory[::record_every].tolist(),
            }
            weights = "[" + ", ".join(f"{w:5.2f}" for w in r.weights) + "]"
            held = "-" if len(envs) == 4 else f"{r.heldout_loss:.3f}"
            rows.append([name, key, weights, held])
    table = format_table(["method", "trained on", "weights", "held-out loss"], rows)

    four, two = results["4 envs"], results["2 envs"]
    mean_w = np.asarray(four["mean"]["weights"])
    checks = [
        Check(
            f"averaging sews the shortcuts together: mean weights {np.round(mean_w, 2).tolist()} "
            f"≈ {list(MEAN_WEIGHTS)}",
            bool(np.allclose(mean_w, MEAN_WEIGHTS, atol=0.01)),
            {"weights": mean_w, "expected": MEAN_WEIGHTS},
        )
    ]
    for name in ("and_mask", "geometric_mean"):
        w = np.asarray(four[name]["weights"])
        checks.append(
            Check(
                f"{name} finds the invariant feature: last weight {w[4]:.3f} ≈ 3, others "
                f"max |w| {np.abs(w[:4]).max():.3f} ≈ 0",
                bool(abs(w[4] - 3.0) <= 0.05 and np.abs(w[:4]).max() <= 0.01),
                {"weights": w},
            )
        )
    checks.append(
        Check(
            f"the invariant solution transfers to the held-out environments: held-out loss "
            f"and_mask {two['and_mask']['heldout_loss']:.3f} < mean {two['mean']['heldout_loss']:.3f}",
            two["and_mask"]["heldout_loss"] < two["mean"]["heldout_loss"],
            {name: two[name]["heldout_loss"] for name in two},
        )
    )

    def draw(plt: Any) -> Any:
        fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True, sharey=True)
        for row, key in zip(axes, results):
            for ax, (name, r) in zip(row, results[key].items()):
                traj = np.asarray(r["trajectory"])
                for i in range(traj.shape[1]):
                    label = f"w{i} (env {i} only)" if i < 4 else "w4 (invariant)"
                    ax.plot(r["trajectory_steps"], traj[:, i], label=label, lw=2 if i == 4 else 1)
                ax.set_title(f"{name}, trained on {key}", fontsize=10)
                ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("step")
        for ax in axes[:, 0]:
            ax.set_ylabel("weight")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        return fig

    config = {
        "backend": backend,
        "device": device,
        "steps": steps,
        "lr": 0.3,
        "lr_decay": 0.9995,
        "weight_decay": 0.01,
    }
    return Report("patchwork", config, results, checks, table, draw, [])
