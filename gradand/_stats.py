"""Mergeable statistics over environments: the one definition behind every entry point.

A combiner needs a few statistics over environments and their count ``E``:
the mean gradient, the sign votes ``Σ sign(g)``, the mean of
``log(|g| + eps)`` and the sum of squared deviations from the mean (``M2``,
for the variance). They are kept in a form that is both *mergeable* and
*numerically stable*:

- sign votes are exact integers (``int32``), so the threshold comparison
  never depends on float round-off, for any number of environments up to
  ``2**31 - 1``;
- means are means, not sums, so they cannot overflow where the gradients do
  not (the mean of four float32 ``1e38`` gradients is ``1e38``);
- ``M2`` is merged with Chan et al.'s parallel update, so the variance does
  not cancel (``[10001, 9999, 10000]`` has variance 1 in float32 too).

The same :class:`Statistics` serve the dense path (reduce a stacked array),
the streaming path (merge one environment at a time, O(P) memory), chunks
(any split of the environments) and the distributed path
(:func:`all_reduce_statistics`: scaled terms whose SUM over workers is the
merged statistics).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Sequence
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

__all__ = [
    "MAX_COUNT",
    "STATISTIC_NAMES",
    "Statistics",
    "all_reduce_statistics",
    "merge",
    "required_votes",
    "statistics",
]

#: Every statistic a combiner may ask for, in a fixed order.
STATISTIC_NAMES: tuple[str, ...] = ("mean", "sign_sum", "log_abs_mean", "m2")

#: The most environments one set of statistics may hold: sign votes are int32.
MAX_COUNT: int = 2**31 - 1

# Above this many environments a float32 sum of signs is no longer exact: sum as integers.
_EXACT_FLOAT_SIGN_SUM = 2**24


def _check_count(count: Any, empty: bool) -> Any:
    """Validate a Python-number count: an int in [1, MAX_COUNT], 0 when empty.

    Arrays (a count after an all-reduce, a tracer under ``jit``) and the
    placeholders that pytree utilities pass through are kept as they are.
    """
    if type(count) is int and 0 < count <= MAX_COUNT and not empty:  # the common case, first
        return count
    if isinstance(count, bool):
        raise TypeError(f"count must be the number of environments (an int); got {count!r}")
    if isinstance(count, numbers.Integral):
        n = operator.index(count)
        if empty:
            if n != 0:
                raise ValueError(
                    f"Statistics with no fields are the empty set of environments and must have "
                    f"count=0; got count={n}"
                )
            return 0
        if not 1 <= n <= MAX_COUNT:
            raise ValueError(
                f"count must be the number of environments, between 1 and {MAX_COUNT}; got count={n}"
            )
        return n
    if isinstance(count, numbers.Real):  # a float: 3.0 is not a count
        raise TypeError(f"count must be an int (the number of environments); got {count!r}")
    shape = getattr(count, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise TypeError(f"count must be an int or a 0-d array; got an array of shape {tuple(shape)}")
    return count


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
    """Statistics over a set of environments, for one gradient tensor.

    Fields that the combiner does not need are ``None``:

    - ``mean``: the mean gradient over the environments;
    - ``sign_sum``: ``Σ_e sign(g_e)``, exact ``int32`` votes (a zero or NaN
      component casts no vote);
    - ``log_abs_mean``: the mean of ``log(|g_e| + eps)`` (``GeometricMean``);
    - ``m2``: ``Σ_e (g_e - mean)²`` (``SandMask``'s variance is ``m2 / (E - 1)``).

    ``count`` is the number of environments ``E`` (a Python int in
    ``[1, MAX_COUNT]``, or a 0-d array after a traced all-reduce). ``dtype`` is
    the gradients' dtype (the dtype of the update that :func:`gradand.finalize`
    returns); the float statistics are kept in at least float32. ``eps`` is the
    ``GeometricMean`` epsilon that ``log_abs_mean`` was computed with.

    ``Statistics()`` is the empty set of environments; ``a + b`` merges two
    disjoint sets (:func:`gradand.merge`).

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> c = gradand.AndMask()
        >>> s = gradand.Statistics()
        >>> for g in [np.array([1.0, -2.0]), np.array([3.0, 4.0])]:
        ...     s = s + gradand.statistics(g, c, axis=None)
        >>> s.count, s.mean, s.sign_sum
        (2, array([2., 1.]), array([2, 0], dtype=int32))
        >>> gradand.finalize(s, c)
        array([4., 0.])
    """

    count: Any = 0
    mean: Any = None
    sign_sum: Any = None
    log_abs_mean: Any = None
    m2: Any = None
    dtype: Any = None
    eps: float | None = None

    def __post_init__(self) -> None:
        # cached once: merging in a streaming loop reads these for every environment and tensor
        present = (self.mean, self.sign_sum, self.log_abs_mean, self.m2)  # STATISTIC_NAMES order
        fields = tuple(n for n, v in zip(STATISTIC_NAMES, present) if v is not None)
        object.__setattr__(self, "_fields", fields)
        first = next((v for v in present if v is not None), None)
        object.__setattr__(self, "_shape", None if first is None else tuple(first.shape))
        object.__setattr__(self, "count", _check_count(self.count, not fields))

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the statistics present, in :data:`STATISTIC_NAMES` order."""
        return self._fields  # type: ignore[attr-defined,no-any-return]

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the gradient tensor (``None`` when empty)."""
        return self._shape  # type: ignore[attr-defined,no-any-return]

    @property
    def is_empty(self) -> bool:
        """True for ``Statistics()``: no environment added yet."""
        return not self._fields  # type: ignore[attr-defined]

    def arrays(self) -> dict[str, Any]:
        """The present statistics as a dict ``name -> array``."""
        return {n: getattr(self, n) for n in self.fields}

    def replace(self, **changes: Any) -> Statistics:
        """A copy with some fields replaced (validated like the constructor)."""
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
    """Statistics of the union of disjoint sets of environments.

    Sign votes add exactly; means and ``M2`` merge by Chan et al.'s parallel
    update, so the order of merging changes only the last bits of the means
    and never a sign vote. Empty statistics are the identity. Shapes, fields,
    dtype and ``eps`` must match.

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
    for i, p in enumerate(parts):
        if not isinstance(p, Statistics):
            raise TypeError(f"merge() takes Statistics; argument {i} is {type(p).__name__}")
        out = _merge2(out, p)
    return out


