"""Pytrees of per-environment gradients -> the core's statistics -> one update per leaf.

:func:`statistics`, :func:`finalize` and :func:`combine` are the core's verbs
lifted to pytrees (plain dicts, flax ``params``, equinox modules, tuples): each
array leaf holds one parameter's gradients stacked over environments on axis
0, and the core runs once per leaf. :class:`gradand.Statistics` is registered
as a pytree on import, so a tree of statistics passes through ``jax.jit``,
``lax.scan`` carries and ``lax.psum``; ``finalize(..., axis_name=...)``
all-reduces the statistics across devices before finalizing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat
import jax
import jax.numpy as jnp
from jax.experimental import checkify

import gradand
from gradand import Combiner, Statistics
from gradand._namespace import HookedNamespace
from gradand._stats import Fold
from gradand.backends.jax._all_reduce import AxisName, PyTree, all_reduce_statistics

__all__ = ["NAN_POLICIES", "TreeInfo", "combine", "finalize", "statistics"]

#: The core's policies plus ``"checkify"`` (a ``checkify.check`` per leaf).
NAN_POLICIES = ("raise", "propagate", "zero", "checkify")

_DATA_FIELDS = ("count", *gradand.STATISTIC_NAMES)
_META_FIELDS = ("dtype", "eps")


def _register_statistics() -> None:
    """Make :class:`gradand.Statistics` a pytree: arrays (and ``count``) are children."""
    try:
        jax.tree_util.register_dataclass(
            Statistics, data_fields=list(_DATA_FIELDS), meta_fields=list(_META_FIELDS)
        )
    except ValueError:  # already registered (the module was reloaded)
        pass


_register_statistics()


class TreeInfo(NamedTuple):
    """Per-leaf logging values, each a pytree shaped like the gradients.

    Attributes:
        survivor_fraction: per leaf, the fraction of components that survive
            the mask (a 0-d float32; the mean soft mask for ``SandMask``; 1 for ``Mean``).
        agreement: per leaf, the mean over components of ``|mean_e sign(g_e)|``
            (a 0-d float32).
    """

    survivor_fraction: PyTree
    agreement: PyTree


def _is_stats(x: Any) -> bool:
    return isinstance(x, Statistics)


def check_combiner(combiner: Any) -> None:
    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (gradand.Mean(), gradand.AndMask(...), ...); "
            f"got {combiner!r} ({type(combiner).__name__})"
        )


def check_nan_policy(nan_policy: Any) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}; got {nan_policy!r}")


def is_floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


#: Most environments whose statistics are accumulated one at a time under jit on CPU (above
#: that, the trace would grow too long; XLA's reduction over the environment axis is used).
_UNROLL_ENVIRONMENTS = 256


def _unrolled(g: jax.Array) -> bool:
    return (
        isinstance(g, jax.core.Tracer)
        and 1 <= g.shape[0] <= _UNROLL_ENVIRONMENTS
        and jax.default_backend() == "cpu"
    )


class _JaxNamespace(HookedNamespace):
    """array-api-compat's JAX namespace, plus the core's hooks for XLA on CPU.

    ``gradand_unroll_environments(n)``: under ``jit`` on CPU with at most
    :data:`_UNROLL_ENVIRONMENTS` environments, XLA fuses a sum of per-environment terms several
    times faster than it reduces over the leading axis, so the core's factored engine folds the
    environments one at a time there. ``gradand_matrix_transpose``: the factored engine's
    ``Xᵀ Δ`` products with the transpose laid out in memory (see the method).
    """

    @staticmethod
    def gradand_unroll_environments(n: int) -> bool:
        return 1 <= n <= _UNROLL_ENVIRONMENTS and jax.default_backend() == "cpu"

    @staticmethod
    def gradand_vote_signs(g: jax.Array) -> jax.Array:
        """``sign(g)`` with NaN casting no vote (0), in as many operations as ``sign`` alone: an
        ordered ``|g| > 0`` is false for NaN. XLA fuses the whole sum of votes into each consumer
        of the statistics (the survivor count, the selection, both Adam moments), so a ``where``
        clearing NaN votes after ``sign`` costs once per environment per consumer: 1.24x the
        fused sum of ``sign`` at 64 environments of 256 x 256, this 0.97x."""
        return jnp.copysign((jnp.abs(g) > 0).astype(g.dtype), g)

    @staticmethod
    def gradand_matrix_transpose(a: jax.Array) -> jax.Array:
        """The transpose laid out as such on CPU (``optimization_barrier`` keeps XLA from folding
        it into the product): XLA's CPU product over the leading axis of both operands,
        ``Δᵀ X``, is 1.7x slower than over a transposed copy (150 vs 86 us at 128 x 256)."""
        t = jnp.swapaxes(a, -1, -2)
        # batched (E, rows, ·) products are as fast either way, and the barrier then costs fusion
        return jax.lax.optimization_barrier(t) if t.ndim == 2 and jax.default_backend() == "cpu" else t


#: The namespace the JAX backend hands the core.
XP: Any = _JaxNamespace(array_api_compat.array_namespace(jnp.zeros(())))


def _leaf_statistics(g: jax.Array, combiner: Combiner, nan_policy: str, name: str) -> Statistics:
    policy = nan_policy
    if nan_policy == "checkify":
        finite = jnp.isfinite(g)
        escaped = name.replace("{", "{{").replace("}", "}}")
        message = (
            f"{escaped} contains NaN or Inf ({{n}} of {g.size} entries of the per-environment "
            f"gradients, stacked shape {tuple(g.shape)})"
        )
        checkify.check(jnp.all(finite), message, n=jnp.sum(~finite))
        policy = "propagate"
    if _unrolled(g):
        # XLA on CPU reduces over a leading axis several times slower than it fuses a sum of
        # per-environment terms: accumulate one environment at a time (the core's streaming
        # form, gradand.merge of each environment's statistics). Under jit "raise" cannot look
        # at the values anyway.
        policy = "propagate" if policy == "raise" else policy
        fold = Fold(combiner, g.shape[0], nan_policy=policy, xp=XP)
        for e in range(g.shape[0]):
            fold.add(g[e])
        return fold.result()
    try:
        return gradand.statistics(g, combiner, nan_policy=policy, xp=XP)
    except ValueError as e:  # the core's eager NaN check, or an empty environment axis
        raise ValueError(f"{name}: {e}") from None


def statistics(
    grads: PyTree, combiner: Combiner, *, nan_policy: str = "raise", name: str = "grads"
) -> PyTree:
    """The core's :class:`gradand.Statistics` per leaf of a pytree of stacked gradients.

    Args:
        grads: a pytree whose array leaves are per-environment gradients of
            shape ``(E, *param_shape)``, the same ``E`` for every leaf.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        nan_policy: ``"raise"`` (eager arrays only: under ``jit``/``scan`` the
            values are unknown and the check is skipped), ``"zero"``,
            ``"propagate"``, or ``"checkify"`` (a ``checkify.check`` per leaf;
            wrap the caller in ``jax.experimental.checkify.checkify``).
        name: how error messages call ``grads``.

    Returns:
        A pytree of ``Statistics`` with the structure of ``grads``; merge two
        with ``jax.tree.map(gradand.merge, a, b, is_leaf=...)`` or finalize it.

    Example:
        >>> import jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> grads = {"w": jnp.array([[1.0, -1.0], [2.0, 1.0]])}  # 2 environments
        >>> s = gj.statistics(grads, gradand.AndMask())
        >>> s["w"].count, s["w"].sign_sum
        (2, Array([2, 0], dtype=int32))
    """
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    if not leaves:
        raise ValueError(f"{name} has no array leaves (got {grads!r}): nothing to combine")
    arrays = []
    envs: int | None = None
    first = ""
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        g = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if not is_floating(g.dtype):
            raise TypeError(
                f"{where} has dtype {g.dtype}; gradients must be floating (float16, bfloat16, "
                f"float32 or float64). Leave integer leaves out of the tree you combine."
            )
        if g.ndim == 0:
            raise ValueError(
                f"{where} has shape () and so no environment axis: every leaf must hold the "
                f"per-environment gradients stacked on axis 0, shape (E, *param_shape) (e.g. from "
                f"jax.vmap(jax.grad(loss), in_axes=(None, 0)), or use gradand.backends.jax.value_and_grad)"
            )
        if envs is None:
            envs, first = g.shape[0], where
        elif g.shape[0] != envs:
            raise ValueError(
                f"the environment axis (axis 0) has different lengths across leaves: {first} has "
                f"{envs} environments but {where} has {g.shape[0]} (shape {tuple(g.shape)}); every "
                f"leaf must stack the gradients of the same environments"
            )
        arrays.append((g, where))
    stats = [_leaf_statistics(g, combiner, nan_policy, where) for g, where in arrays]
    return jax.tree_util.tree_unflatten(treedef, stats)


def merge_trees(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise :func:`gradand.merge` of two pytrees of statistics."""
    return jax.tree.map(gradand.merge, a, b, is_leaf=_is_stats)


