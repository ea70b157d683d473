"""The combiners: which statistics each needs, and how it finalizes them.

Each combiner is an immutable, hashable value. Its math lives in ``mask`` and
``direction``; :func:`gradand.finalize` applies ``mask ⊙ direction`` and the
per-tensor rescaling the same way for all of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

from gradand._stats import Statistics

__all__ = ["AndMask", "Combiner", "GeometricMean", "Mean", "SandMask"]


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _check_threshold(value: Any) -> float:
    value = _check_real("threshold", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"threshold must be in [0, 1] (the fraction of environments that must agree in sign); got {value}"
        )
    return value


def _check_positive(name: str, value: Any) -> float:
    value = _check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def agreement_from(stats: Statistics, xp: Any) -> Any:
    """|mean sign| over environments, from ``Σ sign(g)`` and the count."""
    return xp.abs(stats.sign_sum) / stats.count


def hard_mask(stats: Statistics, threshold: float, xp: Any) -> Any:
    """``agreement >= threshold`` as a boolean array, i.e. ``|Σ sign(g)| >= threshold · E``.

    ``Σ sign(g)`` holds integers exactly, so every entry point (dense,
    streaming, merged, all-reduced) compares the very same number; comparing
    the count with ``threshold · E`` (a Python scalar takes the array's dtype)
    also saves dividing the whole tensor by ``E``.
    """
    return xp.abs(stats.sign_sum) >= threshold * stats.count


class Combiner(abc.ABC):
    """A way to combine per-environment gradients into one update.

    A combiner names the additive :class:`~gradand.Statistics` it needs
    (``statistics``) and maps them to a ``direction`` and a ``mask`` in [0, 1];
    :func:`gradand.finalize` returns ``mask ⊙ direction``, rescaled per tensor
    by ``numel / Σ mask`` when ``rescale`` is true (0 where nothing survives).

    Subclass it to add a combiner: every entry point (dense, streaming,
    distributed, every backend) then supports it.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> isinstance(gradand.AndMask(), gradand.Combiner)
        True
    """

    #: The statistics this combiner needs (a subset of ``STATISTIC_NAMES``).
    statistics: ClassVar[tuple[str, ...]]
    rescale: bool = False

    @abc.abstractmethod
    def direction(self, stats: Statistics, xp: Any) -> Any:
        """The unmasked update direction (e.g. the mean gradient)."""

    def mask(self, stats: Statistics, xp: Any) -> Any | None:
        """The mask with the gradient's shape: boolean (keep or drop), or float in [0, 1]
        (a soft mask), or ``None`` for all ones."""
        return None


@dataclasses.dataclass(frozen=True)
class Mean(Combiner):
    """Plain averaging over environments (the logical OR): ``mean_e g_e``.

    It also collects ``Σ sign(g)`` so that the agreement can be logged.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> gradand.combine(np.array([[1.0, -1.0], [3.0, 2.0]]), gradand.Mean())
        array([2. , 0.5])
    """

    statistics: ClassVar[tuple[str, ...]] = ("sum", "sign_sum")

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.sum / stats.count


@dataclasses.dataclass(frozen=True)
class AndMask(Combiner):
    """The AND-mask: keep components on which a fraction ``threshold`` of environments agree in sign.

    agreement ``a = |mean_e sign(g_e)|`` (a zero gradient casts no vote), mask
    ``m = 1[a >= threshold]``, update ``m ⊙ mean_e g_e``. With ``rescale`` the
    surviving components of each tensor are multiplied by ``numel / Σ m`` (the
    reference code's ``scale_grad_inverse_sparsity``); a fully masked tensor
    gets a zero update. ``threshold=0`` is plain averaging (with ``rescale``
    a no-op, since nothing is masked).

    Args:
        threshold: τ in [0, 1]; 1 requires every environment to agree.
        rescale: rescale surviving components per tensor.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0, 2.0], [3.0, 2.0, 2.0]])
        >>> gradand.combine(g, gradand.AndMask(threshold=1.0, rescale=False))
        array([2., 0., 2.])
        >>> gradand.combine(g, gradand.AndMask(threshold=1.0))  # 2 of 3 survive: x 3/2
        array([3., 0., 3.])
    """

    threshold: float = 1.0
    rescale: bool = True
    statistics: ClassVar[tuple[str, ...]] = ("sum", "sign_sum")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        _check_bool("rescale", self.rescale)

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.sum / stats.count

    def mask(self, stats: Statistics, xp: Any) -> Any:
        return hard_mask(stats, self.threshold, xp)


@dataclasses.dataclass(frozen=True)
class GeometricMean(Combiner):
    """Masked geometric mean: ``sign(mean g) ⊙ exp(mean_e log(|g_e| + eps))``.

    The reference code's ``method='geom_mean'``: magnitudes shrink towards the
    smallest environment's, so one environment with a large gradient cannot
    dominate. Masked by the AND-mask with the same ``threshold`` and rescaled
    like :class:`AndMask`.

    Args:
        threshold: τ in [0, 1] for the AND-mask applied on top.
        rescale: rescale surviving components per tensor.
        eps: added to ``|g|`` before the log, so a zero gradient is finite.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0], [4.0, 2.0]])
        >>> gradand.combine(g, gradand.GeometricMean(rescale=False, eps=1e-12)).round(6)
        array([2., 0.])
    """

    threshold: float = 1.0
    rescale: bool = True
    eps: float = 1e-10
    statistics: ClassVar[tuple[str, ...]] = ("sum", "sign_sum", "log_abs_sum")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        _check_bool("rescale", self.rescale)
        object.__setattr__(self, "eps", _check_positive("eps", self.eps))

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return xp.sign(stats.sum) * xp.exp(stats.log_abs_sum / stats.count)

    def mask(self, stats: Statistics, xp: Any) -> Any:
        return hard_mask(stats, self.threshold, xp)


@dataclasses.dataclass(frozen=True)
class SandMask(Combiner):
    """The smoothed AND-mask (SAND-mask, Shahtalebi et al. 2021, as in DomainBed).

    ``m = max(0, tanh(k (a - threshold) / σ²))`` with ``a`` the agreement and
    ``σ²`` the unbiased variance of the gradient over environments; the update
    is ``m ⊙ mean_e g_e``, rescaled by ``numel / Σ m`` per tensor.

    Degenerate cases (documented, finite, no NaN patching): where ``σ² = 0``
    (all environments give the same value, and always when ``E = 1``) the mask
    is its limit as ``σ² → 0``: 1 where ``a > threshold``, 0 where
    ``a <= threshold``. DomainBed writes 1e-17 instead of NaN at
    ``a = threshold, σ² = 0``; here that entry is exactly 0. ``σ²`` comes from
    ``Σ g²`` and ``Σ g`` (float32 at least), so for environments whose
    gradients nearly coincide it carries cancellation error; the mask is then
    already saturated at 0 or 1.

    Args:
        threshold: τ in [0, 1]. DomainBed's default is 1.0, which masks
            everything (``a - 1 <= 0``); useful values are below 1.
        k: steepness (> 0); DomainBed's default is 10.
        rescale: rescale per tensor by ``numel / Σ m``.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0], [1.2, 1.0], [0.8, 0.5]])
        >>> gradand.combine(g, gradand.SandMask(threshold=0.5, k=10.0, rescale=False))
        array([1., 0.])
    """

    threshold: float
    k: float
    rescale: bool = True
    statistics: ClassVar[tuple[str, ...]] = ("sum", "sign_sum", "sq_sum")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        object.__setattr__(self, "k", _check_positive("k", self.k))
        _check_bool("rescale", self.rescale)

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.sum / stats.count

    def mask(self, stats: Statistics, xp: Any) -> Any:
        count = stats.count
        centered = stats.sq_sum - stats.sum * stats.sum / count
        centered = xp.where(centered > 0, centered, xp.zeros_like(centered))
        dof = count - 1 if isinstance(count, int) else xp.maximum(count - 1, xp.ones_like(count))
        var = centered / max(dof, 1) if isinstance(dof, int) else centered / dof
        a = agreement_from(stats, xp)
        excess = a - self.threshold
        positive = var > 0
        safe_var = xp.where(positive, var, xp.ones_like(var))
        soft = xp.tanh(self.k * excess / safe_var)
        soft = xp.where(soft > 0, soft, xp.zeros_like(soft))
        limit = xp.astype(excess > 0, a.dtype)
        return xp.where(positive, soft, limit)