def _check_mergeable(a: Statistics, b: Statistics) -> None:
    first_a, first_b = getattr(a, a.fields[0]), getattr(b, b.fields[0])
    try:
        if type(first_a) is not type(first_b):
            array_namespace(first_a, first_b, name="the statistics to merge")
    except TypeError:
        raise TypeError(
            f"cannot merge statistics held in {type(first_a).__module__}.{type(first_a).__name__} with "
            f"statistics held in {type(first_b).__module__}.{type(first_b).__name__}: every "
            f"environment's gradient must come from the same array library"
        ) from None
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


def _weights(na: Any, nb: Any, like: Any, xp: Any) -> tuple[Any, Any, Any]:
    """``(n, na / n, nb / n)``: Python numbers for int counts, 0-d arrays in ``like``'s dtype otherwise."""
    n = na + nb
    if isinstance(na, int) and isinstance(nb, int):
        if n > MAX_COUNT:
            raise OverflowError(
                f"merging {na} and {nb} environments gives {n}, more than the {MAX_COUNT} that int32 "
                f"sign votes count exactly"
            )
        return n, na / n, nb / n
    if like is None:  # sign votes only: no weights needed
        return n, None, None
    fa = _as_float(na, like, xp)
    fb = _as_float(nb, like, xp)
    total = fa + fb
    if not isinstance(total, (int, float)):  # both sides may count 0 (absent environments): no 0/0
        total = xp.where(total > 0, total, xp.ones_like(total))
    return n, fa / total, fb / total


def _as_float(count: Any, like: Any, xp: Any) -> Any:
    if isinstance(count, int):
        return count
    return xp.astype(count, like.dtype)


def _mean_update(a: Any, b: Any, wa: Any, wb: Any) -> Any:
    """``wa·a + wb·b`` as ``base + (other·w - base·w)`` around the heavier side.

    Equal inputs give the input exactly, and no intermediate exceeds the
    inputs' magnitude (``w ≤ 1/2``), so nothing overflows where the inputs do not.
    """
    if isinstance(wa, float) and isinstance(wb, float):
        if wa >= wb:
            return a + (b * wb - a * wb)
        return b + (a * wa - b * wa)
    return a + (b * wb - a * wb)


def _float_field(s: Statistics) -> Any:
    """The first float statistic (its dtype is the accumulation dtype), or ``None`` for votes only."""
    return next((getattr(s, n) for n in ("mean", "log_abs_mean", "m2") if getattr(s, n) is not None), None)


