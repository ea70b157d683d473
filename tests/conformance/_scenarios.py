"""The conformance scenarios and their numpy oracle.

Every scenario is the same small task: a dense layer ``y = x Wᵀ + b`` (``W`` stored
``(out, in)``; JAX and Keras kernels are its transpose) with the mean squared error of each
environment as that environment's loss, on environments of equal or different sizes. The oracle
computes each environment's gradient in closed form in float64 and combines them with the numpy
core, so every backend's every entry point is compared with one definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import gradand

IN, OUT = 5, 3

COMBINERS: dict[str, gradand.Combiner] = {
    "mean": gradand.Mean(),
    "and1": gradand.AndMask(threshold=1.0),
    "and0.5-norescale": gradand.AndMask(threshold=0.5, rescale=False),
    "geom0.5": gradand.GeometricMean(threshold=0.5),
    "sand0.3": gradand.SandMask(threshold=0.3, k=2.0),
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One task: environment sizes, a combiner, a NaN policy and an optional poisoned example."""

    name: str
    sizes: tuple[int, ...]
    combiner: str = "and1"
    nan_policy: str = "raise"
    poison: tuple[int, int] | None = None  # (environment, example) whose target is NaN
    seed: int = 0

    @property
    def envs(self) -> int:
        return len(self.sizes)

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1

    @property
    def per_example(self) -> bool:
        return set(self.sizes) == {1}

    def data(self) -> Data:
        rng = np.random.default_rng(self.seed)
        xs = [rng.standard_normal((n, IN)) for n in self.sizes]
        # environment-specific targets: a shared mechanism plus a per-environment shortcut
        shared = rng.standard_normal((OUT, IN))
        ys = []
        for e, x in enumerate(xs):
            w = shared + 0.8 * rng.standard_normal((OUT, IN)) * (e % 2)
            ys.append(x @ w.T + 0.1 * rng.standard_normal((len(x), OUT)))
        if self.poison is not None:
            e, b = self.poison
            ys[e][b, 0] = np.nan
        weight = 0.3 * rng.standard_normal((OUT, IN))
        bias = 0.1 * rng.standard_normal(OUT)
        return Data(xs, ys, weight, bias)


@dataclasses.dataclass
class Data:
    xs: list[np.ndarray]
    ys: list[np.ndarray]
    weight: np.ndarray  # (OUT, IN)
    bias: np.ndarray  # (OUT,)

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """``(E, n, IN)`` and ``(E, n, OUT)`` (equal sizes only)."""
        return np.stack(self.xs), np.stack(self.ys)

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, targets and an environment id per example (any sizes)."""
        ids = np.concatenate([np.full(len(x), e) for e, x in enumerate(self.xs)])
        return np.concatenate(self.xs), np.concatenate(self.ys), ids

    def losses(self) -> np.ndarray:
        out = []
        for x, y in zip(self.xs, self.ys):
            r = x @ self.weight.T + self.bias - y
            out.append(np.mean(r * r))
        return np.asarray(out)

    def env_gradients(self) -> dict[str, np.ndarray]:
        """Per-environment gradients of each environment's MSE: ``weight (E, OUT, IN)``, ``bias (E, OUT)``."""
        gw, gb = [], []
        for x, y in zip(self.xs, self.ys):
            r = x @ self.weight.T + self.bias - y  # (n, OUT)
            scale = 2.0 / (len(x) * OUT)
            gw.append(scale * r.T @ x)
            gb.append(scale * r.sum(0))
        return {"weight": np.stack(gw), "bias": np.stack(gb)}


def oracle(scenario: Scenario) -> tuple[dict[str, np.ndarray], gradand.Result]:
    """The expected update per tensor and the expected Result, from the numpy core in float64."""
    data = scenario.data()
    combiner = COMBINERS[scenario.combiner]
    policy = "propagate" if scenario.nan_policy == "raise" else scenario.nan_policy
    updates, infos = {}, []
    for name, g in data.env_gradients().items():
        u, info = gradand.combine(g, combiner, nan_policy=policy, return_info=True)
        updates[name] = u
        infos.append(info)
    losses = data.losses()
    summary = gradand.summarize(infos, [OUT * IN, OUT])
    return updates, gradand.Result(np.mean(losses), losses, infos, summary)


def scenarios() -> list[Scenario]:
    """Every scenario: grouped, per-example and ragged environments, every combiner and NaN policy."""
    out = [Scenario(f"grouped-{c}", (6, 6, 6, 6), combiner=c) for c in COMBINERS]
    out += [
        Scenario(f"per-example-{c}", (1,) * 12, combiner=c) for c in ("mean", "and0.5-norescale", "sand0.3")
    ]
    out += [Scenario(f"ragged-{c}", (3, 7, 1, 5), combiner=c) for c in ("and1", "geom0.5")]
    out += [
        Scenario("nan-raise", (4, 4, 4), nan_policy="raise", poison=(1, 2)),
        Scenario("nan-zero", (4, 4, 4), nan_policy="zero", poison=(1, 2)),
        Scenario("nan-propagate", (4, 4, 4), nan_policy="propagate", poison=(1, 2)),
    ]
    return out


def as_numpy(x: Any) -> np.ndarray:
    """A framework array (or a number) as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)
