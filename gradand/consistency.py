"""Consistency of minima across environments (paper §2): inconsistency I^ε and ILC.

For a minimum θ* and environments A, B, the inconsistency is the worst change
of B's loss inside A's ε-sublevel region around θ*:

    I^ε(θ*) = max_{A ≠ B}  max_{θ ∈ N^ε_{A,θ*}} |L_B(θ) - L_A(θ*)|,   ILC = -E[I^ε].

Under the quadratic approximation with zero loss at θ* (``L_e = ½ δᵀ H_e δ``),
A's sublevel set is an ellipsoid and ``I^ε = ε · max_{A≠B} λ_max(H_A⁻¹ H_B)``,
a generalised eigenvalue. A direction that is flat in A (``H_A`` singular) but
curved in B gives ``inf``: A does not constrain it, B does.

Everything here works on numpy arrays (other arrays are converted with
``numpy.asarray``): generalised eigenproblems are outside the array API.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "InconsistencyEstimate",
    "arithmetic_mean",
    "empirical_inconsistency",
    "ilc",
    "inconsistency",
    "karcher_mean",
    "pair_inconsistency",
    "proposition3_bound",
]


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon must be a number > 0; got {epsilon!r}")
    if not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite; got {epsilon}")
    return float(epsilon)


def _as_hessians(hessians: Any, name: str = "hessians") -> tuple[np.ndarray, bool]:
    """A float64 stack of Hessians: (E, P, P) full or (E, P) diagonals."""
    h = np.asarray(hessians)
    if h.dtype.kind not in "fiu" or h.dtype == bool:
        raise TypeError(f"{name} must be real numbers; got dtype {h.dtype}")
    h = h.astype(np.float64)
    if h.ndim == 2:
        diagonal = True
    elif h.ndim == 3:
        diagonal = False
        if h.shape[1] != h.shape[2]:
            raise ValueError(f"{name} must be square matrices (E, P, P); got shape {h.shape}")
        if not np.allclose(h, np.swapaxes(h, 1, 2), rtol=1e-8, atol=1e-12):
            raise ValueError(f"{name} must be symmetric")
    else:
        raise ValueError(
            f"{name} must have shape (E, P, P) (full Hessians) or (E, P) (diagonals); got shape {h.shape}"
        )
    if h.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 environments; got {h.shape[0]}")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{name} contains NaN or Inf")
    return h, diagonal


def _psd_check(h: np.ndarray, diagonal: bool, name: str) -> None:
    scale = max(float(np.max(np.abs(h))), 1.0)
    lows = h.min(axis=-1) if diagonal else np.linalg.eigvalsh(h).min(axis=-1)
    if np.any(lows < -1e-10 * scale):
        e = int(np.argmin(lows))
        raise ValueError(
            f"{name}[{e}] is not positive semi-definite (smallest eigenvalue "
            f"{float(lows[e]):.3g}): θ* is not a minimum of that environment's quadratic"
        )


def _pair_ratio_diag(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    flat_a = a <= tol
    if np.any(flat_a & (b > tol)):
        return math.inf
    keep = ~flat_a
    if not np.any(keep):
        return 0.0
    return float(np.max(b[keep] / a[keep]))


def _pair_ratio_full(ha: np.ndarray, hb: np.ndarray, tol: float) -> float:
    """λ_max of the pencil (H_B, H_A), with ∞ where A is flat but B is not."""
    w, u = np.linalg.eigh(ha)
    flat = w <= tol
    if np.any(flat):
        n = u[:, flat]
        if np.linalg.eigvalsh(n.T @ hb @ n).max() > tol:
            return math.inf
    if not np.any(~flat):
        return 0.0
    r = u[:, ~flat] / np.sqrt(w[~flat])
    return float(np.linalg.eigvalsh(r.T @ hb @ r).max())


def pair_inconsistency(hessian_a: Any, hessian_b: Any, *, epsilon: float = 1.0) -> float:
    """``ε · λ_max(H_A⁻¹ H_B)``: worst rise of ``L_B`` inside A's ε-sublevel set.

    Not symmetric in (A, B); :func:`inconsistency` takes the max over ordered pairs.
    Accepts (P, P) matrices or (P,) diagonals.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import pair_inconsistency
        >>> pair_inconsistency(np.array([0.05, 1.0]), np.array([1.0, 0.05]), epsilon=0.1)
        2.0
    """
    epsilon = _check_epsilon(epsilon)
    h, _ = _as_hessians(np.stack([np.asarray(hessian_a), np.asarray(hessian_b)]), "hessians")
    return float(_pairs(h, epsilon)[0][0, 1])


def _pairs(h: np.ndarray, epsilon: float) -> tuple[np.ndarray, bool]:
    diagonal = h.ndim == 2
    _psd_check(h, diagonal, "hessians")
    e = h.shape[0]
    tol = 1e-12 * max(float(np.max(np.abs(h))), 1e-300)
    out = np.zeros((e, e))
    for i in range(e):
        for j in range(e):
            if i == j:
                continue
            ratio = (_pair_ratio_diag if diagonal else _pair_ratio_full)(h[i], h[j], tol)
            out[i, j] = epsilon * ratio
    return out, diagonal


def inconsistency(hessians: Any, *, epsilon: float = 1.0) -> float:
    """Inconsistency ``I^ε`` of a minimum from per-environment Hessians (quadratic approximation).

    ``I^ε = ε · max_{A≠B} λ_max(H_A⁻¹ H_B)``: at least ``ε`` (equal Hessians
    give exactly ``ε``), scale-invariant (multiplying every Hessian by c > 0
    changes nothing), ``inf`` where some direction is flat in one environment
    and curved in another.

    Args:
        hessians: shape (E, P, P) for full symmetric PSD Hessians (generalised
            eigenproblem), or (E, P) for diagonal Hessians (fast path:
            ``ε · max_i max_{A,B} h^B_i / h^A_i``).
        epsilon: the loss level ε > 0 that defines the sublevel regions.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> h = np.array([[0.05, 1.0], [1.0, 0.05]])  # diag(0.05, 1) and diag(1, 0.05)
        >>> gradand.consistency.inconsistency(h, epsilon=1.0)
        20.0
    """
    epsilon = _check_epsilon(epsilon)
    h, _ = _as_hessians(hessians)
    return float(np.max(_pairs(h, epsilon)[0]))


def ilc(hessians: Any, *, epsilon: float = 1.0) -> float:
    """Invariant learning consistency ``ILC = -I^ε`` for one minimum.

    For a training algorithm that finds a distribution of minima, average this
    over the minima it finds (``ILC = -E[I^ε]``). Higher (closer to ``-ε``) is
    more consistent.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> gradand.consistency.ilc(np.array([[1.0, 2.0], [1.0, 2.0]]), epsilon=0.5)
        -0.5
    """
    return -inconsistency(hessians, epsilon=epsilon)


def arithmetic_mean(matrices: Any) -> np.ndarray:
    """Arithmetic mean of Hessians: the landscape of the averaged loss (the logical OR).

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import arithmetic_mean
        >>> arithmetic_mean(np.array([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])])).diagonal()
        array([0.525, 0.525])
    """
    h, _ = _as_hessians(matrices, "matrices")
    return h.mean(axis=0)


def _sqrt_and_inv_sqrt(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, u = np.linalg.eigh(x)
    return (u * np.sqrt(w)) @ u.T, (u / np.sqrt(w)) @ u.T


def _sym_fn(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    w, u = np.linalg.eigh((x + x.T) / 2)
    return (u * fn(w)) @ u.T


def karcher_mean(matrices: Any, *, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """Geometric (Karcher) mean of symmetric positive-definite matrices (the logical AND).

    The unique SPD ``X`` with ``Σ_e log(X^{-½} H_e X^{-½}) = 0``, found by the
    Riemannian fixed-point iteration. For commuting matrices it is the
    element-wise geometric mean of their eigenvalues; for (E, P) diagonals it
    returns that diagonal directly. Its determinant is the geometric mean of
    the determinants.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import karcher_mean
        >>> karcher_mean(np.array([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])])).diagonal().round(4)
        array([0.2236, 0.2236])
    """
    h, diagonal = _as_hessians(matrices, "matrices")
    if diagonal:
        if np.any(h <= 0):
            raise ValueError("matrices must be positive definite for the Karcher mean")
        return np.exp(np.log(h).mean(axis=0))
    if np.any(np.linalg.eigvalsh(h).min(axis=-1) <= 0):
        raise ValueError("matrices must be positive definite for the Karcher mean")
    x = h.mean(axis=0)
    for _ in range(max_iter):
        s, s_inv = _sqrt_and_inv_sqrt(x)
        step = np.mean([_sym_fn(s_inv @ m @ s_inv, np.log) for m in h], axis=0)
        x = s @ _sym_fn(step, np.exp) @ s
        if np.linalg.norm(step) < tol:
            break
    return (x + x.T) / 2


def proposition3_bound(hessian_a: Any, hessian_b: Any, *, epsilon: float = 1.0) -> float:
    """The paper's Proposition 3 bound ``I^ε ≤ 2ε (det H_{A+B} / det H_{A∧B})²``.

    For co-diagonalisable (commuting) SPD Hessians. ``H_{A+B} = H_A + H_B`` is
    the Hessian of the summed loss ``L_A + L_B`` and ``H_{A∧B}`` their
    geometric (Karcher) mean. (With the arithmetic *mean* in the numerator the
    inequality would fail already in one dimension once the curvature ratio
    exceeds 1 + √2, so the sum is the reading under which it holds.) The bound
    is large when the pooled landscape has much more volume-curvature than the
    AND landscape, i.e. when the environments disagree.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import proposition3_bound, inconsistency
        >>> a, b = np.diag([0.05, 1.0]), np.diag([1.0, 0.05])
        >>> bound = proposition3_bound(a, b, epsilon=1.0)
        >>> inconsistency(np.stack([a, b])) <= bound
        True
    """
    epsilon = _check_epsilon(epsilon)
    h, diagonal = _as_hessians(np.stack([np.asarray(hessian_a), np.asarray(hessian_b)]), "hessians")
    if diagonal:
        log_ratio = np.sum(np.log(h[0] + h[1]) - np.log(karcher_mean(h)))
    else:
        if not np.allclose(h[0] @ h[1], h[1] @ h[0], rtol=1e-8, atol=1e-10 * np.abs(h).max()):
            raise ValueError(
                "proposition3_bound needs co-diagonalisable Hessians (H_A H_B = H_B H_A); "
                "these do not commute"
            )
        _, logdet_sum = np.linalg.slogdet(h[0] + h[1])
        _, logdet_geo = np.linalg.slogdet(karcher_mean(h))
        log_ratio = logdet_sum - logdet_geo
    return float(2.0 * epsilon * np.exp(2.0 * log_ratio))


class InconsistencyEstimate(NamedTuple):
    """Result of :func:`empirical_inconsistency`.

    Attributes:
        value: the estimate of ``I^ε`` (a lower bound of the probed quantity).
        pair: ``(A, B)``, the ordered environment pair that attained it.
        point: the parameter vector where ``|L_B - L_A(θ*)|`` was largest.
        n_probes: probe directions used per ordered pair.
    """

    value: float
    pair: tuple[int, int]
    point: np.ndarray
    n_probes: int


def _boundary(
    loss: Callable[[np.ndarray], float],
    theta: np.ndarray,
    d: np.ndarray,
    level: float,
    max_radius: float,
    iters: int,
) -> float:
    """Largest t ≤ max_radius with loss(θ + t d) ≤ level along the ray (bisection)."""
    lo, hi = 0.0, 1e-3 * max_radius
    while hi < max_radius and float(loss(theta + hi * d)) <= level:
        lo, hi = hi, min(2.0 * hi, max_radius)
    if float(loss(theta + hi * d)) <= level:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(loss(theta + mid * d)) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def empirical_inconsistency(
    losses: Sequence[Callable[[np.ndarray], float]],
    theta_star: Any,
    *,
    epsilon: float = 1.0,
    n_probes: int = 256,
    n_steps: int = 8,
    max_radius: float = 1e3,
    seed: int = 0,
) -> InconsistencyEstimate:
    """Estimate ``I^ε`` for arbitrary per-environment losses of a flat parameter vector.

    For every ordered pair (A, B) and each of ``n_probes`` random unit
    directions ``d`` (the same directions for every pair), walk from θ* along
    ``d`` to the boundary of A's sublevel set ``{L_A ≤ L_A(θ*) + ε}`` (found
    by bisection, capped at ``max_radius``), evaluate ``|L_B - L_A(θ*)|`` at
    ``n_steps`` evenly spaced points of that segment, and keep the worst.

    Sampling error: every probed point lies inside A's sublevel region, so the
    estimate never exceeds the true ``I^ε``; it is a *lower bound* that is
    non-decreasing in ``n_probes`` for a fixed ``seed`` (the probes are
    nested). The gap closes slowly in high dimension: the directions within
    angle δ of the worst one are a fraction of order ``δ^(P-1)`` of the
    sphere, so with P parameters expect the estimate to approach the closed
    form from below only for ``n_probes`` ≫ ``(1/δ)^(P-1)``; compare minima
    with the same seed and probe budget rather than reading absolute values.
    A direction flat in A up to ``max_radius`` is probed out to
    ``max_radius`` (where the quadratic answer would be ``inf``).

    Args:
        losses: one callable per environment, ``L_e(theta) -> float``, on a flat
            float vector (backends provide these for models).
        theta_star: the minimum θ*, a 1-D array.
        epsilon: the loss level ε > 0.
        n_probes: directions per pair (≥ 1).
        n_steps: points evaluated per direction between θ* and the boundary.
        max_radius: how far to walk when A's loss stays below the level.
        seed: seed of the direction sampler.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import empirical_inconsistency
        >>> ha, hb = np.array([0.05, 1.0]), np.array([1.0, 0.05])
        >>> losses = [lambda t, h=h: 0.5 * float(np.sum(h * t * t)) for h in (ha, hb)]
        >>> est = empirical_inconsistency(losses, np.zeros(2), epsilon=1.0, n_probes=512)
        >>> 18.0 < est.value <= 20.0
        True
    """
    epsilon = _check_epsilon(epsilon)
    losses = list(losses)
    if len(losses) < 2:
        raise ValueError(f"losses needs at least 2 environments; got {len(losses)}")
    if not all(callable(f) for f in losses):
        raise TypeError("losses must be callables theta -> float, one per environment")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an int >= 1; got {n_probes!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}")
    theta = np.asarray(theta_star, dtype=np.float64)
    if theta.ndim != 1 or theta.size == 0:
        raise ValueError(f"theta_star must be a non-empty 1-D vector; got shape {theta.shape}")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_probes, theta.size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    base = [float(f(theta)) for f in losses]
    if not all(math.isfinite(b) for b in base):
        raise ValueError(f"a loss is not finite at theta_star: {base}")
    fractions = np.arange(1, n_steps + 1) / n_steps
    best = (-math.inf, (0, 1), theta)
    for a, loss_a in enumerate(losses):
        level = base[a] + epsilon
        for d in directions:
            t_max = _boundary(loss_a, theta, d, level, max_radius, iters=60)
            for f in fractions:
                point = theta + f * t_max * d
                for b, loss_b in enumerate(losses):
                    if b == a:
                        continue
                    value = abs(float(loss_b(point)) - base[a])
                    if value > best[0]:
                        best = (value, (a, b), point)
    return InconsistencyEstimate(best[0], best[1], best[2], n_probes)
