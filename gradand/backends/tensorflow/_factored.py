"""The factored source: Keras layers' inputs ``X`` and output gradients ``Δ`` for the core.

A dense layer ``z = x @ W + b`` has environment ``e``'s kernel gradient
``X_eᵀ Δ_e`` (``Δ = ∂loss_e/∂z`` on that environment's rows) and bias gradient
``Σ Δ_e``; a convolution's kernel gradient is TensorFlow's weight-gradient op of
``X_e`` and ``Δ_e``. One forward pass over every example records each supported
layer's ``X`` and ``z`` (``_layers``; ``BatchNormalization`` computes its batch
statistics per environment while it runs: ``_batchnorm``); one ``tape.gradient``
of ``Σ_e loss_e`` with respect to the ``z`` gives every ``Δ``. This module only
groups ``X`` and ``Δ`` by environment and hands them to the core's factored
engine, :func:`gradand.layer_statistics`; variables outside supported layers
fall back to ``tape.jacobian`` of the environments' losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

import gradand
from gradand import Combiner, Statistics
from gradand._namespace import NanPolicy, check_nan_policy
from gradand.backends.tensorflow import xp
from gradand.backends.tensorflow._batchnorm import (
    batch_norms,
    plain_batch_norm,
    recording_batch_norm,
    scale_gradient,
)
from gradand.backends.tensorflow._common import (
    call_loss,
    check_chunk_size,
    check_fallback,
    dense,
    flat_variables,
    scaled,
    unscale_factor,
)
from gradand.backends.tensorflow._layers import (
    Call,
    all_layers,
    conv_gradient,
    is_conv,
    key,
    recording_call,
    supported,
)

__all__ = ["FACTORED_LAYERS", "factored_statistics"]

#: Layer types whose variables the factored path handles without per-environment backward
#: passes (layers that keep Keras' own ``call``; convolutions channels_last; a trainable
#: ``BatchNormalization`` in training mode with per-environment batch statistics). Every other
#: variable falls back (``fallback=``).
FACTORED_LAYERS: tuple[type, ...] = (
    keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.BatchNormalization,
)  # fmt: skip


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


def _environment_ids(env_ids: Any, num_envs: Any, batch: int) -> tuple[Any, int]:
    """``env_ids`` as int32 ``(B,)`` and the number of environments, every index checked."""
    env = tf.convert_to_tensor(env_ids)
    if not env.dtype.is_integer:
        raise TypeError(f"env_ids must be integers (an environment id per example); got {env.dtype.name}")
    if env.shape.rank != 1 or env.shape[0] != batch:
        raise ValueError(f"env_ids must have shape ({batch},), one id per example; got {tuple(env.shape)}")
    env = tf.cast(env, tf.int32)
    eager = tf.executing_eagerly()
    if num_envs is None:
        if not eager:
            raise ValueError("num_envs is needed with env_ids inside a tf.function (a static number)")
        num_envs = int(tf.reduce_max(env)) + 1
    if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1; got {num_envs!r}")
    counts = tf.math.bincount(tf.clip_by_value(env, 0, num_envs - 1), minlength=num_envs, maxlength=num_envs)
    bad = tf.logical_or(env < 0, env >= num_envs)
    if eager:
        if bool(tf.reduce_any(bad)):
            wrong = sorted({int(i) for i in tf.boolean_mask(env, bad).numpy()})
            raise ValueError(f"env_ids holds {wrong}, outside [0, num_envs={num_envs})")
        missing = [e for e, n in enumerate(counts.numpy()) if n == 0]
        if missing:
            raise ValueError(
                f"environment(s) {missing} of num_envs={num_envs} have no example in this batch; every "
                f"environment needs at least one (or pass num_envs for the environments present)"
            )
        return env, num_envs
    ok = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)), [f"gradand: env_ids outside [0, num_envs={num_envs}):", env]
    )
    present = tf.debugging.Assert(
        tf.reduce_all(counts > 0), ["gradand: an environment has no example in this batch; counts:", counts]
    )
    with tf.control_dependencies([ok, present]):
        return tf.identity(env), num_envs


class _Groups:
    """A flat batch's examples by environment: ``(B, ...)`` -> ``(E, n, ...)`` or ``(E, rows, last)``."""

    def __init__(self, env: Any, num_envs: int, n_ex: int | None) -> None:
        self.env, self.num_envs, self.n_ex = env, num_envs, n_ex
        self._memo: dict[int, tuple[Any, Any]] = {}
        if env is not None:  # environments of any sizes: zero-padded to the largest one
            self.counts = tf.math.bincount(env, minlength=num_envs, maxlength=num_envs)
            self.order = tf.argsort(env, stable=True)
            sorted_env = tf.gather(env, self.order)
            pos = tf.range(tf.shape(env)[0]) - tf.gather(tf.cumsum(self.counts, exclusive=True), sorted_env)
            self.index = tf.stack([sorted_env, pos], axis=1)
            self.rows = tf.reduce_max(self.counts)

    def __call__(self, t: Any) -> Any:
        """``(B, ..., last)`` -> ``(E, rows, last)``: every position of an example a row.

        Memoised per tensor: a layer's kernel and bias get the same grouped ``Δ``, so the graph
        holds one sign and one scaling of it, not one per variable.
        """
        hit = self._memo.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        if self.env is None:  # the environments' examples are contiguous: one reshape
            out = tf.reshape(t, (self.num_envs, -1, t.shape[-1]))
        else:
            rows = self.examples(tf.reshape(t, (t.shape[0], -1, t.shape[-1])))
            out = tf.reshape(rows, (self.num_envs, -1, t.shape[-1]))
        self._memo[id(t)] = (t, out)
        return out

    def examples(self, t: Any) -> Any:
        """``(B, ...)`` -> ``(E, n, ...)`` (with ids: ``n`` the largest environment, padded with zeros)."""
        rest = [n if n is not None else tf.shape(t)[k + 1] for k, n in enumerate(t.shape[1:])]
        if self.env is None:
            return tf.reshape(t, [self.num_envs, self.n_ex, *rest])
        shape = tf.concat([[self.num_envs, self.rows], tf.shape(t)[1:]], axis=0)
        padded = tf.scatter_nd(self.index, tf.gather(t, self.order), shape)
        return tf.reshape(padded, [self.num_envs, -1, *rest])

    def split(self, t: Any) -> list[Any]:
        return tf.dynamic_partition(t, self.env, self.num_envs)


