"""Flat-vector per-environment losses and Hessians of a Keras model, for :mod:`gradand.consistency`.

The model is evaluated with ``model.stateless_call`` on substituted values of
the chosen variables, so it is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["environment_hessians", "environment_losses"]

LossFn = Callable[[Any, Any], Any]


def _subset(model: keras.Model, variables: Sequence[Any] | None) -> list[int]:
    """Positions in ``model.trainable_variables`` of the chosen variables (objects or paths)."""
    trainable = model.trainable_variables
    if not trainable:
        raise ValueError(
            "model has no trainable variables; build it first (call it once or give it an Input)"
        )
    if variables is None:
        return list(range(len(trainable)))
    if isinstance(variables, (str, keras.Variable, tf.Variable)):
        variables = [variables]
    variables = list(variables)
    if not variables:
        raise ValueError("variables is empty: choose at least one (e.g. model.layers[-1].kernel)")
    paths = [v.path for v in trainable]
    index = []
    for v in variables:
        k = paths.index(v) if isinstance(v, str) and v in paths else None
        if k is None and not isinstance(v, str):
            k = next((i for i, t in enumerate(trainable) if t is v), None)
        if k is None:
            name = v if isinstance(v, str) else getattr(v, "path", type(v).__name__)
            raise ValueError(
                f"variables names {name!r}, which is not a trainable variable of the model; it has {paths}"
            )
        index.append(k)
    return index


def _environments(inputs: Any, targets: Any, env_ids: Any, num_envs: int | None) -> list[tuple[Any, Any]]:
    x, y = np.asarray(inputs), np.asarray(targets)
    if env_ids is None:
        if x.shape[0] != y.shape[0] or x.ndim < 2:
            raise ValueError(
                f"inputs and targets must hold the same number of environments on axis 0 (E, n, ...); got "
                f"shapes {x.shape} and {y.shape}"
            )
        return [(x[e], y[e]) for e in range(x.shape[0])]
    ids = np.asarray(env_ids)
    if ids.ndim != 1 or ids.shape[0] != x.shape[0] or ids.dtype.kind not in "iu":
        raise ValueError(
            f"env_ids must be integers of shape ({x.shape[0]},); got {ids.dtype} of shape {ids.shape}"
        )
    n = int(ids.max()) + 1 if num_envs is None else num_envs
    if ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"env_ids must lie in [0, {n}); got values from {ids.min()} to {ids.max()}")
    envs = [(x[ids == e], y[ids == e]) for e in range(n)]
    empty = [e for e, (xe, _) in enumerate(envs) if xe.shape[0] == 0]
    if empty:
        raise ValueError(f"environments {empty} have no example in env_ids")
    return envs


class _Flat:
    """Maps a flat parameter vector to the values of a subset of a model's trainable variables."""

    def __init__(self, model: keras.Model, variables: Sequence[Any] | None) -> None:
        self.model = model
        self.index = _subset(model, variables)
        chosen = [model.trainable_variables[k] for k in self.index]
        self.shapes = [tuple(v.shape) for v in chosen]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = tf.as_dtype(chosen[0].dtype)
        self.theta = np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in chosen])

    def loss(self, theta: tf.Tensor, loss_fn: LossFn, x: Any, y: Any) -> tf.Tensor:
        values = [tf.convert_to_tensor(v) for v in self.model.trainable_variables]
        for k, part, shape in zip(self.index, tf.split(theta, self.sizes), self.shapes):
            values[k] = tf.cast(tf.reshape(part, shape), values[k].dtype)
        fixed = [tf.convert_to_tensor(v) for v in self.model.non_trainable_variables]
        out, _ = self.model.stateless_call(values, fixed, x, training=False)
        loss = tf.convert_to_tensor(loss_fn(y, out))
        if loss.shape.rank != 0:
            raise ValueError(f"loss_fn must return a scalar; got shape {tuple(loss.shape)}")
        return loss


