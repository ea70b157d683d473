"""From a ``tf.GradientTape`` and the environments' losses to combined gradients.

``combined_gradients(tape, losses, variables, combiner)`` is the AND-masked
counterpart of ``tape.gradient(loss, variables)``: it returns one gradient per
variable, in the structure of ``variables``, ready for
``optimizer.apply_gradients``. It is built from three steps that can also be
used on their own:

1. :func:`environment_statistics` — the combiner's additive statistics of the
   per-environment gradients, either by a loop over the environments (one
   ``tape.gradient`` each, folded into running sums: memory independent of
   the number of environments) or vectorised (one ``tape.jacobian`` through
   ``pfor``); :func:`vectorized_statistics` does the same from a per-environment
   loss function with ``tf.vectorized_map``.
2. :func:`all_reduce_statistics` — under ``tf.distribute``, an all-reduce SUM of
   the statistics across replicas (the statistics are additive, so this is
   exactly the statistics of all replicas' environments together).
3. :func:`finalize_gradients` — :func:`gradand.finalize` per variable, plus a
   :class:`gradand.MaskInfo` per variable for logging.

No combiner math lives here: the core does it on ``tf`` tensors through
:mod:`gradand.backends.tensorflow.xp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import tensorflow as tf

import gradand
from gradand import Combiner, MaskInfo, Statistics
from gradand._namespace import NanPolicy
from gradand.backends.tensorflow import xp

__all__ = [
    "CombinedGradients",
    "all_reduce_statistics",
    "combined_gradients",
    "environment_statistics",
    "finalize_gradients",
    "vectorized_statistics",
]

Method = Literal["loop", "vectorized"]
METHODS: tuple[str, ...] = ("loop", "vectorized")


class CombinedGradients(NamedTuple):
    """What :func:`combined_gradients` returns; unpacks as ``gradients, info``.

    Attributes:
        gradients: one combined gradient per variable, in the structure of the
            ``variables`` argument (``None`` for a variable that no loss
            depends on, as ``tape.gradient`` does). Pass
            ``zip(gradients, variables)`` to ``optimizer.apply_gradients``.
        info: a :class:`gradand.MaskInfo` (``survivor_fraction``,
            ``agreement``; 0-d tensors) per variable, same structure
            (``None`` where the gradient is ``None``).
    """

    gradients: Any
    info: Any

    def summary(self) -> MaskInfo:
        """The mask info over all variables, weighted by their sizes (for logging).

        ``survivor_fraction`` is then the fraction of all parameters whose
        update survives; ``agreement`` the mean agreement over all parameters.

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
        leaves = iter(tf.nest.flatten(self.info))  # a MaskInfo flattens to its 2 fields, None to None
        pairs = []
        for g in tf.nest.flatten(self.gradients):
            if g is None:
                next(leaves)
            else:
                pairs.append((g, (next(leaves), next(leaves))))
        if not pairs:
            nan = tf.constant(float("nan"), tf.float32)
            return MaskInfo(nan, nan)
        sizes = [math.prod(g.shape) for g, _ in pairs]
        total = float(sum(sizes))
        fields = []
        for k in range(2):
            parts = [tf.cast(i[k], tf.float32) * (n / total) for (_, i), n in zip(pairs, sizes)]
            fields.append(tf.add_n(parts))
        return MaskInfo(*fields)