def _merge2(a: Statistics, b: Statistics) -> Statistics:
    if a.is_empty:
        return b
    if b.is_empty:
        return a
    _check_mergeable(a, b)
    like = _float_field(a)
    xp = array_namespace(getattr(a, a.fields[0]), name="stats")
    n, wa, wb = _weights(a.count, b.count, like, xp)  # raises past MAX_COUNT
    if like is None:  # sign votes only
        return dataclasses.replace(a, count=n, sign_sum=a.sign_sum + b.sign_sum)
    out: dict[str, Any] = {}
    if a.sign_sum is not None:
        out["sign_sum"] = a.sign_sum + b.sign_sum
    if a.log_abs_mean is not None:
        out["log_abs_mean"] = _mean_update(a.log_abs_mean, b.log_abs_mean, wa, wb)
    if a.mean is not None:
        out["mean"] = _mean_update(a.mean, b.mean, wa, wb)
    if a.m2 is not None:
        # Chan et al.: M2 = M2_a + M2_b + δ² · na·nb/n, with δ scaled before squaring
        delta = b.mean - a.mean
        if isinstance(n, int):
            c = math.sqrt(a.count * wb)  # sqrt(na·nb/n)
        else:
            c = xp.sqrt(_as_float(a.count, like, xp) * wb)
        scaled = delta * c
        out["m2"] = a.m2 + b.m2 + scaled * scaled
    return dataclasses.replace(a, count=n, **out)


