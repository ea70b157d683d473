"""The factored path: per-environment gradients of Keras ``Dense`` layers from one backward pass.

A dense layer ``z = x @ W + b`` has the weight gradient ``Σ_b x_b ⊗ δ_b``
(``x_b`` the layer's input, ``δ_b = ∂loss/∂z_b`` the gradient at its
pre-activation output). Examples do not interact, so for ``total = Σ_e loss_e``
the output gradient of an example of environment ``e`` is ``∂loss_e/∂z``, and
environment ``e``'s kernel gradient is ``X_eᵀ Δ_e``. One forward pass over
every example, one ``tape.gradient`` with respect to the layers' outputs and
one batched matrix product per layer give every environment's gradient; the
statistics and the update come from the core (:func:`gradand.statistics`,
:func:`gradand.outer_statistics`, :func:`gradand.finalize`) through
:mod:`gradand.backends.tensorflow.xp`. No combiner math lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

import gradand
from gradand import Combiner, Statistics
from gradand._namespace import NanPolicy, check_nan_policy
from gradand.backends.tensorflow import xp
from gradand.backends.tensorflow._gradients import (
    CombinedGradients,
    _dense,
    _finish,
    _flat_variables,
    _resolve_loss_scale,
    _scaled,
)

__all__ = ["factored_gradients", "factored_statistics"]

FALLBACKS: tuple[str, ...] = ("jacobian", "error")

#: Bytes of per-environment gradients per statistics pass when ``chunk_size`` is None: small
#: enough that the batched product and the passes of the statistics over it stay in cache.
_CHUNK_BYTES = 2 * 1024 * 1024


def _supported(layer: Any) -> bool:
    """A plain Keras ``Dense`` layer: its own ``call``, no LoRA, not quantized."""
    return (
        isinstance(layer, keras.layers.Dense)
        and type(layer).call is keras.layers.Dense.call
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and "call" not in vars(layer)
    )


def _key(v: Any) -> int:
    """Identity of a variable: a Keras variable and the ``tf.Variable`` it holds are one variable."""
    if isinstance(v, keras.Variable):
        v = v.value
    return id(v)


def _layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:  # pragma: no cover - Keras internals moved
        return list(getattr(model, "layers", []))
    return list(flatten(include_self=True, recursive=True))


class _Call:
    """One call of a supported layer: its input ``x`` and pre-activation output ``z``."""

    __slots__ = ("layer", "x", "z")

    def __init__(self, layer: Any, x: Any, z: Any) -> None:
        self.layer, self.x, self.z = layer, x, z


def _recording_call(layer: Any, calls: list[_Call], bad: set[int], batch: int) -> Callable[..., Any]:
    """``Dense.call`` computed as it is, recording ``x`` and ``z`` before the activation."""

    def call(inputs: Any, training: Any = None) -> Any:
        z = keras.ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = keras.ops.add(z, layer.bias)
        if inputs.shape.rank is not None and inputs.shape.rank >= 2 and inputs.shape[0] == batch:
            calls.append(_Call(layer, inputs, z))
        else:
            bad.add(id(layer))
        return z if layer.activation is None else layer.activation(z)

    return call


def _check_data(name: str, data: Any) -> tuple[list[Any], int, int]:
    leaves = [tf.convert_to_tensor(t) for t in tf.nest.flatten(data)]
    if not leaves:
        raise ValueError(f"{name} is empty; pass tensors of shape (E, n, ...)")
    shapes = [tuple(t.shape) for t in leaves]
    for t in leaves:
        if t.shape.rank is None or t.shape.rank < 2:
            raise ValueError(
                f"{name} must have shape (E, n, ...): environments, then examples; got shape "
                f"{tuple(t.shape)} (for one example per environment use {name}[:, None])"
            )
        if t.shape[0] is None or t.shape[1] is None:
            raise ValueError(
                f"{name} must have a static number of environments and examples (axes 0 and 1); "
                f"got shape {tuple(t.shape)}"
            )
    heads = {t.shape[:2] for t in leaves}
    if len(heads) > 1:
        raise ValueError(f"every tensor of {name} must share its (E, n) leading axes; got shapes {shapes}")
    n_env, n_ex = leaves[0].shape[0], leaves[0].shape[1]
    if n_env == 0 or n_ex == 0:
        raise ValueError(
            f"{name} has shape {shapes[0]}; need at least one environment (axis 0) and one example "
            f"per environment (axis 1)"
        )
    return leaves, n_env, n_ex


def _model_input_shapes(model: Any) -> list[tuple[Any, ...]] | None:
    """The shapes ``(None, ...)`` of a functional/Sequential model's inputs, if it declares them."""
    try:
        declared = model.inputs
    except (AttributeError, ValueError):
        return None
    if not declared:
        return None
    try:
        return [tuple(t.shape) for t in tf.nest.flatten(declared)]
    except (AttributeError, TypeError):  # pragma: no cover - not Keras tensors
        return None


