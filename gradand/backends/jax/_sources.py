"""Sources: a loss function and a batch -> ``(losses, statistics)``, the first of the three layers.

:func:`vectorized_statistics` ``vmap``s the gradient of one environment's loss
over the environment axis of the batch and reduces the per-environment
gradients to the core's statistics (in ``lax.scan`` chunks with
``chunk_size``); :func:`streaming_statistics` is the same one environment at a
time (O(P) memory). The factored source is in ``_factored.py``. Every source
returns the per-environment losses and a pytree of :class:`gradand.Statistics`
shaped like the parameters; :func:`gradand.backends.jax.all_reduce_statistics`
and :func:`gradand.backends.jax.finalize_gradients` take it from there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gradand import Combiner
from gradand._stats import drop_zero_environments
from gradand.backends.jax._all_reduce import AxisName, PyTree, make_varying
from gradand.backends.jax._batch import (
    _check_params,
    _environment_count,
    _is_none,
    _map_mapped,
    _normalize_argnums,
    _resolve_in_axes,
    _slice,
    check_env_ids,
    environment_means,
    environment_sizes,
)
from gradand.backends.jax._tree import _is_stats, check_combiner, check_nan_policy, merge_trees, statistics

__all__ = ["streaming_statistics", "vectorized_statistics"]


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be None or a positive int (environments per pass); got {chunk_size!r}"
        )


def check_loss_scale(loss_scale: Any) -> None:
    if loss_scale is not None and (
        isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale > 0
    ):
        raise ValueError(f"loss_scale must be None or a positive number; got {loss_scale!r}")


def scaled_loss(loss_fn: Callable[..., Any], has_aux: bool, loss_scale: float | None) -> Callable:
    """``loss_fn`` as ``(loss · loss_scale, (loss, aux))``, for ``jax.value_and_grad(..., has_aux=True)``."""

    def scaled(*a: Any, **kw: Any) -> tuple[Any, tuple[Any, Any]]:
        out = loss_fn(*a, **kw)
        if has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"has_aux=True: loss_fn must return (loss, aux); got {type(out).__name__}")
        loss, aux = out if has_aux else (out, None)
        return (loss if loss_scale is None else loss * loss_scale), (loss, aux)

    return scaled


def _unscaled(grads: PyTree, loss_scale: float | None) -> PyTree:
    if loss_scale is None:
        return grads
    return jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)) / loss_scale, grads)


def unscaled_statistics(
    grads: PyTree, combiner: Combiner, loss_scale: float | None, nan_policy: str
) -> PyTree:
    """Statistics of ``grads / loss_scale`` (divided in float32: a half-precision division underflows)."""
    if loss_scale is None:
        return statistics(grads, combiner, nan_policy=nan_policy)
    stats = statistics(_unscaled(grads, loss_scale), combiner, nan_policy=nan_policy)
    return jax.tree.map(lambda s, g: s.replace(dtype=g.dtype), stats, grads, is_leaf=_is_stats)


def present_statistics(grads: PyTree, combiner: Combiner, sizes: jax.Array, policy: str) -> PyTree:
    """Statistics over the environments with examples (a traced count): an empty environment's
    gradient is exactly 0, and the core takes such environments out again."""
    policy = "propagate" if policy == "raise" else policy  # traced: values unknown
    stats = statistics(grads, combiner, nan_policy=policy)
    empty = jnp.sum(sizes == 0).astype(jnp.int32)
    return jax.tree.map(lambda st: drop_zero_environments(st, empty), stats, is_leaf=_is_stats)


def vectorized_statistics(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    *args: Any,
    argnums: int | Sequence[int] = 0,
    in_axes: Any = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
    nan_policy: str = "raise",
    env_ids: Any = None,
    num_envs: int | None = None,
    loss_scale: float | None = None,
    axis_name: AxisName | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, PyTree]:
    """Source: every environment's gradient in one ``vmap``-ped pass, reduced to statistics.

    ``loss_fn(params, batch, ...)`` is the loss of **one** environment;
    ``args`` are its positional arguments with the batch stacked over
    environments on axis 0 (``in_axes`` as in ``jax.vmap``). The gradient of
    the ``argnums`` argument(s) is taken per environment and reduced to the
    core's :class:`gradand.Statistics`, one per leaf. Pure and jit-able.

    With ``env_ids`` (an int array, one environment id per example) the batch
    is *not* stacked by environment: ``loss_fn`` is evaluated per example
    (the batch's leading axis holds examples), and each environment's loss and
    gradient are the mean over its examples (``jax.ops.segment_sum``), so
    environments may have any sizes. Eagerly, an environment without examples
    raises; under ``jit`` it is left out (its count is 0: the statistics count
    the environments present) and its loss is NaN.

    Args:
        loss_fn: one environment's (with ``env_ids``: one example's) loss; a
            scalar, or ``(loss, aux)`` with ``has_aux=True``.
        combiner: the combiner whose statistics to compute.
        *args: ``loss_fn``'s positional arguments (parameters and batch).
        argnums: the differentiated argument(s); their leaves must be floating.
        in_axes: the environment axis of each argument (default: axis 0 of
            every argument that is not differentiated).
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        chunk_size: environments per ``lax.scan`` step, carrying only the
            statistics (peak memory O(chunk_size · P)); ``None``: all at once.
        nan_policy: ``"raise"`` (eager only), ``"zero"``, ``"propagate"``, ``"checkify"``.
        env_ids: ``(N,)`` environment id per example, in ``[0, num_envs)``.
        num_envs: the number of environments (static) with ``env_ids``.
        loss_scale: the loss is multiplied by this inside the gradient (float16
            gradients do not underflow) and the gradients divided by it, in
            float32, before the statistics.
        axis_name: inside ``shard_map``, the axis the environments are split
            over: gradients are taken per device. The statistics stay this
            device's: merge them with :func:`all_reduce_statistics`.
        kwargs: keyword arguments for ``loss_fn``, passed unmapped.

    Returns:
        ``(losses, stats)``: the per-environment losses ``(E,)`` (with
        ``has_aux``: ``(losses, aux)``, the aux stacked on axis 0, per example
        with ``env_ids``) and a pytree of statistics like the differentiated
        argument (a tuple of them for several ``argnums``).

    Example:
        >>> import jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> def loss(w, batch):  # one environment's loss
        ...     x, y = batch
        ...     return jnp.mean((x @ w - y) ** 2)
        >>> x = jnp.array([[[1.0, 1.0]], [[1.0, -1.0]]])  # 2 environments x 1 example
        >>> c = gradand.AndMask(rescale=False)
        >>> losses, stats = gj.vectorized_statistics(loss, c, jnp.zeros(2), (x, jnp.ones((2, 1))))
        >>> losses, stats.sign_sum
        (Array([1., 1.], dtype=float32), Array([-2,  0], dtype=int32))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    argnums_t = _normalize_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    check_chunk_size(chunk_size)
    check_loss_scale(loss_scale)
    kwargs = {} if kwargs is None else kwargs
    nargs = len(args)
    if nargs == 0 or max(argnums_t) >= nargs:
        raise ValueError(f"argnums={argnums!r} but only {nargs} positional arguments were given")
    axes = _resolve_in_axes(in_axes, nargs, argnums_t)
    for i in argnums_t:
        _check_params(args[i], i)
    envs = _environment_count(axes, args)  # with env_ids: examples
    ids = None
    if env_ids is not None:
        ids = check_env_ids(env_ids, num_envs, envs)
        if chunk_size is not None:
            raise ValueError("chunk_size is not supported with env_ids (the examples are vmapped at once)")
    if axis_name is not None:  # per-device gradients, not JAX's implicit sum over devices
        args = tuple(make_varying(a, axis_name) if i in argnums_t else a for i, a in enumerate(args))
    # Move every environment axis to the front, so chunks are slices of axis 0.
    args = _map_mapped(lambda ax, x: jnp.moveaxis(jnp.asarray(x), ax, 0), axes, args)
    axes0 = tuple(jax.tree.map(lambda ax: None if ax is None else 0, s, is_leaf=_is_none) for s in axes)
    grad_of = jax.value_and_grad(scaled_loss(loss_fn, has_aux, loss_scale), argnums=argnums, has_aux=True)

    def one_environment(*a: Any) -> tuple[Any, Any, PyTree]:
        (_, (loss, aux)), grads = grad_of(*a, **kwargs)
        return loss, aux, grads

    per_env = jax.vmap(one_environment, in_axes=axes0)

    def chunk_statistics(*a: Any, policy: str = nan_policy) -> tuple[Any, Any, PyTree]:
        losses, aux, grads = per_env(*a)
        return losses, aux, unscaled_statistics(grads, combiner, loss_scale, policy)

    if ids is not None:
        losses, aux, grads = per_env(*args)
        sizes = environment_sizes(ids, num_envs)
        losses = jnp.where(sizes > 0, environment_means(losses, ids, sizes), jnp.nan)
        grads = environment_means(grads, ids, sizes)
        if isinstance(ids, jax.core.Tracer):
            stats = present_statistics(_unscaled(grads, loss_scale), combiner, sizes, nan_policy)
            stats = jax.tree.map(lambda s, g: s.replace(dtype=g.dtype), stats, grads, is_leaf=_is_stats)
        else:  # checked eagerly: every environment has examples
            stats = unscaled_statistics(grads, combiner, loss_scale, nan_policy)
    elif chunk_size is None or chunk_size >= envs:
        losses, aux, stats = chunk_statistics(*args)
    else:
        n_chunks, head = envs // chunk_size, (envs // chunk_size) * chunk_size
        # The scan carry starts at zero statistics of the right structure (shapes only:
        # "propagate" so that eval_shape stages no checkify.check).
        shapes = jax.eval_shape(
            lambda *a: chunk_statistics(*a, policy="propagate")[2], *_slice(args, axes0, 0, chunk_size)
        )
        zero = jax.tree.map(jnp.zeros_like, shapes)  # keeps shard_map's device-variance

        def body(carry: PyTree, i: jax.Array) -> tuple[PyTree, tuple[Any, Any]]:
            part_losses, part_aux, part = chunk_statistics(*_slice(args, axes0, i * chunk_size, chunk_size))
            return merge_trees(carry, part), (part_losses, part_aux)

        stats, (losses, aux) = jax.lax.scan(body, zero, jnp.arange(n_chunks))
        flat = functools.partial(jax.tree.map, lambda x: x.reshape((head, *x.shape[2:])))
        losses, aux = flat(losses), flat(aux)
        if head < envs:
            rest_losses, rest_aux, rest = chunk_statistics(*_slice(args, axes0, head, envs - head))
            stats = merge_trees(stats, rest)
            cat = functools.partial(jax.tree.map, lambda x, y: jnp.concatenate([x, y]))
            losses, aux = cat(losses, rest_losses), cat(aux, rest_aux)
        # the carry counted in a traced int; the number of environments is static: keep it
        # a Python int, so the threshold test compares integer votes exactly
        stats = jax.tree.map(lambda st: st.replace(count=envs), stats, is_leaf=_is_stats)
    return ((losses, aux) if has_aux else losses), stats


