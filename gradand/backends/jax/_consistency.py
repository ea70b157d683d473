"""Flat-vector per-environment losses and Hessians of a loss function, for :mod:`gradand.consistency`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradand.backends.jax._all_reduce import PyTree
from gradand.backends.jax._batch import check_env_ids
from gradand.backends.jax._tree import is_floating

__all__ = ["environment_hessians", "environment_losses"]


class _Flat:
    """Maps a flat vector to ``params`` with a subset of its leaves (by key path) replaced."""

    def __init__(self, params: PyTree, subset: Sequence[str] | str | None) -> None:
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.leaves = [jnp.asarray(v) for _, v in flat]
        names = [jax.tree_util.keystr(p) for p, _ in flat]
        if subset is None:
            self.chosen = [i for i, v in enumerate(self.leaves) if is_floating(v.dtype)]
            if not self.chosen:
                raise ValueError("params has no floating leaf; name the leaves with subset=[...]")
        else:
            subset = [subset] if isinstance(subset, str) else list(subset)
            if not subset:
                raise ValueError("subset is empty: name at least one leaf (e.g. \"['out']['w']\")")
            unknown = [n for n in subset if n not in names]
            if unknown:
                raise ValueError(f"subset names {unknown} that are not leaves of params; it has {names}")
            self.chosen = [names.index(n) for n in subset]
        self.shapes = [self.leaves[i].shape for i in self.chosen]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = jnp.result_type(*(self.leaves[i] for i in self.chosen))
        self.theta = jnp.concatenate([self.leaves[i].reshape(-1).astype(self.dtype) for i in self.chosen])

    def unflatten(self, theta: jax.Array) -> PyTree:
        leaves = list(self.leaves)
        parts = jnp.split(theta, np.cumsum(self.sizes)[:-1])
        for i, part, shape in zip(self.chosen, parts, self.shapes):
            leaves[i] = part.reshape(shape).astype(self.leaves[i].dtype)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _environments(batch: tuple, env_ids: Any, num_envs: int | None) -> list[tuple]:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("no batch given: pass the batch after params")
    n = jnp.shape(leaves[0])[0]
    if env_ids is None:
        return [jax.tree.map(lambda a, e=e: jnp.asarray(a)[e], batch) for e in range(n)]
    ids = np.asarray(check_env_ids(env_ids, num_envs, n))
    return [jax.tree.map(lambda a, e=e: jnp.asarray(a)[ids == e], batch) for e in range(num_envs)]


def _flat_loss(
    loss_fn: Callable[..., Any], flat: _Flat, per_example: bool, kwargs: dict[str, Any]
) -> Callable[[jax.Array, tuple], jax.Array]:
    def loss(theta: jax.Array, batch: tuple) -> jax.Array:
        params = flat.unflatten(theta)
        if per_example:  # env_ids: the mean over the environment's examples of the per-example loss
            return jnp.mean(jax.vmap(lambda *b: loss_fn(params, *b, **kwargs))(*batch))
        value = loss_fn(params, *batch, **kwargs)
        if jnp.ndim(value) != 0:
            raise ValueError(f"loss_fn must return a scalar; got shape {jnp.shape(value)}")
        return value

    return loss


def environment_losses(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *batch: Any,
    subset: Sequence[str] | str | None = None,
    env_ids: Any = None,
    num_envs: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[list[Callable[[np.ndarray], float]], np.ndarray]:
    """Per-environment losses as functions of a flat parameter vector, and the current vector.

    What :func:`gradand.consistency.empirical_inconsistency` takes: each
    callable maps a 1-D numpy vector θ (the chosen leaves of ``params``,
    flattened in order) to that environment's loss, every other leaf fixed
    at its value in ``params``. Each callable is jitted (one compilation for
    environments of equal sizes).

    Args:
        loss_fn: ``loss_fn(params, *batch) -> scalar``, one environment's loss
            (as in :func:`value_and_grad`); with ``env_ids``, one example's.
        params: the parameters (any pytree).
        *batch: the batch, environments stacked on axis 0, or ``(N, ...)``
            examples with ``env_ids``.
        subset: the leaves to vary, by key path (``jax.tree_util.keystr``,
            e.g. ``"['out']['w']"``); ``None``: every floating leaf.
        env_ids: optional ``(N,)`` environment id per example.
        num_envs: the number of environments with ``env_ids``.
        kwargs: keyword arguments for ``loss_fn``.

    Returns:
        ``(losses, theta_star)``: one callable per environment, and the
        current parameters as a float64 numpy vector.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.backends import jax as gj
        >>> def loss(p, x, y):
        ...     return jnp.mean((x @ p["w"] - y) ** 2)
        >>> x = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 environments, 1 example each
        >>> params = {"w": jnp.array([0.5, -1.0])}
        >>> losses, theta = gj.environment_losses(loss, params, x, x @ params["w"])
        >>> losses[0](theta), theta.shape
        (0.0, (2,))
    """
    flat = _Flat(params, subset)
    envs = _environments(batch, env_ids, num_envs)
    f = jax.jit(_flat_loss(loss_fn, flat, env_ids is not None, {} if kwargs is None else kwargs))

    def make(b: tuple) -> Callable[[np.ndarray], float]:
        def loss(theta: np.ndarray) -> float:
            t = np.asarray(theta)
            if t.shape != flat.theta.shape:
                raise ValueError(f"theta must have shape {tuple(flat.theta.shape)}; got {t.shape}")
            return float(f(jnp.asarray(t, flat.dtype), b))

        return loss

    return [make(b) for b in envs], np.asarray(flat.theta, np.float64)


def environment_hessians(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *batch: Any,
    subset: Sequence[str] | str | None = None,
    env_ids: Any = None,
    num_envs: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Each environment's Hessian with respect to a subset of the parameters, ``(E, P, P)``.

    ``jax.hessian`` of the loss as a function of the chosen leaves flattened in
    order (P numbers; memory and time grow as P², so choose a small subset,
    e.g. the last layer), in the leaves' dtype (enable ``jax_enable_x64`` and
    use float64 parameters for accuracy), returned as float64 numpy,
    symmetrised ``(H + Hᵀ)/2`` so that :func:`gradand.consistency.inconsistency`
    accepts it.

    Args:
        loss_fn, params, batch, subset, env_ids, num_envs, kwargs: as in
            :func:`environment_losses`.

    Returns:
        float64 array ``(E, P, P)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.backends import jax as gj
        >>> def loss(p, x, y):
        ...     return jnp.mean((x @ p["w"] - y) ** 2)
        >>> x = jnp.array([[[1.0, 0.0]], [[0.0, 2.0]]])
        >>> h = gj.environment_hessians(loss, {"w": jnp.zeros(2)}, x, jnp.zeros((2, 1)))
        >>> h[0].tolist(), h[1].tolist()  # 2 x xᵀ for the MSE of one example
        ([[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 8.0]])
    """
    flat = _Flat(params, subset)
    envs = _environments(batch, env_ids, num_envs)
    loss = _flat_loss(loss_fn, flat, env_ids is not None, {} if kwargs is None else kwargs)
    hess = jax.jit(jax.hessian(loss))
    out = []
    for b in envs:
        h = np.asarray(hess(flat.theta, b), np.float64)
        out.append(0.5 * (h + h.T))
    return np.stack(out)