def finalize(
    stats: PyTree,
    combiner: Combiner,
    *,
    axis_name: AxisName | None = None,
    return_info: bool = False,
) -> Any:
    """The combined update per leaf from a pytree of statistics.

    Args:
        stats: a pytree of :class:`gradand.Statistics` (from :func:`statistics`,
            merged in any way).
        combiner: the combiner the statistics were computed for.
        axis_name: inside ``shard_map``/``pmap``/``vmap``, the name (or tuple
            of names) of the axis the environments are spread over: the
            statistics are summed over it with ``lax.psum`` first, so every
            device gets the update of all environments.
        return_info: also return a :class:`TreeInfo`.

    Returns:
        The update pytree (each leaf in its gradient's dtype), and the
        :class:`TreeInfo` when ``return_info``.

    Example:
        >>> import jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> c = gradand.AndMask(rescale=False)
        >>> s = gj.statistics({"w": jnp.array([[1.0, -1.0], [3.0, 1.0]])}, c)
        >>> gj.finalize(s, c)
        {'w': Array([2., 0.], dtype=float32)}
    """
    check_combiner(combiner)
    if axis_name is not None:
        stats = all_reduce_statistics(stats, axis_name)
    leaves, treedef = jax.tree_util.tree_flatten(stats, is_leaf=_is_stats)
    bad = next((x for x in leaves if not _is_stats(x)), None)
    if bad is not None or not leaves:
        raise TypeError(
            f"stats must be a non-empty pytree of gradand.Statistics (from gradand.backends.jax."
            f"statistics); found a leaf {type(bad).__name__}"
        )
    if not return_info:
        return jax.tree_util.tree_unflatten(treedef, [gradand.finalize(s, combiner) for s in leaves])
    updates, fractions, agreements = [], [], []
    for s in leaves:
        update, info = gradand.finalize(s, combiner, return_info=True)
        updates.append(update)
        fractions.append(jnp.asarray(info.survivor_fraction, jnp.float32))
        agreements.append(jnp.asarray(info.agreement, jnp.float32))
    unflatten = jax.tree_util.tree_unflatten
    info = TreeInfo(unflatten(treedef, fractions), unflatten(treedef, agreements))
    return unflatten(treedef, updates), info


