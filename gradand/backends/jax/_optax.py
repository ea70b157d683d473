"""optax gradient transformations: combine per-environment updates; the temporal AND-mask.

:func:`reduce_environments` turns updates stacked over environments (leading
axis) into one update per parameter with a combiner, so it goes first in an
``optax.chain``. :func:`temporal_and_mask` is the paper's Algorithm 1 (Adam
with a moving average of gradient signs over *steps*) as an optax optimizer;
its math is :func:`gradand.temporal.temporal_and_mask_step`, called per leaf.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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

    ``update`` needs ``params`` (``update(updates, state, params)``; a chain
    passes on what it is given): every leaf of ``updates`` must have shape
    ``(E, *param.shape)`` with the same ``E >= 1`` in every leaf, and the
    same tree structure as ``params``; otherwise a ``ValueError`` names the
    leaf, its shape and the expected shape. (Without the check, updates
    without the environment axis would be combined over the parameter's first
    axis and the result broadcast into the parameter by
    ``optax.apply_updates``.) The shapes are static, so the check costs
    nothing under ``jit``.

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
        _check_stacked(updates, params)
        combined, info = combine(
            updates, combiner, axis_name=axis_name, return_info=True, nan_policy=nan_policy
        )
        return combined, ReduceEnvironmentsState(info.survivor_fraction, info.agreement)

    return optax.GradientTransformation(init_fn, update_fn)


def _stacked_shape(envs: int | None, param_shape: tuple[int, ...]) -> str:
    """``(E, *param_shape)`` written out, with ``E`` a number once it is known."""
    items = ["E" if envs is None else str(envs), *map(str, param_shape)]
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def _check_stacked(updates: PyTree, params: PyTree) -> None:
    """Every leaf of ``updates`` is ``(E, *param.shape)``, the same ``E >= 1`` everywhere."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if params is None:
        param_shapes: list[tuple[int, ...] | None] = [None] * len(leaves)
    else:
        p_leaves, p_def = jax.tree_util.tree_flatten(params)
        if p_def != treedef:
            raise ValueError(
                f"updates and params have different tree structures: updates {treedef}, params {p_def}"
            )
        param_shapes = [tuple(jnp.shape(p)) for p in p_leaves]
    shapes = [tuple(jnp.shape(leaf)) for _, leaf in leaves]
    # E as the first well-formed leaf has it, to write the expected shape of a malformed one.
    known = next((s[0] for s, p in zip(shapes, param_shapes) if p is not None and s[1:] == p and s), None)
    envs: int | None = None
    first = ""
    for (path, _), shape, p_shape in zip(leaves, shapes, param_shapes):
        where = "updates" + jax.tree_util.keystr(path)
        expected = _stacked_shape(known if envs is None else envs, () if p_shape is None else p_shape)
        if not shape:
            raise ValueError(
                f"{where} has shape () and so no environment axis; expected "
                f"{expected if p_shape is not None else '(E, *param_shape)'}: reduce_environments takes "
                f"the per-environment updates stacked on axis 0 (e.g. from jax.vmap(jax.grad(loss), "
                f"in_axes=(None, 0)))"
            )
        if p_shape is not None and shape[1:] != p_shape:
            hint = (
                " (it has the parameter's shape: the environment axis is missing)" if shape == p_shape else ""
            )
            raise ValueError(
                f"{where} has shape {shape}; expected {expected}: the per-environment updates "
                f"stacked on axis 0 of a parameter of shape {p_shape}{hint}"
            )
        if envs is None:
            envs, first = shape[0], where
        elif shape[0] != envs:
            raise ValueError(
                f"{where} has shape {shape}, but {first} has {envs} environments on axis 0; expected "
                f"{_stacked_shape(envs, shape[1:] if p_shape is None else p_shape)}: every leaf must "
                f"stack the updates of the same environments"
            )
    if envs == 0:
        raise ValueError(f"{first} has 0 environments on axis 0; reduce_environments needs at least one")
    if params is None:
        raise ValueError(
            "reduce_environments needs the parameters: call update(updates, state, params), so that "
            "each leaf of updates can be checked to be (E, *param.shape) (an update without the "
            "environment axis would otherwise be combined over the parameter's first axis and "
            "broadcast into the parameter)"
        )


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


_DEFAULTS = {
    "learning_rate": 1e-3,
    "b1": 0.9,
    "b2": 0.999,
    "beta3": 0.9,
    "threshold": 0.5,
    "eps": 1e-8,
    "weight_decay": 0.0,
}

# core argument name (regex) -> this module's argument name
_ARGUMENT_NAMES = {"lr": "learning_rate", "betas[0]": "b1", "betas[1]": "b2"}