def factored_statistics(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    combiner: Combiner,
    *,
    env_ids: Any = None,
    num_envs: int | None = None,
    variables: Any = None,
    training: bool = True,
    fallback: str = "vectorized",
    chunk_size: int | None = None,
    nan_policy: NanPolicy = "raise",
    loss_scale: Any = None,
) -> tuple[Any, list[Statistics | None]]:
    """The environments' losses and gradient statistics from one forward and one backward pass.

    The same statistics as :func:`vectorized_statistics` (up to rounding), at
    close to the cost of an ordinary training step: one forward pass of every
    example (each supported layer records its input ``X`` and output ``z``),
    each environment's loss ``loss_fn(outputs_e, targets_e)``, one
    ``tape.gradient`` of their sum with respect to the ``z`` (the ``Δ``), then
    :func:`gradand.layer_statistics` per variable (batched products in chunks
    of ``chunk_size`` environments; no per-example gradient at all when every
    environment is one example).

    Supported (Keras 3, not a subclass overriding ``call``, not LoRA, not
    quantized, called on inputs whose axis 0 is the examples):
    ``keras.layers.Dense`` (any activation, with or without bias);
    ``Conv1D``/``Conv2D``/``Conv3D`` with ``data_format="channels_last"``
    (``"valid"``, ``"same"`` or ``"causal"`` padding, strides, dilation,
    groups), whose kernel's per-environment gradients come from TensorFlow's
    own weight-gradient op (``Conv2DBackpropFilter``,
    ``Conv3DBackpropFilterV2``) per environment; ``BatchNormalization``
    (``gamma``, ``beta``). Every other variable (``LayerNormalization``,
    ``Conv2DTranspose``, ``Embedding``, ...) falls back: with
    ``fallback="vectorized"`` its per-environment gradients come from
    ``tape.jacobian`` of the losses (about E backward passes); with
    ``fallback="error"`` a ``ValueError`` lists them.

    A trainable ``BatchNormalization`` in training mode normalises each
    environment with that environment's own batch statistics (per channel, the
    mean and biased variance over its examples and positions) and updates its
    moving statistics once per environment in environment order, as one
    forward pass per environment (``method="streaming"``) does; a layer called
    more than once per forward pass is updated call by call. In training
    mode ``renorm=True``, ``synchronized=True``, a subclass with its own
    ``call`` or a mask raise ``ValueError``.

    Args:
        model: a Keras model (or layer), called as ``model(x, training=training)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, one environment's
            loss; a ``keras.losses.Loss`` object (or a ``keras.losses``
            function) is called the Keras way, ``(targets, outputs)``.
        inputs: ``(E, n, ...)`` (E environments of n examples; ``(B, 1, ...)``
            makes every example its own environment), or ``(B, ...)`` with
            ``env_ids``; floating tensors or a ``tf.nest`` structure of them.
        targets: like ``inputs``.
        combiner: ``gradand.Mean()``, ``AndMask(...)``, ``GeometricMean(...)``, ``SandMask(...)``.
        env_ids: ``(B,)`` integers, the environment of each example:
            environments of any sizes (every one of ``range(num_envs)`` present).
        num_envs: the number of environments with ``env_ids`` (needed inside
            ``tf.function``; eagerly ``max(env_ids) + 1`` by default).
        variables: what to differentiate; default ``model.trainable_variables``.
        training: passed to the model.
        fallback: ``"vectorized"`` or ``"error"``, for variables outside supported layers.
        chunk_size: environments per batched product (the core's default: about 2 MiB, cache-sized).
        nan_policy: ``"raise"`` checks the summed statistics (eagerly
            ``ValueError``, in a ``tf.function`` ``tf.errors.InvalidArgumentError``,
            skipped under XLA), ``"zero"`` or ``"propagate"``.
        loss_scale: the factor the losses carry, as in :func:`streaming_statistics`.

    Returns:
        ``(losses, stats)``: the ``(E,)`` losses and a flat list (the order of
        ``tf.nest.flatten(variables)``) of :class:`gradand.Statistics`
        (``None`` for a variable no loss depends on).

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
        >>> c = gradand.AndMask(threshold=0.8)
        >>> losses, stats = gtf.factored_statistics(model, bce, x, y, c)
        >>> tuple(losses.shape), [s.count for s in stats], tuple(stats[0].mean.shape)
        ((5,), [5, 5, 5, 5], (3, 4))
        >>> _, slow = gtf.vectorized_statistics(lambda a, b: bce(b, model(a)), model.trainable_variables,
        ...                                     (x, y), c)
        >>> fast, slow = gtf.finalize_gradients(stats, c)[0], gtf.finalize_gradients(slow, c)[0]
        >>> all(bool(tf.reduce_all(tf.abs(a - b) < 1e-5)) for a, b in zip(fast, slow))
        True
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Keras model or layer; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss; got {type(loss_fn).__name__}")
    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (gradand.AndMask(), ...); got {type(combiner).__name__}"
        )
    check_nan_policy(nan_policy)
    fallback = check_fallback(fallback)
    check_chunk_size(chunk_size)
    if env_ids is None:
        x_leaves, n_env, n_ex = _check_data("inputs", inputs)
        y_leaves, y_env, y_ex = _check_data("targets", targets)
    else:
        x_leaves, y_leaves = _check_flat("inputs", inputs), _check_flat("targets", targets)
        n_ex = y_ex = None
        n_env = y_env = x_leaves[0].shape[0]
    for k, t in enumerate(x_leaves):
        if not t.dtype.is_floating:
            where = "inputs" if len(x_leaves) == 1 else f"inputs leaf {k}"
            raise TypeError(
                f"{where} must have a floating dtype (the factored path differentiates through the "
                f"model's inputs); got {t.dtype.name} with shape {tuple(t.shape)}. Cast with "
                f"tf.cast(inputs, tf.float32), or use vectorized_statistics"
            )
    if env_ids is None:
        _check_input_shapes(model, x_leaves)
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
    flat_vars = flat_variables(variables)
    unscale = unscale_factor(loss_scale)
    norms = batch_norms(model, training)  # raises for one it cannot split per environment

    if env_ids is None:
        batch = n_env * n_ex
        flat_x = tf.nest.pack_sequence_as(inputs, [_merge_leading(t, batch) for t in x_leaves])
        groups = _Groups(None, n_env, n_ex)
    else:
        batch = n_env
        env, n_env = _environment_ids(env_ids, num_envs, batch)
        flat_x = inputs
        groups = _Groups(env, n_env, None)

    wanted = {key(v) for v in flat_vars}
    layers = all_layers(model)
    is_wanted = lambda layer: any(key(v) in wanted for v in layer.trainable_variables)  # noqa: E731
    recorded = [layer for layer in layers if supported(layer) and is_wanted(layer)]
    # every BatchNormalization in training mode (its examples must not interact), and in inference
    # mode those whose gamma or beta are wanted (factored then, not by the fallback)
    norms += [layer for layer in layers if plain_batch_norm(layer) and is_wanted(layer)]
    norms = list({id(m): m for m in norms}.values())
    recorded = list({id(m): m for m in recorded}.values())
    calls: list[Call] = []
    bad: set[int] = set()
    with tf.GradientTape(persistent=True) as tape:
        for layer in recorded:
            object.__setattr__(layer, "call", recording_call(layer, calls, bad, batch))
        for layer in norms:
            object.__setattr__(layer, "call", recording_batch_norm(layer, groups, calls, bad, batch))
        try:
            out = model(flat_x, training=training)
        finally:
            for layer in (*recorded, *norms):
                object.__delattr__(layer, "call")
        out_leaves = tf.nest.flatten(out)
        for t in out_leaves:
            if t.shape.rank is None or t.shape.rank < 1 or t.shape[0] != batch:
                where = f"(E·n = {n_env}·{n_ex})" if env_ids is None else "(one per env_ids entry)"
                raise ValueError(
                    f"model(inputs) must return tensors with the {batch} examples {where} on axis 0; got "
                    f"shape {tuple(t.shape)}"
                )
        losses = _environment_losses(loss_fn, out, targets, groups)
        total = tf.reduce_sum(losses)

    owner: dict[int, tuple[Any, str]] = {}
    called = {id(c.layer) for c in calls}
    for layer in (*recorded, *norms):
        if id(layer) in called and id(layer) not in bad:
            for v, kind in _factored_variables(layer):
                owner[key(v)] = (layer, kind)
    rest = [k for k, v in enumerate(flat_vars) if key(v) not in owner]
    if rest and fallback == "error":
        listed = [
            f"{getattr(flat_vars[k], 'path', None) or flat_vars[k].name} {tuple(flat_vars[k].shape)}"
            for k in rest
        ]
        raise ValueError(
            f"factored_statistics handles the variables of keras.layers.Dense, Conv1D/Conv2D/Conv3D "
            f"(channels_last) and BatchNormalization layers called on batch-first inputs; these "
            f"variables are outside them: {listed}. Pass "
            f"fallback='vectorized' (per-environment gradients by tape.jacobian) or use "
            f"vectorized_statistics"
        )
    # "raise" inside a graph: one check of all the summed statistics (below), not one per variable
    graph_check = nan_policy == "raise" and not tf.executing_eagerly()
    policy = "propagate" if graph_check else nan_policy
    stats: list[Statistics | None] = [None] * len(flat_vars)
    if rest:
        jac = tape.jacobian(
            losses, [flat_vars[k] for k in rest], unconnected_gradients=tf.UnconnectedGradients.NONE
        )
        for k, j in zip(rest, jac):
            if j is not None:
                g = scaled(dense(j), unscale)
                stats[k] = gradand.statistics(g, combiner, axis=0, nan_policy=policy, xp=xp)
    owners = {id(layer) for layer, _ in owner.values()}
    needed = [c for c in calls if id(c.layer) in owners]
    deltas = tape.gradient(total, [c.z for c in needed]) if needed else []
    del tape
    for k, v in enumerate(flat_vars):
        if key(v) in owner:
            layer, kind = owner[key(v)]
            parts = [(c, d) for c, d in zip(needed, deltas) if c.layer is layer and d is not None]
            if parts:  # else the layer's output does not reach the loss: no gradient
                # the engine computes "raise" as checked later (no NaN votes cleared) and checks
                # eagerly itself; in a graph _checked puts one check_numerics on the data path
                stats[k] = _layer_statistics(
                    v, kind, parts, groups, combiner, chunk_size, nan_policy, unscale, graph_check
                )
    return scaled(losses, unscale), _checked(stats) if graph_check else stats


def _factored_variables(layer: Any) -> list[tuple[Any, str]]:
    """A recorded layer's variables and what each is: ``"kernel"``, ``"bias"`` or ``"scale"`` (γ)."""
    if plain_batch_norm(layer):
        pairs = [(layer.gamma, "scale"), (layer.beta, "bias")]
    else:
        pairs = [(layer.kernel, "kernel"), (layer.bias, "bias")]
    return [(v, kind) for v, kind in pairs if v is not None]


