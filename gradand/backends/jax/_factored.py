"""The factored fast path: per-environment gradients of dense layers from one batched backward pass.

For a dense layer ``y = x @ W + b`` the gradient of environment ``e``'s loss
with respect to ``W`` is ``X_eᵀ Δ_e`` (``X_e`` the layer's inputs in that
environment, ``Δ_e = ∂loss_e/∂y``). So instead of differentiating every
environment's loss with respect to every kernel (``vmap`` of ``grad``, which
is what :func:`vectorized_statistics` does), :func:`factored_statistics`
differentiates with respect to a zero *perturbation* added to each layer's
output (flax's ``Module.perturb`` trick): one batched backward pass to the
layer outputs gives every ``Δ_e``. This module only finds the layers and
records ``X`` and ``Δ``: the core's factored engine :func:`gradand.layer_statistics`
turns them into statistics (``X_eᵀ Δ_e`` per chunk of environments, the
outer-product path for one example per environment, the loss scale, the NaN
check), and everything after (the mask, the update) is the core's too.

Layers are found without model changes: every ``flax.linen.Dense`` call is
intercepted (``flax.linen.intercept_methods``), and hand-written models call
:func:`dense` in place of ``x @ kernel + bias``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend.core import Var

import gradand
from gradand import Combiner, Statistics
from gradand._stats import drop_zero_environments
from gradand.backends.jax._all_reduce import PyTree
from gradand.backends.jax._batch import (
    _check_params,
    _environment_count,
    _is_none,
    _map_mapped,
    _resolve_in_axes,
    check_env_ids,
    environment_means,
    environment_sizes,
)
from gradand.backends.jax._sources import check_chunk_size, check_loss_scale, scaled_loss, unscaled_statistics
from gradand.backends.jax._tree import XP, _is_stats, check_combiner, check_nan_policy

__all__ = ["FACTORED_LAYERS", "dense", "factored_statistics"]

#: The layers whose kernel and bias :func:`factored_statistics` factors: ``flax.linen.Dense``
#: (intercepted; not a subclass that overrides ``__call__``, nor one with a custom
#: ``dot_general``) and calls of :func:`dense`. Inputs ``(..., in)``: any leading axes are
#: examples (or positions) of the environment. Convolutions, embeddings, attention
#: projections written by hand, ``nn.DenseGeneral``, normalisation scales and every other
#: parameter fall back to per-environment gradients.
FACTORED_LAYERS: tuple[str, ...] = ("flax.linen.Dense", "gradand.backends.jax.dense")

_state = threading.local()


def _current() -> _Trace | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _active(trace: _Trace) -> Iterator[None]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(trace)
    try:
        with _flax_interceptor():
            yield
    finally:
        stack.pop()


class _Record:
    """What the discovery trace learned about one call of a supported layer."""

    __slots__ = ("bias", "kernel", "x_dtype", "x_shape", "y_dtype", "y_shape")

    def __init__(self, kernel: int | None, bias: int | None, x: Any, y: Any) -> None:
        self.kernel, self.bias = kernel, bias
        self.x_shape, self.x_dtype = tuple(x.shape), x.dtype
        self.y_shape, self.y_dtype = tuple(y.shape), y.dtype


class _Trace:
    """One trace of one environment's loss: discovery (records calls) or the real run (taps them)."""

    def __init__(self, leaf_ids: dict[int, int], slots: list | None = None, plan: Any = None) -> None:
        self.leaf_ids = leaf_ids  # id(param leaf) -> its index in the flattened params
        self.slots = slots  # discovery: stand-ins for the leaves, one per leaf
        self.plan = plan  # run: (records, active flags, perturbations)
        self.records: list[_Record] = []
        self.inputs: list[Any] = []
        self.calls = 0

    def tap(self, x: Any, kernel: Any, bias: Any, compute: Callable[[Any, Any, Any], Any]) -> Any:
        k = self.calls
        self.calls += 1
        ki = self.leaf_ids.get(id(kernel))
        bi = None if bias is None else self.leaf_ids.get(id(bias))
        if self.plan is None:  # discovery: use stand-ins, so that other uses of the leaves show
            kk = kernel if ki is None else self.slots[ki]
            bb = bias if bi is None else self.slots[bi]
            y = compute(x, kk, bb)
            self.records.append(_Record(ki, bi, x, y))
            return y
        records, active, perts = self.plan
        if k >= len(records) or (records[k].kernel, records[k].bias) != (ki, bi):
            raise RuntimeError(
                "the factored path: the model called its dense layers differently in two traces "
                "of the same loss (call order or parameters changed); the loss must be a pure function"
            )
        y = compute(x, kernel, bias)
        if not active[k]:
            return y
        self.inputs.append(x)
        return y + perts[k]