def _check_input_shapes(model: Any, leaves: list[Any]) -> None:
    shapes = _model_input_shapes(model)
    if shapes is None or len(shapes) != len(leaves):
        return
    for k, (declared, t) in enumerate(zip(shapes, leaves)):
        got = tuple(t.shape)
        ok = len(got) == len(declared) + 1 and all(d is None or d == g for d, g in zip(declared[1:], got[2:]))
        if not ok:
            where = "inputs" if len(leaves) == 1 else f"inputs leaf {k}"
            want = ", ".join(["E", "n", *(str(d) for d in declared[1:])])
            raise ValueError(
                f"{where} must have shape ({want}): environments, examples, then the model's input "
                f"shape {declared}; got shape {got}"
            )


def _check_batch_norm(model: Any, training: bool) -> None:
    if not training:
        return
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            raise ValueError(
                f"model contains BatchNormalization layer {layer.name!r}, which in training mode "
                f"normalises over the whole batch, so the environments' examples would interact; the "
                f"factored path needs every example computed on its own. Pass training=False, freeze "
                f"the layer (layer.trainable = False), or use vectorized_statistics"
            )


def _check_loss(loss: Any) -> Any:
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(
            f"loss_fn must return one environment's loss as a scalar; got shape {tuple(loss.shape)}. "
            f"Reduce the per-example losses to their mean (a keras.losses.Loss object does)"
        )
    if not loss.dtype.is_floating:
        raise TypeError(f"loss_fn must return a floating loss; got {loss.dtype.name}")
    return loss


def _env_losses(loss_fn: Callable[..., Any], targets: Any, outputs: Any) -> Any:
    """``(E,)``: ``loss_fn(targets[e], outputs[e])`` for every environment, vectorised."""
    return tf.vectorized_map(lambda args: _check_loss(loss_fn(*args)), (targets, outputs))