class Fold:
    """Statistics of one tensor folded from environments' gradients as they come (O(P) memory).

    The accumulator behind the streaming sources and the factored engine's chunks:
    ``fold.add(g)`` per environment (or ``fold.add(chunk, axis=0)`` per chunk of
    environments), then ``fold.result()``. It gives :func:`statistics` of the
    stacked gradients (the same exact votes, the means up to summation order)
    without a :func:`merge` per environment: with ``expected`` environments
    known, means are sums of terms scaled by a power of two ``>= expected``
    (exact scaling; the sum cannot overflow where the gradients do not),
    otherwise running means. Votes are summed as floats while that is exact (up
    to ``2**24``), as int32 beyond. ``M2`` (``SandMask``) is merged by Chan et
    al.'s update, one part at a time.

    Args:
        combiner: the combiner whose statistics to fold.
        expected: the number of environments that will be added (``None`` when unknown).
        nan_policy: as in :func:`statistics`, applied to each part.
        xp: the array namespace, when it cannot be inferred (TensorFlow).
        name: how errors name the gradients.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> from gradand._stats import Fold
        >>> fold = Fold(gradand.AndMask(), expected=2)
        >>> fold.add(np.array([1.0, -2.0])); fold.add(np.array([3.0, 4.0]))
        >>> s = fold.result()
        >>> s.count, s.mean, s.sign_sum
        (2, array([2., 1.]), array([2, 0], dtype=int32))
    """

    def __init__(
        self,
        combiner: Combiner,
        expected: int | None = None,
        *,
        nan_policy: NanPolicy = "raise",
        xp: Any = None,
        name: str = "grads",
        _checked_later: bool = False,
    ) -> None:
        from gradand._combiners import Combiner

        if not isinstance(combiner, Combiner):
            raise TypeError(
                f"combiner must be a gradand combiner (Mean(), AndMask(), ...); got {type(combiner).__name__}"
            )
        check_nan_policy(nan_policy)
        needed = combiner.statistics
        self._combiner = combiner
        self._mean = "mean" in needed
        self._votes = "sign_sum" in needed
        self._logs = "log_abs_mean" in needed
        self._merging = "m2" in needed  # Chan's update: M2 is no sum of per-part terms
        self._eps = getattr(combiner, "eps", None) if self._logs else None
        self._expected = expected
        self._scale = _power_of_two_at_least(expected) if expected else None
        self._int_votes = (expected or MAX_COUNT) > _EXACT_FLOAT_SIGN_SUM
        self._nan_policy = nan_policy
        self._checked_later = _checked_later  # a caller that raises on a non-finite mean afterwards
        self._xp = xp
        self._name = name
        self._count: Any = 0  # Python int, or a 0-d array once an environment's presence is data
        self._sums: dict[str, Any] = {}
        self._merged = Statistics()
        self._dtype: Any = None

    @property
    def needs_values(self) -> bool:
        """Whether a zero gradient must still be added as values (``log|g|`` or ``M2`` change)."""
        return self._logs or self._merging

    def seed(self, dtype: Any, xp: Any) -> float | None:
        """A power of two a backend may seed each environment's backward pass with, or ``None``.

        Gradients computed with this seed (``output_gradients`` / ``grad_outputs``) arrive as
        ``g / 2**k``, exactly, and are added with ``add(g, seeded=True)``: the scaled sum's
        multiply then costs nothing. Only for the mean and votes of gradients of at least 32 bits
        (a 16-bit backward pass would underflow).
        """
        if self._scale is None or self._scale == 1.0 or self.needs_values:
            return None
        if xp.finfo(dtype).bits < 32:
            return None
        return 1.0 / self._scale

    def arrays(self) -> list[Any]:
        """The running accumulators (for a framework's control dependencies)."""
        if self._merging:
            return list(self._merged.arrays().values())
        return list(self._sums.values())

    def skip(self, present: Any = None) -> None:
        """Count one environment whose gradient is zero, without its values (see :attr:`needs_values`)."""
        if self.needs_values:
            raise ValueError("this combiner's statistics change with a zero gradient: add() the zeros")
        self._count = self._count + (1 if present is None else self._as_count(present))

    def _as_count(self, present: Any) -> Any:
        xp = self._xp or array_namespace(present, name="present")
        return xp.astype(present, xp.int32)

    def add(
        self,
        g: Any,
        *,
        axis: int | None = None,
        present: Any = None,
        seeded: bool = False,
        owned: bool = False,
    ) -> None:
        """Add one environment's gradient ``g`` (``axis=0``: a chunk of environments along axis 0).

        ``present`` (0-d bool array, one environment only): whether it counts. ``seeded``: ``g``
        was computed with :meth:`seed` as the backward pass's seed. ``owned``: ``g`` is the
        caller's to overwrite (a fresh contiguous gradient); with a namespace that writes in place
        (``gradand_add_into``, ``gradand_sign_into``: PyTorch) the fold then allocates nothing
        per environment, and holds two arrays of ``g``'s size besides ``g``.
        """
        xp = self._xp = array_namespace(g, xp=self._xp)
        if self._dtype is None:
            check_float(g, xp, self._name)
            self._dtype = g.dtype
        if axis not in (None, 0):
            raise ValueError(f"axis must be None (one environment) or 0 (a chunk); got {axis!r}")
        if axis is not None and present is not None:
            raise ValueError("present marks one environment: pass it with axis=None")
        n = 1 if axis is None else int(g.shape[0])
        if self._merging:
            self._merge_part(g, axis, present, xp)
            return
        acc = accumulation_dtype(g.dtype, xp)
        owned = owned and g.dtype == acc
        g = g if g.dtype == acc else xp.astype(g, acc)
        g, finite = apply_nan_policy(g, xp, self._nan_policy, self._name, report=True)
        inplace = (
            owned and axis is None and present is None and self._scale is not None
            and not self._int_votes and getattr(xp, "gradand_add_into", None) is not None
            and getattr(xp, "gradand_sign_into", None) is not None
        )  # fmt: skip
        if inplace:
            self._count = self._count + 1
            self._add_inplace(g, seeded, xp)
            return
        finite = finite or self._checked_later
        w = None
        if present is not None:
            if self._scale is None:
                raise ValueError("Fold: an environment's presence needs the expected number of environments")
            w = xp.astype(present, acc)
            g = g * w
            self._count = self._count + self._as_count(present)
        else:
            self._count = self._count + n
        if self._votes:
            if self._int_votes:
                votes = sign_votes(g, xp, axis=axis, finite=finite)
            else:
                votes = vote_signs(g, xp, finite=finite)
                votes = votes if axis is None else xp.sum(votes, axis=0)
            self._put("sign_sum", votes)
        if self._mean:
            self._accumulate("mean", g, axis, n, xp, seeded)
        if self._logs:
            logs = xp.log(xp.abs(g) + self._eps)
            self._accumulate("log_abs_mean", logs if w is None else logs * w, axis, n, xp, False)

    def _add_inplace(self, g: Any, seeded: bool, xp: Any) -> None:
        """One environment added by writing into the accumulators and into ``g`` itself."""
        if self._logs:  # before g changes
            self._put("log_abs_mean", xp.log(xp.abs(g) + self._eps) * (1.0 / self._scale))
        if self._mean:
            term = g if self._scale == 1.0 or seeded else g * (1.0 / self._scale)
            if "mean" in self._sums:
                xp.gradand_add_into(self._sums["mean"], term)
            else:
                self._sums["mean"] = term if term is not g else xp.asarray(g, copy=True)
        if self._votes:  # the signs overwrite g: no per-environment array is allocated
            signs = xp.gradand_sign_into(g)
            if "sign_sum" in self._sums:
                xp.gradand_add_into(self._sums["sign_sum"], signs)
            else:
                self._sums["sign_sum"] = signs

    def _put(self, key: str, v: Any) -> None:
        self._sums[key] = v if key not in self._sums else self._sums[key] + v

    def _accumulate(self, key: str, v: Any, axis: int | None, n: int, xp: Any, seeded: bool) -> None:
        if self._scale is not None:  # a sum of exactly scaled terms
            hook = getattr(xp, "gradand_scaled_sum", None)
            if axis is not None and hook is not None and self._scale != 1.0 and not seeded:
                # a namespace that scales the chunk's sum instead of its terms when that sum is
                # finite (the same values: the factor is a power of two), lazily (TensorFlow)
                self._put(key, hook(v, 1.0 / self._scale))
                return
            term = v if self._scale == 1.0 or seeded else v * (1.0 / self._scale)
            self._put(key, term if axis is None else xp.sum(term, axis=0))
            return
        part = v if axis is None else xp.sum(v, axis=0) / n  # running mean; count is a Python int
        if key not in self._sums:
            self._sums[key] = part
        else:
            self._sums[key] = self._sums[key] + (part - self._sums[key]) * (n / self._count)

    def _merge_part(self, g: Any, axis: int | None, present: Any, xp: Any) -> None:
        part = statistics(
            g,
            self._combiner,
            axis=axis,
            nan_policy=self._nan_policy,
            xp=xp,
            _checked_later=self._checked_later,
        )
        if present is not None:
            weight = {k: a * xp.astype(present, a.dtype) for k, a in part.arrays().items()}
            part = part.replace(count=xp.asarray(xp.astype(present, xp.int32)), **weight)  # 0-d array
        self._merged = self._merged + part
        self._count = self._merged.count

    def result(self, like: Any = None) -> Statistics:
        """The folded statistics (``Statistics()`` when nothing was counted).

        ``like``: a tensor of the gradient's shape and dtype, for a fold whose environments were
        all skipped (zero gradients everywhere: zero means, no votes).
        """
        if self._merging:
            return self._merged
        if not self._sums:
            if isinstance(self._count, int) and self._count == 0:
                return Statistics()
            if like is None:
                raise ValueError("environments were counted with skip() but none was added: no shape known")
            xp = self._xp or array_namespace(like, name="like")
            zeros = xp.zeros_like(like, dtype=accumulation_dtype(like.dtype, xp))
            empty: dict[str, Any] = {}
            if self._mean:
                empty["mean"] = zeros
            if self._votes:
                empty["sign_sum"] = xp.astype(zeros, xp.int32)
            return Statistics(count=self._count, dtype=like.dtype, eps=self._eps, **empty)
        xp = self._xp
        out = dict(self._sums)
        count = self._count
        if self._scale is not None:
            if isinstance(count, int):
                denom: Any = count / self._scale
            else:
                like_f = next(v for k, v in out.items() if k != "sign_sum")
                c = xp.astype(count, like_f.dtype)
                denom = xp.where(c > 0, c, xp.ones_like(c)) / self._scale
            for key in ("mean", "log_abs_mean"):
                if key in out:
                    out[key] = out[key] / denom
        if "sign_sum" in out and out["sign_sum"].dtype != xp.int32:
            out["sign_sum"] = xp.astype(out["sign_sum"], xp.int32)
        return Statistics(count=count, dtype=self._dtype, eps=self._eps, **out)


