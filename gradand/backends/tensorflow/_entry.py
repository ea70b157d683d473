"""The one-line entry points: a source, the all-reduce under ``tf.distribute``, the sink, one Result."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import tensorflow as tf

import gradand
from gradand import Combiner, Result, Statistics
from gradand._namespace import NanPolicy
from gradand.backends.tensorflow._all_reduce import all_reduce_statistics
from gradand.backends.tensorflow._batchnorm import check_vectorized
from gradand.backends.tensorflow._common import (
    call_loss,
    check_method,
    replicas,
)
from gradand.backends.tensorflow._factored import _environment_ids, factored_statistics
from gradand.backends.tensorflow._sink import finalize_gradients
from gradand.backends.tensorflow._sources import streaming_statistics, vectorized_statistics

__all__ = ["gradient", "model_gradient"]


def gradient(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    method: str = "streaming",
    nan_policy: NanPolicy = "raise",
    loss_scale: Any = None,
) -> tuple[Any, Result]:
    """The AND-mask's ``tape.gradient``: combined gradients of the environments' losses.

    :func:`streaming_statistics` (or :func:`vectorized_statistics` of the
    tape), then :func:`all_reduce_statistics` inside ``strategy.run`` with
    several replicas, then :func:`finalize_gradients`. Under ``tf.distribute``
    each replica returns ``update / num_replicas``, because
    ``optimizer.apply_gradients`` sums the replicas' gradients: the applied
    update is that of all environments together.

    Args:
        tape: the tape the losses were recorded on (``persistent=True`` for ``"streaming"``).
        losses: one scalar loss per environment (a list of scalars or a 1-D tensor).
        variables: what to differentiate (any ``tf.nest`` structure).
        combiner: a gradand combiner.
        method: ``"streaming"`` (memory independent of E) or ``"vectorized"`` (``tape.jacobian``).
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``.
        loss_scale: the factor the losses carry: a number or a
            ``keras.optimizers.LossScaleOptimizer``; by default ``1 / num_replicas``
            under ``tf.distribute`` (TensorFlow's convention), else 1.

    Returns:
        ``(grads, result)``: the gradients in the structure of ``variables``
        (for ``optimizer.apply_gradients(zip(grads, variables))``) and a
        :class:`gradand.Result` (``infos`` a flat list in the variables' order).

    Example:
        >>> import keras
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> grads, result = gtf.gradient(tape, losses, [w], gradand.AndMask(rescale=False))
        >>> grads[0].numpy()  # the second component's environments disagree
        array([2., 0.], dtype=float32)
        >>> float(result.loss), float(result.summary.survivor_fraction)
        (2.0, 0.5)
        >>> _ = keras.optimizers.SGD(0.1).apply_gradients(zip(grads, [w]))
    """
    method = check_method(method)
    source = streaming_statistics if method == "streaming" else vectorized_statistics
    losses, stats = source(tape, losses, variables, combiner, nan_policy=nan_policy, loss_scale=loss_scale)
    return finish(losses, stats, combiner, variables)


def model_gradient(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    combiner: Combiner,
    *,
    method: str = "factored",
    env_ids: Any = None,
    num_envs: int | None = None,
    variables: Any = None,
    training: bool = True,
    chunk_size: int | None = None,
    fallback: str = "vectorized",
    nan_policy: NanPolicy = "raise",
    loss_scale: Any = None,
) -> tuple[Any, Result]:
    """Combined gradients of a Keras model on a batch of environments, in one line.

    ``method="factored"`` (default) is :func:`factored_statistics`;
    ``"vectorized"`` is :func:`vectorized_statistics` (``tf.vectorized_map``
    over the environment axis, or ``tape.jacobian`` with ``env_ids``);
    ``"streaming"`` one forward pass and one ``tape.gradient`` per environment
    (also with ``env_ids``). A ``BatchNormalization`` in training mode gets
    each environment's own batch statistics with ``"factored"`` and
    ``"streaming"``; ``"vectorized"`` refuses it (``ValueError``). Then, as in
    :func:`gradient`, the all-reduce under ``tf.distribute`` and
    :func:`finalize_gradients`.

    Args:
        model: a Keras model, called as ``model(x, training=training)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for one environment
            (a ``keras.losses.Loss`` is called the Keras way).
        inputs: ``(E, n, ...)``, or ``(B, ...)`` with ``env_ids``.
        targets: like ``inputs``.
        combiner: a gradand combiner.
        method: ``"factored"``, ``"vectorized"`` or ``"streaming"``.
        env_ids: ``(B,)`` integer environment of each example (environments of any sizes).
        num_envs: the number of environments with ``env_ids`` (static; needed in ``tf.function``).
        variables: default ``model.trainable_variables``.
        training: passed to the model.
        chunk_size: environments per vectorised pass or batched product.
        fallback: the factored path's ``"vectorized"`` or ``"error"``.
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``.
        loss_scale: a number or a ``keras.optimizers.LossScaleOptimizer``.

    Returns:
        ``(grads, result)`` as :func:`gradient`.

    Example:
        >>> import keras
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
        ...                           keras.layers.Dense(1)])
        >>> x, y = tf.random.normal((10, 3)), tf.random.normal((10, 1))
        >>> env = tf.constant([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # three environments of 3, 2 and 5
        >>> grads, result = gtf.model_gradient(model, keras.losses.MeanSquaredError(), x, y,
        ...                                    gradand.AndMask(0.6), env_ids=env, num_envs=3)
        >>> len(grads), tuple(result.losses.shape)
        (4, (3,))
    """
    method = check_method(method, ("factored", "vectorized", "streaming"))
    if variables is None:
        variables = model.trainable_variables
    options = {"nan_policy": nan_policy, "loss_scale": loss_scale}
    if method == "vectorized":
        check_vectorized(model, training)
    if method == "factored":
        losses, stats = factored_statistics(
            model, loss_fn, inputs, targets, combiner, env_ids=env_ids, num_envs=num_envs,
            variables=variables, training=training, fallback=fallback, chunk_size=chunk_size, **options,
        )  # fmt: skip
    elif method == "vectorized" and env_ids is None:
        losses, stats = vectorized_statistics(
            lambda x_e, y_e: call_loss(loss_fn, model(x_e, training=training), y_e),
            variables, (inputs, targets), combiner, chunk_size=chunk_size, **options,
        )  # fmt: skip
    else:
        persistent = method == "streaming"
        with tf.GradientTape(persistent=persistent) as tape:
            env_losses = _per_environment_losses(
                model, loss_fn, inputs, targets, env_ids, num_envs, training, separate=persistent
            )
        source = streaming_statistics if persistent else vectorized_statistics
        losses, stats = source(tape, env_losses, variables, combiner, **options)
    return finish(losses, stats, combiner, variables)


def _per_environment_losses(
    model: Any,
    loss_fn: Any,
    inputs: Any,
    targets: Any,
    env_ids: Any,
    num_envs: Any,
    training: bool,
    *,
    separate: bool = True,
) -> list[Any]:
    """Each environment's loss; ``separate``: one forward pass per environment also with ``env_ids``.

    (``"streaming"``: a ``BatchNormalization`` in training mode then normalises each
    environment by itself; ``"vectorized"`` differentiates one forward pass of the batch.)
    """
    if env_ids is None:
        n = tf.nest.flatten(inputs)[0].shape[0]
        pick = lambda t, e: tf.nest.map_structure(lambda a: a[e], t)  # noqa: E731
        return [
            call_loss(loss_fn, model(pick(inputs, e), training=training), pick(targets, e)) for e in range(n)
        ]
    batch = tf.nest.flatten(inputs)[0].shape[0]
    env, n = _environment_ids(env_ids, num_envs, batch)
    tgts = [tf.dynamic_partition(tf.convert_to_tensor(t), env, n) for t in tf.nest.flatten(targets)]
    if separate:
        xs = [tf.dynamic_partition(tf.convert_to_tensor(t), env, n) for t in tf.nest.flatten(inputs)]
        return [
            call_loss(
                loss_fn,
                model(tf.nest.pack_sequence_as(inputs, [p[e] for p in xs]), training=training),
                tf.nest.pack_sequence_as(targets, [p[e] for p in tgts]),
            )
            for e in range(n)
        ]
    out = model(inputs, training=training)
    outs = [tf.dynamic_partition(t, env, n) for t in tf.nest.flatten(out)]
    return [
        call_loss(
            loss_fn,
            tf.nest.pack_sequence_as(out, [p[e] for p in outs]),
            tf.nest.pack_sequence_as(targets, [p[e] for p in tgts]),
        )
        for e in range(n)
    ]


def finish(
    losses: Any, stats: list[Statistics | None], combiner: Combiner, variables: Any
) -> tuple[Any, Result]:
    """All-reduce (several replicas), sink, and the :class:`gradand.Result`."""
    ctx, n = replicas()
    if n > 1:
        stats = all_reduce_statistics(stats, replica_context=ctx)
    grads, infos = finalize_gradients(stats, combiner)
    if n > 1:  # apply_gradients sums the replicas' gradients
        grads = [None if g is None else g / tf.cast(n, g.dtype) for g in grads]
    sizes = [math.prod(v.shape) for v in tf.nest.flatten(variables)]
    result = Result(tf.reduce_mean(losses), losses, infos, gradand.summarize(infos, sizes))
    return tf.nest.pack_sequence_as(variables, grads), result