def _matmul(x: Any, kernel: Any, bias: Any, precision: Any = None) -> Any:
    """``x @ kernel + bias``, with ``jnp.matmul``'s dtype promotion."""
    y = jnp.matmul(x, kernel, precision=precision)
    return y if bias is None else y + bias


def dense(x: Any, kernel: Any, bias: Any = None, *, precision: Any = None) -> jax.Array:
    """``x @ kernel + bias`` that the factored path (:func:`factored_statistics`) can see.

    Use it in place of the matrix product of a hand-written dense layer.
    Outside the factored path it is exactly ``x @ kernel + bias``
    (any other transform, ``jit``, ``grad``, ``vmap``, works as usual);
    inside it, it records ``x`` and adds a zero perturbation to the output so
    that the kernel's and bias's per-environment gradients come from one
    backward pass. ``kernel`` and ``bias`` must be leaves of the
    differentiated parameters, passed as they are (a transformed kernel,
    e.g. ``kernel.T`` or ``kernel * mask``, is computed but not factored: its
    leaf falls back to per-environment gradients).

    Args:
        x: inputs ``(..., in)``: the leading axes are one environment's
            examples (or positions); any float dtype.
        kernel: ``(in, out)``.
        bias: ``(out,)`` or ``None``.
        precision: passed to ``jax.lax.dot_general``.

    Returns:
        ``(..., out)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.backends import jax as gj
        >>> gj.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.arange(4.0))
        Array([[3., 4., 5., 6.],
               [3., 4., 5., 6.]], dtype=float32)
    """
    shape, k_shape = tuple(jnp.shape(x)), tuple(jnp.shape(kernel))
    if len(k_shape) != 2:
        raise ValueError(f"kernel must have shape (in, out); got shape {k_shape}")
    if len(shape) < 1 or shape[-1] != k_shape[0]:
        raise ValueError(
            f"x must have shape (..., in) with in = kernel.shape[0] = {k_shape[0]}; got x {shape} "
            f"and kernel {k_shape}"
        )
    if bias is not None and tuple(jnp.shape(bias)) != (k_shape[1],):
        raise ValueError(
            f"bias must have shape (out,) = ({k_shape[1]},) or be None; got shape {tuple(jnp.shape(bias))}"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x has dtype {jnp.result_type(x)}; dense needs floating inputs")
    compute = functools.partial(_matmul, precision=precision)
    trace = _current()
    if trace is None:
        return compute(x, kernel, bias)
    return trace.tap(x, kernel, bias, compute)


# --- flax.linen.Dense, intercepted -----------------------------------------------------------


def _flax_interceptor() -> Any:
    """``flax.linen.intercept_methods`` with the Dense tap, when flax is already imported."""
    if "flax.linen" not in sys.modules:
        return contextlib.nullcontext()
    import flax.linen as nn

    return nn.intercept_methods(_intercept_dense)


def _intercept_dense(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    import flax.linen as nn
    from flax.linen.dtypes import promote_dtype

    m = context.module
    trace = _current()
    if (
        trace is None
        or context.method_name != "__call__"
        or not isinstance(m, nn.Dense)
        or type(m).__call__ is not nn.Dense.__call__
        or getattr(m, "dot_general", None) is not None
        or getattr(m, "dot_general_cls", None) is not None
        or m.is_initializing()
        or len(args) != 1
        or kwargs
        or not m.has_variable("params", "kernel")
    ):
        return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0])
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        return next_fun(*args, **kwargs)
    kernel = m.get_variable("params", "kernel")
    bias = m.get_variable("params", "bias") if m.use_bias else None

    def compute(x: Any, kernel: Any, bias: Any) -> Any:  # flax's Dense.__call__, minus parameter creation
        x, kernel, bias = getattr(m, "promote_dtype", promote_dtype)(x, kernel, bias, dtype=m.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=m.precision)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    return trace.tap(x, kernel, bias, compute)