def combine(
    grads: PyTree,
    combiner: Combiner,
    *,
    axis_name: AxisName | None = None,
    return_info: bool = False,
    nan_policy: str = "raise",
) -> Any:
    """Combine a pytree of stacked per-environment gradients into one update per leaf.

    ``finalize(statistics(grads, combiner), combiner)``: the core's
    :func:`gradand.combine` applied to every leaf, pure and jit-able. Each
    leaf of ``grads`` has shape ``(E, *param_shape)``; the update has shape
    ``param_shape``, the gradient's dtype (statistics in float32 for 16-bit
    gradients) and stays on its device.

    Args:
        grads: pytree of per-environment gradients, environments on axis 0.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ``gradand.GeometricMean(...)``,
            ``gradand.SandMask(...)``.
        axis_name: inside ``shard_map``/``pmap``, the axis the environments
            are spread over; see :func:`finalize`. Each device must pass its
            *own* environments' gradients: inside ``shard_map`` take them with
            respect to ``jax.lax.pcast(params, axis_name, to="varying")``, or
            JAX has already summed them over the devices (or use
            :func:`gradand.backends.jax.value_and_grad`, which does this).
        return_info: also return a :class:`TreeInfo` (per-leaf survivor
            fraction and agreement) for logging.
        nan_policy: see :func:`statistics`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> grads = {"b": jnp.array([[1.0, -1.0], [3.0, 2.0]]), "w": jnp.ones((2, 2, 2))}
        >>> update, info = jax.jit(gj.combine, static_argnums=1, static_argnames="return_info")(
        ...     grads, gradand.AndMask(rescale=False), return_info=True)
        >>> update["b"], float(info.survivor_fraction["b"]), float(info.agreement["w"])
        (Array([2., 0.], dtype=float32), 0.5, 1.0)
    """
    stats = statistics(grads, combiner, nan_policy=nan_policy)
    return finalize(stats, combiner, axis_name=axis_name, return_info=return_info)
