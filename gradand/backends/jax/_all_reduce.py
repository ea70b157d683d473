"""All-reduce: a pytree of statistics merged over a collective axis with ``lax.psum``.

The middle layer of every backend (source → all-reduce → sink). The rounds are
the core's :func:`gradand.all_reduce_statistics`; this module gives it JAX's
SUM (``lax.psum``) and marks parameters device-varying inside ``shard_map``
so that each device's gradients stay its own.
"""

from __future__ import annotations

from typing import Any

import jax

import gradand
from gradand import Statistics

__all__ = ["all_reduce_statistics", "make_varying"]

PyTree = Any
AxisName = Any  # a collective axis name (str), or a tuple of them


def _is_stats(x: Any) -> bool:
    return isinstance(x, Statistics)


def all_reduce_statistics(stats: PyTree, axis_name: AxisName) -> PyTree:
    """Merge a pytree of statistics over the collective axis ``axis_name`` (``lax.psum`` rounds).

    Inside ``shard_map``/``pmap`` (or ``vmap`` with an ``axis_name``), every
    device passes the statistics of its own environments and gets the
    statistics of all of them: the same sign votes as one device seeing every
    environment, the means up to rounding. The core's
    :func:`gradand.all_reduce_statistics` with ``lax.psum`` as the SUM; the
    total count is static when JAX knows the axis size (the local count times
    it), so the threshold test stays exact on integers.

    Args:
        stats: a pytree of :class:`gradand.Statistics` (from a source).
        axis_name: the mesh axis (or tuple of axes) the environments are split over.

    Returns:
        The merged pytree, same structure.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> c = gradand.AndMask(rescale=False)
        >>> g = jnp.array([[[1.0, -1.0]], [[2.0, 1.0]]])  # 2 devices x 1 environment each
        >>> def per_device(gi):  # this device's environments
        ...     stats = gj.all_reduce_statistics(gj.statistics({"w": gi}, c), "d")
        ...     return gj.finalize_gradients(stats, c)[0]["w"]
        >>> jax.vmap(per_device, axis_name="d")(g)  # every device: the update of both
        Array([[1.5, 0. ],
               [1.5, 0. ]], dtype=float32)
    """
    leaves, treedef = jax.tree_util.tree_flatten(stats, is_leaf=_is_stats)
    if not leaves:
        return stats
    counts = {s.count for s in leaves if isinstance(s.count, int)}
    total = None
    if len(counts) == 1 and all(isinstance(s.count, int) for s in leaves):
        total = _static_total(counts.pop(), axis_name)
    reduced = gradand.all_reduce_statistics(
        leaves, lambda arrays: jax.lax.psum(list(arrays), axis_name), total_count=total
    )
    return jax.tree_util.tree_unflatten(treedef, reduced)


def _static_total(local: int, axis_name: AxisName) -> Any:
    """``local`` times the size of the named axes: a Python int when JAX knows the sizes statically."""
    try:
        return local * int(jax.lax.psum(1, axis_name))
    except Exception:  # sizes not static here: a traced total (exact up to 2**24 environments)
        return jax.lax.psum(local, axis_name)


def _varying_axes(x: Any) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def make_varying(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Mark ``tree`` device-varying along ``axis_name`` inside ``shard_map``.

    Inside ``shard_map`` the gradient with respect to a replicated (invariant)
    value is summed over the devices automatically; gradients taken with
    respect to a device-varying copy stay each device's own, which is what
    the per-device statistics need. Outside ``shard_map`` (``pmap``, ``vmap``)
    nothing is summed and ``tree`` is returned as it is.
    """
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)

    def leaf(x: Any) -> Any:
        missing = tuple(n for n in names if n not in _varying_axes(x))
        if not missing:
            return x
        try:
            return jax.lax.pcast(x, missing, to="varying")
        except ValueError:  # a vmap axis name: not a device axis, no implicit sum to avoid
            return x

    return jax.tree.map(leaf, tree)
