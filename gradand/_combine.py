"""Entry points: finalize statistics, combine a stack, agreement, logging info."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, overload

import array_api_compat

from gradand._combiners import Combiner, agreement_from
from gradand._namespace import NanPolicy, array_namespace
from gradand._stats import Statistics, check_axis, statistics

__all__ = ["MaskInfo", "agreement", "combine", "finalize", "finalize_many"]


class _SignVotes(Combiner):
    """Only ``Σ sign(g)``: what :func:`agreement` needs."""

    statistics = ("sign_sum",)  # type: ignore[assignment]

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
    if "log_abs_mean" in combiner.statistics and stats.eps != eps:
        raise ValueError(
            f"these statistics were computed with eps={stats.eps}, but {combiner!r} uses eps={eps}"
        )


def _rescale_factor(survivors: Any, numel: Any, hard: bool, xp: Any) -> Any:
    """``numel / Σ mask`` per tensor (0-d, or one entry per tensor), and 0 where nothing survives.

    A hard mask's survivor count is an integer: with none, every entry is masked
    anyway, so only 1/0 needs avoiding. A soft mask's sum can be any value > 0.
    """
    if hard:
        return numel / xp.maximum(survivors, xp.ones_like(survivors))
    alive = survivors > 0
    safe = xp.where(alive, survivors, xp.ones_like(survivors))
    return xp.where(alive, numel / safe, xp.zeros_like(survivors))


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
            direction = direction * _rescale_factor(survivors, numel, True, xp)
        update = _select(mask, direction, xp)
    else:  # a soft mask weighs
        survivors = xp.sum(mask)
        if combiner.rescale:
            direction = direction * _rescale_factor(survivors, numel, False, xp)
        update = mask * direction
    if update.dtype != stats.dtype:
        update = xp.astype(update, stats.dtype)
    if not return_info:
        return update
    # 0-d results are built from reductions so they land on the gradients' device
    if stats.sign_sum is not None:  # mean over components of |Σ sign| / E, with one full-size pass
        votes = xp.sum(xp.astype(xp.abs(stats.sign_sum), direction.dtype))
        mean_agreement = votes / (_float_count(stats.count, votes, xp) * numel)
    else:  # a custom combiner without sign statistics
        mean_agreement = xp.sum(direction) * float("nan")
    fraction = xp.ones_like(mean_agreement) if survivors is None else survivors / numel
    return update, MaskInfo(fraction, mean_agreement)


def _select(mask: Any, direction: Any, xp: Any) -> Any:
    """A hard mask selects: masked entries are +0 — but NaN/Inf stay NaN, never a clean-looking 0.

    ``d - d`` is +0 for every finite ``d`` and NaN for NaN or ±Inf. A namespace may supply the
    same selection as ``gradand_select`` (PyTorch on CPU: a branchy ``where``, 15x slower).
    """
    hook = getattr(xp, "gradand_select", None)
    if hook is not None:
        return hook(mask, direction)
    return xp.where(mask, direction, direction - direction)


def _float_count(count: Any, like: Any, xp: Any) -> Any:
    return count if isinstance(count, int) else xp.astype(count, like.dtype)


#: What the fused path of :func:`finalize_many` needs from a namespace (beyond :func:`finalize`'s).
_FUSED_OPS = ("concat", "reshape", "stack", "count_nonzero", "asarray")


def _fusable(stats: list[Statistics], combiner: Combiner, xp: Any) -> bool:
    if len(stats) < 2 or not all(hasattr(xp, op) for op in _FUSED_OPS):
        return False
    head = stats[0]
    arrays = [getattr(s, n) for s in stats for n in combiner.statistics]
    try:
        devices = {str(array_api_compat.device(a)) for a in arrays}
    except Exception:  # a namespace array_api_compat does not know: no device to compare
        return False
    return len(devices) == 1 and all(
        isinstance(s.count, int) and s.count == head.count and s.dtype == head.dtype and s.eps == head.eps
        for s in stats
    ) and len({getattr(s, n).dtype for s in stats for n in combiner.statistics if n != "sign_sum"}) <= 1


@overload
def finalize_many(
    stats: Sequence[Statistics], combiner: Combiner, *, return_info: Literal[False] = ..., xp: Any = ...
) -> list[Any]: ...
@overload
def finalize_many(
    stats: Sequence[Statistics], combiner: Combiner, *, return_info: Literal[True], xp: Any = ...
) -> tuple[list[Any], list[MaskInfo]]: ...
def finalize_many(
    stats: Sequence[Statistics], combiner: Combiner, *, return_info: bool = False, xp: Any = None
) -> Any:
    """``[finalize(s, combiner) for s in stats]`` for a model's tensors, with the element-wise work done once.

    A model has many tensors, and in eager frameworks every small
    element-wise operation costs a fixed launch overhead: this concatenates
    the tensors' statistics into one flat buffer, computes the direction, the
    mask and the selection once over all of them, and keeps per tensor only
    the reductions that must stay per tensor (survivor counts, agreement) and
    the rescaling. Each tensor's update is rescaled by its own
    ``numel / Σ mask``, exactly as :func:`finalize` does; the results are
    equal to it (up to the rounding of a product's order for soft masks).

    Tensors are fused when they share the namespace, the device, the count,
    the gradient dtype and ``eps``, and the namespace has ``concat``,
    ``reshape``, ``stack``, ``count_nonzero`` and ``asarray``; otherwise each
    tensor goes through :func:`finalize` (e.g. a counted-on-device ``count``
    after an all-reduce, or TensorFlow, whose graphs fuse the work anyway).

    Args:
        stats: the statistics of each tensor (a non-empty sequence).
        combiner: the combiner they were computed for.
        return_info: also return one :class:`MaskInfo` per tensor.
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Returns:
        The updates in ``stats`` order, each in its tensor's shape and
        gradient dtype (and the infos when ``return_info``).

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> c = gradand.AndMask(threshold=1.0)
        >>> w = gradand.statistics(np.array([[[1.0, -1.0], [2.0, 2.0]], [[3.0, 1.0], [1.0, 1.0]]]), c)
        >>> b = gradand.statistics(np.array([[1.0, 1.0], [-1.0, 1.0]]), c)
        >>> updates = gradand.finalize_many([w, b], c)
        >>> [u.tolist() for u in updates]  # w: 3 of 4 survive (x 4/3); b: 1 of 2 (x 2)
        [[[2.6666666666666665, 0.0], [2.0, 2.0]], [0.0, 2.0]]
        >>> all(np.array_equal(u, gradand.finalize(s, c)) for u, s in zip(updates, [w, b]))
        True
    """
    stats = list(stats)
    if not stats:
        raise ValueError("stats is empty: pass the statistics of at least one tensor")
    for i, s in enumerate(stats):
        try:
            _check_stats(s, combiner)
        except (TypeError, ValueError) as err:
            raise type(err)(f"stats[{i}]: {err}") from None
    first = getattr(stats[0], stats[0].fields[0])
    xp = array_namespace(first, xp=xp, name="stats")
    kind = type(first)
    for i, s in enumerate(stats):  # every tensor's arrays from one library (a type check first)
        arrays = s.arrays().values()
        if any(type(a) is not kind for a in arrays) and getattr(xp, "gradand_check_finite", None) is None:
            array_namespace(first, *arrays, name=f"stats[0] and stats[{i}]")
    if not _fusable(stats, combiner, xp):
        out = [finalize(s, combiner, return_info=True, xp=xp) for s in stats]
        updates = [u for u, _ in out]
        return (updates, [info for _, info in out]) if return_info else updates

    head = stats[0]
    shapes = [s.shape for s in stats]
    sizes = [math.prod(shape) for shape in shapes]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    segments = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    flat = Statistics(
        count=head.count,
        dtype=head.dtype,
        eps=head.eps,
        **{
            n: xp.concat([xp.reshape(getattr(s, n), (-1,)) for s in stats])
            for n in combiner.statistics
        },
    )
    direction = combiner.direction(flat, xp)
    mask = combiner.mask(flat, xp)
    dt = direction.dtype
    numels = xp.asarray(sizes, dtype=dt, device=array_api_compat.device(direction))
    votes_ = None  # Σ |Σ sign| per tensor, before the updates exist: no full-size float copy
    if return_info and flat.sign_sum is not None:
        absolute = xp.abs(flat.sign_sum)
        votes_ = xp.stack([xp.sum(absolute[sl], dtype=dt) for sl in segments])
        absolute = None
    survivors = None
    if mask is None:
        pieces = [direction[sl] for sl in segments]
    elif mask.dtype == xp.bool:
        survivors = xp.astype(xp.stack([xp.count_nonzero(mask[sl]) for sl in segments]), dt)
        selected = _select(mask, direction, xp)  # masked entries are +0, NaN stays NaN
        if combiner.rescale:
            scale = _rescale_factor(survivors, numels, True, xp)
            pieces = [selected[sl] * scale[i] for i, sl in enumerate(segments)]
        else:
            pieces = [selected[sl] for sl in segments]
    else:
        survivors = xp.stack([xp.sum(mask[sl]) for sl in segments])
        if combiner.rescale:
            scale = _rescale_factor(survivors, numels, False, xp)
            pieces = [mask[sl] * (direction[sl] * scale[i]) for i, sl in enumerate(segments)]
        else:
            pieces = [mask[sl] * direction[sl] for sl in segments]
    updates = []
    for piece, shape in zip(pieces, shapes):
        u = xp.reshape(piece, shape)
        updates.append(u if u.dtype == head.dtype else xp.astype(u, head.dtype))
    if not return_info:
        return updates
    agreement_ = votes_ / (numels * flat.count) if votes_ is not None else (
        xp.stack([xp.sum(direction[sl]) for sl in segments]) * float("nan")
    )  # fmt: skip
    fraction = xp.ones_like(agreement_) if survivors is None else survivors / numels
    return updates, [MaskInfo(fraction[i], agreement_[i]) for i in range(len(stats))]


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
    if return_info is not True and return_info is not False:
        raise TypeError(f"return_info must be True or False; got {return_info!r}")
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
    xp = array_namespace(grads, xp=xp)
    stats = statistics(grads, _SIGN_VOTES, axis=axis, nan_policy=nan_policy, xp=xp)
    dtype = grads.dtype if xp.finfo(grads.dtype).bits >= 32 else xp.float32
    a = agreement_from(stats, xp, dtype)
    if nan_policy == "propagate":  # NaN in, NaN out: a NaN vote has no agreement
        axis = check_axis(axis, len(grads.shape), tuple(grads.shape))
        nan = xp.any(xp.logical_not(grads == grads), axis=axis)
        a = xp.where(nan, xp.full_like(a, float("nan")), a)
    return a if a.dtype == grads.dtype else xp.astype(a, grads.dtype)
