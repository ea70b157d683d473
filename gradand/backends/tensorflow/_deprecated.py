"""Old names (gradand 0.1), kept as thin deprecated aliases of the one API; each warns once per call."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

import gradand
from gradand import Combiner, MaskInfo, Statistics
from gradand._namespace import NanPolicy
from gradand.backends.tensorflow import xp
from gradand.backends.tensorflow._common import check_method
from gradand.backends.tensorflow._entry import gradient, model_gradient
from gradand.backends.tensorflow._sink import pack
from gradand.backends.tensorflow._sources import streaming_statistics, vectorized_statistics

__all__ = ["CombinedGradients", "combined_gradients", "environment_statistics", "factored_gradients"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"gtf.{old} is deprecated; use gtf.{new}", DeprecationWarning, stacklevel=3)


class CombinedGradients(NamedTuple):
    """Deprecated: what :func:`combined_gradients` returns, ``(gradients, info)``; use :func:`gradient`.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import CombinedGradients
        >>> info = [gradand.MaskInfo(tf.constant(1.0), tf.constant(1.0)),
        ...         gradand.MaskInfo(tf.constant(0.0), tf.constant(0.5))]
        >>> out = CombinedGradients([tf.zeros(1), tf.zeros(3)], info)
        >>> [float(v) for v in out.summary()]
        [0.25, 0.625]
    """

    gradients: Any
    info: Any

    def summary(self) -> MaskInfo:
        """The mask info over all variables, weighted by size: :func:`gradand.summarize`."""
        grads = tf.nest.flatten(self.gradients)
        infos = tf.nest.flatten(self.info)  # a MaskInfo flattens to its 2 fields, None to None
        it, flat = iter(infos), []
        for g in grads:
            flat.append(None if g is None else MaskInfo(next(it), next(it)))
            if g is None:
                next(it)
        sizes = [0 if g is None else math.prod(g.shape) for g in grads]
        return gradand.summarize(flat, sizes, xp=xp)


def _old(grads: Any, result: gradand.Result, variables: Any) -> CombinedGradients:
    return CombinedGradients(grads, pack(variables, list(result.infos)))


def combined_gradients(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    method: str = "streaming",
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> CombinedGradients:
    """Deprecated alias of :func:`gradient` returning the old :class:`CombinedGradients`.

    Example:
        >>> import warnings
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import combined_gradients
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     grads, info = combined_gradients(tape, losses, [w], gradand.AndMask(rescale=False))
        >>> grads[0].numpy()
        array([2., 0.], dtype=float32)
    """
    _warn("combined_gradients", "gradient (returns (grads, gradand.Result))")
    method = check_method(method)
    grads, result = gradient(
        tape, losses, variables, combiner, method=method, nan_policy=nan_policy, loss_scale=loss_scale
    )
    return _old(grads, result, variables)


def environment_statistics(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    method: str = "streaming",
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> list[Statistics | None]:
    """Deprecated: :func:`streaming_statistics` (or :func:`vectorized_statistics`), statistics only.

    Example:
        >>> import warnings
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import environment_statistics
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     [s] = environment_statistics(tape, losses, [w], gradand.AndMask())
        >>> s.sign_sum.numpy()
        array([2, 0], dtype=int32)
    """
    _warn("environment_statistics", "streaming_statistics (returns (losses, stats))")
    source = streaming_statistics if check_method(method) == "streaming" else vectorized_statistics
    return source(tape, losses, variables, combiner, nan_policy=nan_policy, loss_scale=loss_scale)[1]


def factored_gradients(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    combiner: Combiner,
    *,
    variables: Any = None,
    training: bool = True,
    fallback: str = "vectorized",
    chunk_size: int | None = None,
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> CombinedGradients:
    """Deprecated alias of :func:`model_gradient`; ``loss_fn(y_true, y_pred)`` in the old Keras order.

    Example:
        >>> import warnings
        >>> import keras
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import factored_gradients
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     grads, info = factored_gradients(model, keras.losses.MeanSquaredError(),
        ...                                      tf.ones((4, 1, 3)), tf.ones((4, 1, 1)), gradand.AndMask())
        >>> len(grads), len(info)
        (2, 2)
    """
    _warn("factored_gradients", "model_gradient (loss_fn(outputs, targets); returns (grads, gradand.Result))")
    if variables is None:
        variables = model.trainable_variables
    grads, result = model_gradient(
        model, lambda outputs, targets: loss_fn(targets, outputs), inputs, targets, combiner,
        variables=variables, training=training, fallback=fallback, chunk_size=chunk_size,
        nan_policy=nan_policy, loss_scale=loss_scale,
    )  # fmt: skip
    return _old(grads, result, variables)
