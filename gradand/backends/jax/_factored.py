"""The factored fast path: per-environment gradients of dense layers from one batched backward pass.

For a dense layer ``y = x @ W + b`` the gradient of environment ``e``'s loss
with respect to ``W`` is ``X_eᵀ Δ_e`` (``X_e`` the layer's inputs in that
environment, ``Δ_e = ∂loss_e/∂y``). So instead of differentiating every
environment's loss with respect to every kernel (``vmap`` of ``grad``, which
is what :func:`value_and_grad` does), :func:`factored_value_and_grad`
differentiates with respect to a zero *perturbation* added to each layer's
output (flax's ``Module.perturb`` trick): one batched backward pass to the
layer outputs gives every ``Δ_e``, and one batched matrix product per layer
gives every environment's kernel gradient. With one example per environment
the core's :func:`gradand.outer_statistics` gives the statistics with no
per-example gradient array at all. Everything after the gradients (the
statistics, the mask, the update) is the core's.

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
from jax.experimental import checkify
from jax.extend.core import Var

import gradand
from gradand import Combiner, Statistics
from gradand.backends.jax._grad import (
    GradInfo,
    _check_params,
    _environment_count,
    _is_none,
    _map_mapped,
    _resolve_in_axes,
)
from gradand.backends.jax._tree import (
    PyTree,
    check_combiner,
    check_nan_policy,
    finalize,
)

__all__ = ["FACTORED_LAYERS", "dense", "factored_value_and_grad"]

#: The layers whose kernel and bias :func:`factored_value_and_grad` factors: ``flax.linen.Dense``
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
                "factored_value_and_grad: the model called its dense layers differently in two traces "
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
    """``x @ kernel + bias`` that :func:`factored_value_and_grad` can see.

    Use it in place of the matrix product of a hand-written dense layer.
    Outside :func:`factored_value_and_grad` it is exactly ``x @ kernel + bias``
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


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _stacked_statistics(g: jax.Array, combiner: Combiner, policy: str, name: str) -> Statistics:
    """The core's statistics of ``g`` (E, ...), environments on axis 0 (see ``_tree._leaf_statistics``)."""
    from gradand.backends.jax._tree import _leaf_statistics

    return _leaf_statistics(g, combiner, policy, name)


def _check_finite(a: jax.Array, name: str) -> None:
    finite = jnp.isfinite(a)
    escaped = name.replace("{", "{{").replace("}", "}}")
    checkify.check(
        jnp.all(finite),
        f"{escaped} contains NaN or Inf ({{n}} of {a.size} entries, shape {tuple(a.shape)})",
        n=jnp.sum(~finite),
    )


def _outer(x: jax.Array, d: jax.Array, combiner: Combiner, policy: str, name: str) -> Statistics:
    """Per-example kernel statistics (``(in, out)``) from ``x`` (E, in) and ``Δ`` (E, out)."""
    if policy == "checkify":
        _check_finite(x, f"{name} (layer inputs)")
        _check_finite(d, f"{name} (output gradients)")
        policy = "propagate"
    try:
        s = gradand.outer_statistics(x, d, combiner, nan_policy=policy)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    # The core's layout is (out, in); the kernel's is (in, out). (XLA folds the transposes into
    # the products: faster on CPU than swapping the roles of x and Δ.)
    return s.replace(**{k: v.T for k, v in s.arrays().items()})


# --- the transform --------------------------------------------------------------------------


def _leaf_names(params: Any) -> list[str]:
    return [f"grads{jax.tree_util.keystr(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _uses(jaxpr: Any) -> set:
    used: set = set()
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if isinstance(v, Var))
    used.update(v for v in jaxpr.outvars if isinstance(v, Var))
    return used