# --- statistics ---------------------------------------------------------------------------


def _check_finite(a: jax.Array, name: str) -> None:
    finite = jnp.isfinite(a)
    escaped = name.replace("{", "{{").replace("}", "}}")
    checkify.check(
        jnp.all(finite),
        f"{escaped} contains NaN or Inf ({{n}} of {a.size} entries, shape {tuple(a.shape)})",
        n=jnp.sum(~finite),
    )


# --- the transform --------------------------------------------------------------------------


def _leaf_names(params: Any) -> list[str]:
    return [f"grads{jax.tree_util.keystr(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _uses(jaxpr: Any) -> set:
    used: set = set()
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if isinstance(v, Var))
    used.update(v for v in jaxpr.outvars if isinstance(v, Var))
    return used


def factored_statistics(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    params: PyTree,
    *batch: Any,
    has_aux: bool = False,
    fallback: str = "vectorized",
    chunk_size: int | None = None,
    nan_policy: str = "raise",
    loss_scale: float | None = None,
    env_ids: Any = None,
    num_envs: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, PyTree]:
    """Source: the factored fast path, for models built from dense layers; ``(losses, stats)``.

    Same arguments and result (up to float rounding) as
    ``gj.vectorized_statistics(loss_fn, combiner, params, *batch)``, at about
    the cost of an ordinary step. ``loss_fn(params, *batch, **kwargs)`` is the
    loss of **one** environment; the batch is stacked over environments on
    axis 0. The environments are ``vmap``-ped as there, so layers that mix the
    examples *of one environment* (BatchNorm in train mode, attention) see the
    same batch.

    How: the loss is traced once to find the calls of supported layers
    (:data:`FACTORED_LAYERS`: every ``flax.linen.Dense``, intercepted with
    ``flax.linen.intercept_methods``, no model change; and :func:`dense` in
    hand-written models) whose kernel and bias are leaves of ``params`` used
    nowhere else. One batched backward pass then gives, per environment, the
    gradient ``Δ_e`` at each such layer's output (with respect to a zero
    perturbation added there, as flax's ``Module.perturb`` does), and the
    layer's inputs ``X_e``; both go to the core's :func:`gradand.layer_statistics`
    (one :class:`gradand.LayerFactors` per call of the layer), which forms
    ``X_eᵀ Δ_e`` chunk by chunk (bias: ``Σ Δ_e``), or, with one example per
    environment, the statistics from outer products without any
    per-example gradient array.

    With ``env_ids`` (one environment id per example, ``num_envs`` static)
    ``loss_fn`` is one example's loss, as in :func:`vectorized_statistics`:
    each example's ``X`` and ``Δ`` (divided by its environment's size) are
    gathered into its environment's rows, padded with zero rows to the
    largest environment (to the batch size under ``jit``, where the sizes are
    not known: the per-environment products then cost E times those of
    environments stacked on axis 0).

    Every other leaf of ``params`` (LayerNorm scales, embeddings,
    convolutions, ``nn.DenseGeneral``, a kernel also used outside its layer,
    e.g. in a weight-decay term or tied transposed) falls back: with
    ``fallback="vectorized"`` its per-environment gradients come from ``vmap``
    of ``grad`` (only for those leaves, in the same pass); with
    ``fallback="error"`` a ``ValueError`` names them. A kernel shared by
    several supported layers is factored. Dense layers inside flax lifted
    transforms (``nn.scan``, ``nn.remat``, ``nn.vmap``) fall back.

    Args:
        loss_fn: one environment's loss; a scalar, or ``(loss, aux)`` with ``has_aux=True``.
        combiner: the combiner whose statistics to compute.
        params: the parameters (any pytree), differentiated.
        *batch: the rest of ``loss_fn``'s positional arguments, environments on axis 0.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        fallback: ``"vectorized"`` or ``"error"``, for the leaves outside supported layers.
        chunk_size: environments per batched product (``None``: chunks that
            fit in cache on CPU, all at once on accelerators).
        nan_policy: ``"raise"`` (eager only), ``"zero"``, ``"propagate"``, ``"checkify"``.
        loss_scale: as in :func:`vectorized_statistics`.
        env_ids: ``(N,)`` environment id per example, in ``[0, num_envs)``.
        num_envs: the number of environments (static) with ``env_ids``.
        kwargs: keyword arguments for ``loss_fn``, passed unmapped.

    Returns:
        ``(losses, stats)`` (``((losses, aux), stats)`` with ``has_aux``), as
        :func:`vectorized_statistics`.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
        >>> x = jax.random.normal(jax.random.key(0), (4, 16, 3))  # 4 environments x 16 examples
        >>> y = (x[..., :1] > 0).astype(jnp.float32)
        >>> params = model.init(jax.random.key(1), x[0])["params"]
        >>> def loss(params, x, y):  # one environment's loss
        ...     return jnp.mean((model.apply({"params": params}, x) - y) ** 2)
        >>> c = gradand.AndMask(threshold=0.75)
        >>> losses, fast = gj.factored_statistics(loss, c, params, x, y, fallback="error")
        >>> _, slow = gj.vectorized_statistics(loss, c, params, x, y)
        >>> leaves = lambda t: jax.tree.leaves(t, is_leaf=lambda s: isinstance(s, gradand.Statistics))
        >>> all(bool((a.sign_sum == b.sign_sum).all()) for a, b in zip(leaves(fast), leaves(slow)))
        True
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    if fallback not in ("vectorized", "error"):
        raise ValueError(f"fallback must be 'vectorized' or 'error'; got {fallback!r}")
    check_chunk_size(chunk_size)
    check_loss_scale(loss_scale)
    kwargs = {} if kwargs is None else kwargs
    if not batch:
        raise ValueError(
            "no batch given: pass the per-environment batch after params, with the environments "
            "stacked on axis 0, e.g. step(params, (x, y)) with x of shape (E, examples_per_env, ...)"
        )
    args = (params, *batch)
    axes = _resolve_in_axes(None, len(args), (0,))
    _check_params(params, 0)
    envs = _environment_count(axes, args)  # with env_ids: examples
    ids = None if env_ids is None else check_env_ids(env_ids, num_envs, envs)
    if env_ids is None and num_envs is not None:
        raise ValueError("num_envs is only used with env_ids (else the batch is (E, n, ...))")
    args = _map_mapped(lambda ax, x: jnp.asarray(x), axes, args)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    seen: set[int] = set()
    for i, v in enumerate(leaves):  # one object per leaf: the layers' leaves are found by identity
        if id(v) in seen:
            leaves[i] = jnp.array(v, copy=True)
        seen.add(id(leaves[i]))
    names = _leaf_names(params)
    rest = args[1:]
    rest_axes = axes[1:]
    call = scaled_loss(functools.partial(loss_fn, **kwargs), has_aux, loss_scale)

    # 1. Discovery: trace one environment's loss, recording the supported layer calls, with
    #    the leaves they use replaced by stand-ins so that any other use of a leaf shows up.
    one = jax.tree.map(
        lambda ax, a: (
            None if ax is None else jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), a)
        ),
        rest_axes,
        rest,
        is_leaf=_is_none,
    )
    discovery: list[_Trace] = []

    def discover(lv: list, slots: list, batch: tuple) -> Any:
        trace = _Trace({id(v): i for i, v in enumerate(lv)}, slots=slots)
        discovery.append(trace)
        a = tuple(r if ax is None else b for ax, r, b in zip(rest_axes, rest, batch, strict=True))
        with _active(trace):
            loss, _ = call(jax.tree_util.tree_unflatten(treedef, lv), *a)
        return loss

    abstract = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in leaves]
    batch_sds = tuple(None if ax is None else b for ax, b in zip(rest_axes, one))
    closed = jax.make_jaxpr(discover)(abstract, abstract, batch_sds)
    records = discovery[-1].records
    n_leaves = len(leaves)
    used = _uses(closed.jaxpr)
    direct = [v in used for v in closed.jaxpr.invars[:n_leaves]]
    role: dict[int, set[str]] = {}
    for r in records:
        if r.kernel is not None:
            role.setdefault(r.kernel, set()).add("kernel")
        if r.bias is not None:
            role.setdefault(r.bias, set()).add("bias")
    covered = {i for i, kinds in role.items() if len(kinds) == 1 and not direct[i]}
    uncovered = [i for i in range(n_leaves) if i not in covered]
    if uncovered and fallback == "error":
        listed = [f"{names[i]} {tuple(leaves[i].shape)}" for i in uncovered]
        raise ValueError(
            f"the factored path factors the kernels and biases of {list(FACTORED_LAYERS)} used "
            f"nowhere else; these leaves of params are not: {listed}. Pass fallback='vectorized' "
            f"(per-environment gradients for them) or use method='vectorized'"
        )
    active = [(r.kernel in covered) or (r.bias is not None and r.bias in covered) for r in records]

    # 2. One batched pass: per-environment losses, layer inputs, output gradients (and the
    #    per-environment gradients of the leaves that fall back).
    def per_env(unc: list, pin: list, *a: Any) -> tuple[Any, tuple[Any, Any, list]]:
        it = iter(pin)
        perts = [next(it) if on else None for on in active]
        lv = list(leaves)
        for i, v in zip(uncovered, unc, strict=True):
            lv[i] = v
        trace = _Trace({id(v): i for i, v in enumerate(lv)}, plan=(records, active, perts))
        with _active(trace):
            scaled, (loss, aux) = call(jax.tree_util.tree_unflatten(treedef, lv), *a)
        if trace.calls != len(records):
            raise RuntimeError(
                "the factored path: the model called its dense layers a different number of times "
                "in two traces of the same loss; the loss must be a pure function"
            )
        return scaled, (loss, aux, trace.inputs)

    perts_in = [jnp.zeros((envs, *r.y_shape), r.y_dtype) for r, on in zip(records, active) if on]
    batched = jax.vmap(
        jax.value_and_grad(per_env, argnums=(0, 1), has_aux=True), in_axes=(None, 0, *rest_axes)
    )
    (_, (losses, aux, inputs)), (unc_grads, deltas) = batched([leaves[i] for i in uncovered], perts_in, *rest)

    if ids is not None:  # examples -> environments: mean losses and gradients, X and Δ/n_e grouped
        assert num_envs is not None  # checked by check_env_ids
        sizes = environment_sizes(ids, num_envs)
        losses = jnp.where(sizes > 0, environment_means(losses, ids, sizes), jnp.nan)
        unc_grads = environment_means(unc_grads, ids, sizes)
        inputs, deltas = _group_examples(ids, sizes, inputs, deltas)
        envs = num_envs

    # 3. Statistics per leaf: factored leaves from (X, Δ) by the core, the others from their gradients.
    stats: list[Any] = [None] * n_leaves
    if uncovered:
        partial = dict(zip(uncovered, unc_grads))  # the params tree with only those leaves (names)
        tree = jax.tree_util.tree_unflatten(treedef, [partial.get(i) for i in range(n_leaves)])
        fell_back = unscaled_statistics(tree, combiner, loss_scale, nan_policy)
        for i, s in zip(uncovered, jax.tree_util.tree_leaves(fell_back, is_leaf=_is_stats), strict=True):
            stats[i] = s
    calls = [j for j, on in enumerate(active) if on]
    x_of = dict(zip(calls, inputs, strict=True))
    d_of = dict(zip(calls, deltas, strict=True))
    for i in sorted(covered):
        stats[i] = _factored_leaf(
            i, records, x_of, d_of, leaves[i], envs, combiner, nan_policy, names[i], chunk_size, loss_scale
        )
    if ids is not None and isinstance(ids, jax.core.Tracer):  # an empty environment: out of the count
        empty = jnp.sum(sizes == 0).astype(jnp.int32)
        stats = [drop_zero_environments(st, empty) for st in stats]
    return ((losses, aux) if has_aux else losses), jax.tree_util.tree_unflatten(treedef, stats)


def _group_examples(
    ids: jax.Array, sizes: jax.Array, inputs: list[jax.Array], deltas: list[jax.Array]
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per-example ``X`` and ``Δ`` ``(N, ..., width)`` -> ``(E, m·rows, width)`` per environment.

    ``Δ`` is divided by the example's environment size (an environment's loss is the mean of its
    examples'); rows past an environment's size are zero rows, which add nothing to ``Xᵀ Δ``. An
    id out of range makes every ``Δ`` NaN: under ``jit`` the update is then NaN, never an update
    that silently left examples out (as :func:`environment_means`).
    """
    n, num_envs = ids.shape[0], sizes.shape[0]
    m = n if isinstance(ids, jax.core.Tracer) else max(1, int(np.max(np.asarray(sizes))))
    onehot = ids[:, None] == jnp.arange(num_envs)[None, :]
    rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # position within its environment
    pad = jnp.full((num_envs, m), n, jnp.int32).at[ids, rank].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    stray = jnp.any((ids < 0) | (ids >= num_envs))
    weight = 1.0 / jnp.maximum(sizes, 1)[jnp.clip(ids, 0, num_envs - 1)]
    weight = jnp.where(stray, jnp.nan, weight)

    def group(a: jax.Array, w: jax.Array | None) -> jax.Array:
        a = _rows(a, n)  # (N, rows, width)
        if w is not None:
            a = a * w.astype(a.dtype)[:, None, None]
        a = jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)])
        return a[pad].reshape(num_envs, m * a.shape[1], a.shape[2])

    return [group(x, None) for x in inputs], [group(d, weight) for d in deltas]


