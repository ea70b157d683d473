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

Inputs and numerics, shared by every function here:

- Hessians are real: integer and floating arrays are converted to float64;
  boolean, complex and object arrays raise ``TypeError``. A list of
  per-environment arrays of different shapes, a size-0 parameter axis, too
  few environments, non-square or non-symmetric matrices (``|H - Hᵀ|`` above
  1e-8 of ``max |H|``) and NaN/Inf entries raise ``ValueError`` naming the
  argument (and the environment). Hessians are symmetrised, ``(H + Hᵀ)/2``.
- Scalars (``epsilon``, ``max_radius``, ``tol``) are real numbers (Python or
  numpy, not ``bool``), finite and > 0; counts (``n_probes``, ``n_steps``,
  ``max_iter``) are integers (``operator.index``) ≥ 1.
- Flat means "zero to working precision", judged for each Hessian against
  its own largest eigenvalue: an eigenvalue at or below ``8·√P·2⁻⁵²`` times
  it (2.5e-15 for P = 2, 1e-14 for P = 32) cannot be told from rounding
  error and counts as 0, so conditions up to ~1e14 are resolved and
  ``diag(1, 1e-12)`` against ``diag(2, 2e-12)`` is a ratio of 2. A direction
  flat in A is "curved in B" when B's curvature along it is above B's own
  rounding level; flat in both is ignored. Eigenvalues down to ``-1e-10``
  times the largest are accepted as rounding error of a PSD Hessian (and
  count as flat); lower ones raise ``ValueError``. The Karcher mean and
  Proposition 3 need positive definite matrices and refuse flat ones.
- Generalised eigenvalues come from whitening by a Cholesky factor of ``H_A``
  taken in its eigenbasis with a diagonal scaling, not from dividing by its
  computed eigenvalues: a pair ``(H, c·H)`` gives ``c`` to a few ulps when
  ``c·H`` is exact (c a power of two), and otherwise to within what rounding
  ``c·H`` to float64 itself changes (~``2⁻⁵²·cond(H)``), for conditions up to
  1e12 and beyond. Each matrix is first scaled by an exact power of two, so
  magnitudes from 1e-300 to 1e300 work; a ratio beyond the float64 range is
  ``inf`` (or 0).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
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

_ULP = float(np.finfo(np.float64).eps)
_SYMMETRY_RTOL = 1e-8  # |H - Hᵀ| allowed, relative to max |H|
_PSD_RTOL = 1e-10  # negative eigenvalues allowed as rounding, relative to the largest |eigenvalue|


# --------------------------------------------------------------------------- scalars


def _real(value: Any, name: str) -> float:
    """A finite real number (Python or numpy scalar, not bool) as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (int, float or numpy scalar); "
            f"got {value!r} ({type(value).__name__})"
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return out


def _positive(value: Any, name: str, meaning: str = "") -> float:
    out = _real(value, name)
    if not out > 0:
        raise ValueError(f"{name} must be > 0{meaning}; got {value!r}")
    return out


def _count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer (Python or numpy, not bool, not float) ≥ ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})")
    out = operator.index(value)
    if out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {out}")
    return out


def _check_epsilon(epsilon: Any) -> float:
    return _positive(epsilon, "epsilon", " (the loss level that defines the sublevel regions)")


# --------------------------------------------------------------------------- arrays


def _real_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 array; TypeError for bool, complex and non-numeric data."""
    if isinstance(value, (list, tuple)) and value:
        shapes = []
        for i, item in enumerate(value):
            try:
                shapes.append(np.shape(item))
            except ValueError as err:
                raise ValueError(f"{name}[{i}] is not a rectangular array: {err}") from None
        for i, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise ValueError(
                    f"{name}[{i}] has shape {shape} but {name}[0] has shape {shapes[0]}: every "
                    "environment's Hessian must have the same shape (the same P parameters)"
                )
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be an array of real numbers; got {type(value).__name__} ({err})"
        ) from None
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} must hold real numbers, not booleans; got dtype {arr.dtype}")
    if kind == "c":
        raise TypeError(
            f"{name} must hold real numbers; got complex dtype {arr.dtype} (Hessians of real losses are real)"
        )
    if kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype} from {type(value).__name__}")
    return arr.astype(np.float64)


