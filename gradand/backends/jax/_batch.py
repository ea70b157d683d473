"""The batch side of the sources: argument checks, environment axes, and environment ids."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradand.backends.jax._tree import is_floating


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


# --- environments given as an id per example -----------------------------------------------


def check_env_ids(env_ids: Any, num_envs: int | None, n_examples: int) -> jax.Array:
    """``env_ids`` as int32 ``(N,)``; eagerly also every id in range and every environment present."""
    if num_envs is None:
        raise ValueError(
            "env_ids needs num_envs: pass num_envs=E to value_and_grad (it must be static under jit)"
        )
    ids = env_ids if isinstance(env_ids, jax.Array) else jnp.asarray(env_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"env_ids must be a 1-D integer array (one environment id per example); got shape "
            f"{tuple(ids.shape)} and dtype {ids.dtype}"
        )
    if ids.shape[0] != n_examples:
        raise ValueError(
            f"env_ids has {ids.shape[0]} entries but the batch has {n_examples} examples on its "
            f"example axis; need one environment id per example"
        )
    if not isinstance(ids, jax.core.Tracer):
        values = np.asarray(ids)
        if values.size and (values.min() < 0 or values.max() >= num_envs):
            raise ValueError(
                f"env_ids must lie in [0, num_envs={num_envs}); got values from {values.min()} to "
                f"{values.max()}"
            )
        empty = np.flatnonzero(np.bincount(values, minlength=num_envs) == 0)
        if empty.size:
            raise ValueError(
                f"environments {empty.tolist()} of num_envs={num_envs} have no example in env_ids; "
                f"every environment needs at least one (under jit an empty environment is left out "
                f"of the count and its loss is NaN; an id out of range makes the losses and update NaN)"
            )
    return ids.astype(jnp.int32)


def environment_sizes(ids: jax.Array, num_envs: int) -> jax.Array:
    """How many examples each environment has, ``(E,)`` int32 (ids outside ``[0, E)`` are dropped)."""
    return jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=num_envs)


def environment_means(tree: Any, ids: jax.Array, sizes: jax.Array) -> Any:
    """Per-example leaves ``(N, ...)`` -> per-environment means ``(E, ...)`` (segment sums / sizes).

    An id outside ``[0, E)`` cannot raise under ``jit``: it makes every mean NaN instead, so the
    losses and the update are NaN — never an update that silently left examples out.
    """
    num_envs = sizes.shape[0]
    stray = jnp.any((ids < 0) | (ids >= num_envs))

    def mean(x: jax.Array) -> jax.Array:
        acc = jnp.promote_types(x.dtype, jnp.float32)
        total = jax.ops.segment_sum(x.astype(acc), ids, num_segments=num_envs)
        total = jnp.where(stray, jnp.asarray(jnp.nan, acc), total)
        n = jnp.maximum(sizes, 1).astype(acc).reshape((num_envs,) + (1,) * (x.ndim - 1))
        return (total / n).astype(x.dtype)

    return jax.tree.map(mean, tree)