def streaming_statistics(
    loss_fn: Callable[..., Any], combiner: Combiner, *args: Any, **options: Any
) -> tuple[Any, PyTree]:
    """Source: one environment at a time (``lax.scan``), O(P) memory whatever the number of environments.

    :func:`vectorized_statistics` with ``chunk_size=1``: the same arguments,
    options and result; each scan step takes one environment's gradient and
    merges its statistics into the carry.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> def loss(w, batch):
        ...     x, y = batch
        ...     return jnp.mean((x @ w - y) ** 2)
        >>> x = jax.random.normal(jax.random.key(0), (5, 4, 3))  # 5 environments x 4 examples
        >>> c = gradand.AndMask(threshold=0.6)
        >>> _, one = gj.streaming_statistics(loss, c, jnp.ones(3), (x, x[..., 0]))
        >>> _, all_ = gj.vectorized_statistics(loss, c, jnp.ones(3), (x, x[..., 0]))
        >>> bool((one.sign_sum == all_.sign_sum).all()), one.count
        (True, 5)
    """
    if options.get("chunk_size") not in (None, 1):
        raise ValueError(
            f"streaming_statistics takes one environment at a time; got chunk_size={options['chunk_size']!r}"
        )
    options["chunk_size"] = 1
    return vectorized_statistics(loss_fn, combiner, *args, **options)