def _rows(a: jax.Array, envs: int) -> jax.Array:
    """``(E, ..., width)`` -> ``(E, rows, width)``."""
    return a.reshape(envs, -1, a.shape[-1])


def _factored_leaf(
    i: int,
    records: list[_Record],
    x_of: dict[int, jax.Array],
    d_of: dict[int, jax.Array],
    leaf: jax.Array,
    envs: int,
    combiner: Combiner,
    policy: str,
    name: str,
    chunk_size: int | None,
    loss_scale: float | None,
) -> Statistics:
    """Hand the layer calls' ``X`` and ``Δ`` of leaf ``i`` to the core's :func:`gradand.layer_statistics`."""
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    factors = [
        gradand.LayerFactors(
            None if r.bias == i else _rows(x_of[j], envs).astype(acc), _rows(d_of[j], envs).astype(acc)
        )
        for j, r in enumerate(records)
        if i in (r.kernel, r.bias)
    ]
    if policy == "checkify":
        for f in factors:
            if f.inputs is not None:
                _check_finite(f.inputs, f"{name} (layer inputs)")
            _check_finite(f.deltas, f"{name} (output gradients)")
        policy = "propagate"
    if chunk_size is None:
        one_product = any(f.inputs is None for f in factors) or (
            len(factors) == 1 and factors[0].deltas.shape[1] == 1
        )  # a bias, or the outer-product path
        chunk_size = envs if one_product else _chunk_size(leaf, envs)

    def engine(parts: list[gradand.LayerFactors], n: int, how: str) -> Statistics:
        return gradand.layer_statistics(
            parts, combiner, shape=leaf.shape, layout="in_out", chunk_size=min(chunk_size, n),
            scale=loss_scale, nan_policy=how, name=name, xp=XP,
        )  # fmt: skip

    n_chunks = envs // chunk_size
    if n_chunks < _SCAN_CHUNKS or not XP.gradand_unroll_environments(envs):
        return engine(factors, envs, policy).replace(dtype=leaf.dtype)
    # Many chunks on CPU: a scan over them, as the vectorized path's chunks, so that one chunk's
    # batched product and its unrolled sums are live at a time (in cache), not all of them.
    part = functools.partial(_chunk_of, factors, chunk_size)
    traced = "propagate" if policy == "raise" else policy  # in a scan the values are unknown
    first = engine(part(0), chunk_size, traced)

    def body(carry: Statistics, i: jax.Array) -> tuple[Statistics, None]:
        return carry + engine(part(i), chunk_size, traced), None

    first = first.replace(count=jnp.asarray(first.count, jnp.int32))  # a carry: the count is an array
    s, _ = jax.lax.scan(body, first, jnp.arange(1, n_chunks))
    head = n_chunks * chunk_size
    if head < envs:
        rest = [
            gradand.LayerFactors(None if f.inputs is None else f.inputs[head:], f.deltas[head:])
            for f in factors
        ]
        s = s + engine(rest, envs - head, traced)
    # the number of environments is static: a Python int, so the vote threshold stays exact
    return s.replace(count=envs, dtype=leaf.dtype)