def _check_stack(h: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Finite, square, symmetric; returns the symmetrised stack. ``names[e]`` names environment e."""
    diagonal = h.ndim == 2
    bad = np.argwhere(~np.isfinite(h))
    if bad.size:
        e, *where = (int(i) for i in bad[0])
        raise ValueError(f"{names[e]} contains NaN or Inf (value {h[(e, *where)]} at index {tuple(where)})")
    if diagonal:
        return h
    asym = np.max(np.abs(h - np.swapaxes(h, 1, 2)), axis=(1, 2))
    scale = np.max(np.abs(h), axis=(1, 2))
    for e in range(h.shape[0]):
        if asym[e] > _SYMMETRY_RTOL * scale[e]:
            raise ValueError(
                f"{names[e]} is not symmetric (max |H - Hᵀ| = {asym[e]:.3g}, max |H| = {scale[e]:.3g}); "
                "a Hessian is symmetric: pass (H + Hᵀ)/2 if the asymmetry is rounding"
            )
    return 0.5 * h + 0.5 * np.swapaxes(h, 1, 2)


def _as_hessians(value: Any, name: str = "hessians", *, min_envs: int = 2) -> tuple[np.ndarray, bool]:
    """A symmetrised float64 stack of Hessians: (E, P, P) full or (E, P) diagonals."""
    h = _real_array(value, name)
    if h.ndim not in (2, 3):
        raise ValueError(
            f"{name} must have shape (E, P, P) (full Hessians) or (E, P) (diagonals); got shape {h.shape}"
        )
    if h.shape[0] < min_envs:
        raise ValueError(
            f"{name} needs at least {min_envs} environment{'s' if min_envs > 1 else ''}; "
            f"got {h.shape[0]} (shape {h.shape})"
        )
    if h.ndim == 3 and h.shape[1] != h.shape[2]:
        raise ValueError(f"{name} must be square matrices (E, P, P); got shape {h.shape}")
    if h.shape[1] == 0:
        raise ValueError(f"{name} has shape {h.shape}: each Hessian needs at least one parameter (P >= 1)")
    h = _check_stack(h, [f"{name}[{e}]" for e in range(h.shape[0])])
    return h, h.ndim == 2


def _as_pair(hessian_a: Any, hessian_b: Any) -> tuple[np.ndarray, bool]:
    """``(hessian_a, hessian_b)`` as a validated (2, P, P) or (2, P) stack."""
    a = _real_array(hessian_a, "hessian_a")
    b = _real_array(hessian_b, "hessian_b")
    for name, x in (("hessian_a", a), ("hessian_b", b)):
        if x.ndim not in (1, 2):
            raise ValueError(
                f"{name} must have shape (P, P) (a Hessian) or (P,) (its diagonal); got shape {x.shape}"
            )
        if x.ndim == 2 and x.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must be a square (P, P) matrix; got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"{name} has shape {x.shape}: a Hessian needs at least one parameter (P >= 1)")
    if a.shape != b.shape:
        raise ValueError(
            f"hessian_a has shape {a.shape} and hessian_b has shape {b.shape}: they must have the same "
            "shape (both (P, P) matrices or both (P,) diagonals over the same P parameters)"
        )
    h = _check_stack(np.stack([a, b]), ["hessian_a", "hessian_b"])
    return h, h.ndim == 2


# --------------------------------------------------------------------------- spectra


def _flat_rtol(p: int) -> float:
    """Relative size below which an eigenvalue of a P×P symmetric matrix is rounding error."""
    return 8.0 * math.sqrt(p) * _ULP


def _pow2_scale(h: np.ndarray) -> np.ndarray:
    """Per-environment powers of two ``s_e`` with ``max |h_e| / s_e`` in [1, 2) (1 for a zero matrix)."""
    peak = np.max(np.abs(h.reshape(h.shape[0], -1)), axis=1)
    _, exponent = np.frexp(np.where(peak > 0, peak, 1.0))
    return np.ldexp(1.0, exponent - 1)


class _Spectrum(NamedTuple):
    h: np.ndarray  # the stack scaled by powers of two, (E, P, P) or (E, P)
    scale: np.ndarray  # the powers of two: original = scale[e] · h[e]
    w: np.ndarray  # eigenvalues (ascending), (E, P); the diagonals themselves for (E, P)
    u: np.ndarray | None  # eigenvectors, (E, P, P); None for diagonals
    tol: np.ndarray  # per environment: eigenvalues <= tol[e] are flat


def _spectrum(h: np.ndarray, names: Sequence[str], *, positive_definite: bool, why: str) -> _Spectrum:
    scale = _pow2_scale(h)
    hs = h / (scale[:, None] if h.ndim == 2 else scale[:, None, None])
    if hs.ndim == 2:
        w, u = np.sort(hs, axis=1), None
    else:
        w, u = np.linalg.eigh(hs)
    top = np.max(np.abs(w), axis=1)
    tol = _flat_rtol(h.shape[1]) * top
    for e in range(h.shape[0]):
        low = float(w[e, 0])
        if low < -_PSD_RTOL * top[e]:
            raise ValueError(
                f"{names[e]} is not positive {'definite' if positive_definite else 'semi-definite'} "
                f"(smallest eigenvalue {low * scale[e]:.3g}, largest {top[e] * scale[e]:.3g}): {why}"
            )
        if positive_definite and low <= tol[e]:
            raise ValueError(
                f"{names[e]} is singular to working precision (smallest eigenvalue {low * scale[e]:.3g}, "
                f"largest {top[e] * scale[e]:.3g}, ratio below {_flat_rtol(h.shape[1]):.2g}): {why}"
            )
    return _Spectrum(hs, scale, w, u, tol)


def _sym(x: np.ndarray) -> np.ndarray:
    return 0.5 * x + 0.5 * x.T


class _Whitener(NamedTuple):
    """A factor ``F = U D L`` of an SPD matrix ``H = F Fᵀ``, accurate for graded spectra."""

    u: np.ndarray
    d: np.ndarray
    chol: np.ndarray | None

    def whiten(self, m: np.ndarray) -> np.ndarray:
        """``F⁻¹ m F⁻ᵀ`` (symmetrised)."""
        x = _sym(self.u.T @ m @ self.u) / np.outer(self.d, self.d)
        if self.chol is not None:
            x = np.linalg.solve(self.chol, np.linalg.solve(self.chol, x).T)
        return _sym(x)

    def factor(self) -> np.ndarray:
        f = self.u * self.d
        return f if self.chol is None else f @ self.chol


def _whitener(h: np.ndarray, w: np.ndarray, u: np.ndarray) -> _Whitener:
    """Whiten by ``H`` restricted to the eigenvectors ``u`` (eigenvalues ``w``, all > 0).

    ``Uᵀ H U`` is diagonal up to rounding of order ``ulp·‖H‖``; its diagonally
    scaled version ``D⁻¹ Uᵀ H U D⁻¹`` is the identity up to rounding relative
    to each pair of eigenvalues, so its Cholesky factor is well conditioned and
    ``F⁻¹ H F⁻ᵀ`` is the identity to working precision whatever the condition
    of ``H`` (dividing by the computed eigenvalues instead would leave errors
    of order ``ulp·cond(H)``).
    """
    ht = _sym(u.T @ h @ u)
    diag = np.diagonal(ht)
    if np.all(diag > 0):
        d = np.sqrt(diag)
        try:
            return _Whitener(u, d, np.linalg.cholesky(_sym(ht / np.outer(d, d))))
        except np.linalg.LinAlgError:
            pass
    return _Whitener(u, np.sqrt(w), None)


# --------------------------------------------------------------------------- inconsistency


def _ratios_from(s: _Spectrum, a: int) -> np.ndarray:
    """``λ_max`` of the pencils ``(H_B, H_A)`` for every B (entry a is 0).

    ``inf`` where some direction is flat in A (eigenvalue <= ``s.tol[a]``) but
    curved in B (B's curvature there > ``s.tol[b]``); directions flat in both
    are ignored; on the rest, whitening by A's Cholesky factor (see
    :func:`_whitener`).
    """
    e = s.h.shape[0]
    out = np.zeros(e)
    if s.u is None:  # diagonals: the entries are the eigenvalues, in parameter order
        flat = s.h[a] <= s.tol[a]
        keep = ~flat
        for b in range(e):
            if b == a:
                continue
            if np.any(flat & (s.h[b] > s.tol[b])):
                out[b] = math.inf
            elif np.any(keep):
                out[b] = float(np.max(s.h[b][keep] / s.h[a][keep]))
    else:
        u = s.u[a]
        flat = s.w[a] <= s.tol[a]
        keep = ~flat
        null = u[:, flat]
        whitener = _whitener(s.h[a], s.w[a][keep], u[:, keep]) if np.any(keep) else None
        for b in range(e):
            if b == a:
                continue
            if null.shape[1] and float(np.linalg.eigvalsh(_sym(null.T @ s.h[b] @ null)).max()) > s.tol[b]:
                out[b] = math.inf
            elif whitener is not None:
                out[b] = float(np.linalg.eigvalsh(whitener.whiten(s.h[b])).max())
    # undo the powers of two (inf stays inf even if the scales underflow); a ratio <= 0 means
    # B is flat wherever A is curved
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scaled = out * (s.scale / s.scale[a])
    return np.where(np.isinf(out), math.inf, np.where(out > 0, scaled, 0.0))


_PSD_WHY = "θ* is not a minimum of that environment's quadratic"


def _pairs(h: np.ndarray, names: Sequence[str], epsilon: float) -> np.ndarray:
    """``ε · λ_max(H_A⁻¹ H_B)`` for every ordered pair, ``[A, B]``; 0 on the diagonal."""
    s = _spectrum(h, names, positive_definite=False, why=_PSD_WHY)
    ratios = np.stack([_ratios_from(s, a) for a in range(h.shape[0])])
    with np.errstate(over="ignore"):
        return epsilon * ratios


def pair_inconsistency(hessian_a: Any, hessian_b: Any, *, epsilon: float = 1.0) -> float:
    """``ε · λ_max(H_A⁻¹ H_B)``: worst rise of ``L_B`` inside A's ε-sublevel set.

    Not symmetric in (A, B); :func:`inconsistency` takes the max over ordered pairs.
    Accepts two (P, P) matrices or two (P,) diagonals (the same shape); see the
    module notes for what is validated and what counts as flat.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import pair_inconsistency
        >>> pair_inconsistency(np.array([0.05, 1.0]), np.array([1.0, 0.05]), epsilon=0.1)
        2.0
        >>> round(pair_inconsistency(np.diag([1.0, 1e-12]), np.diag([2.0, 2e-12])), 12)  # condition 1e12
        2.0
    """
    epsilon = _check_epsilon(epsilon)
    h, _ = _as_pair(hessian_a, hessian_b)
    return float(_pairs(h, ["hessian_a", "hessian_b"], epsilon)[0, 1])


def inconsistency(hessians: Any, *, epsilon: float = 1.0) -> float:
    """Inconsistency ``I^ε`` of a minimum from per-environment Hessians (quadratic approximation).

    ``I^ε = ε · max_{A≠B} λ_max(H_A⁻¹ H_B)``: at least ``ε`` (equal Hessians
    give exactly ``ε``; all-zero Hessians give 0: nothing curves),
    scale-invariant (multiplying every Hessian by c > 0 changes nothing),
    ``inf`` where some direction is flat in one environment and curved in
    another. Flat is relative to each Hessian's own largest
    curvature and the rounding level (see the module notes): ``diag(1, 1e-12)``
    against ``diag(2, 2e-12)`` is a ratio of 2; an exactly singular ``H_A``
    against a curved ``H_B`` is ``inf``.

    Args:
        hessians: shape (E, P, P) for full symmetric PSD Hessians (generalised
            eigenproblem), or (E, P) for diagonal Hessians (fast path:
            ``ε · max_i max_{A,B} h^B_i / h^A_i``); E >= 2. A list of E
            arrays of the same shape works too.
        epsilon: the loss level ε > 0 that defines the sublevel regions.

    Raises:
        ValueError: shapes (ragged, size 0, fewer than 2 environments,
            non-square), NaN/Inf, non-symmetric or non-PSD Hessians, epsilon <= 0.
        TypeError: non-real data (bool, complex, object) or a non-number epsilon.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> h = np.array([[0.05, 1.0], [1.0, 0.05]])  # diag(0.05, 1) and diag(1, 0.05)
        >>> gradand.consistency.inconsistency(h, epsilon=1.0)
        20.0
    """
    epsilon = _check_epsilon(epsilon)
    h, _ = _as_hessians(hessians)
    return float(np.max(_pairs(h, [f"hessians[{e}]" for e in range(h.shape[0])], epsilon)))


def ilc(hessians: Any, *, epsilon: float = 1.0) -> float:
    """Invariant learning consistency ``ILC = -I^ε`` for one minimum.

    For a training algorithm that finds a distribution of minima, average this
    over the minima it finds (``ILC = -E[I^ε]``). Higher (closer to ``-ε``) is
    more consistent. Arguments and errors as in :func:`inconsistency`.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> gradand.consistency.ilc(np.array([[1.0, 2.0], [1.0, 2.0]]), epsilon=0.5)
        -0.5
    """
    return -inconsistency(hessians, epsilon=epsilon)


# --------------------------------------------------------------------------- means


def arithmetic_mean(matrices: Any) -> np.ndarray:
    """Arithmetic mean of Hessians: the landscape of the averaged loss (the logical OR).

    ``matrices`` is (E, P, P) symmetric or (E, P) diagonals, E >= 1 (the mean
    of one matrix is itself). The Hessians need not be PSD: the mean of any
    symmetric Hessians is the Hessian of the averaged loss.

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import arithmetic_mean
        >>> arithmetic_mean(np.array([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])])).diagonal()
        array([0.525, 0.525])
    """
    h, _ = _as_hessians(matrices, "matrices", min_envs=1)
    scale = float(np.max(_pow2_scale(h)))  # a power of two: no overflow, no extra rounding
    return (h / scale).mean(axis=0) * scale


_SPD_WHY = "the geometric (Karcher) mean needs symmetric positive-definite matrices"


def _log_eig(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log λ, V)`` of an SPD matrix ``m = V diag(λ) Vᵀ``; λ clipped at the smallest normal number."""
    lam, v = np.linalg.eigh(m)
    return np.log(np.maximum(lam, np.finfo(np.float64).tiny)), v


