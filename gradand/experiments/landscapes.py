"""The paper's consistency figure (§2): two quadratic environments, their OR and AND landscapes.

Each environment's loss near the minimum θ* = 0 is ``L_e(δ) = ½ δᵀ H_e δ``.
The averaged loss (the logical OR) has the arithmetic mean of the Hessians;
the geometric (Karcher) mean of the Hessians is the AND landscape, curved
only where *both* environments are. In the paper's example
``H_A = diag(0.05, 1)``, ``H_B = diag(1, 0.05)`` each environment is flat
where the other is curved: the average is a round, well-curved bowl that
hides this, while the geometric mean is flat (small determinant, large
ε-sublevel area) and the inconsistency score is high (``I^ε = 20 ε``). When
both environments are curved along the same direction
(``H_A = diag(0.05, 1)``, ``H_B = diag(0.01, 1)``) the two means nearly agree.

Everything here is numpy and :mod:`gradand.consistency`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradand.consistency import (
    arithmetic_mean,
    empirical_inconsistency,
    ilc,
    inconsistency,
    karcher_mean,
    pair_inconsistency,
    proposition3_bound,
)

__all__ = ["SCENARIOS", "analyse", "run", "sublevel_area"]

#: Name → (H_A, H_B) diagonals.
SCENARIOS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "swapped": ((0.05, 1.0), (1.0, 0.05)),
    "aligned": ((0.05, 1.0), (0.01, 1.0)),
}


def sublevel_area(hessian: Any, epsilon: float) -> float:
    """Area of the 2-D ε-sublevel ellipse ``{δ : ½ δᵀ H δ ≤ ε}``: ``2π ε / √det H``.

    In P dimensions the volume scales like ``det(H)^(-1/2)``: a small
    determinant is a flat, wide minimum.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.landscapes import sublevel_area
        >>> round(sublevel_area(np.eye(2), 1.0), 4)  # a disc of radius √2
        6.2832
    """
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (2, 2):
        raise ValueError(f"hessian must be a 2x2 matrix; got shape {h.shape}")
    det = float(np.linalg.det(h))
    return math.inf if det <= 0 else 2.0 * math.pi * epsilon / math.sqrt(det)


def analyse(
    h_a: Any, h_b: Any, *, epsilon: float = 1.0, seeds: tuple[int, ...] = (0,), n_probes: int = 256
) -> dict[str, Any]:
    """Means, determinants, areas, inconsistency (closed form and sampled) of two 2-D Hessians.

    Args:
        h_a, h_b: (2,) diagonals or (2, 2) symmetric positive-definite Hessians.
        epsilon: the loss level ε.
        seeds: seeds of :func:`gradand.consistency.empirical_inconsistency`.
        n_probes: probe directions per environment pair and seed.

    Example:
        >>> from gradand.experiments.landscapes import analyse
        >>> r = analyse((0.05, 1.0), (1.0, 0.05), n_probes=64)
        >>> round(r["inconsistency"], 6), round(r["det"]["arithmetic"], 4), round(r["det"]["geometric"], 4)
        (20.0, 0.2756, 0.05)
    """
    mats = []
    for h in (h_a, h_b):
        h = np.asarray(h, dtype=np.float64)
        mats.append(np.diag(h) if h.ndim == 1 else h)
    stack = np.stack(mats)
    arith = arithmetic_mean(stack)
    geo = karcher_mean(stack)
    named = {"A": stack[0], "B": stack[1], "arithmetic": arith, "geometric": geo}
    losses = [lambda t, h=h: 0.5 * float(t @ h @ t) for h in stack]
    estimates = [
        empirical_inconsistency(losses, np.zeros(2), epsilon=epsilon, n_probes=n_probes, seed=s).value
        for s in seeds
    ]
    return {
        "hessians": {k: v.tolist() for k, v in named.items()},
        "det": {k: float(np.linalg.det(v)) for k, v in named.items()},
        "sublevel_area": {k: sublevel_area(v, epsilon) for k, v in named.items()},
        "inconsistency": inconsistency(stack, epsilon=epsilon),
        "ilc": ilc(stack, epsilon=epsilon),
        "pair_inconsistency": {
            "A->B": pair_inconsistency(stack[0], stack[1], epsilon=epsilon),
            "B->A": pair_inconsistency(stack[1], stack[0], epsilon=epsilon),
        },
        "proposition3_bound": proposition3_bound(stack[0], stack[1], epsilon=epsilon),
        "empirical_inconsistency": estimates,
    }


def run(
    *,
    scenarios: dict[str, tuple[Any, Any]] | None = None,
    epsilon: float = 1.0,
    seeds: tuple[int, ...] = (0, 1, 2),
    n_probes: int = 256,
    preset_name: str = "default",
) -> Any:
    """Analyse every scenario and test the paper's claims; a :class:`gradand.experiments._report.Report`.

    Example:
        >>> from gradand.experiments.landscapes import run
        >>> report = run(seeds=(0,))
        >>> all(c.passed for c in report.checks), len(report.checks)
        (True, 6)
    """
    from gradand.experiments._report import Check, Report, format_table

    scenarios = dict(SCENARIOS if scenarios is None else scenarios)
    results = {
        name: analyse(a, b, epsilon=epsilon, seeds=seeds, n_probes=n_probes)
        for name, (a, b) in scenarios.items()
    }
    rows = []
    for name, r in results.items():
        d = r["det"]
        rows.append(
            [
                name,
                f"diag{tuple(np.diag(np.asarray(r['hessians']['A'])).tolist())}",
                f"diag{tuple(np.diag(np.asarray(r['hessians']['B'])).tolist())}",
                f"{d['arithmetic']:.4f}",
                f"{d['geometric']:.4f}",
                f"{d['arithmetic'] / d['geometric']:.2f}",
                f"{r['inconsistency']:.2f}",
                f"{max(r['empirical_inconsistency']):.2f}",
                f"{r['proposition3_bound']:.1f}",
            ]
        )
    table = format_table(
        [
            "scenario",
            "H_A",
            "H_B",
            "det OR",
            "det AND",
            "OR/AND",
            f"I^ε (ε={epsilon:g})",
            "sampled",
            "Prop.3 bound",
        ],
        rows,
    )

    checks = []
    if {"swapped", "aligned"} <= set(results):
        s, a = results["swapped"], results["aligned"]
        rs = s["det"]["arithmetic"] / s["det"]["geometric"]
        ra = a["det"]["arithmetic"] / a["det"]["geometric"]
        checks.append(
            Check(
                f"the arithmetic mean hides the disagreement the geometric mean shows: det OR/AND is "
                f"{rs:.2f} when the environments are curved in swapped directions vs {ra:.2f} when aligned",
                rs > ra,
                {"swapped": rs, "aligned": ra},
            )
        )
        checks.append(
            Check(
                f"swapped curvatures are less consistent: I^ε {s['inconsistency']:.2f} > "
                f"{a['inconsistency']:.2f}",
                s["inconsistency"] > a["inconsistency"],
                {"swapped": s["inconsistency"], "aligned": a["inconsistency"]},
            )
        )
    for name, r in results.items():
        top = max(r["empirical_inconsistency"])
        closed = r["inconsistency"]
        checks.append(
            Check(
                f"{name}: sampled inconsistency {top:.3f} is within [0.9, 1] x the closed form {closed:.3f}",
                0.9 * closed <= top <= closed * (1 + 1e-9),
                {"sampled": r["empirical_inconsistency"], "closed_form": closed},
            )
        )
        bound = r["proposition3_bound"]
        checks.append(
            Check(
                f"{name}: Proposition 3 holds, I^ε {closed:.3f} <= bound {bound:.3f}",
                closed <= bound,
                {"inconsistency": closed, "bound": bound},
            )
        )

    def draw(plt: Any) -> Any:
        n = len(results)
        fig, axes = plt.subplots(n, 4, figsize=(13, 3.3 * n), squeeze=False)
        grid = np.linspace(-6, 6, 241)
        xx, yy = np.meshgrid(grid, grid)
        pts = np.stack([xx, yy], axis=-1)
        titles = {
            "A": "L_A",
            "B": "L_B",
            "arithmetic": "OR: arithmetic mean",
            "geometric": "AND: geometric mean",
        }
        for row, (name, r) in zip(axes, results.items()):
            for ax, key in zip(row, titles):
                h = np.asarray(r["hessians"][key])
                z = 0.5 * np.einsum("...i,ij,...j->...", pts, h, pts)
                ax.contourf(xx, yy, z, levels=np.linspace(0, 4 * epsilon, 17), cmap="viridis", extend="max")
                ax.contour(xx, yy, z, levels=[epsilon], colors="white", linewidths=1.5)
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{titles[key]}\ndet {r['det'][key]:.3g}", fontsize=9)
            row[0].set_ylabel(f"{name}\nI^ε = {r['inconsistency']:.3g}")
        fig.suptitle(f"Loss landscapes near θ* (white: the ε = {epsilon:g} sublevel set)", fontsize=11)
        fig.tight_layout()
        return fig

    config = {
        "preset": preset_name,
        "scenarios": {
            k: [np.asarray(a, float).tolist(), np.asarray(b, float).tolist()]
            for k, (a, b) in scenarios.items()
        },
        "epsilon": epsilon,
        "seeds": list(seeds),
        "n_probes": n_probes,
        "backend": "numpy",
    }
    return Report("consistency", config, results, checks, table, draw, [])
