"""The combiners: which statistics each needs, and how it finalizes them.

Each combiner is an immutable, hashable value. Its math lives in ``mask`` and
``direction``; :func:`gradand.finalize` applies ``mask ⊙ direction`` and the
per-tensor rescaling the same way for all of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from typing import Any, ClassVar

from gradand._stats import Statistics, _float_field, required_votes

__all__ = ["AndMask", "Combiner", "GeometricMean", "Mean", "SandMask"]


def _check_real(name: str, value: Any) -> float:
    """A finite real number as a Python float (numpy scalars and 0-d numpy arrays accepted; bools refused)."""
    if getattr(value, "shape", None) == () and hasattr(value, "item") and not isinstance(value, numbers.Real):
        value = value.item()  # a 0-d array (numpy, torch, ...) holding a number
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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


def agreement_from(stats: Statistics, xp: Any, dtype: Any = None) -> Any:
    """``|mean sign|`` over environments, from the exact votes ``Σ sign(g)`` and the count.

    In ``dtype`` (default: the statistics' float dtype, else float32).
    """
    if dtype is None:
        like = _float_field(stats)
        dtype = xp.float32 if like is None else like.dtype
    votes = xp.astype(xp.abs(stats.sign_sum), dtype)
    count = stats.count if isinstance(stats.count, int) else xp.astype(stats.count, dtype)
    return votes / count


def hard_mask(stats: Statistics, threshold: float, xp: Any) -> Any:
    """``agreement >= threshold`` as a boolean array, compared exactly on the integer votes.

    With a Python-int count the fewest votes that pass, ``k`` (see
    :func:`gradand._stats.required_votes`), is computed exactly once and the
    array side compares integers, ``|Σ sign(g)| >= k``, so every entry point
    (dense, streaming, merged, all-reduced) keeps the same components. With a
    count only known on the device (a traced all-reduce) the same ``k`` is
    computed there in floating point: exact up to 2**24 environments in float32.
    """
    votes = xp.abs(stats.sign_sum)
    count = stats.count
    if isinstance(count, int):
        return votes >= required_votes(threshold, count)
    like = _float_field(stats)
    dt = xp.float64 if like is not None and like.dtype == xp.float64 else xp.float32
    n = xp.astype(count, dt)
    k = xp.ceil(n * threshold)
    k = xp.where((k - 1) / n >= threshold, k - 1, k)
    return xp.astype(votes, dt) >= k


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

    statistics: ClassVar[tuple[str, ...]] = ("mean", "sign_sum")

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.mean


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
    statistics: ClassVar[tuple[str, ...]] = ("mean", "sign_sum")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        _check_bool("rescale", self.rescale)

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.mean

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
    statistics: ClassVar[tuple[str, ...]] = ("mean", "sign_sum", "log_abs_mean")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        _check_bool("rescale", self.rescale)
        object.__setattr__(self, "eps", _check_positive("eps", self.eps))

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return xp.sign(stats.mean) * xp.exp(stats.log_abs_mean)

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
    ``a = threshold, σ² = 0``; here that entry is exactly 0. ``σ²`` is
    ``M2 / (E - 1)`` with ``M2`` merged by Chan et al.'s update, so it does not
    cancel when the environments' gradients nearly coincide, nor overflow
    where their differences do not. ``k`` acts on ``(a - threshold) / σ²``, so
    it depends on the gradients' scale: at per-component variances of
    1e-9–1e-6 the tanh saturates and the SAND-mask is the hard AND-mask
    (strict ``a > threshold``); scale ``k`` with the gradients' variance.

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
    statistics: ClassVar[tuple[str, ...]] = ("mean", "sign_sum", "m2")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))
        object.__setattr__(self, "k", _check_positive("k", self.k))
        _check_bool("rescale", self.rescale)

    def direction(self, stats: Statistics, xp: Any) -> Any:
        return stats.mean

    def mask(self, stats: Statistics, xp: Any) -> Any:
        m2 = stats.m2
        count = stats.count
        if isinstance(count, int):
            var = m2 / max(count - 1, 1)
        else:
            n = xp.astype(count, m2.dtype)
            var = m2 / xp.maximum(n - 1, xp.ones_like(n))
        a = agreement_from(stats, xp, m2.dtype)
        excess = a - self.threshold
        positive = var > 0
        safe_var = xp.where(positive, var, xp.ones_like(var))
        soft = xp.tanh(self.k * excess / safe_var)
        soft = xp.where(soft > 0, soft, xp.zeros_like(soft))
        limit = xp.astype(excess > 0, a.dtype)
        return xp.where(positive, soft, limit)
