"""``value_and_grad``: ``jax.value_and_grad`` with the environments combined by a combiner.

The user writes the loss of *one* environment (or one example); the
transform ``vmap``s its gradient over the environment axis of the batch,
reduces the per-environment gradients to the core's additive statistics and
finalizes them. With ``chunk`` the environments are processed ``chunk`` at a
time inside ``lax.scan`` and only the statistics are carried, so memory is
O(chunk · P) instead of O(E · P). With ``axis_name`` (inside ``shard_map`` or
``pmap``) the statistics are ``lax.psum``-ed across devices before finalizing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradand import Combiner
from gradand.backends.jax._tree import (
    AxisName,
    PyTree,
    _is_stats,
    check_combiner,
    check_nan_policy,
    finalize,
    is_floating,
    make_varying,
    merge_trees,
    statistics,
)

__all__ = ["GradInfo", "value_and_grad"]


class GradInfo(NamedTuple):
    """What :func:`value_and_grad` reports next to the mean loss (a pytree, so jit returns it).

    Attributes:
        losses: the per-environment losses, shape ``(E,)`` (this device's
            environments when ``axis_name`` is given).
        survivor_fraction: per leaf of the gradients, the fraction of
            components that survive the mask (0-d float32).
        agreement: per leaf, the mean sign agreement ``|mean_e sign(g_e)|``
            over its components (0-d float32).
        aux: with ``has_aux=True``, the per-environment auxiliary outputs
            stacked on axis 0; otherwise ``None``.
    """

    losses: jax.Array
    survivor_fraction: PyTree
    agreement: PyTree
    aux: Any


def _is_none(x: Any) -> bool:
    return x is None


def _check_index(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")


def _normalize_argnums(argnums: Any) -> tuple[int, ...]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        _check_index("argnums", argnums)
        return (argnums,)
    if isinstance(argnums, Sequence) and not isinstance(argnums, str) and argnums:
        for a in argnums:
            _check_index("argnums entries", a)
        if len(set(argnums)) != len(argnums):
            raise ValueError(f"argnums has repeated entries: {argnums!r}")
        return tuple(argnums)
    raise TypeError(f"argnums must be an int or a non-empty tuple of ints; got {argnums!r}")


def _resolve_in_axes(in_axes: Any, nargs: int, argnums: tuple[int, ...]) -> tuple[Any, ...]:
    """One environment-axis spec (a pytree prefix of ints/None) per positional argument."""
    if in_axes is None or (isinstance(in_axes, int) and not isinstance(in_axes, bool)):
        axis = 0 if in_axes is None else in_axes
        return tuple(None if i in argnums else axis for i in range(nargs))
    if not isinstance(in_axes, (tuple, list)) or len(in_axes) != nargs:
        raise ValueError(
            f"in_axes must be None, an int, or a tuple with one entry per positional argument "
            f"({nargs} here); got {in_axes!r}"
        )
    for i in argnums:
        if any(ax is not None for ax in jax.tree.leaves(in_axes[i], is_leaf=_is_none)):
            raise ValueError(
                f"in_axes[{i}]={in_axes[i]!r}, but argument {i} is differentiated (argnums): "
                f"parameters are shared by all environments, so their in_axes entry must be None"
            )
    for ax in jax.tree.leaves(tuple(in_axes), is_leaf=_is_none):
        if ax is not None and (isinstance(ax, bool) or not isinstance(ax, int)):
            raise TypeError(f"in_axes entries must be ints or None; got {ax!r} in {in_axes!r}")
    return tuple(in_axes)


def _map_mapped(fn: Callable[[Any, Any], Any], axes: tuple[Any, ...], args: tuple[Any, ...]) -> tuple:
    """Apply ``fn(axis, leaf)`` to every leaf that has an environment axis."""

    def per_arg(spec: Any, arg: Any) -> Any:
        return jax.tree.map(
            lambda ax, sub: sub if ax is None else jax.tree.map(functools.partial(fn, ax), sub),
            spec,
            arg,
            is_leaf=_is_none,
        )

    return tuple(per_arg(spec, arg) for spec, arg in zip(axes, args))


def _environment_count(axes: tuple[Any, ...], args: tuple[Any, ...]) -> int:
    sizes: list[tuple[str, int]] = []
    for i, (spec, arg) in enumerate(zip(axes, args)):

        def visit(ax: Any, sub: Any, i: int = i) -> None:
            if ax is None:
                return
            for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
                where = f"args[{i}]{jax.tree_util.keystr(path)}"
                shape = jnp.shape(leaf)
                if not -len(shape) <= ax < len(shape):
                    raise ValueError(
                        f"{where} has shape {tuple(shape)} and no environment axis {ax}: the batch "
                        f"must hold the environments (or examples) along axis {ax} (in_axes), e.g. "
                        f"shape (E, examples_per_env, ...)"
                    )
                sizes.append((where, shape[ax]))

        try:
            jax.tree.map(visit, spec, arg, is_leaf=_is_none)
        except ValueError as e:
            if "environment axis" in str(e):
                raise
            raise ValueError(
                f"in_axes[{i}]={spec!r} does not match the structure of args[{i}]: {e}"
            ) from None
    if not sizes:
        raise ValueError(
            "no argument has an environment axis: pass the batch with the environments stacked on "
            "axis 0 (in_axes=None maps every argument that is not differentiated)"
        )
    first, envs = sizes[0]
    for where, n in sizes[1:]:
        if n != envs:
            raise ValueError(
                f"the environment axis has different lengths across the batch: {first} has {envs} "
                f"environments but {where} has {n}"
            )
    if envs == 0:
        raise ValueError(f"{first} has 0 environments; need at least one")
    return envs


def _check_params(arg: Any, i: int) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(arg)[0]
    if not leaves:
        raise ValueError(f"args[{i}] (differentiated, argnums) has no array leaves: {arg!r}")
    for path, leaf in leaves:
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:
            raise TypeError(
                f"args[{i}]{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array, but "
                f"args[{i}] is differentiated (argnums); split non-array leaves off first (equinox: "
                f"params, static = eqx.partition(model, eqx.is_inexact_array))"
            ) from None
        if not is_floating(dtype):
            raise TypeError(
                f"args[{i}]{jax.tree_util.keystr(path)} has dtype {dtype}, but args[{i}] is "
                f"differentiated (argnums), so every leaf must be floating (float16, bfloat16, "
                f"float32, float64); keep integer state out of the differentiated argument"
            )


def _slice(args: tuple, axes: tuple, start: Any, size: int) -> tuple:
    return _map_mapped(lambda _, x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0), axes, args)


def value_and_grad(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    in_axes: Any = None,
    chunk: int | None = None,
    axis_name: AxisName | None = None,
    nan_policy: str = "raise",
) -> Callable[..., tuple[tuple[jax.Array, GradInfo], PyTree]]:
    """Like ``jax.value_and_grad``, but the gradients of the environments are combined, not averaged.

    ``loss_fn(params, batch, ...)`` is the loss of **one** environment (or of
    one example, for per-example masking). The returned function takes the
    same arguments with the batch stacked over environments on axis 0 and
    returns ``((mean_loss, info), grads)``: the mean of the per-environment
    losses, a :class:`GradInfo`, and the combined gradient with the structure
    of ``params`` (any pytree: dicts, flax ``params``, equinox modules). It is
    pure and jit-able; combine it with an optax optimizer as usual. Every
    leaf of the differentiated argument must be a floating array: for an
    equinox module, differentiate the ``eqx.partition(model, eqx.is_inexact_array)``
    half and ``eqx.combine`` it with the static half inside ``loss_fn``.

    With ``gradand.Mean()`` the gradient is ``jax.grad`` of the mean loss;
    with ``gradand.AndMask(threshold)`` only the components on which a
    fraction ``threshold`` of the environments agree in sign survive.

    Args:
        loss_fn: ``loss_fn(*args, **kwargs) -> loss`` for one environment; a
            scalar, or ``(loss, aux)`` with ``has_aux=True``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``,
            ``gradand.GeometricMean(...)``, ``gradand.SandMask(...)``.
        argnums: which positional argument(s) to differentiate (as in JAX);
            their leaves must be floating.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``info.aux`` then holds
            the per-environment ``aux`` stacked on axis 0.
        in_axes: where each positional argument holds its environment axis,
            as in ``jax.vmap`` (ints or ``None``, per argument or as a pytree
            prefix). ``None`` (default): axis 0 of every argument except the
            differentiated ones. Keyword arguments are passed unmapped.
        chunk: process this many environments at a time inside ``lax.scan``,
            carrying only the statistics: peak memory O(chunk · P) instead of
            O(E · P). Any ``chunk`` gives the same update (up to float
            rounding of the sums; the masks are identical). ``None``: all at once.
        axis_name: inside ``shard_map``/``pmap``, the mesh axis (or tuple of
            axes) over which the environments are split: statistics and
            losses are ``lax.psum``-ed, so every device gets the update of
            all environments, equal to a single device seeing them all.
        nan_policy: ``"raise"`` (only effective when called eagerly without
            ``chunk``: under ``jit`` the values are unknown and the check is
            skipped), ``"zero"`` (drop non-finite components: no vote, no
            contribution), ``"propagate"``, or ``"checkify"`` (a
            ``checkify.check`` per leaf: wrap the jitted step with
            ``jax.experimental.checkify.checkify`` and call ``err.throw()``).
            ``jax.config.update("jax_debug_nans", True)`` also works for debugging.

    Returns:
        A function with ``loss_fn``'s arguments returning ``((loss, info), grads)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> def loss(w, batch):  # one environment's loss
        ...     x, y = batch
        ...     return jnp.mean((x @ w - y) ** 2)
        >>> x = jnp.array([[[1.0, 1.0]], [[1.0, -1.0]]])  # 2 environments x 1 example x 2 features
        >>> y = jnp.array([[1.0], [1.0]])
        >>> step = jax.jit(gj.value_and_grad(loss, gradand.AndMask(rescale=False)))
        >>> (mean_loss, info), grads = step(jnp.zeros(2), (x, y))
        >>> mean_loss, grads, info.losses
        (Array(1., dtype=float32), Array([-2.,  0.], dtype=float32), Array([1., 1.], dtype=float32))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    argnums_t = _normalize_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int (environments per scan step); got {chunk!r}")
    grad_of = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)

    @functools.wraps(loss_fn)
    def combined_value_and_grad(*args: Any, **kwargs: Any) -> tuple[tuple[jax.Array, GradInfo], PyTree]:
        nargs = len(args)
        if max(argnums_t) >= nargs:
            raise ValueError(f"argnums={argnums!r} but only {nargs} positional arguments were given")
        axes = _resolve_in_axes(in_axes, nargs, argnums_t)
        for i in argnums_t:
            _check_params(args[i], i)
        envs = _environment_count(axes, args)
        if axis_name is not None:  # per-device gradients, not JAX's implicit sum over devices
            args = tuple(make_varying(a, axis_name) if i in argnums_t else a for i, a in enumerate(args))
        # Move every environment axis to the front, so chunks are slices of axis 0.
        args = _map_mapped(lambda ax, x: jnp.moveaxis(jnp.asarray(x), ax, 0), axes, args)
        axes0 = tuple(jax.tree.map(lambda ax: None if ax is None else 0, s, is_leaf=_is_none) for s in axes)

        def one_environment(*a: Any) -> tuple[Any, Any, PyTree]:
            out, grads = grad_of(*a, **kwargs)
            loss, aux = out if has_aux else (out, None)
            return loss, aux, grads

        per_env = jax.vmap(one_environment, in_axes=axes0)

        def chunk_statistics(*a: Any, policy: str = nan_policy) -> tuple[Any, Any, PyTree]:
            losses, aux, grads = per_env(*a)
            return losses, aux, statistics(grads, combiner, nan_policy=policy)

        if chunk is None or chunk >= envs:
            losses, aux, stats = chunk_statistics(*args)
        else:
            n_chunks, head = envs // chunk, (envs // chunk) * chunk
            # The scan carry starts at zero statistics of the right structure (shapes only:
            # "propagate" so that eval_shape stages no checkify.check).
            shapes = jax.eval_shape(
                lambda *a: chunk_statistics(*a, policy="propagate")[2], *_slice(args, axes0, 0, chunk)
            )
            zero = jax.tree.map(jnp.zeros_like, shapes)  # keeps shard_map's device-variance

            def body(carry: PyTree, i: jax.Array) -> tuple[PyTree, tuple[Any, Any]]:
                part_losses, part_aux, part = chunk_statistics(*_slice(args, axes0, i * chunk, chunk))
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
        acc = jnp.promote_types(losses.dtype, jnp.float32)
        total, count = jnp.sum(losses, dtype=acc), envs
        if axis_name is not None:
            total, count = jax.lax.psum((total, jnp.asarray(envs, jnp.int32)), axis_name)
        loss = (total / count).astype(losses.dtype)
        grads, info = finalize(stats, combiner, axis_name=axis_name, return_info=True)
        return (loss, GradInfo(losses, info.survivor_fraction, info.agreement, aux)), grads

    return combined_value_and_grad