def _chunk_of(factors: list[gradand.LayerFactors], size: int, i: Any) -> list[gradand.LayerFactors]:
    """Chunk ``i`` (possibly traced) of ``size`` environments of every factor."""

    def cut(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(a, i * size, size, axis=0)

    return [gradand.LayerFactors(None if f.inputs is None else cut(f.inputs), cut(f.deltas)) for f in factors]


#: Fewest cache-sized chunks worth a scan on CPU: below, one batched product summed unrolled is
#: faster (spirals MLP, 16 environments x 256 rows of 256 x 256: 1.6x faster than 2 scanned
#: chunks); from here, the scan's bounded memory wins (64 x 64 rows: 2x faster than one product).
_SCAN_CHUNKS = 4

#: Bytes of per-environment kernel gradients per chunk on CPU: small enough that the batched
#: product and the statistics over it stay in cache (spirals MLP, E=64 x 64 examples, 256x256
#: layers: the product and its statistics then cost what the one (4096, 256)ᵀ(4096, 256)
#: product of a plain step costs).
_CHUNK_BYTES = 2 * 1024 * 1024


def _chunk_size(leaf: jax.Array, envs: int) -> int:
    """Environments per batched product of a kernel: all at once on accelerators; on CPU, chunks
    whose per-environment gradients stay in cache (XLA reduces over a leading axis several times
    slower than it fuses a sum of per-environment terms, so the engine sums each chunk one
    environment at a time while the trace stays short: the namespace's
    ``gradand_unroll_environments``)."""
    if jax.default_backend() != "cpu":
        return envs
    return min(envs, max(1, _CHUNK_BYTES // max(1, leaf.size * 4)))
