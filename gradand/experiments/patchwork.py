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

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gradand._combine import combine
from gradand._combiners import AndMask, Combiner, GeometricMean, Mean

__all__ = ["PatchworkResult", "default_combiners", "inputs", "train"]


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


def train(
    combiner: Combiner,
    *,
    environments: Sequence[int] = (0, 1, 2, 3),
    steps: int = 1000,
    lr: float = 0.3,
    lr_decay: float = 0.9995,
    weight_decay: float = 0.01,
) -> PatchworkResult:
    """Gradient descent on ``½ (x·w - y)²`` per environment, combined with ``combiner``.

    Weight decay is added after combining (it is not masked), the learning
    rate decays by ``lr_decay`` per step, as in the reference notebook.

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
    w = np.zeros(5)
    trajectory = [w.copy()]
    for _ in range(steps):
        residual = x[env] @ w - y[env]  # (E,)
        grads = residual[:, None] * x[env]  # (E, 5): one gradient per environment
        w = w - lr * (combine(grads, combiner) + weight_decay * w)
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