def factored_value_and_grad(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    *,
    has_aux: bool = False,
    fallback: str = "vmap",
    nan_policy: str = "raise",
) -> Callable[..., tuple[tuple[jax.Array, GradInfo], PyTree]]:
    """:func:`value_and_grad` at about the cost of an ordinary step, for models built from dense layers.

    Same calling convention and result (up to float rounding) as
    ``gj.value_and_grad(loss_fn, combiner)``: ``loss_fn(params, batch, ...)``
    is the loss of **one** environment; the returned function takes the batch
    stacked over environments on axis 0 (every positional argument after
    ``params``; keyword arguments are passed unmapped) and returns
    ``((mean_loss, info), grads)`` with a :class:`GradInfo`. It is pure and
    jit-able. The environments are ``vmap``-ped as in :func:`value_and_grad`,
    so layers that mix the examples *of one environment* (BatchNorm in train
    mode, attention) see the same batch as there.

    How: the loss is traced once to find the calls of supported layers
    (:data:`FACTORED_LAYERS`: every ``flax.linen.Dense``, intercepted with
    ``flax.linen.intercept_methods``, no model change; and :func:`dense` in
    hand-written models) whose kernel and bias are leaves of ``params`` used
    nowhere else. Then one batched backward pass gives, per environment, the
    gradient ``Δ_e`` at each such layer's output (with respect to a zero
    perturbation added there, as flax's ``Module.perturb`` does) instead of
    the kernel gradients, and per layer one batched product ``X_eᵀ Δ_e`` gives
    every environment's kernel gradient (bias: ``Σ Δ_e``), in float32 or wider;
    their statistics (:func:`gradand.statistics`, accumulated one environment
    at a time, which XLA fuses into one pass) are finalized by the core. With
    one example per environment (inputs ``(E, 1, ...)`` or ``(E, ...)``), a
    layer called once, and a combiner whose statistics are in
    :data:`gradand.OUTER_STATISTICS` (``Mean``, ``AndMask``, ``SandMask``;
    not ``GeometricMean``), :func:`gradand.outer_statistics` gives the
    kernel's statistics from two or three ``(in, E) × (E, out)`` products
    and no per-example gradient array.

    Cost: one forward and one backward pass without the kernel gradients,
    then per layer ``E·n·in·out`` multiply-adds (what the plain step spends on
    the kernel gradient) and the statistics' passes over the ``(E, in, out)``
    per-environment kernel gradients, on CPU in chunks of environments that
    fit in cache (inside ``lax.scan``); per-example layers on the outer path
    need one or two more ``(in, E) × (E, out)`` products instead. Measured on
    the spirals MLP (CPU, 1 thread), as a ratio to a jitted plain-averaging
    step: 1.1–1.4 for 16 environments × 256, 1.1–1.3 for 64 × 64, 1.15–1.8
    for 128 examples each its own environment (:func:`value_and_grad`:
    1.05–1.3 for 16 or 64 environments, 68 per example).

    Every other leaf of ``params`` (LayerNorm scales, embeddings,
    convolutions, ``nn.DenseGeneral``, a free scale parameter, a kernel also
    used outside its layer, e.g. in a weight-decay term or tied to another
    layer transposed) falls back: with ``fallback="vmap"`` its per-environment
    gradients come from ``vmap`` of ``grad`` (only for those leaves, in the
    same pass); with ``fallback="error"`` a ``ValueError`` names them. A
    kernel shared by several supported layers is factored (its products are
    summed). Dense layers inside flax lifted transforms (``nn.scan``,
    ``nn.remat``, ``nn.vmap``) fall back.

    Not supported (use :func:`value_and_grad`): ``argnums`` other than 0,
    ``in_axes``, ``chunk`` (memory is O(E · P) for the per-environment
    kernel gradients, as unchunked :func:`value_and_grad`; per-example
    layers on the outer path need none), ``axis_name``.

    Args:
        loss_fn: ``loss_fn(params, *batch, **kwargs) -> loss`` for one
            environment; a scalar, or ``(loss, aux)`` with ``has_aux=True``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``,
            ``gradand.GeometricMean(...)``, ``gradand.SandMask(...)``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``info.aux`` then holds
            the per-environment ``aux`` stacked on axis 0.
        fallback: ``"vmap"`` or ``"error"``, for the leaves outside supported
            layers (see above).
        nan_policy: as in :func:`value_and_grad` (``"raise"`` only when called
            eagerly; under ``jit`` the check is skipped).

    Returns:
        A function ``(params, *batch, **kwargs) -> ((mean_loss, info), grads)``.

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
        >>> step = jax.jit(gj.factored_value_and_grad(loss, gradand.AndMask(threshold=0.75)))
        >>> (mean_loss, info), grads = step(params, x, y)
        >>> slow = gj.value_and_grad(loss, gradand.AndMask(threshold=0.75))
        >>> all(jax.tree.leaves(jax.tree.map(
        ...     lambda a, b: jnp.allclose(a, b, atol=1e-5), grads, slow(params, x, y)[1])))
        True
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    if fallback not in ("vmap", "error"):
        raise ValueError(f"fallback must be 'vmap' or 'error'; got {fallback!r}")
    outer_ok = set(combiner.statistics) <= gradand.OUTER_STATISTICS

    @functools.wraps(loss_fn)
    def factored(*args: Any, **kwargs: Any) -> tuple[tuple[jax.Array, GradInfo], PyTree]:
        if not args:
            raise ValueError("the function takes (params, *batch): got no positional arguments")
        if len(args) < 2:
            raise ValueError(
                "no batch given: pass the per-environment batch after params, with the environments "
                "stacked on axis 0, e.g. step(params, (x, y)) with x of shape (E, examples_per_env, ...)"
            )
        axes = _resolve_in_axes(None, len(args), (0,))
        _check_params(args[0], 0)
        envs = _environment_count(axes, args)
        params = args[0]
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

        def call(p: Any, *a: Any) -> tuple[Any, Any]:
            out = loss_fn(p, *a, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"has_aux=True: loss_fn must return (loss, aux); got {type(out).__name__}"
                    )
                return out
            return out, None

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
                f"factored_value_and_grad factors the kernels and biases of {list(FACTORED_LAYERS)} "
                f"used nowhere else; these leaves of params are not: {listed}. Pass fallback='vmap' "
                f"(per-environment gradients for them) or use gj.value_and_grad"
            )
        active = [(r.kernel in covered) or (r.bias is not None and r.bias in covered) for r in records]

        # 2. One batched pass: per-environment losses, layer inputs, output gradients (and the
        #    per-environment gradients of the leaves that fall back).
        def per_env(unc: list, perts: list, *a: Any) -> tuple[Any, tuple[Any, list]]:
            lv = list(leaves)
            for i, v in zip(uncovered, unc, strict=True):
                lv[i] = v
            trace = _Trace({id(v): i for i, v in enumerate(lv)}, plan=(records, active, perts))
            with _active(trace):
                loss, aux = call(jax.tree_util.tree_unflatten(treedef, lv), *a)
            if trace.calls != len(records):
                raise RuntimeError(
                    "factored_value_and_grad: the model called its dense layers a different number "
                    "of times in two traces of the same loss; the loss must be a pure function"
                )
            return loss, (aux, trace.inputs)

        perts = [
            jnp.zeros((envs, *r.y_shape), r.y_dtype) if on else None
            for r, on in zip(records, active, strict=True)
        ]
        perts_in = [p for p in perts if p is not None]

        def per_env_compact(unc: list, pin: list, *a: Any) -> Any:
            it = iter(pin)
            full = [next(it) if on else None for on in active]
            return per_env(unc, full, *a)

        batched = jax.vmap(
            jax.value_and_grad(per_env_compact, argnums=(0, 1), has_aux=True),
            in_axes=(None, 0, *rest_axes),
        )
        (losses, (aux, inputs)), (unc_grads, deltas) = batched(
            [leaves[i] for i in uncovered], perts_in, *rest
        )

        # 3. Statistics per leaf: factored leaves from (X, Δ), the others from their gradients.
        stats: list[Any] = [None] * n_leaves
        for i, g in zip(uncovered, unc_grads, strict=True):
            stats[i] = _stacked_statistics(g, combiner, nan_policy, names[i])
        calls = [j for j, on in enumerate(active) if on]
        x_of = dict(zip(calls, inputs, strict=True))
        d_of = dict(zip(calls, deltas, strict=True))
        for i in sorted(covered):
            stats[i] = _factored_statistics(
                i, records, x_of, d_of, leaves[i], envs, combiner, nan_policy, names[i], outer_ok
            )

        acc = jnp.promote_types(losses.dtype, jnp.float32)
        loss = (jnp.sum(losses, dtype=acc) / envs).astype(losses.dtype)
        tree = jax.tree_util.tree_unflatten(treedef, stats)
        grads, info = finalize(tree, combiner, return_info=True)
        return (loss, GradInfo(losses, info.survivor_fraction, info.agreement, aux)), grads

    return factored


def _rows(a: jax.Array, envs: int) -> jax.Array:
    """``(E, ..., width)`` -> ``(E, rows, width)``."""
    return a.reshape(envs, -1, a.shape[-1])


def _factored_statistics(
    i: int,
    records: list[_Record],
    x_of: dict[int, jax.Array],
    d_of: dict[int, jax.Array],
    leaf: jax.Array,
    envs: int,
    combiner: Combiner,
    policy: str,
    name: str,
    outer_ok: bool,
) -> Statistics:
    kernel_calls = [j for j, r in enumerate(records) if r.kernel == i]
    bias_calls = [j for j, r in enumerate(records) if r.bias == i]
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    if bias_calls:  # the bias gradient of an environment: Σ over its rows of Δ
        g = sum(jnp.sum(_rows(d_of[j], envs).astype(acc), axis=1) for j in bias_calls)
        return _stacked_statistics(g.astype(leaf.dtype), combiner, policy, name)
    xs = [_rows(x_of[j], envs).astype(acc) for j in kernel_calls]
    ds = [_rows(d_of[j], envs).astype(acc) for j in kernel_calls]
    x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)
    d = ds[0] if len(ds) == 1 else jnp.concatenate(ds, axis=1)
    if outer_ok and x.shape[1] == 1 and leaf.dtype == acc:
        s = _outer(x[:, 0], d[:, 0], combiner, policy, name)
        return s

    def chunk_statistics(x: jax.Array, d: jax.Array, policy: str = policy) -> Statistics:
        g = jnp.einsum("eri,ero->eio", x, d, preferred_element_type=acc)
        return _stacked_statistics(g.astype(leaf.dtype), combiner, policy, name)

    size = _chunk_size(leaf, envs)
    if size >= envs or not _is_traced(x):
        return chunk_statistics(x, d)
    # In chunks of environments that keep the per-environment gradients in cache: the
    # batched product writes them and the statistics read them back from there.
    n_chunks, head = envs // size, (envs // size) * size
    split = functools.partial(lambda a: a[:head].reshape(n_chunks, size, *a.shape[1:]))
    shapes = jax.eval_shape(functools.partial(chunk_statistics, policy="propagate"), x[:size], d[:size])
    zero = jax.tree.map(jnp.zeros_like, shapes)

    def body(carry: Statistics, xd: tuple[jax.Array, jax.Array]) -> tuple[Statistics, None]:
        return gradand.merge(carry, chunk_statistics(*xd)), None

    stats, _ = jax.lax.scan(body, zero, (split(x), split(d)))
    if head < envs:
        stats = gradand.merge(stats, chunk_statistics(x[head:], d[head:]))
    return stats


#: Bytes of per-environment kernel gradients per chunk on CPU: small enough that the batched
#: product and the statistics over it stay in cache (spirals MLP, E=64 x 64 examples, 256x256
#: layers: the product and its statistics then cost what the one (4096, 256)ᵀ(4096, 256)
#: product of a plain step costs).
_CHUNK_BYTES = 2 * 1024 * 1024


def _chunk_size(leaf: jax.Array, envs: int) -> int:
    if jax.default_backend() != "cpu":  # accelerators: one batched product, no cache to fit
        return envs
    return max(1, _CHUNK_BYTES // max(1, leaf.size * 4))
