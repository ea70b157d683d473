"""Additive statistics over environments: the one definition behind every entry point.

A combiner needs a few sums over environments (``Σ g``, ``Σ sign(g)``,
``Σ log(|g| + eps)``, ``Σ g²``) and their count. Sums merge by addition, so the
same :class:`Statistics` serve the dense path (reduce a stacked array), the
streaming path (add one environment at a time, O(P) memory), chunks (any split
of the environments) and the distributed path (an all-reduce SUM of each field).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from gradand._namespace import (
    NanPolicy,
    accumulation_dtype,
    apply_nan_policy,
    array_namespace,
    check_float,
    check_nan_policy,
)

if TYPE_CHECKING:
    from gradand._combiners import Combiner

__all__ = ["STATISTIC_NAMES", "Statistics", "merge", "statistics"]

#: Every statistic a combiner may ask for, in a fixed order.
STATISTIC_NAMES: tuple[str, ...] = ("sum", "sign_sum", "log_abs_sum", "sq_sum")


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
    """Sums over a set of environments, for one gradient tensor.

    Fields that the combiner does not need are ``None``. ``count`` is the number
    of environments (a Python int, or a 0-d array after a distributed
    all-reduce). ``dtype`` is the gradients' dtype (the dtype of the update
    that :func:`gradand.finalize` returns); the sums themselves are kept in at
    least float32. ``eps`` is the ``GeometricMean`` epsilon that
    ``log_abs_sum`` was computed with.

    ``Statistics()`` is the empty set of environments; ``a + b`` merges two
    disjoint sets (:func:`gradand.merge`).

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> c = gradand.AndMask()
        >>> s = gradand.Statistics()
        >>> for g in [np.array([1.0, -2.0]), np.array([3.0, 4.0])]:
        ...     s = s + gradand.statistics(g, c, axis=None)
        >>> s.count, s.sign_sum
        (2, array([2., 0.]))
        >>> gradand.finalize(s, c)
        array([4., 0.])
    """

    count: Any = 0
    sum: Any = None
    sign_sum: Any = None
    log_abs_sum: Any = None
    sq_sum: Any = None
    dtype: Any = None
    eps: float | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the statistics present, in :data:`STATISTIC_NAMES` order."""
        return tuple(n for n in STATISTIC_NAMES if getattr(self, n) is not None)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the gradient tensor (``None`` when empty)."""
        for n in STATISTIC_NAMES:
            a = getattr(self, n)
            if a is not None:
                return tuple(a.shape)
        return None

    @property
    def is_empty(self) -> bool:
        """True for ``Statistics()``: no environment added yet."""
        return not self.fields

    def arrays(self) -> dict[str, Any]:
        """The present statistics as a dict ``name -> array`` (for all-reduce)."""
        return {n: getattr(self, n) for n in self.fields}

    def replace(self, **changes: Any) -> Statistics:
        """A copy with some fields replaced (e.g. after an all-reduce)."""
        return dataclasses.replace(self, **changes)

    def __add__(self, other: Statistics) -> Statistics:
        return merge(self, other)

    def __repr__(self) -> str:
        if self.is_empty:
            return "Statistics(empty)"
        return (
            f"Statistics(count={self.count!r}, shape={self.shape}, fields={self.fields}, dtype={self.dtype})"
        )


def merge(*parts: Statistics) -> Statistics:
    """Statistics of the union of disjoint sets of environments (a field-wise sum).

    This is what a distributed all-reduce computes; empty statistics are the
    identity. Shapes, fields, dtype and ``eps`` must match.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0], [2.0, 1.0], [3.0, 1.0]])
        >>> c = gradand.AndMask(threshold=1.0, rescale=False)
        >>> a = gradand.statistics(g[:1], c)
        >>> b = gradand.statistics(g[1:], c)
        >>> gradand.finalize(gradand.merge(a, b), c)
        array([2., 0.])
    """
    out = Statistics()
    for p in parts:
        if not isinstance(p, Statistics):
            raise TypeError(f"merge() takes Statistics; got {type(p).__name__}")
        out = _merge2(out, p)
    return out


def _merge2(a: Statistics, b: Statistics) -> Statistics:
    if a.is_empty:
        return b
    if b.is_empty:
        return a
    if a.fields != b.fields:
        raise ValueError(
            f"cannot merge statistics with fields {a.fields} and {b.fields}: they were "
            f"computed for different combiners"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"cannot merge statistics of gradient shape {a.shape} with statistics of shape "
            f"{b.shape}: every environment's gradient must have the same shape"
        )
    if a.eps != b.eps:
        raise ValueError(f"cannot merge statistics computed with eps={a.eps} and eps={b.eps}")
    if a.dtype != b.dtype:
        raise ValueError(f"cannot merge statistics of gradients of dtype {a.dtype} and {b.dtype}")
    summed = {n: getattr(a, n) + getattr(b, n) for n in a.fields}
    return dataclasses.replace(a, count=a.count + b.count, **summed)


def statistics(
    grads: Any,
    combiner: Combiner,
    *,
    axis: int | None = 0,
    nan_policy: NanPolicy = "raise",
    xp: Any = None,
) -> Statistics:
    """The statistics ``combiner`` needs, summed over the environments in ``grads``.

    Args:
        grads: per-environment gradients of one tensor, stacked along ``axis``;
            with ``axis=None``, the gradient of a single environment.
        combiner: the combiner whose statistics to compute (``combiner.statistics``).
        axis: the environment axis, or ``None`` for one environment.
        nan_policy: ``"raise"`` (default) raises ``ValueError`` on NaN/Inf in
            eager mode; ``"zero"`` drops non-finite components (no vote, nothing
            added); ``"propagate"`` lets them through.
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Returns:
        :class:`Statistics` with ``count`` environments, sums in at least float32.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0], [2.0, 1.0]])
        >>> gradand.statistics(g, gradand.AndMask()).sign_sum
        array([2., 0.])
    """
    from gradand._combiners import Combiner

    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (Mean(), AndMask(), ...); got {type(combiner).__name__}"
        )
    check_nan_policy(nan_policy)
    xp = array_namespace(grads, xp=xp)
    check_float(grads, xp, "grads")
    acc = accumulation_dtype(grads.dtype, xp)
    if axis is None:
        count: Any = 1
    else:
        ndim = len(grads.shape)
        if not isinstance(axis, int) or not -ndim <= axis < ndim:
            raise ValueError(
                f"axis={axis!r} is not an axis of grads with shape {tuple(grads.shape)}; "
                f"grads must hold the environments along `axis` (pass axis=None for "
                f"a single environment's gradient)"
            )
        count = grads.shape[axis]
        if count == 0:
            raise ValueError(
                f"grads has 0 environments along axis {axis} (shape {tuple(grads.shape)}); need at least one"
            )
    g = grads if grads.dtype == acc else xp.astype(grads, acc)
    g = apply_nan_policy(g, xp, nan_policy, "grads")

    def reduce(x: Any) -> Any:
        return x if axis is None else xp.sum(x, axis=axis)

    needed = combiner.statistics
    eps = getattr(combiner, "eps", None) if "log_abs_sum" in needed else None
    values: dict[str, Any] = {}
    if "sum" in needed:
        values["sum"] = reduce(g)
    if "sign_sum" in needed:
        values["sign_sum"] = reduce(xp.sign(g))
    if "log_abs_sum" in needed:
        values["log_abs_sum"] = reduce(xp.log(xp.abs(g) + eps))
    if "sq_sum" in needed:
        values["sq_sum"] = reduce(g * g)
    return Statistics(count=count, dtype=grads.dtype, eps=eps, **values)
