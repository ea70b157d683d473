"""optax gradient transformations: combine per-environment updates; the temporal AND-mask.

:func:`reduce_environments` turns updates stacked over environments (leading
axis) into one update per parameter with a combiner, so it goes first in an
``optax.chain``. :func:`temporal_and_mask` is the paper's Algorithm 1 (Adam
with a moving average of gradient signs over *steps*) as an optax optimizer;
its math is :func:`gradand.temporal.temporal_and_mask_step`, called per leaf.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradand import Combiner
from gradand.backends.jax._tree import AxisName, PyTree, check_combiner, check_nan_policy, combine
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step

__all__ = [
    "ReduceEnvironmentsState",
    "TemporalAndMaskState",
    "reduce_environments",
    "scale_by_temporal_and_mask",
    "temporal_and_mask",
]


class ReduceEnvironmentsState(NamedTuple):
    """State of :func:`reduce_environments`: the last step's per-leaf logging values.

    Attributes:
        survivor_fraction: pytree like the parameters, 0-d float32 per leaf.
        agreement: pytree like the parameters, 0-d float32 per leaf.
    """

    survivor_fraction: PyTree
    agreement: PyTree


def _zeros_per_leaf(params: PyTree) -> PyTree:
    return jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)


def reduce_environments(
    combiner: Combiner, *, axis_name: AxisName | None = None, nan_policy: str = "raise"
) -> optax.GradientTransformation:
    """An optax transformation that combines per-environment updates (leading axis) with ``combiner``.

    ``update`` takes updates whose leaves have shape ``(E, *param_shape)``
    (e.g. ``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``) and
    returns updates shaped like the parameters, so it goes first in a chain:
    ``optax.chain(reduce_environments(gradand.AndMask(0.8)), optax.adam(1e-3))``.
    The state keeps the last step's per-leaf survivor fraction and agreement
    for logging.

    Args:
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        axis_name: inside ``shard_map``/``pmap``, the axis the environments are
            split over: statistics are ``lax.psum``-ed before finalizing. Each
            device passes its own environments' updates (inside ``shard_map``,
            gradients with respect to ``jax.lax.pcast(params, axis_name,
            to="varying")``; see :func:`gradand.backends.jax.combine`).
        nan_policy: as in :func:`gradand.backends.jax.statistics`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> params = {"w": jnp.zeros(2)}
        >>> opt = optax.chain(gj.reduce_environments(gradand.AndMask(rescale=False)), optax.sgd(1.0))
        >>> state = opt.init(params)
        >>> per_env = {"w": jnp.array([[1.0, -1.0], [3.0, 1.0]])}  # 2 environments
        >>> updates, state = opt.update(per_env, state, params)
        >>> optax.apply_updates(params, updates)["w"], float(state[0].survivor_fraction["w"])
        (Array([-2.,  0.], dtype=float32), 0.5)
    """
    check_combiner(combiner)
    check_nan_policy(nan_policy)

    def init_fn(params: PyTree) -> ReduceEnvironmentsState:
        zeros = _zeros_per_leaf(params)
        return ReduceEnvironmentsState(zeros, zeros)

    def update_fn(
        updates: PyTree, state: ReduceEnvironmentsState, params: PyTree = None
    ) -> tuple[PyTree, ReduceEnvironmentsState]:
        del params
        combined, info = combine(
            updates, combiner, axis_name=axis_name, return_info=True, nan_policy=nan_policy
        )
        return combined, ReduceEnvironmentsState(info.survivor_fraction, info.agreement)

    return optax.GradientTransformation(init_fn, update_fn)


class TemporalAndMaskState(NamedTuple):
    """State of :func:`scale_by_temporal_and_mask` (a pytree: jit, checkpoints and sharding accept it).

    Attributes:
        count: number of steps taken (int32).
        mu: first moment ``m`` per leaf.
        nu: second moment ``v`` per leaf.
        sign_avg: moving average ``s`` of ``sign(g)`` over steps, per leaf.
        survivor_fraction: per leaf, the fraction of components the last
            step's mask kept (0-d float32), for logging.
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree
    sign_avg: PyTree
    survivor_fraction: PyTree


_DEFAULTS = {"b1": 0.9, "b2": 0.999, "beta3": 0.9, "threshold": 0.5, "eps": 1e-8, "weight_decay": 0.0}


