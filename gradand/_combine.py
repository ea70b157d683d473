"""Entry points: finalize statistics, combine a stack, agreement, logging info."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, overload

from gradand._combiners import Combiner, agreement_from
from gradand._namespace import NanPolicy, array_namespace
from gradand._stats import Statistics, statistics

__all__ = ["MaskInfo", "agreement", "combine", "finalize"]


class _SignVotes(Combiner):
    """Only ``Σ sign(g)``: what :func:`agreement` needs."""

    statistics = ("sign_sum",)

    def direction(self, stats: Statistics, xp: Any) -> Any:  # pragma: no cover - never finalized
        raise NotImplementedError


_SIGN_VOTES = _SignVotes()


class MaskInfo(NamedTuple):
    """What to log per tensor: 0-d arrays in the gradients' namespace.

    Attributes:
        survivor_fraction: mean of the mask (fraction of components that
            survive; for ``SandMask`` the mean soft mask; 1 for ``Mean``).
        agreement: mean over components of the agreement ``|mean_e sign(g_e)|``.
    """

    survivor_fraction: Any
    agreement: Any


def _check_stats(stats: Statistics, combiner: Combiner) -> None:
    if not isinstance(stats, Statistics):
        raise TypeError(f"stats must be gradand.Statistics; got {type(stats).__name__}")
    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (Mean(), AndMask(), ...); got {type(combiner).__name__}"
        )
    if stats.is_empty:
        raise ValueError(
            "cannot finalize statistics of zero environments: add at least one environment's gradient first"
        )
    missing = [n for n in combiner.statistics if getattr(stats, n) is None]
    if missing:
        raise ValueError(
            f"{combiner!r} needs statistics {missing} that these statistics (fields "
            f"{stats.fields}) lack; compute them with gradand.statistics(..., {combiner!r})"
        )
    eps = getattr(combiner, "eps", None)
    if "log_abs_sum" in combiner.statistics and stats.eps != eps:
        raise ValueError(
            f"these statistics were computed with eps={stats.eps}, but {combiner!r} uses eps={eps}"
        )


@overload
def finalize(
    stats: Statistics, combiner: Combiner, *, return_info: Literal[False] = ..., xp: Any = ...
) -> Any: ...
@overload
def finalize(
    stats: Statistics, combiner: Combiner, *, return_info: Literal[True], xp: Any = ...
) -> tuple[Any, MaskInfo]: ...
def finalize(stats: Statistics, combiner: Combiner, *, return_info: bool = False, xp: Any = None) -> Any:
    """The combined update from the environments' statistics.

    ``mask ⊙ direction``, rescaled per tensor by ``numel / Σ mask`` when the
    combiner rescales (a tensor with no survivor gets a zero update, never
    inf or NaN). Returned in the gradients' dtype and namespace.

    Args:
        stats: statistics of at least one environment (:func:`gradand.statistics`,
            summed or merged in any way).
        combiner: the combiner that the statistics were computed for.
        return_info: also return a :class:`MaskInfo` for logging.
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> c = gradand.AndMask(threshold=1.0, rescale=False)
        >>> s = gradand.statistics(np.array([[1.0, -1.0], [3.0, 1.0]]), c)
        >>> update, info = gradand.finalize(s, c, return_info=True)
        >>> update, float(info.survivor_fraction), float(info.agreement)
        (array([2., 0.]), 0.5, 0.5)
    """
    _check_stats(stats, combiner)
    first = getattr(stats, stats.fields[0])
    xp = array_namespace(first, xp=xp, name="stats")
    direction = combiner.direction(stats, xp)
    mask = combiner.mask(stats, xp)
    numel = math.prod(direction.shape)
    if mask is None:
        update = direction
        survivors = None
    elif mask.dtype == xp.bool:
        # an exact integer count of survivors, cast once (not the whole mask)
        survivors = xp.astype(xp.count_nonzero(mask), direction.dtype)
        if combiner.rescale:
            # with no survivor every entry is masked below, whatever the scale: only avoid 1/0
            direction = direction * (numel / xp.maximum(survivors, xp.ones_like(survivors)))
        # a hard mask selects: masked entries are +0, never -0 or NaN
        update = xp.where(mask, direction, xp.zeros_like(direction))
    else:  # a soft mask weighs
        survivors = xp.sum(mask)
        if combiner.rescale:
            alive = survivors > 0
            safe = xp.where(alive, survivors, xp.ones_like(survivors))
            direction = direction * xp.where(alive, numel / safe, xp.zeros_like(survivors))
        update = mask * direction
    if update.dtype != stats.dtype:
        update = xp.astype(update, stats.dtype)
    if not return_info:
        return update
    # 0-d results are built from reductions so they land on the gradients' device
    if stats.sign_sum is not None:  # mean over components of |Σ sign| / E, with one full-size pass
        mean_agreement = xp.sum(xp.abs(stats.sign_sum)) / (stats.count * numel)
    else:  # a custom combiner without sign statistics
        mean_agreement = xp.sum(direction) * float("nan")
    fraction = xp.ones_like(mean_agreement) if survivors is None else survivors / numel
    return update, MaskInfo(fraction, mean_agreement)


def combine(
    grads: Any,
    combiner: Combiner,
    *,
    axis: int = 0,
    return_info: bool = False,
    nan_policy: NanPolicy = "raise",
    xp: Any = None,
) -> Any:
    """Combine stacked per-environment gradients of one tensor into one update.

    The dense entry point: ``finalize(statistics(grads, combiner, axis=axis), combiner)``.

    Args:
        grads: array of shape ``(E, *shape)`` (environments along ``axis``), float.
        combiner: ``Mean()``, ``AndMask(...)``, ``GeometricMean(...)``, ``SandMask(...)``.
        axis: the environment axis.
        return_info: also return a :class:`MaskInfo` for logging.
        nan_policy: ``"raise"`` | ``"zero"`` | ``"propagate"`` (see :func:`gradand.statistics`).
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Returns:
        The update, shape ``shape``, in ``grads``' namespace, dtype and device
        (and the :class:`MaskInfo` when ``return_info``).

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[0.5, -1.0], [1.5, 2.0]])  # two environments
        >>> gradand.combine(g, gradand.Mean())
        array([1. , 0.5])
        >>> gradand.combine(g, gradand.AndMask(threshold=1.0, rescale=False))
        array([1., 0.])
    """
    if axis is None:
        raise ValueError("combine() needs the environment axis; axis=None is for gradand.statistics")
    stats = statistics(grads, combiner, axis=axis, nan_policy=nan_policy, xp=xp)
    return finalize(stats, combiner, return_info=return_info, xp=xp)


def agreement(grads: Any, *, axis: int = 0, nan_policy: NanPolicy = "raise", xp: Any = None) -> Any:
    """Sign agreement ``|mean_e sign(g_e)|`` in [0, 1] per component.

    1 where every environment pushes the same way, 0 where the votes cancel;
    ``sign(0) = 0``, so a zero gradient casts no vote but still counts in the
    mean. Returned in ``grads``' dtype, without the environment axis.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> gradand.agreement(np.array([[1.0, -1.0, 0.0], [2.0, 1.0, 0.0]]))
        array([1., 0., 0.])
    """
    stats = statistics(grads, _SIGN_VOTES, axis=axis, nan_policy=nan_policy, xp=xp)
    xp = array_namespace(grads, xp=xp)
    a = agreement_from(stats, xp)
    return a if a.dtype == grads.dtype else xp.astype(a, grads.dtype)
