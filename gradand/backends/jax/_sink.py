"""Sink: a pytree of statistics -> the update pytree and a :class:`gradand.MaskInfo` per leaf.

The last of the three layers. The update of each leaf is the core's
:func:`gradand.finalize`; the entry points add the :class:`gradand.Result`
around it (the mean loss and :func:`gradand.summarize` of the infos).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

import gradand
from gradand import Combiner, MaskInfo
from gradand.backends.jax._all_reduce import AxisName, PyTree
from gradand.backends.jax._tree import _is_stats, check_combiner

__all__ = ["finalize_gradients"]


def _is_info(x: Any) -> bool:
    return isinstance(x, MaskInfo)


def finalize_gradients(stats: PyTree, combiner: Combiner) -> tuple[PyTree, PyTree]:
    """Sink: the combined update and a :class:`gradand.MaskInfo` per leaf of a pytree of statistics.

    Args:
        stats: a pytree of :class:`gradand.Statistics` (from a source, merged
            or all-reduced in any way).
        combiner: the combiner the statistics were computed for.

    Returns:
        ``(grads, infos)``: the update pytree (each leaf in its gradient's
        dtype, ready for optax) and a pytree of the same structure with a
        ``MaskInfo(survivor_fraction, agreement)`` (0-d float32) per leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> c = gradand.AndMask(rescale=False)
        >>> stats = gj.statistics({"w": jnp.array([[1.0, -1.0], [3.0, 1.0]])}, c)
        >>> grads, infos = gj.finalize_gradients(stats, c)
        >>> grads["w"], float(infos["w"].survivor_fraction)
        (Array([2., 0.], dtype=float32), 0.5)
    """
    check_combiner(combiner)
    leaves, treedef = jax.tree_util.tree_flatten(stats, is_leaf=_is_stats)
    bad = next((x for x in leaves if not _is_stats(x)), None)
    if bad is not None or not leaves:
        raise TypeError(
            f"stats must be a non-empty pytree of gradand.Statistics (from a source or "
            f"gradand.backends.jax.statistics); found a leaf {type(bad).__name__}"
        )
    updates, infos = [], []
    for s in leaves:
        update, info = gradand.finalize(s, combiner, return_info=True)
        updates.append(update)
        infos.append(MaskInfo(*(jnp.asarray(v, jnp.float32) for v in info)))
    return jax.tree_util.tree_unflatten(treedef, updates), jax.tree_util.tree_unflatten(treedef, infos)


def make_result(
    losses: jax.Array,
    grads: PyTree,
    infos: PyTree,
    aux: Any = None,
    *,
    present: jax.Array | None = None,
    axis_name: AxisName | None = None,
) -> gradand.Result:
    """The :class:`gradand.Result` of a step: the mean of the (present, all devices') losses, the summary."""
    acc = jnp.promote_types(losses.dtype, jnp.float32)
    if present is None:
        total, count = jnp.sum(losses, dtype=acc), jnp.asarray(losses.shape[0], jnp.int32)
    else:
        total = jnp.sum(jnp.where(present, losses, 0), dtype=acc)
        count = jnp.sum(present, dtype=jnp.int32)
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    loss = (total / count).astype(losses.dtype)
    info_leaves = jax.tree_util.tree_leaves(infos, is_leaf=_is_info)
    sizes = [math.prod(jnp.shape(g)) for g in jax.tree_util.tree_leaves(grads)]
    return gradand.Result(loss, losses, infos, gradand.summarize(info_leaves, sizes), aux)