def _factors(layer: Any, kind: str, x: Any, d: Any, groups: _Groups) -> gradand.LayerFactors:
    """One call's :class:`gradand.LayerFactors` for the core: ``X`` and ``Δ`` by environment."""
    norm = plain_batch_norm(layer)
    if kind == "bias":  # Σ Δ over examples and positions: rows = examples x positions, channels last
        if norm and layer.axis % d.shape.rank != d.shape.rank - 1:
            d = tf.experimental.numpy.moveaxis(d, layer.axis, -1)
        return gradand.LayerFactors(None, groups(d))
    if kind == "scale":  # γ: Σ Δ ⊙ x̂ per channel
        return gradand.LayerFactors(
            groups.examples(x), groups.examples(d), scale_gradient(layer.axis % x.shape.rank)
        )
    if is_conv(layer):  # raw inputs per environment and TensorFlow's weight-gradient op
        return gradand.LayerFactors(groups.examples(x), groups.examples(d), conv_gradient(layer))
    return gradand.LayerFactors(groups(x), groups(d))


def _layer_statistics(
    v: Any,
    kind: str,
    parts: list[Any],
    groups: _Groups,
    combiner: Combiner,
    chunk_size: Any,
    policy: Any,
    unscale: Any,
    defer_check: bool = False,
) -> Statistics:
    """Hand one variable's ``X`` and ``Δ`` (per call of its layer, grouped by environment) to the core."""
    dtype = tf.as_dtype(v.dtype)
    cast = lambda t: t if t.dtype == dtype else tf.cast(t, dtype)  # noqa: E731
    factors = [_factors(c.layer, kind, cast(c.x), cast(d), groups) for c, d in parts]
    scale = None if isinstance(unscale, float) and unscale == 1.0 else tf.cast(1.0 / unscale, dtype)
    return gradand.layer_statistics(
        factors,
        combiner,
        shape=tuple(v.shape),
        layout="in_out",
        chunk_size=chunk_size,
        scale=scale,
        nan_policy=policy,
        name=f"variable {getattr(v, 'path', None) or v.name!r}",
        xp=xp,
        _defer_check=defer_check,  # in a graph: one check_numerics of all the means (_checked)
    )