def drop_zero_environments(stats: Statistics, zeros: Any) -> Statistics:
    """``stats`` without ``zeros`` of its environments whose gradients were exactly 0.

    For environments known to be empty only when the step runs (environment ids under
    ``jit``): their mean gradient is 0, so they added nothing to the sums and cast no vote, and
    Chan's merge in reverse takes them out of ``M2``. The count becomes a 0-d array when
    ``zeros`` is one; with every environment dropped the statistics are zero.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> from gradand._stats import drop_zero_environments
        >>> c = gradand.SandMask(threshold=0.5, k=10.0)
        >>> g = np.array([[1.0, -2.0], [3.0, 1.0], [0.0, 0.0]])
        >>> s = drop_zero_environments(gradand.statistics(g, c), 1)
        >>> bool(np.allclose(s.mean, g[:2].mean(0))), bool(np.allclose(s.m2, 2 * g[:2].var(0)))
        (True, True)
    """
    if stats.is_empty:
        raise ValueError("drop_zero_environments: the statistics are empty")
    xp = array_namespace(getattr(stats, stats.fields[0]), name="stats")
    like = _float_field(stats)
    n = stats.count
    if isinstance(n, int) and isinstance(zeros, int):
        if not 0 <= zeros < n:
            raise ValueError(f"zeros must be in [0, count={n}); got {zeros}")
        if zeros == 0:
            return stats
        kept: Any = n - zeros
        fn, fz, fk = float(n), float(zeros), float(kept)
        ok: Any = None
    else:
        kept = n - zeros
        fn, fz, fk = (_as_float(c, like, xp) if like is not None else c for c in (n, zeros, kept))
        ok = fk > 0
        fk = xp.where(ok, fk, xp.ones_like(fk)) if like is not None else fk
    out: dict[str, Any] = {}
    if stats.mean is not None:
        out["mean"] = stats.mean * (fn / fk)
    if stats.log_abs_mean is not None:
        out["log_abs_mean"] = (stats.log_abs_mean * fn - fz * math.log(stats.eps)) / fk
    if stats.m2 is not None:
        mean = stats.mean * (fn / fk)
        m2 = stats.m2 - mean * mean * (fk * fz / fn)
        out["m2"] = xp.where(m2 > 0, m2, xp.zeros_like(m2))
    if ok is not None:
        out = {k: xp.where(ok, v, xp.zeros_like(v)) for k, v in out.items()}
    return stats.replace(count=kept, **out)


