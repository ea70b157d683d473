"""The array namespace of TensorFlow operations that the gradand core runs on.

array-api-compat does not cover TensorFlow, so this module *is* the namespace:
the handful of functions and dtypes that the core calls on ``xp`` (``sign``,
``sum``, ``where``, ``astype``, ``finfo``, ...), each a thin alias of a ``tf``
op. :mod:`gradand.backends.tensorflow` registers it on import, so
``gradand.combine``, ``gradand.statistics``, ``gradand.finalize`` and
``gradand.temporal.temporal_and_mask_step`` accept ``tf.Tensor`` and
``tf.Variable`` arguments, eagerly and inside ``tf.function`` (XLA included),
with no combiner math written here.

``gradand_check_finite`` is the hook the core calls for ``nan_policy="raise"``:
eagerly it raises ``ValueError`` like the core does for other arrays; inside a
``tf.function`` graph it inserts ``tf.debugging.check_numerics`` (behind a ``tf.cond`` on the
tensor's sum for large tensors, as ``check_numerics`` is slow on CPU), which raises
``tf.errors.InvalidArgumentError`` naming the tensor when the step runs. XLA
(``jit_compile=True``) compiles ``check_numerics`` to nothing, so there the
check is skipped, as under ``jax.jit``.

Example:
    >>> import tensorflow as tf
    >>> import gradand
    >>> from gradand.backends.tensorflow import xp
    >>> g = tf.constant([[1.0, -2.0], [3.0, 2.0]])
    >>> gradand.combine(g, gradand.AndMask(rescale=False), xp=xp).numpy()
    array([2., 0.], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import ml_dtypes
import tensorflow as tf

__all__ = [
    "abs",
    "all",
    "any",
    "asarray",
    "astype",
    "bfloat16",
    "bool",
    "ceil",
    "count_nonzero",
    "exp",
    "expand_dims",
    "finfo",
    "float16",
    "float32",
    "float64",
    "full",
    "full_like",
    "gradand_check_finite",
    "gradand_check_is_exhaustive",
    "gradand_dense_mean",
    "gradand_scaled_sum",
    "gradand_select",
    "int32",
    "int64",
    "is_tensorflow_array",
    "isdtype",
    "isfinite",
    "log",
    "logical_not",
    "matmul",
    "matrix_transpose",
    "maximum",
    "minimum",
    "ones",
    "ones_like",
    "reshape",
    "result_type",
    "sign",
    "sqrt",
    "stack",
    "sum",
    "tanh",
    "where",
    "zeros",
    "zeros_like",
]

_builtin_bool = bool
_builtin_any = any

float16 = tf.float16
bfloat16 = tf.bfloat16
float32 = tf.float32
float64 = tf.float64
int32 = tf.int32
int64 = tf.int64
bool = tf.bool

sign = tf.sign
abs = tf.abs
ceil = tf.math.ceil
exp = tf.exp
log = tf.math.log
sqrt = tf.sqrt
tanh = tf.tanh
isfinite = tf.math.is_finite
logical_not = tf.logical_not
maximum = tf.maximum
minimum = tf.minimum
matmul = tf.linalg.matmul
matrix_transpose = tf.linalg.matrix_transpose
reshape = tf.reshape
zeros_like = tf.zeros_like
ones_like = tf.ones_like


def is_tensorflow_array(x: Any) -> _builtin_bool:
    """Whether ``x`` is a ``tf.Tensor`` or ``tf.Variable`` (what this namespace serves)."""
    return isinstance(x, (tf.Tensor, tf.Variable))


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> tf.Tensor:
    """``tf.convert_to_tensor``, cast to ``dtype`` when given."""
    t = tf.convert_to_tensor(obj)
    if dtype is not None and t.dtype != dtype:
        t = tf.cast(t, dtype)
    return t


def astype(x: Any, dtype: Any, /, *, copy: _builtin_bool = True, device: Any = None) -> tf.Tensor:
    """``tf.cast``."""
    return tf.cast(x, dtype)


def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: _builtin_bool = False) -> tf.Tensor:
    """``tf.reduce_sum`` (booleans are summed as int64, as the array API does)."""
    if x.dtype == tf.bool:
        x = tf.cast(x, tf.int64)
    if dtype is not None:
        x = tf.cast(x, dtype)
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def count_nonzero(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> tf.Tensor:
    """The number of nonzero entries, as int64 (the array API's default integer).

    Summed as int32 when the count fits (a 4-byte pass: 1.3x faster than
    ``tf.math.count_nonzero``'s int64 one), then cast.
    """
    if x.dtype != tf.bool:
        x = tf.not_equal(x, tf.zeros((), x.dtype))
    size = x.shape.num_elements()
    if size is None or size >= 2**31:
        return tf.reduce_sum(tf.cast(x, tf.int64), axis=axis, keepdims=keepdims)
    return tf.cast(tf.reduce_sum(tf.cast(x, tf.int32), axis=axis, keepdims=keepdims), tf.int64)


def any(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> tf.Tensor:
    """``tf.reduce_any``."""
    if x.dtype != tf.bool:
        x = tf.not_equal(x, tf.zeros((), x.dtype))
    return tf.reduce_any(x, axis=axis, keepdims=keepdims)


def expand_dims(x: Any, /, *, axis: int = 0) -> tf.Tensor:
    """``tf.expand_dims``."""
    return tf.expand_dims(x, axis)


def full_like(x: Any, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """``tf.fill`` with ``x``'s shape, in ``x``'s dtype unless ``dtype`` is given."""
    return tf.fill(tf.shape(x), tf.constant(fill_value, dtype=dtype or x.dtype))


def all(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> tf.Tensor:
    """``tf.reduce_all``."""
    if x.dtype != tf.bool:
        x = tf.not_equal(x, tf.zeros((), x.dtype))
    return tf.reduce_all(x, axis=axis, keepdims=keepdims)


def result_type(*dtypes: Any) -> Any:
    """The widest of floating ``tf.DType`` s (what the core needs to combine mixed-precision factors)."""
    floats = [tf.as_dtype(d) for d in dtypes]
    return max(floats, key=lambda d: (d.size, d == tf.float32))


def stack(arrays: Any, /, *, axis: int = 0) -> tf.Tensor:
    """``tf.stack``."""
    return tf.stack(list(arrays), axis=axis)


def where(condition: Any, x1: Any, x2: Any, /) -> tf.Tensor:
    """``tf.where`` with broadcasting."""
    return tf.where(condition, x1, x2)


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """``tf.zeros`` (float32 by default)."""
    return tf.zeros(shape, dtype=dtype or tf.float32)


def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """``tf.ones`` (float32 by default)."""
    return tf.ones(shape, dtype=dtype or tf.float32)


def full(shape: Any, fill_value: Any, *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    """``tf.fill`` in ``dtype`` (float32 by default)."""
    return tf.fill(shape, tf.constant(fill_value, dtype=dtype or tf.float32))


class FloatInfo(NamedTuple):
    """What :func:`finfo` reports: the fields of the array API's ``finfo``."""

    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: Any


def finfo(dtype: Any, /) -> FloatInfo:
    """Machine limits of a floating ``tf.DType``: ``bits``, ``eps``, ``max``, ``min``, ``smallest_normal``."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise TypeError(f"finfo() needs a floating dtype; got {dtype.name}")
    info = ml_dtypes.finfo(dtype.as_numpy_dtype)  # numpy's finfo, bfloat16 included
    return FloatInfo(
        bits=dtype.size * 8,
        eps=float(info.eps),
        max=float(info.max),
        min=float(info.min),
        smallest_normal=float(info.smallest_normal),
        dtype=dtype,
    )


_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: d.is_integer or d.is_floating or d.is_complex,
}


def isdtype(dtype: Any, kind: Any) -> _builtin_bool:
    """The array API's ``isdtype`` for ``tf.DType`` (a kind name, a dtype, or a tuple of them)."""
    if isinstance(kind, tuple):
        return _builtin_any(isdtype(dtype, k) for k in kind)
    dtype = tf.as_dtype(dtype)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"isdtype(): unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
        return _builtin_bool(_KINDS[kind](dtype))
    return dtype == tf.as_dtype(kind)


#: The check below lets no NaN/Inf reach the statistics: eagerly it raises, in a graph
#: ``check_numerics`` raises when the step runs. (XLA compiles it away: there a NaN reaches the
#: update, as under ``jax.jit``, and its component's votes are lost with it.)
gradand_check_is_exhaustive = True


#: From this many entries a sum first, and ``check_numerics`` only when it is not finite.
_SUM_FIRST = 1 << 12


def gradand_check_finite(x: Any, name: str) -> tf.Tensor:
    """The core's hook for ``nan_policy="raise"``.

    Eagerly: ``ValueError`` naming ``name``, the count of bad entries and the
    shape. In a ``tf.function`` graph: ``tf.debugging.check_numerics``, which
    raises ``tf.errors.InvalidArgumentError`` with the same advice when the
    step runs (XLA compiles it away). Returns ``x`` (the checked tensor in
    graph mode, so the check is on the data path).
    """
    advice = (
        "a non-finite gradient would poison the update. Pass nan_policy='zero' to drop those "
        "components (they cast no vote and add nothing), or nan_policy='propagate' to let them through."
    )
    if tf.executing_eagerly():
        finite = tf.math.is_finite(x)
        if not _builtin_bool(tf.reduce_all(finite)):
            n_bad = int(tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int64)))
            shape = tuple(x.shape)
            raise ValueError(
                f"{name} contains NaN or Inf ({n_bad} of {math.prod(shape)} entries of shape {shape}); "
                + advice
            )
        return x
    message = f"gradand: {name} contains NaN or Inf; {advice}"
    size = x.shape.num_elements()
    if size is not None and size < _SUM_FIRST:
        return tf.debugging.check_numerics(x, message=message)
    # check_numerics is slow on CPU (~1 ns an entry): a finite sum has no NaN/Inf term, so the full
    # check runs only when the sum is not finite (a NaN/Inf, or an overflow of finite values)
    return tf.cond(
        tf.math.is_finite(tf.reduce_sum(x)),
        lambda: tf.identity(x),
        lambda: tf.debugging.check_numerics(x, message=message),
    )