def _karcher_whitened(m: list[np.ndarray], tol: float, max_iter: int) -> tuple[np.ndarray, float, bool]:
    """Karcher mean ``G = K Kᵀ`` of whitened SPD matrices ``m`` by Riemannian gradient descent from ``I``.

    Each step moves the estimate to ``exp(t·S)`` in the current whitened frame,
    ``S = mean_e log M_e`` (the Riemannian gradient up to a factor), and
    re-whitens every ``M_e`` by the congruence ``exp(-tS/2)``, so nothing is
    ever inverted. Step: the better (smaller next ``‖S‖``) of ``t = 1``, the
    classic fixed-point step, exact for commuting matrices but oscillating or
    diverging for matrices far apart, and ``t = 2/(1 + L)``, the best fixed
    step for curvatures in ``[1, L]``, ``L = mean_e (Δ_e/2) coth(Δ_e/2)``,
    ``Δ_e = log cond(M_e)`` (the bound on the Hessian of the squared
    distance behind Bini & Iannazzo's 2013 step size); halved until ``‖S‖`` falls if
    neither does (the sum of squared distances is geodesically strictly
    convex). It stops at ``‖S‖_F <= tol`` or when ``‖S‖`` has stopped
    falling (no new low below 0.9 of the last one in 10 steps: the rounding
    floor of the data) and returns the iterate with the smallest ``‖S‖``:
    ``(K, ‖S‖, done)``, ``done`` False only when ``max_iter`` ran out first.
    """
    n = len(m)
    factor = np.eye(m[0].shape[0])

    def gradient(m: list[np.ndarray]) -> tuple[np.ndarray, float, float]:
        s = np.zeros_like(m[0])
        curvature = 0.0
        for x in m:
            lw, v = _log_eig(x)
            s += (v * lw) @ v.T
            half = 0.5 * float(lw[-1] - lw[0])
            curvature += half / math.tanh(half) if half > 1e-8 else 1.0
        s = _sym(s / n)
        return s, float(np.linalg.norm(s)), curvature / n

    def step(m: list[np.ndarray], sig: np.ndarray, v: np.ndarray, t: float) -> tuple[Any, ...]:
        half_inv = (v * np.exp(-0.5 * t * sig)) @ v.T
        m_new = [_sym(half_inv @ x @ half_inv) for x in m]
        return (*gradient(m_new), m_new, t)

    s, norm, curvature = gradient(m)
    best = (factor, norm)
    reference, stalled = norm, 0
    for _ in range(max_iter):
        if norm <= tol:
            return factor, norm, True
        sig, v = np.linalg.eigh(s)
        trials = [step(m, sig, v, 1.0)]
        if curvature > 1.0 + 1e-6:
            trials.append(step(m, sig, v, 2.0 / (1.0 + curvature)))
        trial = min(trials, key=lambda r: r[1])
        t = min(r[-1] for r in trials)
        for _ in range(50):
            if trial[1] < norm:
                break
            t *= 0.5
            trial = step(m, sig, v, t)
        else:  # no step lowers it: the rounding floor
            return (*best, True)
        s, norm, curvature, m, t = trial
        factor = factor @ ((v * np.exp(0.5 * t * sig)) @ v.T)
        if norm < best[1]:
            best = (factor, norm)
        if norm < 0.9 * reference:
            reference, stalled = norm, 0
        else:
            stalled += 1
            if stalled >= 10:
                return (*best, True)
    if norm <= tol:
        return factor, norm, True
    return (*best, False)


