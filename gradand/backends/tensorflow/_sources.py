"""Sources: the environments' losses and the statistics of their gradients, per variable.

:func:`streaming_statistics` differentiates a tape once per environment and
folds each gradient into running statistics (O(P) memory whatever E is);
:func:`vectorized_statistics` gets every environment's gradient in one
vectorised pass (``tape.jacobian`` of the losses, or ``tf.vectorized_map`` of a
per-environment loss function). The factored source is in ``_factored.py``.
No combiner math lives here: the core computes the statistics on ``tf``
tensors through :mod:`gradand.backends.tensorflow.xp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

import gradand
from gradand import Combiner, Statistics
from gradand._namespace import NanPolicy
from gradand._stats import Fold
from gradand.backends.tensorflow import xp
from gradand.backends.tensorflow._common import (
    check_chunk_size,
    check_loss,
    check_tape,
    dense,
    flat_variables,
    refuse_writes,
    scaled,
    unscale_factor,
)

__all__ = ["streaming_statistics", "vectorized_statistics"]

_NONE = tf.UnconnectedGradients.NONE


def _losses_list(tape: tf.GradientTape, losses: Any) -> list[Any]:
    """``losses`` as a list of scalar tensors recorded on ``tape``."""
    if isinstance(losses, (tf.Tensor, tf.Variable)):
        if losses.shape.rank != 1:
            raise ValueError(
                f"losses must be a list of scalar losses or a 1-D tensor with one loss per "
                f"environment; got a tensor of shape {tuple(losses.shape)}"
            )
        n = losses.shape[0]
        if n is None:
            raise ValueError("losses must have a static number of environments; got shape (None,)")
        with tape:  # slicing must be recorded so that each slice can be differentiated
            out = [losses[e] for e in range(n)]
    elif isinstance(losses, (list, tuple)):
        for e, loss in enumerate(losses):
            if not isinstance(loss, (tf.Tensor, tf.Variable)):
                raise TypeError(
                    f"losses[{e}] must be a scalar tf.Tensor recorded on the tape; got {type(loss).__name__}"
                )
        out = [check_loss(loss, f"losses[{e}]") for e, loss in enumerate(losses)]
    else:
        raise TypeError(
            f"losses must be a list of scalar tensors (one per environment) or a 1-D tensor; "
            f"got {type(losses).__name__}"
        )
    if not out:
        raise ValueError("losses is empty; need the loss of at least one environment")
    if len({loss.dtype for loss in out}) > 1:
        raise TypeError(f"losses must share one dtype; got {sorted({loss.dtype.name for loss in out})}")
    return out


def _losses_vector(tape: tf.GradientTape, losses: Any) -> Any:
    if isinstance(losses, (tf.Tensor, tf.Variable)) and losses.shape.rank == 1:
        if losses.shape[0] in (None, 0):
            raise ValueError(
                f"losses must hold at least one environment's loss; got shape {tuple(losses.shape)}"
            )
        if not losses.dtype.is_floating:
            raise TypeError(f"losses must have a floating dtype; got {losses.dtype.name}")
        return losses
    items = _losses_list(tape, losses)
    with tape:
        return tf.stack(items)


def streaming_statistics(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    loss_scale: Any = None,
) -> tuple[Any, list[Statistics | None]]:
    """The environments' losses and gradient statistics, one ``tape.gradient`` per environment.

    Each environment's gradients are folded into running statistics, so the
    memory does not grow with E; in a ``tf.function`` each environment's
    backward pass waits for the previous one's statistics.

    Args:
        tape: the tape the losses were computed under; ``persistent=True``
            when there is more than one environment.
        losses: one scalar loss per environment: a list, or a 1-D tensor ``(E,)``.
        variables: the variables (any ``tf.nest`` structure, e.g. ``model.trainable_variables``).
        combiner: ``gradand.Mean()``, ``AndMask(...)``, ``GeometricMean(...)``, ``SandMask(...)``.
        nan_policy: ``"raise"`` | ``"zero"`` | ``"propagate"`` (see :func:`gradand.statistics`).
        loss_scale: the factor the losses carry (a number or a
            ``keras.optimizers.LossScaleOptimizer``); gradients and losses are
            divided by it. ``None``: TensorFlow's convention, ``1 / num_replicas``
            inside ``strategy.run`` with several replicas, else 1.

    Returns:
        ``(losses, stats)``: the ``(E,)`` losses and a flat list (the order of
        ``tf.nest.flatten(variables)``) of :class:`gradand.Statistics`,
        ``None`` for a variable that no loss depends on.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> losses, [s] = gtf.streaming_statistics(tape, losses, [w], gradand.AndMask())
        >>> losses.numpy(), s.count, s.sign_sum.numpy()
        (array([3., 1.], dtype=float32), 2, array([2, 0], dtype=int32))
    """
    check_tape(tape)
    flat_vars = flat_variables(variables)
    unscale = unscale_factor(loss_scale)
    items = _losses_list(tape, losses)
    if len(items) > 1 and not tape._persistent:
        raise ValueError(
            f"streaming_statistics differentiates the tape once per environment ({len(items)} losses), "
            f"so the tape must be created with tf.GradientTape(persistent=True); or use "
            f"method='vectorized'"
        )
    stats = fold_statistics(tape, items, flat_vars, combiner, nan_policy=nan_policy, unscale=unscale)
    return scaled(tf.stack(items), unscale), stats


def fold_statistics(
    tape: tf.GradientTape,
    losses: Sequence[Any],
    flat_vars: Sequence[Any],
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    present: Sequence[Any] | None = None,
    unscale: Any = 1.0,
) -> list[Statistics | None]:
    """Fold one environment's gradients at a time into the statistics.

    ``present`` (optional, one boolean 0-d tensor per loss) drops the
    environments absent from a batch: they add nothing and are not counted
    (``count`` becomes a 0-d tensor).
    """
    folds = [Fold(combiner, len(losses), nan_policy=nan_policy, xp=xp) for _ in flat_vars]
    connected = [False] * len(flat_vars)
    previous: list[Any] = []
    # the folds' power-of-two scale as the backward pass's seed: free where every variable allows it
    seeds = {f.seed(v.dtype, xp) for f, v in zip(folds, flat_vars)}
    unscaled = isinstance(unscale, float) and unscale == 1.0
    seed = seeds.pop() if len(seeds) == 1 and unscaled else None
    for e, loss in enumerate(losses):
        seeded = seed is not None and loss.dtype in (tf.float32, tf.float64)
        with tf.control_dependencies(previous):
            out = tf.constant(seed, dtype=loss.dtype) if seeded else None
            grads = tape.gradient(loss, list(flat_vars), output_gradients=out, unconnected_gradients=_NONE)
        flag = None if present is None else present[e]
        for k, (g, v) in enumerate(zip(grads, flat_vars)):
            if g is None and not folds[k].needs_values:
                folds[k].skip(flag)  # this environment casts no vote and adds nothing here
                continue
            if g is None:
                g = tf.zeros(v.shape, dtype=v.dtype)
            else:
                connected[k] = True
                g = dense(g)
            folds[k].add(scaled(g, unscale), present=flag, seeded=seeded)
        previous = [a for f in folds for a in f.arrays()]
    return [f.result() if c else None for f, c in zip(folds, connected)]


def vectorized_statistics(
    source: Any,
    arg1: Any,
    arg2: Any,
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    loss_scale: Any = None,
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Any:
    """The environments' losses and gradient statistics from one vectorised pass.

    Two forms:

    - ``vectorized_statistics(tape, losses, variables, combiner)``: the
      ``(E, *shape)`` Jacobian of the losses by ``tape.jacobian`` (``pfor``),
      then reduced (E x P memory; a non-persistent tape is fine). Each row is
      a backward pass through everything the tape recorded, so this costs
      like E backward passes of the whole batch.
    - ``vectorized_statistics(loss_fn, variables, environments, combiner)``:
      ``loss_fn(*data_e)`` (``loss_fn(data_e)`` when ``environments`` is not a
      tuple) is environment ``e``'s scalar loss from its slice of
      ``environments`` (tensors with the environments on axis 0);
      ``tf.vectorized_map`` differentiates every environment through its own
      slice only (linear in E). ``chunk_size`` environments per pass bound
      the memory; ``has_aux=True``: ``loss_fn`` returns ``(loss, aux)``.

    ``nan_policy`` and ``loss_scale`` as in :func:`streaming_statistics`.

    Returns:
        ``(losses, stats)`` as :func:`streaming_statistics`;
        ``(losses, stats, aux)`` with ``has_aux=True`` (aux stacked over environments).

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> w = tf.Variable([1.0, 1.0])
        >>> x = tf.constant([[1.0, 2.0], [3.0, -2.0]])  # one row per environment
        >>> losses, [s] = gtf.vectorized_statistics(lambda x_e: tf.reduce_sum(w * x_e), [w], x,
        ...                                         gradand.AndMask())
        >>> losses.numpy(), s.count, s.sign_sum.numpy()
        (array([3., 1.], dtype=float32), 2, array([2, 0], dtype=int32))
    """
    if isinstance(source, tf.GradientTape):
        if has_aux:
            raise ValueError("has_aux=True needs the loss_fn form: vectorized_statistics(loss_fn, ...)")
        return _jacobian_statistics(source, arg1, arg2, combiner, nan_policy, loss_scale)
    if not callable(source):
        raise TypeError(
            f"vectorized_statistics takes a tf.GradientTape or a per-environment loss_fn first; got "
            f"{type(source).__name__}"
        )
    check_chunk_size(chunk_size)
    flat_vars = flat_variables(arg1)
    unscale = unscale_factor(loss_scale)
    leaves = [tf.convert_to_tensor(t) for t in tf.nest.flatten(arg2)]
    if not leaves:
        raise ValueError("environments is empty; pass tensors with the environments on axis 0")
    sizes = {None if t.shape.rank == 0 else t.shape[0] for t in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"every tensor in environments must have the same static, non-zero number of environments "
            f"on axis 0; got leading sizes {sorted(map(str, sizes))}"
        )
    (n_env,) = sizes
    connected: list[bool] = []

    def per_environment(data: Any) -> Any:
        graph = tf.compat.v1.get_default_graph()  # vectorized_map traces this function in a graph
        first = len(graph.get_operations())
        with tf.GradientTape() as tape:
            out = source(*data) if isinstance(data, tuple) else source(data)
            loss, aux = out if has_aux else (out, ())
            loss = check_loss(loss, "loss_fn's result")
        refuse_writes(graph, first, "loss_fn")
        grads = tape.gradient(loss, flat_vars, unconnected_gradients=_NONE)
        connected[:] = [g is not None for g in grads]  # known when this function is traced
        full = [tf.zeros(v.shape, v.dtype) if g is None else dense(g) for g, v in zip(grads, flat_vars)]
        return loss, full, aux

    step = chunk_size or n_env
    stats: list[Statistics] = [Statistics() for _ in flat_vars]
    losses, auxes = [], []
    for lo in range(0, n_env, step):
        part = tf.nest.map_structure(lambda t, lo=lo: t[lo : lo + step], arg2)
        loss, grads, aux = tf.vectorized_map(per_environment, part)
        losses.append(loss)
        auxes.append(aux)
        for k, g in enumerate(grads):
            if connected[k]:
                s = gradand.statistics(scaled(g, unscale), combiner, axis=0, nan_policy=nan_policy, xp=xp)
                stats[k] = stats[k] + s
    out = [s if c else None for s, c in zip(stats, connected)]
    losses = scaled(tf.concat(losses, 0) if len(losses) > 1 else losses[0], unscale)
    if not has_aux:
        return losses, out
    aux = auxes[0] if len(auxes) == 1 else tf.nest.map_structure(lambda *t: tf.concat(t, 0), *auxes)
    return losses, out, aux


def _jacobian_statistics(
    tape: tf.GradientTape, losses: Any, variables: Any, combiner: Combiner, nan_policy: Any, loss_scale: Any
) -> tuple[Any, list[Statistics | None]]:
    flat_vars = flat_variables(variables)
    unscale = unscale_factor(loss_scale)
    target = _losses_vector(tape, losses)
    jac = tape.jacobian(target, flat_vars, unconnected_gradients=_NONE)
    stats = [
        None
        if j is None
        else gradand.statistics(scaled(dense(j), unscale), combiner, axis=0, nan_policy=nan_policy, xp=xp)
        for j in jac
    ]
    return scaled(target, unscale), stats