def environment_losses(
    model: keras.Model,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    variables: Sequence[Any] | None = None,
    env_ids: Any = None,
    num_envs: int | None = None,
) -> tuple[list[Callable[[np.ndarray], float]], np.ndarray]:
    """Per-environment losses as functions of a flat parameter vector, and the current vector.

    What :func:`gradand.consistency.empirical_inconsistency` takes: each
    callable maps a 1-D numpy vector θ (the chosen variables, flattened in
    order) to that environment's loss, every other variable fixed at its
    current value; the model itself is not modified (``model.stateless_call``,
    inference mode).

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar`` (Keras's order, e.g.
            ``keras.losses.MeanSquaredError()``).
        inputs: ``(E, n, ...)``, or ``(N, ...)`` with ``env_ids``.
        targets: ``(E, n, ...)``, or ``(N, ...)`` with ``env_ids``.
        variables: the trainable variables to vary (the objects, or their
            ``.path``); ``None``: all trainable variables.
        env_ids: optional ``(N,)`` integer environment index per example.
        num_envs: number of environments with ``env_ids`` (default: max + 1).

    Returns:
        ``(losses, theta_star)``: one callable per environment, and the
        current values as a float64 numpy vector.

    Example:
        >>> import keras
        >>> import numpy as np
        >>> from gradand.backends.tensorflow import environment_losses
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
        >>> x = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], "float32")  # 2 environments, 1 example each
        >>> y = np.stack([model.predict(x[e], verbose=0) for e in range(2)])  # theta* fits both
        >>> losses, theta = environment_losses(model, keras.losses.MeanSquaredError(), x, y)
        >>> losses[0](theta), theta.shape
        (0.0, (2,))
    """
    flat = _Flat(model, variables)
    envs = _environments(inputs, targets, env_ids, num_envs)

    @tf.function(reduce_retracing=True)
    def evaluate(theta: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return flat.loss(theta, loss_fn, x, y)

    def make(x: Any, y: Any) -> Callable[[np.ndarray], float]:
        x, y = tf.constant(x), tf.constant(y)

        def loss(theta: np.ndarray) -> float:
            t = np.asarray(theta, dtype=np.float64)
            if t.shape != flat.theta.shape:
                raise ValueError(f"theta must have shape {flat.theta.shape}; got {t.shape}")
            return float(evaluate(tf.constant(t, flat.dtype), x, y))

        return loss

    return [make(x, y) for x, y in envs], flat.theta.copy()


def environment_hessians(
    model: keras.Model,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    *,
    variables: Sequence[Any] | None = None,
    env_ids: Any = None,
    num_envs: int | None = None,
) -> np.ndarray:
    """Each environment's Hessian with respect to some of the variables, ``(E, P, P)``.

    The Jacobian (``tape.jacobian``, vectorised) of the gradient of the loss as
    a function of the chosen variables flattened in order (P numbers; memory
    and time grow as P², so choose a small subset, e.g. the last layer), in
    the model's dtypes (for accuracy use float64 throughout: the ``Input``,
    the layers and the loss, e.g. ``keras.losses.MeanSquaredError(dtype="float64")``;
    Keras computes losses in float32 by default), returned as float64 numpy,
    symmetrised ``(H + Hᵀ)/2`` so that :func:`gradand.consistency.inconsistency`
    accepts it.

    Args:
        model, loss_fn, inputs, targets, variables, env_ids, num_envs: as in
            :func:`environment_losses`.

    Returns:
        float64 array ``(E, P, P)``.

    Example:
        >>> import keras
        >>> import numpy as np
        >>> from gradand.backends.tensorflow import environment_hessians
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
        >>> x = np.array([[[1.0, 0.0]], [[0.0, 2.0]]], "float32")
        >>> y = np.zeros((2, 1, 1), "float32")
        >>> h = environment_hessians(model, keras.losses.MeanSquaredError(), x, y)
        >>> h[0].tolist(), h[1].tolist()  # 2 x xᵀ for the MSE of one example
        ([[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 8.0]])
    """
    flat = _Flat(model, variables)
    envs = _environments(inputs, targets, env_ids, num_envs)

    @tf.function(reduce_retracing=True)
    def hessian(theta: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as outer:
            outer.watch(theta)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                loss = flat.loss(theta, loss_fn, x, y)
            grad = inner.gradient(loss, theta)
        return outer.jacobian(grad, theta)

    theta = tf.constant(flat.theta, flat.dtype)
    out = []
    for x, y in envs:
        h = np.asarray(hessian(theta, tf.constant(x), tf.constant(y)).numpy(), np.float64)
        out.append(0.5 * (h + h.T))
    return np.stack(out)