def karcher_mean(matrices: Any, *, tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """Geometric (Karcher) mean of symmetric positive-definite matrices (the logical AND).

    The unique SPD ``X`` with ``Σ_e log(X^{-½} H_e X^{-½}) = 0``. For commuting
    matrices it is the element-wise geometric mean of their eigenvalues; for
    (E, P) diagonals it returns that diagonal directly. Its determinant is the
    geometric mean of the determinants. One matrix is its own mean; for two it
    is the closed form ``A # B = F (F⁻¹ B F⁻ᵀ)^{½} Fᵀ`` with ``A = F Fᵀ``
    (``= A^{½}(A^{-½} B A^{-½})^{½}A^{½}``); for three or more, Riemannian
    gradient descent with backtracking in the whitened frame of the current
    estimate (symmetric eigendecompositions only, every intermediate
    symmetrised), which stays accurate for condition numbers up to ~1e12.

    Args:
        matrices: (E, P, P) SPD matrices or (E, P) positive diagonals, E >= 1.
            A matrix whose smallest eigenvalue is rounding error relative to
            its largest (see the module notes) is refused as singular.
        tol: stop when the Riemannian gradient ``‖mean_e log(X^{-½} H_e X^{-½})‖_F``
            is at most ``tol`` (> 0; three or more matrices only).
        max_iter: the most iterations (>= 1). Running out of them before
            ``tol`` or the rounding floor is reached warns (RuntimeWarning).

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import karcher_mean
        >>> karcher_mean(np.array([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])])).diagonal().round(4)
        array([0.2236, 0.2236])
    """
    tol = _positive(tol, "tol", " (the gradient norm at which the iteration stops)")
    max_iter = _count(max_iter, "max_iter")
    h, diagonal = _as_hessians(matrices, "matrices", min_envs=1)
    names = [f"matrices[{e}]" for e in range(h.shape[0])]
    s = _spectrum(h, names, positive_definite=True, why=_SPD_WHY)
    if all(np.array_equal(x, h[0]) for x in h[1:]):
        return h[0].copy()
    e = h.shape[0]
    # the scaled matrices' mean, times the geometric mean of the powers of two s_e = 2^k_e:
    # 2^(Σk/E) = 2^whole · 2^(rest/E), so no rounding of a large exponent reaches the result
    whole, rest = divmod(int(np.sum(np.frexp(s.scale)[1] - 1)), e)

    def unscale(x: np.ndarray) -> np.ndarray:
        return np.ldexp(x * 2.0 ** (rest / e), whole)

    if diagonal:
        return unscale(np.exp(np.log(s.h).mean(axis=0)))
    if e == 2:
        # whiten by the better-conditioned matrix (ties broken by the entries), so that the
        # mean of (A, B) and of (B, A) are the same numbers
        first, second = sorted((0, 1), key=lambda i: (float(s.w[i, -1] / s.w[i, 0]), s.h[i].ravel().tolist()))
        frame = _whitener(s.h[first], s.w[first], s.u[first])
        lam, v = np.linalg.eigh(frame.whiten(s.h[second]))
        root = (v * np.sqrt(np.maximum(lam, 0.0))) @ v.T
        f = frame.factor()
        x = f @ root @ f.T
    else:
        center = s.h.mean(axis=0)
        w, u = np.linalg.eigh(center)
        frame = _whitener(center, w, u)
        factor, norm, done = _karcher_whitened([frame.whiten(x) for x in s.h], tol, max_iter)
        if not done:
            warnings.warn(
                f"karcher_mean did not converge in max_iter={max_iter} iterations (gradient norm "
                f"{norm:.3g} > tol={tol:.3g}); the result is approximate: raise max_iter or tol",
                RuntimeWarning,
                stacklevel=2,
            )
        f = frame.factor() @ factor
        x = f @ f.T
    return unscale(_sym(x))


def proposition3_bound(hessian_a: Any, hessian_b: Any, *, epsilon: float = 1.0) -> float:
    """The paper's Proposition 3 bound ``I^ε ≤ 2ε (det H_{A+B} / det H_{A∧B})²``.

    For co-diagonalisable (commuting) SPD Hessians. ``H_{A+B} = H_A + H_B`` is
    the Hessian of the summed loss ``L_A + L_B`` and ``H_{A∧B}`` their
    geometric (Karcher) mean, whose determinant is ``√(det H_A det H_B)``.
    (With the arithmetic *mean* in the numerator the
    inequality would fail already in one dimension once the curvature ratio
    exceeds 1 + √2, so the sum is the reading under which it holds.) The bound
    is large when the pooled landscape has much more volume-curvature than the
    AND landscape, i.e. when the environments disagree. Computed from
    log-determinants; ``inf`` when it overflows.

    Raises ``ValueError`` for Hessians of different shapes, not positive
    definite (the geometric mean needs SPD), or that do not commute
    (``‖H_A H_B - H_B H_A‖ > 1e-8 ‖H_A‖ ‖H_B‖``).

    Example:
        >>> import numpy as np
        >>> from gradand.consistency import proposition3_bound, inconsistency
        >>> a, b = np.diag([0.05, 1.0]), np.diag([1.0, 0.05])
        >>> bound = proposition3_bound(a, b, epsilon=1.0)
        >>> inconsistency(np.stack([a, b])) <= bound
        True
    """
    epsilon = _check_epsilon(epsilon)
    h, diagonal = _as_pair(hessian_a, hessian_b)
    s = _spectrum(h, ["hessian_a", "hessian_b"], positive_definite=True, why=_SPD_WHY)
    # log det(A + B) - ½ (log det A + log det B) on the power-of-two scaled matrices
    # a = A / sa, b = B / sb: A + B = m (a·sa/m + b·sb/m) with m = max(sa, sb), exact powers of two
    sa, sb = float(s.scale[0]), float(s.scale[1])
    m = max(sa, sb)
    a, b = s.h
    if not diagonal:
        comm = float(np.linalg.norm(a @ b - b @ a))
        if comm > 1e-8 * float(np.linalg.norm(a)) * float(np.linalg.norm(b)):
            raise ValueError(
                "proposition3_bound needs co-diagonalisable Hessians (H_A H_B = H_B H_A); these do not "
                f"commute (‖H_A H_B - H_B H_A‖ = {comm * sa * sb:.3g}, ‖H_A‖ = {np.linalg.norm(a) * sa:.3g}, "
                f"‖H_B‖ = {np.linalg.norm(b) * sb:.3g})"
            )
    pooled = a * (sa / m) + b * (sb / m)
    sum_w = pooled if diagonal else np.linalg.eigvalsh(_sym(pooled))
    p = a.shape[0]
    log_ratio = float(
        np.sum(np.log(sum_w))
        + p * math.log(m)
        - 0.5 * (np.sum(np.log(s.w[0])) + np.sum(np.log(s.w[1])) + p * (math.log(sa) + math.log(sb)))
    )
    try:
        return 2.0 * epsilon * math.exp(2.0 * log_ratio)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------- empirical estimate


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


class _Loss:
    """One environment's loss, checked to return a real number and never NaN."""

    def __init__(self, fn: Callable[[np.ndarray], Any], index: int) -> None:
        self.fn = fn
        self.name = f"losses[{index}]"

    def __call__(self, theta: np.ndarray, t: float | None = None) -> float:
        """``L(theta)``, where ``theta = θ* + t·d`` (``t`` only names the point in errors)."""
        out = self.fn(theta)
        if type(out) is float and out == out:  # the common case, not NaN
            return out
        kind = getattr(getattr(out, "dtype", None), "kind", None)
        if isinstance(out, (str, bytes, bool, np.bool_, complex)) or kind in ("b", "c"):
            raise TypeError(f"{self.name} must return a real number; returned {out!r} ({type(out).__name__})")
        if isinstance(out, np.ndarray) and out.size == 1:
            out = out.reshape(())
        try:
            value = float(out)
        except (TypeError, ValueError):
            shape = getattr(out, "shape", None)
            raise TypeError(
                f"{self.name} must return a real number (a float or a one-element array); returned "
                f"{type(out).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")
            ) from None
        if math.isnan(value):
            where = "theta_star" if t is None else f"theta_star + {t:.6g}·d (d a unit probe direction)"
            raise ValueError(f"{self.name} returned NaN at {where}; the losses must be defined there")
        return value


