"""BatchNormalization per environment in one forward pass over the whole batch (the factored source).

A ``keras.layers.BatchNormalization`` in training mode normalises with its batch's
statistics, so its examples interact. The streaming path (one forward pass per
environment) gives every environment its own batch statistics; the factored source runs
one forward pass over every example, so while it runs each plain ``BatchNormalization``
computes the same statistics per environment: per channel, the mean and the biased
variance (Keras' convention, also for the moving variance) over that environment's
examples and positions, by a reshape when the environments are an axis ``(E, n, ...)``
and by segment sums over the environment ids otherwise. The moving statistics are then
updated as the per-environment forward passes would have updated them, one environment
after the other in environment order (``moving = moving · momentum + batch · (1 − momentum)``).

The layer is also split for the factored engine: ``y = t + β`` with ``t = x̂ ⊙ γ``, so
that ``Δ = ∂L/∂t`` gives ``γ``'s per-environment gradient ``Σ Δ ⊙ x̂`` per channel and
``β``'s ``Σ Δ`` (``Δ`` at ``t`` equals ``Δ`` at ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from gradand.backends.tensorflow._layers import Call, all_layers

__all__ = [
    "batch_norms",
    "check_vectorized",
    "plain_batch_norm",
    "recording_batch_norm",
    "scale_gradient",
]


def _unsupported(layer: Any) -> str | None:
    """Why the factored path cannot compute ``layer``'s batch statistics per environment (None: it can)."""
    if type(layer).call is not keras.layers.BatchNormalization.call or "call" in vars(layer):
        return f"{type(layer).__name__} has its own call"
    if layer.synchronized:
        return "synchronized=True: statistics across replicas"
    if layer.renorm:
        return "renorm=True: batch renormalization"
    return None


def plain_batch_norm(layer: Any) -> bool:
    """A ``keras.layers.BatchNormalization`` that the factored path can compute itself."""
    return isinstance(layer, keras.layers.BatchNormalization) and _unsupported(layer) is None


def batch_norms(model: Any, training: bool) -> list[Any]:
    """The layers of ``model`` that normalise with batch statistics when called with ``training``.

    Raises:
        ValueError: naming a trainable ``BatchNormalization`` that the factored
            path cannot split per environment (a subclass with its own ``call``,
            ``synchronized=True``, ``renorm=True``).
    """
    if not training:
        return []
    found = []
    for layer in all_layers(model):
        if not (isinstance(layer, keras.layers.BatchNormalization) and layer.trainable):
            continue
        reason = _unsupported(layer)
        if reason is not None:
            raise ValueError(
                f"model contains BatchNormalization layer {layer.name!r} ({reason}), which in training "
                f"mode normalises over the whole batch; the factored path computes batch statistics per "
                f"environment only for a plain keras.layers.BatchNormalization. Pass training=False, "
                f"freeze the layer (layer.trainable = False), or use method='streaming' (one forward "
                f"pass per environment)"
            )
        found.append(layer)
    return found


def check_vectorized(model: Any, training: bool) -> None:
    """Refuse a trainable ``BatchNormalization`` in training mode for the vectorized method.

    Under ``tf.vectorized_map`` every environment's moving-statistics update reads the
    same old value and only one of them is kept; with ``env_ids`` (one forward pass of
    the whole batch) the environments' examples would share batch statistics.
    """
    if not training:
        return
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise ValueError(
                f"model contains BatchNormalization layer {layer.name!r} in training mode, which "
                f"method='vectorized' cannot give each environment's batch statistics and moving-"
                f"statistics update. Use method='factored' (model_gradient) or method='streaming' "
                f"(one forward pass per environment), pass training=False, or freeze the layer"
            )


def _dims(t: Any) -> list[Any]:
    """``t``'s shape: static sizes where known, else scalar tensors."""
    dynamic = tf.shape(t)
    return [n if n is not None else dynamic[k] for k, n in enumerate(t.shape)]