def vote_signs(g: Any, xp: Any, *, finite: bool = False) -> Any:
    """``sign(g)`` as float votes with NaN casting no vote (0).

    A namespace may supply ``gradand_vote_signs`` (PyTorch's backend: ``torch.sign``, which maps
    NaN to 0 in one pass); otherwise ``xp.sign``, with NaN votes cleared unless ``g`` is known to
    be ``finite`` (checked or cleaned by the NaN policy).
    """
    hook = getattr(xp, "gradand_vote_signs", None)
    if hook is not None:
        return hook(g)
    s = xp.sign(g)
    if finite:
        return s
    return xp.where(s == s, s, xp.zeros_like(s))


def sign_votes(g: Any, xp: Any, *, axis: int | None, finite: bool = False) -> Any:
    """``Σ sign(g)`` over ``axis`` (or ``sign(g)`` for ``axis=None``) as exact int32 votes.

    A zero or NaN gradient casts no vote — on every path, so the other environments' votes on
    that component still count.
    """
    s = vote_signs(g, xp, finite=finite)
    if axis is not None:
        if g.shape[axis] > _EXACT_FLOAT_SIGN_SUM:  # a float32 sum is no longer exact: sum integers
            return xp.sum(xp.astype(s, xp.int32), axis=axis, dtype=xp.int32)
        s = xp.sum(s, axis=axis)
    return xp.astype(s, xp.int32)


def _dense_mean(g: Any, axis: int, count: int, xp: Any, *, inspect: bool) -> Any:
    """The mean over ``axis`` that cannot overflow where the gradients do not.

    With ``inspect`` (``nan_policy="raise"``, which reads the values anyway): the plain sum, and
    only if it overflowed (a non-finite sum of finite values) the sum of the terms scaled by a
    power of two (exact). Otherwise, and when traced (``jit``, ``tf.function``, ``torch.compile``
    must see no data-dependent branch): always the scaled sum (XLA fuses the scaling into the
    reduction). A namespace may supply ``gradand_dense_mean(g, axis, count, scale)`` that takes
    the plain sum and the scaled one only on overflow, lazily (TensorFlow's ``tf.cond``, where an
    unfused scaling would cost a pass over every environment's gradient).
    """
    scale = _power_of_two_at_least(count)
    if scale == 1.0:
        return xp.sum(g, axis=axis)
    hook = getattr(xp, "gradand_dense_mean", None)
    if hook is not None:  # a namespace that branches lazily in a graph (TensorFlow's tf.cond)
        return hook(g, axis, count, scale)
    if not inspect:
        return xp.sum(g / scale, axis=axis) / (count / scale)
    total = xp.sum(g, axis=axis)
    try:
        if bool(xp.all(xp.isfinite(total))):
            return total / count
        if not bool(xp.all(xp.isfinite(g))):  # NaN/Inf in the input: the sum says so already
            return total / count
    except Exception:  # a tracer or a symbolic tensor
        pass
    return xp.sum(g / scale, axis=axis) / (count / scale)


def _power_of_two_at_least(n: int) -> float:
    return 2.0 ** math.ceil(math.log2(n)) if n > 1 else 1.0


def statistics(
    grads: Any,
    combiner: Combiner,
    *,
    axis: int | None = 0,
    nan_policy: NanPolicy = "raise",
    xp: Any = None,
    _checked_later: bool = False,
) -> Statistics:
    """The statistics ``combiner`` needs, over the environments in ``grads``.

    Args:
        grads: per-environment gradients of one tensor, stacked along ``axis``;
            with ``axis=None``, the gradient of a single environment.
        combiner: the combiner whose statistics to compute (``combiner.statistics``).
        axis: the environment axis, or ``None`` for one environment.
        nan_policy: ``"raise"`` (default) raises ``ValueError`` on NaN/Inf when
            the values can be inspected; ``"zero"`` drops non-finite components
            (no vote, nothing added); ``"propagate"`` lets them through, so the
            update is NaN where a gradient was (see the guide's NaN table).
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Returns:
        :class:`Statistics` with ``count`` environments, means in at least
        float32, exact int32 sign votes.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> g = np.array([[1.0, -1.0], [2.0, 1.0]])
        >>> s = gradand.statistics(g, gradand.AndMask())
        >>> s.mean, s.sign_sum
        (array([1.5, 0. ]), array([2, 0], dtype=int32))
    """
    from gradand._combiners import Combiner

    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (Mean(), AndMask(), ...); got {type(combiner).__name__}"
        )
    check_nan_policy(nan_policy)
    xp = array_namespace(grads, xp=xp)
    check_float(grads, xp, "grads")
    if axis is None:
        count = 1
    else:
        axis = check_axis(axis, len(grads.shape), tuple(grads.shape))
        count = grads.shape[axis]
        if count == 0:
            raise ValueError(
                f"grads has 0 environments along axis {axis} (shape {tuple(grads.shape)}); need at least one"
            )
        if count > MAX_COUNT:
            raise ValueError(f"grads has {count} environments along axis {axis}; at most {MAX_COUNT}")
    return _dense_statistics(grads, combiner, axis, count, nan_policy, xp, _checked_later)