def _environment_losses(loss_fn: Callable[..., Any], out: Any, targets: Any, groups: _Groups) -> Any:
    """``(E,)``: each environment's ``loss_fn(outputs_e, targets_e)``."""
    if groups.env is None:
        n_env, n_ex = groups.num_envs, groups.n_ex
        outputs = tf.nest.map_structure(lambda t: tf.reshape(t, (n_env, n_ex, *t.shape[1:])), out)
        return tf.vectorized_map(lambda a: call_loss(loss_fn, a[0], a[1]), (outputs, targets))
    outs = [groups.split(t) for t in tf.nest.flatten(out)]
    tgts = [groups.split(tf.convert_to_tensor(t)) for t in tf.nest.flatten(targets)]
    losses = []
    for e in range(groups.num_envs):
        o = tf.nest.pack_sequence_as(out, [p[e] for p in outs])
        y = tf.nest.pack_sequence_as(targets, [p[e] for p in tgts])
        losses.append(call_loss(loss_fn, o, y))
    return tf.stack(losses)


def _checked(stats: list[Statistics | None]) -> list[Statistics | None]:
    """``stats`` after one ``check_numerics`` of a scalar that is NaN when a summed mean is not finite."""
    means = [s.mean for s in stats if s is not None and s.mean is not None]
    if not means:
        return stats
    flag = tf.add_n([tf.cast(tf.reduce_sum(m * tf.zeros((), m.dtype)), tf.float32) for m in means])
    flag = xp.gradand_check_finite(flag, "a per-environment gradient")
    with tf.control_dependencies([flag]):
        return [None if s is None or s.mean is None else s.replace(mean=tf.identity(s.mean)) for s in stats]


def _merge_leading(t: Any, batch: int) -> Any:
    """``(E, n, ...)`` -> ``(E·n, ...)``, sizes unknown until run time kept dynamic (images of any size)."""
    rest = [n if n is not None else tf.shape(t)[k + 2] for k, n in enumerate(t.shape[2:])]
    return tf.reshape(t, [batch, *rest])


def _check_flat(name: str, data: Any) -> list[Any]:
    leaves = [tf.convert_to_tensor(t) for t in tf.nest.flatten(data)]
    if not leaves:
        raise ValueError(f"{name} is empty; pass tensors of shape (B, ...) with env_ids")
    sizes = {t.shape[0] if t.shape.rank else None for t in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"with env_ids, every tensor of {name} must have the same static, non-zero number of "
            f"examples on axis 0; got shapes {[tuple(t.shape) for t in leaves]}"
        )
    return leaves