def _stats(
    g: Any,
    combiner: Combiner,
    policy: NanPolicy,
    name: str,
    checks: list[Any],
    outer: Any = None,
) -> Statistics:
    """The core's statistics of ``g`` (E, ...) (or its outer form), "raise" checked on the sums.

    A NaN or Inf in any environment's gradient reaches ``sum`` (every
    combiner needs it), so under ``nan_policy="raise"`` the check runs on the
    E× smaller sums: eagerly here (a failed check reruns the core's own check
    for its error message), in a graph by appending the sum to ``checks``,
    which :func:`_checked` tests all at once.
    """

    def compute(p: NanPolicy) -> Statistics:
        if outer is not None:
            return gradand.outer_statistics(g, outer, combiner, nan_policy=p, xp=xp)
        return gradand.statistics(g, combiner, axis=0, nan_policy=p, xp=xp)

    try:
        if policy != "raise":
            return compute(policy)
        s = compute("propagate")
        if tf.executing_eagerly():
            if not bool(tf.reduce_all(tf.math.is_finite(s.mean))):
                compute("raise")  # raises the core's ValueError
        else:
            checks.append(s.mean)
        return s
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _checked(stats: list[Statistics | None], checks: list[Any]) -> list[Statistics | None]:
    """``stats`` after one check (``xp.gradand_check_finite``) that every sum in ``checks`` is finite.

    One check over a scalar that is NaN exactly when some sum holds a NaN or
    Inf (``Σ (sum · 0)``), instead of one check per variable: fewer ops per step.
    """
    if not checks:
        return stats
    flag = tf.add_n([tf.cast(tf.reduce_sum(c * tf.zeros((), c.dtype)), tf.float32) for c in checks])
    flag = xp.gradand_check_finite(flag, "a per-environment gradient")
    with tf.control_dependencies([flag]):
        return [None if s is None else s.replace(mean=tf.identity(s.mean)) for s in stats]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def factored_statistics(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    combiner: Combiner,
    *,
    variables: Any = None,
    training: bool = True,
    fallback: str = "jacobian",
    chunk_size: int | None = None,
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
    return_losses: bool = False,
) -> Any:
    """Statistics of per-environment gradients from one forward and one backward pass.

    The same statistics as :func:`vectorized_statistics` (up to floating-point
    rounding), for a Keras model and per-environment batches, usually at close
    to the cost of an ordinary training step:

    1. one forward pass ``model(inputs flattened to (E·n, ...), training=training)``
       under a ``tf.GradientTape``; meanwhile every supported layer records its
       input ``X`` and its pre-activation output ``z``. Supported: Keras 3
       ``keras.layers.Dense`` (any activation, with or without bias; not a
       subclass that overrides ``call``, not LoRA-enabled, not quantized)
       called on inputs whose axis 0 is the ``E·n`` examples (rank 2 or more;
       the kernel acts on the last axis). Convolutions, embeddings and other
       layers are not factored: their variables fall back (below);
    2. each environment's loss ``loss_fn(targets[e], outputs[e])`` (vectorised
       over environments with ``tf.vectorized_map``) and one
       ``tape.gradient(Σ_e loss_e, [z, ...])``: the gradients ``Δ`` at the
       layers' outputs, without the weight-gradient products;
    3. per layer, the environments' kernel gradients ``X_eᵀ Δ_e`` as one
       batched matrix product ``(E, in, out)`` (in chunks of environments) and
       bias gradients ``Σ Δ_e``, then :func:`gradand.statistics`. With one
       example per environment (``n == 1``) on a rank-2 layer input and a
       combiner whose statistics are in :data:`gradand.OUTER_STATISTICS`
       (``Mean``, ``AndMask``, ``SandMask``), :func:`gradand.outer_statistics`
       gives the statistics with no per-example gradient array at all.

    Requirements: examples must not interact in the forward pass (so a
    trainable ``BatchNormalization`` in training mode raises ``ValueError``);
    a supported layer's variables must be used only through that layer's
    call. Variables of a supported layer that is never called, or called on
    inputs without the batch axis first, fall back.

    Every other variable (``LayerNormalization``, ``Conv2D``, ``Embedding``,
    custom layers, ...) falls back: with ``fallback="jacobian"`` its
    per-environment gradients come from ``tape.jacobian`` of the
    environments' losses over the same forward pass (``pfor``; each row a
    backward pass through the whole batch, so this part costs about E
    backward passes); with ``fallback="error"`` a ``ValueError`` lists them.

    Args:
        model: a Keras model (or layer), called as ``model(x, training=training)``.
        loss_fn: ``loss_fn(y_true, y_pred) -> scalar``: one environment's loss,
            Keras's argument order (e.g. ``keras.losses.BinaryCrossentropy(from_logits=True)``).
        inputs: ``(E, n, ...)`` floating tensors (or a ``tf.nest`` structure of
            them): E environments of n examples; ``(B, 1, ...)`` makes every
            example its own environment.
        targets: ``(E, n, ...)`` (or a structure), the same E and n.
        combiner: ``gradand.Mean()``, ``AndMask(...)``, ``GeometricMean(...)``, ``SandMask(...)``.
        variables: what to differentiate (any ``tf.nest`` structure); default
            ``model.trainable_variables``.
        training: passed to the model.
        fallback: ``"jacobian"`` or ``"error"``, for variables outside
            supported layers.
        chunk_size: environments per batched product and statistics pass;
            ``None`` picks about 2 MiB of gradients per chunk (cache-sized).
            The result is the same.
        nan_policy: as in :func:`vectorized_statistics`. ``"raise"`` checks
            the summed statistics (a NaN or Inf in any environment reaches
            them): eagerly ``ValueError``, in a ``tf.function``
            ``tf.errors.InvalidArgumentError``, skipped under XLA.
        loss_scale: the factor the losses carry, as in :func:`environment_statistics`.
        return_losses: also return the ``(E,)`` tensor of the environments' losses.

    Returns:
        A flat list (the order of ``tf.nest.flatten(variables)``) of
        :class:`gradand.Statistics`, ``None`` for a variable that no loss
        depends on; ``(statistics, losses)`` with ``return_losses=True``.
        Finalize with :func:`finalize_gradients`.

    Example:
        >>> import keras
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
        ...                           keras.layers.Dense(1)])
        >>> x = tf.random.normal((5, 8, 3))  # 5 environments of 8 examples
        >>> y = tf.cast(tf.random.uniform((5, 8, 1)) > 0.5, tf.float32)
        >>> bce = keras.losses.BinaryCrossentropy(from_logits=True)
        >>> combiner = gradand.AndMask(threshold=0.8)
        >>> stats = gtf.factored_statistics(model, bce, x, y, combiner)
        >>> [s.count for s in stats], tuple(stats[0].mean.shape)
        ([5, 5, 5, 5], (3, 4))
        >>> slow = gtf.vectorized_statistics(lambda a, b: bce(b, model(a)), model.trainable_variables,
        ...                                  (x, y), combiner)
        >>> fast_grads, _ = gtf.finalize_gradients(stats, combiner)
        >>> slow_grads, _ = gtf.finalize_gradients(slow, combiner)
        >>> all(bool(tf.reduce_all(tf.abs(a - b) < 1e-5)) for a, b in zip(fast_grads, slow_grads))
        True
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Keras model or layer; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (y_true, y_pred) -> scalar; got {type(loss_fn).__name__}")
    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (gradand.AndMask(), ...); got {type(combiner).__name__}"
        )
    check_nan_policy(nan_policy)
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    x_leaves, n_env, n_ex = _check_data("inputs", inputs)
    for k, t in enumerate(x_leaves):
        if not t.dtype.is_floating:
            where = "inputs" if len(x_leaves) == 1 else f"inputs leaf {k}"
            raise TypeError(
                f"{where} must have a floating dtype (the factored path differentiates through the "
                f"model's inputs); got {t.dtype.name} with shape {tuple(t.shape)}. Cast with "
                f"tf.cast(inputs, tf.float32), or use vectorized_statistics"
            )
    _check_input_shapes(model, x_leaves)
    y_leaves, y_env, y_ex = _check_data("targets", targets)
    if (y_env, y_ex) != (n_env, n_ex):
        raise ValueError(
            f"targets must have the same (E, n) leading axes as inputs: inputs have shape "
            f"{tuple(x_leaves[0].shape)} (E={n_env}, n={n_ex}), targets {tuple(y_leaves[0].shape)} "
            f"(E={y_env}, n={y_ex})"
        )
    if variables is None:
        variables = getattr(model, "trainable_variables", None)
        if variables is None:
            raise TypeError(
                f"model has no trainable_variables ({type(model).__name__}); pass variables= explicitly"
            )
    flat_vars = _flat_variables(variables)
    unscale = 1.0 / _resolve_loss_scale(loss_scale)
    _check_batch_norm(model, training)

    batch = n_env * n_ex
    wanted = {_key(v) for v in flat_vars}
    supported = []
    for layer in _layers(model):
        if _supported(layer) and any(_key(v) in wanted for v in layer.trainable_variables):
            supported.append(layer)
    supported = list({id(m): m for m in supported}.values())

    flat_x = tf.nest.pack_sequence_as(inputs, [tf.reshape(t, (batch, *t.shape[2:])) for t in x_leaves])
    calls: list[_Call] = []
    bad: set[int] = set()
    with tf.GradientTape(persistent=True) as tape:
        for layer in supported:
            object.__setattr__(layer, "call", _recording_call(layer, calls, bad, batch))
        try:
            out = model(flat_x, training=training)
        finally:
            for layer in supported:
                object.__delattr__(layer, "call")
        out_leaves = tf.nest.flatten(out)
        for t in out_leaves:
            if t.shape.rank is None or t.shape.rank < 1 or t.shape[0] != batch:
                raise ValueError(
                    f"model(inputs) must return tensors with the {batch} examples (E·n = {n_env}·{n_ex}) "
                    f"on axis 0; got shape {tuple(t.shape)}"
                )
        outputs = tf.nest.pack_sequence_as(
            out, [tf.reshape(t, (n_env, n_ex, *t.shape[1:])) for t in out_leaves]
        )
        losses = _env_losses(loss_fn, targets, outputs)
        total = tf.reduce_sum(losses)

    # Which variables are factored: those of supported layers called (only) on batch-first inputs.
    called: dict[int, list[_Call]] = {}
    for c in calls:
        called.setdefault(id(c.layer), []).append(c)
    owner: dict[int, tuple[Any, str]] = {}
    for layer in supported:
        if id(layer) in called and id(layer) not in bad:
            owner[_key(layer.kernel)] = (layer, "kernel")
            if layer.bias is not None:
                owner[_key(layer.bias)] = (layer, "bias")
    rest = [k for k, v in enumerate(flat_vars) if _key(v) not in owner]
    if rest and fallback == "error":
        listed = [
            f"{getattr(flat_vars[k], 'path', None) or flat_vars[k].name} {tuple(flat_vars[k].shape)}"
            for k in rest
        ]
        raise ValueError(
            f"factored_statistics handles the variables of keras.layers.Dense layers called on "
            f"batch-first inputs; these variables are outside them: {listed}. Pass "
            f"fallback='jacobian' (per-environment gradients by tape.jacobian) or use "
            f"vectorized_statistics"
        )

    stats: list[Statistics | None] = [None] * len(flat_vars)
    checks: list[Any] = []
    if rest:
        jac = tape.jacobian(
            losses, [flat_vars[k] for k in rest], unconnected_gradients=tf.UnconnectedGradients.NONE
        )
        for k, j in zip(rest, jac):
            if j is not None:
                stats[k] = _stats(
                    _scaled(_dense(j), unscale), combiner, nan_policy, _name(flat_vars[k]), checks
                )

    owners = {id(layer) for layer, _ in owner.values()}
    needed = [c for c in calls if id(c.layer) in owners]
    deltas = tape.gradient(total, [c.z for c in needed]) if needed else []
    del tape
    delta_of = {id(c): d for c, d in zip(needed, deltas)}
    outer_ok = n_ex == 1 and set(combiner.statistics) <= gradand.OUTER_STATISTICS

    for k, v in enumerate(flat_vars):
        if _key(v) not in owner:
            continue
        layer, kind = owner[_key(v)]
        parts = [(c, delta_of[id(c)]) for c in called[id(layer)] if delta_of[id(c)] is not None]
        if not parts:
            continue  # the layer's output does not reach the loss: no gradient, as tape.gradient says
        dtype = tf.as_dtype(v.dtype)
        name = _name(v)
        factors = []
        for c, d in parts:
            x = c.x if c.x.dtype == dtype else tf.cast(c.x, dtype)
            d = _scaled(d if d.dtype == dtype else tf.cast(d, dtype), unscale)
            factors.append((x, d))
        if outer_ok and len(factors) == 1 and factors[0][0].shape.rank == 2:
            x, d = factors[0]
            if kind == "kernel":  # every example its own environment: g_b = x_b ⊗ δ_b, shape (in, out)
                stats[k] = _stats(d, combiner, nan_policy, name, checks, outer=x)
            else:
                stats[k] = _stats(d, combiner, nan_policy, name, checks)
            continue
        rows = [
            (tf.reshape(x, (n_env, -1, x.shape[-1])), tf.reshape(d, (n_env, -1, d.shape[-1])))
            for x, d in factors
        ]
        step = chunk_size or max(1, _CHUNK_BYTES // max(1, math.prod(v.shape) * max(4, dtype.size)))
        total_stats = Statistics()
        for lo, hi in _chunks(n_env, step):
            g = None
            for x, d in rows:
                if kind == "kernel":
                    gi = tf.linalg.matmul(x[lo:hi], d[lo:hi], transpose_a=True)
                else:
                    gi = tf.reduce_sum(d[lo:hi], axis=1)
                g = gi if g is None else g + gi
            total_stats = total_stats + _stats(g, combiner, nan_policy, name, checks)
        stats[k] = total_stats
    stats = _checked(stats, checks)
    return (stats, losses) if return_losses else stats


def _name(v: Any) -> str:
    return f"variable {getattr(v, 'path', None) or v.name!r} (shape {tuple(v.shape)})"


def factored_gradients(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    combiner: Combiner,
    *,
    variables: Any = None,
    training: bool = True,
    fallback: str = "jacobian",
    chunk_size: int | None = None,
    nan_policy: NanPolicy = "raise",
    loss_scale: float | None = None,
) -> CombinedGradients:
    """Combined gradients by the factored path: :func:`factored_statistics`, then :func:`finalize_gradients`.

    Returns :class:`CombinedGradients` ``(gradients, info)`` in the structure
    of ``variables`` (default ``model.trainable_variables``), ready for
    ``optimizer.apply_gradients``; the same as :func:`combined_gradients`
    (up to floating-point rounding). Under ``tf.distribute`` (inside
    ``strategy.run``, each replica passing its own environments) the
    statistics are all-reduced and the update divided by the number of
    replicas, as in :func:`combined_gradients`. Arguments as in
    :func:`factored_statistics`.

    Example:
        >>> import keras
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> keras.utils.set_random_seed(0)
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
        ...                           keras.layers.Dense(1)])
        >>> optimizer = keras.optimizers.SGD(0.1)
        >>> @tf.function
        ... def step(x, y):
        ...     grads, info = gtf.factored_gradients(model, keras.losses.MeanSquaredError(), x, y,
        ...                                          gradand.AndMask(threshold=0.8))
        ...     optimizer.apply_gradients(zip(grads, model.trainable_variables))
        ...     return info
        >>> info = step(tf.random.normal((16, 1, 3)), tf.random.normal((16, 1, 1)))  # per-example
        >>> len(info), float(info[0].survivor_fraction) <= 1.0
        (4, True)
    """
    if variables is None:
        variables = getattr(model, "trainable_variables", None)
    stats = factored_statistics(
        model,
        loss_fn,
        inputs,
        targets,
        combiner,
        variables=variables,
        training=training,
        fallback=fallback,
        chunk_size=chunk_size,
        nan_policy=nan_policy,
        loss_scale=loss_scale,
    )
    return _finish(stats, combiner, variables)