def _check_tape(tape: Any) -> None:
    if not isinstance(tape, tf.GradientTape):
        raise TypeError(f"tape must be a tf.GradientTape; got {type(tape).__name__}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def _flat_variables(variables: Any) -> list[Any]:
    flat = tf.nest.flatten(variables)
    if not flat:
        raise ValueError(
            "variables is empty; pass the variables to differentiate (e.g. model.trainable_variables)"
        )
    for k, v in enumerate(flat):
        if not isinstance(v, (tf.Variable, tf.Tensor)) and not hasattr(v, "value"):
            raise TypeError(f"variables[{k}] must be a tf.Variable or tensor; got {type(v).__name__}")
    return flat


def _check_loss(loss: Any, where: str) -> Any:
    if not isinstance(loss, (tf.Tensor, tf.Variable)):
        raise TypeError(
            f"{where} must be a scalar tf.Tensor computed under the tape; got {type(loss).__name__}"
        )
    if loss.shape.rank != 0:
        raise ValueError(
            f"{where} must be a scalar (one loss per environment); got shape {tuple(loss.shape)}. "
            f"Reduce each environment's per-example losses to their mean first"
        )
    if not loss.dtype.is_floating:
        raise TypeError(f"{where} must have a floating dtype; got {loss.dtype.name}")
    return loss


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
        out = [_check_loss(loss, f"losses[{e}]") for e, loss in enumerate(losses)]
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


def _dense(grad: Any) -> Any:
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


def environment_statistics(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    method: Method = "loop",
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> list[Statistics | None]:
    """The combiner's statistics of each variable's per-environment gradients.

    Args:
        tape: the ``tf.GradientTape`` the losses were computed under. The
            ``"loop"`` method differentiates it once per environment, so it
            must be ``persistent=True`` when there is more than one environment.
        losses: one scalar loss per environment: a list of scalar tensors, or
            a 1-D tensor of shape ``(E,)``.
        variables: the variables (any ``tf.nest`` structure, e.g.
            ``model.trainable_variables``).
        combiner: ``gradand.Mean()``, ``AndMask(...)``, ``GeometricMean(...)``, ``SandMask(...)``.
        method: ``"loop"`` folds one environment at a time into running sums
            (O(P) extra memory whatever E is; in a ``tf.function`` each
            environment's backward pass waits for the previous one's
            statistics, so no two are alive at once). ``"vectorized"`` computes
            the (E, *shape) Jacobian of the losses with ``tape.jacobian``
            (``pfor``) and reduces it (E x P memory); it works on a
            non-persistent tape. Both give the same statistics. Each Jacobian
            row is a backward pass through everything the tape recorded, all
            environments' forward passes included, so its cost grows like E²:
            on the spirals MLP (16 environments) it is several times slower
            than the loop. For a vectorised pass that is linear in E, use
            :func:`vectorized_statistics` on a per-environment loss function.
        nan_policy: ``"raise"`` | ``"zero"`` | ``"propagate"`` (see :func:`gradand.statistics`).
        loss_scale: the factor the losses carry; the gradients are divided by
            it before the statistics, so that they are those of each
            environment's own loss. ``None`` (default) follows TensorFlow's
            convention: ``1 / num_replicas`` inside ``strategy.run`` with
            several replicas (what a ``keras.losses.Loss`` object gives there
            when it reduces per-example losses, e.g. for targets of shape
            ``(B, 1)``), else 1. Pass ``1.0`` for losses that are each
            environment's plain mean under a strategy (``tf.reduce_mean``,
            or a Keras loss on 1-D targets, which Keras reduces to a scalar
            without dividing).

    Returns:
        A flat list (the order of ``tf.nest.flatten(variables)``) of
        :class:`gradand.Statistics`, ``None`` for a variable that no loss depends on.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import environment_statistics
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> [s] = environment_statistics(tape, losses, [w], gradand.AndMask())
        >>> s.count, s.sign_sum.numpy()
        (2, array([2, 0], dtype=int32))
    """
    _check_tape(tape)
    _check_method(method)
    flat_vars = _flat_variables(variables)
    unscale = 1.0 / _resolve_loss_scale(loss_scale)
    if method == "vectorized":
        target = _losses_vector(tape, losses)
        jac = tape.jacobian(target, flat_vars, unconnected_gradients=tf.UnconnectedGradients.NONE)
        return [
            None
            if j is None
            else gradand.statistics(_scaled(j, unscale), combiner, axis=0, nan_policy=nan_policy, xp=xp)
            for j in jac
        ]

    items = _losses_list(tape, losses)
    if len(items) > 1 and not tape._persistent:
        raise ValueError(
            f"method='loop' differentiates the tape once per environment ({len(items)} losses), "
            f"so the tape must be created with tf.GradientTape(persistent=True); or use "
            f"method='vectorized'"
        )
    return _loop_statistics(tape, items, flat_vars, combiner, nan_policy=nan_policy, unscale=unscale)


def _resolve_loss_scale(loss_scale: Any) -> float:
    if loss_scale is None:
        return 1.0 / _replicas()[1]
    if (
        isinstance(loss_scale, bool)
        or not isinstance(loss_scale, (int, float))
        or not 0 < loss_scale < math.inf
    ):
        raise ValueError(f"loss_scale must be a finite number > 0 (or None); got {loss_scale!r}")
    return float(loss_scale)


def _scaled(g: Any, factor: float) -> Any:
    return g if factor == 1.0 else g * tf.cast(factor, g.dtype)


def _loop_statistics(
    tape: tf.GradientTape,
    losses: Sequence[Any],
    flat_vars: Sequence[Any],
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    present: Sequence[Any] | None = None,
    unscale: float = 1.0,
) -> list[Statistics | None]:
    """Fold one environment's gradients at a time into the statistics (the ``"loop"`` method).

    ``present`` (optional, one boolean 0-d tensor per loss) drops the
    environments that are absent from a batch: they add nothing to any sum
    and are not counted (``count`` becomes a 0-d tensor).
    """
    totals: list[Statistics] = [Statistics() for _ in flat_vars]
    connected = [False] * len(flat_vars)
    for e, loss in enumerate(losses):
        # Sequence the environments: this backward pass starts once the previous
        # environment's statistics exist, so its gradients can be freed first.
        previous = [a for s in totals for a in s.arrays().values()]
        with tf.control_dependencies(previous):
            grads = tape.gradient(loss, list(flat_vars), unconnected_gradients=tf.UnconnectedGradients.NONE)
        for k, (g, v) in enumerate(zip(grads, flat_vars)):
            if g is None:
                g = tf.zeros(v.shape, dtype=v.dtype)  # this environment casts no vote here
            else:
                connected[k] = True
                g = _dense(g)
            stats = gradand.statistics(_scaled(g, unscale), combiner, axis=None, nan_policy=nan_policy, xp=xp)
            if present is not None:
                stats = _weighted(stats, present[e])
            totals[k] = totals[k] + stats
    return [s if c else None for s, c in zip(totals, connected)]


def _weighted(stats: Statistics, present: Any) -> Statistics:
    """``stats`` if ``present`` else the statistics of no environment (zeros, count 0)."""
    arrays = stats.arrays()
    weighted = {name: a * tf.cast(present, a.dtype) for name, a in arrays.items()}
    return stats.replace(count=tf.cast(present, tf.int32), **weighted)


def vectorized_statistics(
    loss_fn: Callable[..., Any],
    variables: Any,
    environments: Any,
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    has_aux: bool = False,
    loss_scale: float | None = None,
) -> Any:
    """Statistics of per-environment gradients by ``tf.vectorized_map`` over an environment axis.

    ``loss_fn(*data_e)`` (or ``loss_fn(data_e)`` when ``environments`` is not
    a tuple) computes environment ``e``'s scalar loss from its slice of
    ``environments``, whose tensors all carry the environments on axis 0. The
    per-environment gradients (E, *shape) come from one vectorised backward
    pass, each environment through its own slice only: the fast path when the
    environments have equal-sized batches.

    With ``has_aux=True``, ``loss_fn`` returns ``(loss, aux)`` (e.g. the
    predictions) and the result is ``(statistics, aux)`` with ``aux`` stacked
    over the environments. ``loss_scale`` is as in :func:`environment_statistics`.

    Returns:
        A flat list of :class:`gradand.Statistics` as in :func:`environment_statistics`.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import vectorized_statistics
        >>> w = tf.Variable([1.0, 1.0])
        >>> x = tf.constant([[1.0, 2.0], [3.0, -2.0]])  # one row per environment
        >>> [s] = vectorized_statistics(lambda x_e: tf.reduce_sum(w * x_e), [w], x, gradand.AndMask())
        >>> s.count, s.sign_sum.numpy()
        (2, array([2, 0], dtype=int32))
    """
    flat_vars = _flat_variables(variables)
    unscale = 1.0 / _resolve_loss_scale(loss_scale)
    leaves = tf.nest.flatten(environments)
    if not leaves:
        raise ValueError("environments is empty; pass tensors with the environments on axis 0")
    sizes = {None if t.shape.rank == 0 else t.shape[0] for t in map(tf.convert_to_tensor, leaves)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"every tensor in environments must have the same static, non-zero number of environments "
            f"on axis 0; got leading sizes {sorted(map(str, sizes))}"
        )

    connected: list[bool] = []

    def per_environment(data: Any) -> Any:
        with tf.GradientTape() as tape:
            out = loss_fn(*data) if isinstance(data, tuple) else loss_fn(data)
            loss, aux = out if has_aux else (out, ())
            loss = _check_loss(tf.convert_to_tensor(loss), "loss_fn's result")
        grads = tape.gradient(loss, flat_vars, unconnected_gradients=tf.UnconnectedGradients.NONE)
        connected[:] = [g is not None for g in grads]  # known when this function is traced
        dense = [tf.zeros(v.shape, v.dtype) if g is None else _dense(g) for g, v in zip(grads, flat_vars)]
        return dense, aux

    grads, aux = tf.vectorized_map(per_environment, environments)
    stats = [
        gradand.statistics(_scaled(g, unscale), combiner, axis=0, nan_policy=nan_policy, xp=xp) if c else None
        for g, c in zip(grads, connected)
    ]
    return (stats, aux) if has_aux else stats


def all_reduce_statistics(
    stats: Sequence[Statistics | None], *, replica_context: tf.distribute.ReplicaContext | None = None
) -> list[Statistics | None]:
    """All-reduce (SUM) statistics across the replicas of a ``tf.distribute`` strategy.

    Call it inside ``strategy.run``. The core's
    :func:`gradand.all_reduce_statistics` does the rounds (the environment
    count, then the count-weighted means and the exact sign votes, then
    ``M2`` for ``SandMask``), each a batched all-reduce; the result is the
    statistics of every replica's environments together (``count`` becomes a
    0-d int32 tensor inside a ``tf.function``), the same on every replica. Outside a strategy (the
    default replica context, one replica) it returns the statistics unchanged.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import all_reduce_statistics
        >>> s = gradand.statistics(tf.constant([[1.0, -1.0]]), gradand.AndMask())
        >>> all_reduce_statistics([s])[0].count  # no strategy: one replica
        1
    """
    ctx = replica_context or tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError(
            "all_reduce_statistics() must run in a replica context (inside strategy.run(...)); "
            "it was called in a cross-replica context"
        )
    if ctx.num_replicas_in_sync == 1:
        return list(stats)
    present = [s for s in stats if s is not None]
    for s in present:
        if not isinstance(s, Statistics):
            raise TypeError(f"stats must hold gradand.Statistics or None; got {type(s).__name__}")
    if not present:
        return list(stats)
    def all_reduce_sum(arrays: Sequence[Any]) -> list[Any]:
        # TensorFlow keeps int32 tensors in host memory, and one all-reduce cannot mix host and
        # device tensors: the integer votes and counts travel as float32 (exact up to 2**24).
        sent = [tf.cast(a, tf.float32) if a.dtype == tf.int32 else a for a in arrays]
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sent)
        return [tf.cast(r, tf.int32) if a.dtype == tf.int32 else r for a, r in zip(arrays, summed)]

    reduced = iter(gradand.all_reduce_statistics(present, all_reduce_sum))
    return [None if s is None else next(reduced) for s in stats]


def finalize_gradients(
    stats: Sequence[Statistics | None], combiner: Combiner, *, structure: Any = None
) -> CombinedGradients:
    """:func:`gradand.finalize` for each variable's statistics, with the mask info.

    Args:
        stats: a flat list of statistics (``None`` stays ``None``).
        combiner: the combiner the statistics were computed for.
        structure: pack the results like this ``tf.nest`` structure (e.g. the
            ``variables`` that were differentiated); a flat list by default.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> from gradand.backends.tensorflow import finalize_gradients
        >>> c = gradand.AndMask(rescale=False)
        >>> s = gradand.statistics(tf.constant([[1.0, -1.0], [3.0, 1.0]]), c)
        >>> grads, info = finalize_gradients([s], c)
        >>> grads[0].numpy(), float(info[0].survivor_fraction)
        (array([2., 0.], dtype=float32), 0.5)
    """
    grads: list[Any] = []
    infos: list[Any] = []
    for s in stats:
        if s is None:
            grads.append(None)
            infos.append(None)
            continue
        update, info = gradand.finalize(s, combiner, return_info=True, xp=xp)
        grads.append(update)
        infos.append(info)
    if structure is not None:
        return CombinedGradients(tf.nest.pack_sequence_as(structure, grads), _pack_info(structure, infos))
    return CombinedGradients(grads, infos)


def _pack_info(structure: Any, infos: list[Any]) -> Any:
    # Pack MaskInfo leaves without tf.nest descending into the NamedTuple.
    boxes = [_Box(i) for i in infos]
    packed = tf.nest.pack_sequence_as(structure, boxes)
    return tf.nest.map_structure(lambda b: b.value, packed)


class _Box:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _replicas() -> tuple[tf.distribute.ReplicaContext | None, int]:
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return None, 1
    return ctx, ctx.num_replicas_in_sync


def combined_gradients(
    tape: tf.GradientTape,
    losses: Any,
    variables: Any,
    combiner: Combiner,
    *,
    method: Method = "loop",
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> CombinedGradients:
    """Combined gradients of the environments' losses: the AND-mask's ``tape.gradient``.

    Computes the per-environment gradients of ``losses`` with respect to
    ``variables`` from ``tape``, combines them with ``combiner`` per variable
    and returns ``(gradients, info)`` with the structure of ``variables``.

    Under ``tf.distribute`` (called inside ``strategy.run`` with N > 1
    replicas, each holding its own environments) the statistics are
    all-reduced with SUM and finalized, so every replica computes the update
    of all environments together; each replica then returns ``update / N``,
    because ``optimizer.apply_gradients`` sums the gradients of the replicas.
    The result is the update that one replica seeing every environment would apply.
    The losses follow TensorFlow's convention for replicas: each divided by
    the number of replicas, which is what a ``keras.losses.Loss`` object
    returns inside ``strategy.run`` for targets of shape ``(B, 1)``; gradand
    multiplies the gradients back before combining, so a combiner sees each
    environment's own gradient. ``loss_scale`` says otherwise, e.g.
    ``loss_scale=1.0`` for losses that are each environment's plain mean.

    Args:
        tape: the ``tf.GradientTape`` the losses were recorded on
            (``persistent=True`` for ``method="loop"``).
        losses: one scalar loss per environment (list of scalars or a 1-D tensor).
        variables: what to differentiate (any ``tf.nest`` structure).
        combiner: a gradand combiner.
        method: ``"loop"`` (memory independent of the number of environments)
            or ``"vectorized"`` (``tape.jacobian``); see :func:`environment_statistics`.
        nan_policy: ``"raise"`` (eagerly ``ValueError``; in a ``tf.function``
            ``tf.errors.InvalidArgumentError`` from ``tf.debugging.check_numerics``;
            skipped under XLA), ``"zero"`` or ``"propagate"``.
        loss_scale: the factor the losses carry (see :func:`environment_statistics`);
            by default ``1 / num_replicas`` under ``tf.distribute``, else 1.

    Returns:
        :class:`CombinedGradients` ``(gradients, info)``; ``info`` holds a
        :class:`gradand.MaskInfo` per variable and ``.summary()`` an overall one.

    Example:
        >>> import tensorflow as tf
        >>> import keras
        >>> import gradand
        >>> from gradand.backends.tensorflow import combined_gradients
        >>> w = tf.Variable([1.0, 1.0])
        >>> with tf.GradientTape(persistent=True) as tape:
        ...     losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
        >>> grads, info = combined_gradients(tape, losses, [w], gradand.AndMask(rescale=False))
        >>> grads[0].numpy()  # the second component's environments disagree
        array([2., 0.], dtype=float32)
        >>> float(info[0].survivor_fraction)
        0.5
        >>> _ = keras.optimizers.SGD(0.1).apply_gradients(zip(grads, [w]))
        >>> w.numpy()
        array([0.8, 1. ], dtype=float32)
    """
    stats = environment_statistics(
        tape, losses, variables, combiner, method=method, nan_policy=nan_policy, loss_scale=loss_scale
    )
    return _finish(stats, combiner, variables)


def _finish(stats: list[Statistics | None], combiner: Combiner, variables: Any) -> CombinedGradients:
    ctx, n = _replicas()
    if n > 1:
        stats = all_reduce_statistics(stats, replica_context=ctx)
    out = finalize_gradients(stats, combiner, structure=variables)
    if n > 1:
        share = tf.nest.map_structure(lambda g: g / tf.cast(n, g.dtype), out.gradients)
        out = CombinedGradients(share, out.info)
    return out