def _boundary(
    loss: _Loss,
    theta: np.ndarray,
    d: np.ndarray,
    level: float,
    max_radius: float,
    iters: int,
) -> float:
    """Largest t ≤ max_radius with loss(θ + t d) ≤ level along the ray (bisection)."""

    def inside(t: float) -> bool:
        return loss(theta + t * d, t) <= level

    lo, hi = 0.0, 1e-3 * max_radius
    while hi < max_radius and inside(hi):
        lo, hi = hi, min(2.0 * hi, max_radius)
    if inside(hi):
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if inside(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _as_losses(losses: Any) -> list[_Loss]:
    if callable(losses) or isinstance(losses, (str, bytes)):
        raise TypeError(
            "losses must be a sequence of callables theta -> float, one per environment; "
            f"got a single {type(losses).__name__}"
        )
    try:
        items = list(losses)
    except TypeError:
        raise TypeError(
            "losses must be a sequence of callables theta -> float, one per environment; "
            f"got {type(losses).__name__}"
        ) from None
    if len(items) < 2:
        raise ValueError(f"losses needs at least 2 environments; got {len(items)}")
    for i, f in enumerate(items):
        if not callable(f):
            raise TypeError(
                f"losses must be callables theta -> float, one per environment; losses[{i}] is "
                f"{f!r} ({type(f).__name__})"
            )
    return [_Loss(f, i) for i, f in enumerate(items)]


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
        losses: a sequence of at least 2 callables, one per environment,
            ``L_e(theta) -> float``, on a flat float vector (backends provide
            these for models). Each must return a real number (a float or a
            one-element array); NaN anywhere probed raises ``ValueError``,
            ``inf`` counts as outside A's region / an infinite rise of B.
        theta_star: the minimum θ*, a non-empty, finite, real 1-D vector
            (integers are converted to float64).
        epsilon: the loss level ε > 0.
        n_probes: directions per pair (an int ≥ 1).
        n_steps: points evaluated per direction between θ* and the boundary (≥ 1).
        max_radius: how far to walk when A's loss stays below the level (finite, > 0).
        seed: seed of the direction sampler (an int ≥ 0).

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
    n_probes = _count(n_probes, "n_probes")
    n_steps = _count(n_steps, "n_steps")
    max_radius = _positive(max_radius, "max_radius", " (how far from theta_star to probe)")
    seed = _count(seed, "seed", minimum=0)
    checked = _as_losses(losses)
    theta = _real_array(theta_star, "theta_star")
    if theta.ndim != 1 or theta.size == 0:
        raise ValueError(f"theta_star must be a non-empty 1-D vector; got shape {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError(f"theta_star contains NaN or Inf (at index {int(np.argmin(np.isfinite(theta)))})")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_probes, theta.size))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    base = [f(theta) for f in checked]
    for f, b in zip(checked, base):
        if not math.isfinite(b):
            raise ValueError(f"{f.name} is {b} at theta_star; the losses must be finite at the minimum")
    fractions = np.arange(1, n_steps + 1) / n_steps
    best = (-math.inf, (0, 1), theta)
    for a, loss_a in enumerate(checked):
        level = base[a] + epsilon
        for d in directions:
            t_max = _boundary(loss_a, theta, d, level, max_radius, iters=60)
            for f in fractions:
                point = theta + f * t_max * d
                for b, loss_b in enumerate(checked):
                    if b == a:
                        continue
                    value = abs(loss_b(point, f * t_max) - base[a])
                    if value > best[0]:
                        best = (value, (a, b), point)
    return InconsistencyEstimate(best[0], best[1], best[2], n_probes)