def _known(name: str, value: Any) -> Any:
    """``value`` as a float when it is known now; a valid placeholder when it is traced."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        return float(value)  # a concrete array (e.g. optax.inject_hyperparams outside jit)
    except TypeError:  # a tracer: validated by whoever chose it
        return _DEFAULTS[name]


def _state_dtype(param: jax.Array, state_dtype: Any) -> Any:
    if state_dtype is not None:
        return state_dtype
    dtype = jnp.result_type(param)
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def scale_by_temporal_and_mask(
    b1: float = 0.9,
    b2: float = 0.999,
    beta3: float = 0.9,
    threshold: float = 0.5,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_order: str = "after",
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    """The temporal AND-mask direction (paper Algorithm 1), without the learning rate.

    Adam whose update is masked where the bias-corrected moving average of
    ``sign(g)`` over steps (rate ``beta3``) has ``|ŝ| < threshold``; the math
    is :func:`gradand.temporal.temporal_and_mask_step`. Returns the direction
    ``mask ⊙ m̂ / (√v̂ + eps)`` (+ ``weight_decay · param`` when
    ``weight_decay_order="after"``); scale it by ``-learning_rate``, or use
    :func:`temporal_and_mask`.

    Args:
        b1, b2: Adam's moment decay rates.
        beta3: decay rate of the moving average of gradient signs.
        threshold: τ in [0, 1]: the minimum ``|ŝ|`` for a component to move.
        eps: Adam's epsilon.
        weight_decay: decay coefficient (needs ``params`` in ``update``).
        weight_decay_order: ``"after"`` (added after the mask, decoupled, the
            reference authors' advice) or ``"before"`` (an L2 term added to the
            gradient, so masked too).
        state_dtype: dtype of the moments; default float32 for 16-bit
            parameters, else the parameter's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.backends import jax as gj
        >>> tx = gj.scale_by_temporal_and_mask(threshold=0.5)
        >>> state = tx.init(jnp.zeros(2))
        >>> direction, state = tx.update(jnp.array([0.5, -2.0]), state)
        >>> direction.round(4), int(state.count)
        (Array([ 1., -1.], dtype=float32), 1)
    """
    check_temporal_hparams(
        lr=0.0,
        betas=(_known("b1", b1), _known("b2", b2)),
        beta3=_known("beta3", beta3),
        threshold=_known("threshold", threshold),
        eps=_known("eps", eps),
        weight_decay=_known("weight_decay", weight_decay),
        weight_decay_order=weight_decay_order,
    )
    needs_params = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init_fn(params: PyTree) -> TemporalAndMaskState:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), _state_dtype(p, state_dtype))

        mu = jax.tree.map(zeros, params)
        return TemporalAndMaskState(
            count=jnp.zeros((), jnp.int32),
            mu=mu,
            nu=jax.tree.map(zeros, params),
            sign_avg=jax.tree.map(zeros, params),
            survivor_fraction=_zeros_per_leaf(params),
        )

    def update_fn(
        updates: PyTree, state: TemporalAndMaskState, params: PyTree = None
    ) -> tuple[PyTree, TemporalAndMaskState]:
        if params is None:
            if needs_params:
                raise ValueError(
                    f"scale_by_temporal_and_mask(weight_decay={weight_decay!r}) needs the current "
                    f"parameters: call update(updates, state, params)"
                )
            params = updates  # unused: weight_decay is 0
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        rest = [treedef.flatten_up_to(t) for t in (params, state.mu, state.nu, state.sign_avg)]
        out = []
        for g, p, m, v, s in zip(leaves, *rest):
            step = temporal_and_mask_step(
                g,
                p,
                m,
                v,
                s,
                count,
                betas=(b1, b2),
                beta3=beta3,
                threshold=threshold,
                eps=eps,
                weight_decay=weight_decay,
                weight_decay_order=weight_decay_order,
            )
            fraction = jnp.mean(step.mask, dtype=jnp.float32)
            out.append(
                (step.direction.astype(g.dtype), step.exp_avg, step.exp_avg_sq, step.sign_avg, fraction)
            )
        fields = [jax.tree_util.tree_unflatten(treedef, list(col)) for col in zip(*out)]
        direction, mu, nu, sign_avg, fraction = fields
        return direction, TemporalAndMaskState(count, mu, nu, sign_avg, fraction)

    return optax.GradientTransformation(init_fn, update_fn)


def temporal_and_mask(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    beta3: float = 0.9,
    threshold: float = 0.5,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_order: str = "after",
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    """The temporal AND-mask optimizer (paper Algorithm 1): ``param ← param − lr · direction``.

    ``optax.chain(scale_by_temporal_and_mask(...), optax.scale_by_learning_rate(learning_rate))``.
    It needs no per-environment gradients, so a step costs what an Adam step
    costs. Every numeric argument can be changed during training with
    ``optax.inject_hyperparams`` (which injects them all, ``weight_decay``
    included); pass ``hyperparam_dtype=jnp.float32`` there for 16-bit
    parameters, or ``b2=0.999`` is rounded to the parameters' dtype.

    Args:
        learning_rate: a float or an optax schedule.
        b1, b2, beta3, threshold, eps, weight_decay, weight_decay_order,
            state_dtype: see :func:`scale_by_temporal_and_mask`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from gradand.backends import jax as gj
        >>> opt = optax.inject_hyperparams(gj.temporal_and_mask)(learning_rate=0.1, threshold=0.5)
        >>> params = jnp.zeros(2)
        >>> state = opt.init(params)
        >>> updates, state = opt.update(jnp.array([0.5, -2.0]), state, params)
        >>> optax.apply_updates(params, updates)
        Array([-0.1,  0.1], dtype=float32)
        >>> state.hyperparams["threshold"] = jnp.asarray(1.0)  # change τ during training
    """
    return optax.chain(
        scale_by_temporal_and_mask(
            b1=b1,
            b2=b2,
            beta3=beta3,
            threshold=threshold,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_order=weight_decay_order,
            state_dtype=state_dtype,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