#: Below this many entries the scaling pass costs less than a ``tf.cond``.
_COND_WORTH = 1 << 16


def gradand_dense_mean(g: Any, axis: int, count: int, scale: float) -> tf.Tensor:
    """The core's hook for the mean over the environment axis that cannot overflow.

    The plain sum divided by ``count``; only when that sum is not finite (an overflow, or a
    NaN/Inf gradient) the sum of the terms scaled by the power of two ``scale`` (exact), taken
    lazily by ``tf.cond``, so the common case costs one reduction and no pass of scaling.
    """
    return _scaled_sum(g, axis, 1.0 / scale, count / scale)  # finite: total / count


def gradand_scaled_sum(v: Any, factor: float) -> tf.Tensor:
    """The core's hook for a chunk's sum of terms scaled by a power of two (the fold of the
    factored engine): ``Σ_axis0 v · factor``, lazily as :func:`gradand_dense_mean`'s sum."""
    return _scaled_sum(v, 0, factor)


def _scaled_sum(v: Any, axis: int, factor: float, divisor: float = 1.0) -> tf.Tensor:
    """``Σ_axis (v · factor) / divisor`` for a power of two ``factor``: the plain sum times
    ``factor / divisor`` when that sum is finite (the same values: the scaling is exact), else
    the sum of the scaled terms, which cannot overflow where the terms do not, taken lazily by
    ``tf.cond``. Small tensors take the one pass of scaled terms (cheaper than a branch)."""
    if v.shape.num_elements() is not None and v.shape.num_elements() < _COND_WORTH:
        return _divided(tf.reduce_sum(v * factor, axis=axis), divisor)
    total = tf.reduce_sum(v, axis=axis)
    return tf.cond(
        tf.reduce_all(tf.math.is_finite(total)),
        lambda: total / (divisor / factor) if divisor != 1.0 else total * factor,
        lambda: _divided(tf.reduce_sum(v * factor, axis=axis), divisor),
    )


def _divided(t: tf.Tensor, divisor: float) -> tf.Tensor:
    return t if divisor == 1.0 else t / divisor


def gradand_select(mask: Any, direction: Any) -> tf.Tensor:
    """The core's hook for a hard mask's selection: ``direction · mask``.

    The same values as the core's ``where(mask, d, d - d)``: a kept component
    unchanged, a masked one zero, a NaN or ±Inf one NaN (``0 · ±Inf``), never
    a clean-looking 0. A masked negative component is ``-0.0``, which equals
    ``0.0``: TensorFlow's graph optimizer removes a ``+ 0`` that would clear
    the sign bit. ``SelectV2`` costs 2.5 times a multiply on CPU (17 vs 7 us
    for 65k float32 entries, with the ``d - d`` pass it needs).
    """
    return direction * tf.cast(mask, direction.dtype)