def _dense_statistics(
    grads: Any, combiner: Combiner, axis: int | None, count: int, nan_policy: str, xp: Any, later: bool
) -> Statistics:
    """:func:`statistics` of validated arguments (``axis`` normalised, ``count`` its length)."""
    acc = accumulation_dtype(grads.dtype, xp)
    g = grads if grads.dtype == acc else xp.astype(grads, acc)
    g, finite = apply_nan_policy(g, xp, nan_policy, "grads", report=True)
    finite = finite or later  # a caller that raises on a non-finite mean afterwards

    needed = combiner.statistics
    eps = getattr(combiner, "eps", None) if "log_abs_mean" in needed else None
    values: dict[str, Any] = {}
    mean = None
    if "mean" in needed or "m2" in needed:
        if axis is None:
            mean = g
        else:
            mean = _dense_mean(g, axis, count, xp, inspect=nan_policy == "raise" or later)
        if "mean" in needed:
            values["mean"] = mean
    if "sign_sum" in needed:
        values["sign_sum"] = sign_votes(g, xp, axis=axis, finite=finite)
    if "log_abs_mean" in needed:
        logs = xp.log(xp.abs(g) + eps)
        values["log_abs_mean"] = logs if axis is None else xp.sum(logs, axis=axis) / count
    if "m2" in needed:
        if axis is None:
            values["m2"] = xp.zeros_like(g)
        else:
            dev = g - xp.expand_dims(mean, axis=axis)
            values["m2"] = xp.sum(dev * dev, axis=axis)
    return Statistics(count=count, dtype=grads.dtype, eps=eps, **values)


def check_axis(axis: Any, ndim: int, shape: tuple[int, ...], name: str = "axis") -> int:
    """``axis`` as a non-negative int (numpy integers accepted); a clear error naming it otherwise."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int (the environment axis); got {axis!r} ({type(axis).__name__})")
    axis = operator.index(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is not an axis of grads with shape {shape}; grads must hold the "
            f"environments along `{name}` (pass axis=None for a single environment's gradient)"
        )
    return axis % ndim


def required_votes(threshold: float, count: int) -> int:
    """The fewest agreeing votes ``k`` with ``k / count >= threshold``: the AND-mask's exact test.

    The agreement ``|Σ sign| / E`` is compared with ``threshold`` as the
    correctly rounded float64 quotient, so a threshold written as ``k / E``
    (``0.28`` for 7 of 25 votes, ``0.55`` for 110 of 200) keeps exactly the
    components with ``k`` net votes, in every dtype and for every ``E``;
    the array side then compares integers.

    Example:
        >>> import gradand
        >>> gradand.required_votes(0.28, 25), required_votes(0.55, 200), required_votes(1.0, 16)
        (7, 110, 16)
    """
    num, den = float(threshold).as_integer_ratio()  # the float τ exactly, as a fraction
    k = -((-num * count) // den)  # ceil(τ·E) in exact integer arithmetic
    while k > 0 and (k - 1) / count >= threshold:  # (k - 1)/E rounds to τ: it was meant as τ
        k -= 1
    return k


def _count_value(count: Any) -> Any:
    """A Python int when the count's value can be read (eager arrays), else the array itself."""
    if isinstance(count, int):
        return count
    try:
        return operator.index(count) if isinstance(count, numbers.Integral) else int(count)
    except Exception:  # a tracer or a symbolic tensor (each framework has its own error type)
        return count