def _per_environment(x: Any, layer: Any, axis: int, groups: Any) -> tuple[Any, Any, Any]:
    """``(x̂, mean, variance)``: ``x`` normalised per environment, and the ``(E, C)`` statistics."""
    rank, n_env, eps = x.shape.rank, groups.num_envs, layer.epsilon
    others = [k for k in range(1, rank) if k != axis]
    if groups.env is None:  # an environment axis: the statistics of (E, n, ...) over n and positions
        xr = tf.reshape(x, [n_env, groups.n_ex, *_dims(x)[1:]])
        axes = [1, *(k + 1 for k in others)]
        mean = tf.reduce_mean(xr, axes, keepdims=True)
        var = tf.reduce_mean(tf.math.squared_difference(xr, tf.stop_gradient(mean)), axes, keepdims=True)
        xhat = tf.reshape((xr - mean) * tf.math.rsqrt(var + eps), _dims(x))
        return xhat, tf.reshape(mean, (n_env, -1)), tf.reshape(var, (n_env, -1))
    # environment ids: segment sums of each example's sums over the positions
    env = groups.env
    dims = _dims(x)
    positions = math.prod(dims[k] for k in others) if others else 1
    count = tf.cast(groups.counts * tf.cast(positions, groups.counts.dtype), x.dtype)[:, None]
    view = [-1, *(dims[k] if k == axis else 1 for k in range(1, rank))]

    def per_example(s: Any) -> Any:  # (E, C) -> each example's row, broadcast against x
        return tf.reshape(tf.gather(s, env), view)

    sums = tf.reduce_sum(x, others) if others else x
    mean = tf.math.unsorted_segment_sum(sums, env, n_env) / count
    mean_b = per_example(mean)
    sq = tf.math.squared_difference(x, tf.stop_gradient(mean_b))
    var = tf.math.unsorted_segment_sum(tf.reduce_sum(sq, others) if others else sq, env, n_env) / count
    xhat = (x - mean_b) * tf.math.rsqrt(per_example(var) + eps)
    return xhat, mean, var


def _update_moving(layer: Any, mean: Any, var: Any) -> None:
    """Each environment's update of the moving statistics, in environment order, as one assign.

    ``m_E = μ^E m_0 + Σ_e (1 − μ) μ^(E−1−e) s_e`` for momentum ``μ``.
    """
    n_env, mu = mean.shape[0], layer.momentum
    weights = tf.constant([(1.0 - mu) * mu ** (n_env - 1 - e) for e in range(n_env)], mean.dtype)
    keep = tf.constant(mu**n_env, mean.dtype)
    for moving, batch in ((layer.moving_mean, mean), (layer.moving_variance, var)):
        old = tf.cast(moving, mean.dtype)
        moving.assign(old * keep + tf.tensordot(weights, tf.stop_gradient(batch), 1))


def recording_batch_norm(
    layer: Any, groups: Any, calls: list[Call], bad: set[int], batch: int
) -> Callable[..., Any]:
    """``BatchNormalization.call`` with per-environment batch statistics, recording ``x̂`` and ``t = x̂ ⊙ γ``.

    ``groups``: the batch's environments (``num_envs``; ``env`` and ``counts``, or
    ``n_ex`` for an environment axis).
    """

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None:
            raise ValueError(
                f"BatchNormalization layer {layer.name!r} got a mask; the factored path computes "
                f"per-environment batch statistics without masks. Use method='streaming'"
            )
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32  # Keras: at least float32
        x = tf.cast(inputs, dtype)
        rank = x.shape.rank
        axis = layer.axis % rank
        view = [x.shape[k] if k == axis else 1 for k in range(rank)]
        batch_first = axis != 0 and x.shape[0] == batch
        if training and layer.trainable:
            if not batch_first:
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} got input of shape {tuple(x.shape)} "
                    f"(axis={layer.axis}); the factored path needs the batch's {batch} examples on "
                    f"axis 0 to give each environment its own batch statistics. Use method='streaming'"
                )
            xhat, mean, var = _per_environment(x, layer, axis, groups)
            _update_moving(layer, mean, var)
        else:
            mean = tf.reshape(tf.cast(layer.moving_mean, dtype), view)
            var = tf.reshape(tf.cast(layer.moving_variance, dtype), view)
            xhat = (x - mean) * tf.math.rsqrt(var + layer.epsilon)
        t = xhat if layer.gamma is None else xhat * tf.reshape(tf.cast(layer.gamma, dtype), view)
        y = t if layer.beta is None else t + tf.reshape(tf.cast(layer.beta, dtype), view)
        if layer.gamma is not None or layer.beta is not None:
            if batch_first:
                calls.append(Call(layer, xhat, t))
            else:
                bad.add(id(layer))
        return tf.cast(y, layer.compute_dtype)

    return call


def scale_gradient(axis: int) -> Callable[[Any, Any], Any]:
    """Per-environment gradients of a per-channel scale: ``(e, n, ...), (e, n, ...) -> (e, C)``.

    ``axis``: the channel axis of the layer's (batch-first) input, ``axis + 1`` here.
    """

    def gradient(x: Any, d: Any) -> Any:
        prod = x * d
        return tf.reduce_sum(prod, [k for k in range(1, prod.shape.rank) if k != axis + 1])

    return gradient