def _hparam(name: str, value: Any) -> tuple[Any, Any]:
    """``(value to use, value to validate)`` for a numeric hyperparameter.

    A Python or NumPy number is used as a Python float. A 0-d array (what
    ``optax.inject_hyperparams`` passes) is used as it is and validated by its
    value when that is known; a traced one (under ``jit``) cannot be, and is
    validated as its default instead.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number; got {value!r} (bool)")
    if isinstance(value, numbers.Real):
        return float(value), value
    if isinstance(value, (jax.Array, np.ndarray)):
        dtype = value.dtype
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real number; got an array of dtype {dtype}")
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar; got an array of shape {tuple(value.shape)}")
        try:
            return value, float(value)
        except jax.errors.ConcretizationTypeError:  # a tracer (under jit): its value is unknown now
            return value, _DEFAULTS[name]
    raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")


def _check_hparams(learning_rate: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate with the core's check, in this module's argument names; values to use, by name."""
    use, check = {}, {}
    for name, value in kwargs.items():
        if name == "weight_decay_order":
            use[name] = check[name] = value
        else:
            use[name], check[name] = _hparam(name, value)
    if callable(learning_rate):  # an optax schedule: its values are not known here
        lr = 0.0
    else:
        use["learning_rate"], lr = _hparam("learning_rate", learning_rate)
    check_temporal_hparams(
        lr=lr,
        betas=(check["b1"], check["b2"]),
        beta3=check["beta3"],
        threshold=check["threshold"],
        eps=check["eps"],
        weight_decay=check["weight_decay"],
        weight_decay_order=check["weight_decay_order"],
        names=_ARGUMENT_NAMES,  # named as this module names them
    )
    return use


def _check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is None:
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(state_dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"state_dtype must be None or a floating dtype (jnp.float32, ...); got {state_dtype!r}"
            f" (with optax.inject_hyperparams pass static_args=('state_dtype',): it takes every "
            f"callable, a dtype too, for a schedule)"
        )


def _check_like(updates: PyTree, reference: PyTree, what: str) -> tuple[list[Any], Any]:
    """``updates``' leaves and structure, which must be those of ``reference`` (``what``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    r_leaves, r_def = jax.tree_util.tree_flatten(reference)
    if r_def != treedef:
        raise ValueError(
            f"updates and {what} have different tree structures: updates {treedef}, {what} {r_def}"
        )
    for (path, leaf), r in zip(leaves, r_leaves):
        if jnp.shape(leaf) != jnp.shape(r):
            raise ValueError(
                f"updates{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}; expected "
                f"{tuple(jnp.shape(r))}, as in {what}: the temporal AND-mask takes one "
                f"update per parameter (combine per-environment updates first, e.g. with "
                f"reduce_environments)"
            )
    return [leaf for _, leaf in leaves], treedef


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

    Hyperparameters are validated on construction with
    :func:`gradand.temporal.check_temporal_hparams` (a ``TypeError`` or
    ``ValueError`` naming the argument): Python or NumPy numbers (``bool``
    refused), or 0-d arrays, which ``optax.inject_hyperparams`` passes and
    which are validated by their value, at ``init`` and at every eager
    ``update``. Inside ``jit`` an injected value is a tracer, whose value is
    not known when the check runs, so a value set in
    ``state.hyperparams`` (or given by a schedule) and used only under
    ``jit`` is not checked; set them outside ``jit``, or validate them with
    :func:`gradand.temporal.check_temporal_hparams` where you set them.
    ``update`` checks that ``updates`` (and ``params``) have the structure
    and shapes of the parameters the state was built for (a ``ValueError``
    naming the leaf otherwise: per-environment updates go through
    :func:`reduce_environments` first).

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
    hp = _check_hparams(
        0.0,
        b1=b1,
        b2=b2,
        beta3=beta3,
        threshold=threshold,
        eps=eps,
        weight_decay=weight_decay,
        weight_decay_order=weight_decay_order,
    )
    _check_state_dtype(state_dtype)
    b1, b2, beta3, threshold, eps, weight_decay = (
        hp[k] for k in ("b1", "b2", "beta3", "threshold", "eps", "weight_decay")
    )
    needs_params = not (isinstance(weight_decay, float) and weight_decay == 0)

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
        leaves, treedef = _check_like(updates, state.mu, "the parameters the state was built for")
        if params is not updates:
            _check_like(updates, params, "params")
        count = optax.safe_increment(state.count)
        rest = [treedef.flatten_up_to(t) for t in (params, state.mu, state.nu, state.sign_avg)]
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
        out = []
        for g, p, m, v, s, path in zip(leaves, *rest, paths):
            try:
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
            except (TypeError, ValueError) as error:
                raise type(error)(f"updates{path}: {error}") from None
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

    Hyperparameters are validated as in :func:`scale_by_temporal_and_mask`;
    ``learning_rate`` must be >= 0 (``temporal_and_mask(-0.1)`` raises, where
    ``optax.adam(-0.1)`` would silently ascend). A schedule's values are not
    checked.

    Args:
        learning_rate: a number or an optax schedule (a callable of the step count).
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
    if not callable(learning_rate):
        learning_rate = _check_hparams(
            learning_rate,
            b1=b1,
            b2=b2,
            beta3=beta3,
            threshold=threshold,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_order=weight_decay_order,
        )["learning_rate"]
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