def reduction_terms(stats: Statistics, total_count: Any) -> dict[str, Any]:
    """The terms whose SUM over workers is the merged ``mean``, ``sign_sum`` and ``log_abs_mean``.

    Each worker scales its means by ``n_i / N``, so the sum is the global mean
    without ever forming a (possibly overflowing) sum of gradients.
    """
    xp = array_namespace(getattr(stats, stats.fields[0]), name="stats")
    out: dict[str, Any] = {}
    w = _local_weight(stats, total_count, xp)
    if stats.mean is not None:
        out["mean"] = stats.mean * w
    if stats.sign_sum is not None:
        out["sign_sum"] = stats.sign_sum
    if stats.log_abs_mean is not None:
        out["log_abs_mean"] = stats.log_abs_mean * w
    return out


def _local_weight(stats: Statistics, total_count: Any, xp: Any) -> Any:
    like = _float_field(stats)
    if isinstance(stats.count, int) and isinstance(total_count, int):
        return stats.count / total_count
    if like is None:
        return 1.0
    return _as_float(stats.count, like, xp) / _as_float(total_count, like, xp)


def m2_term(stats: Statistics, global_mean: Any) -> Any:
    """This worker's ``M2_i + n_i (mean_i - mean)²``: their SUM over workers is the merged ``M2``."""
    xp = array_namespace(stats.m2, name="stats")
    d = stats.mean - global_mean
    n = stats.count if isinstance(stats.count, int) else _as_float(stats.count, d, xp)
    return stats.m2 + n * (d * d)


def all_reduce_statistics(
    stats: Sequence[Statistics],
    all_reduce_sum: Callable[[list[Any]], Sequence[Any]],
    *,
    total_count: Any = None,
) -> list[Statistics]:
    """Merge statistics across workers with a framework's SUM all-reduce (every worker calls this).

    ``all_reduce_sum(arrays)`` must return the element-wise SUM of each array
    over the workers (``torch.distributed.all_reduce``, ``jax.lax.psum``,
    ``tf.distribute``'s ``all_reduce``); the backends pass their engine's.
    Rounds: the total count (skipped when ``total_count`` is given), then the
    count-weighted means and the sign votes, then — only for ``SandMask`` —
    each worker's ``M2`` about the global mean. The result equals merging
    every worker's statistics in one process: the same sign votes, the means
    up to rounding.

    Args:
        stats: this worker's statistics, one per tensor (none empty; the same
            count in each).
        all_reduce_sum: the SUM all-reduce of a list of arrays.
        total_count: the number of environments over all workers, when known.

    Returns:
        The merged statistics, in ``stats`` order.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> c = gradand.SandMask(threshold=0.5, k=10.0)
        >>> g = np.random.default_rng(0).standard_normal((5, 3))
        >>> mine = [gradand.statistics(g, c)]
        >>> # one worker: the all-reduce is the identity (tests run several workers in threads)
        >>> (total,) = gradand.all_reduce_statistics(mine, lambda arrays: arrays)
        >>> total.count, bool(np.allclose(gradand.finalize(total, c), gradand.combine(g, c)))
        (5, True)
    """
    items = list(stats)
    if not items:
        raise ValueError("stats is empty: pass one Statistics per tensor")
    for i, s in enumerate(items):
        if not isinstance(s, Statistics):
            raise TypeError(f"stats[{i}] must be gradand.Statistics; got {type(s).__name__}")
        if s.is_empty:
            raise ValueError(f"stats[{i}] is empty: every worker must contribute at least one environment")
    first = getattr(items[0], items[0].fields[0])
    xp = array_namespace(first, name="stats")
    if total_count is None:
        local = [s.count for s in items]
        if any(not isinstance(c, int) for c in local):
            packed = [xp.astype(xp.asarray(c), xp.int32) if not isinstance(c, int) else c for c in local]
            packed = xp.stack([xp.asarray(c, dtype=xp.int32) for c in packed])
        else:
            packed = xp.asarray(local, dtype=xp.int32)
        (summed,) = all_reduce_sum([packed])
        totals = [_count_value(summed[i]) for i in range(len(items))]
    else:
        totals = [_count_value(total_count)] * len(items)
    flat: list[Any] = []
    layout: list[tuple[int, str]] = []
    for i, s in enumerate(items):
        for name, a in reduction_terms(s, totals[i]).items():
            flat.append(a)
            layout.append((i, name))
    reduced = list(all_reduce_sum(flat))
    fields: list[dict[str, Any]] = [{} for _ in items]
    for (i, name), a in zip(layout, reduced):
        fields[i][name] = a
    if any(s.m2 is not None for s in items):
        idx = [i for i, s in enumerate(items) if s.m2 is not None]
        m2s = list(all_reduce_sum([m2_term(items[i], fields[i]["mean"]) for i in idx]))
        for i, a in zip(idx, m2s):
            fields[i]["m2"] = a
    return [s.replace(count=totals[i], **fields[i]) for i, s in enumerate(items)]
