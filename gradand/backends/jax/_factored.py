"""The factored fast path: per-environment gradients of dense and conv layers from one backward pass.

For a dense layer ``y = x @ W + b`` the gradient of environment ``e``'s loss
with respect to ``W`` is ``X_eᵀ Δ_e`` (``X_e`` the layer's inputs in that
environment, ``Δ_e = ∂loss_e/∂y``); for a convolution it is the
convolution's transpose with respect to its kernel applied to ``X_e`` and
``Δ_e`` (what ``jax.grad`` computes for the layer, once per environment). So
instead of differentiating every environment's loss with respect to every
kernel (``vmap`` of ``grad``, which
is what :func:`vectorized_statistics` does), :func:`factored_statistics`
differentiates with respect to a zero *perturbation* added to each layer's
output (flax's ``Module.perturb`` trick): one batched backward pass to the
layer outputs gives every ``Δ_e``. This module only finds the layers and
records ``X`` and ``Δ`` (and hands over a convolution's transpose as the
``gradient`` of its :class:`gradand.LayerFactors`): the core's factored engine
:func:`gradand.layer_statistics` turns them into statistics (``X_eᵀ Δ_e`` per
chunk of environments, the outer-product path for one example per
environment, the loss scale, the NaN check), and everything after (the mask,
the update) is the core's too.

Layers are found without model changes: every ``flax.linen.Dense`` and
``flax.linen.Conv`` call is intercepted (``flax.linen.intercept_methods``), and
hand-written models call :func:`dense` in place of ``x @ kernel + bias`` and
:func:`conv` in place of ``jax.lax.conv_general_dilated``.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

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

__all__ = ["FACTORED_LAYERS", "conv", "dense", "factored_statistics"]

#: The layers whose kernel and bias :func:`factored_statistics` factors: ``flax.linen.Dense``
#: and ``flax.linen.Conv`` (intercepted; not a subclass that overrides ``__call__``, nor one
#: with a custom ``dot_general`` / ``conv_general_dilated`` or a ``mask``) and calls of
#: :func:`dense` and :func:`conv`. Dense inputs ``(..., in)``: any leading axes are examples
#: (or positions) of the environment; convolutions channels last, ``(..., *spatial, in)``,
#: with any strides, padding, dilation and ``feature_group_count``. Embeddings, attention
#: projections written by hand, ``nn.DenseGeneral``, ``nn.ConvTranspose``, ``nn.ConvLocal``,
#: normalisation scales (BatchNorm, LayerNorm) and every other parameter fall back to
#: per-environment gradients.
FACTORED_LAYERS: tuple[str, ...] = (
    "flax.linen.Dense", "flax.linen.Conv", "gradand.backends.jax.dense", "gradand.backends.jax.conv",
)  # fmt: skip

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
    """What the discovery trace learned about one call of a supported layer (``conv``: a
    convolution's configuration, ``None`` for a dense layer)."""

    __slots__ = ("bias", "conv", "kernel", "x_dtype", "x_shape", "y_dtype", "y_shape")

    def __init__(self, kernel: int | None, bias: int | None, x: Any, y: Any, conv: _ConvSpec | None) -> None:
        self.kernel, self.bias, self.conv = kernel, bias, conv
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

    def tap(
        self,
        x: Any,
        kernel: Any,
        bias: Any,
        compute: Callable[[Any, Any, Any], Any],
        conv: _ConvSpec | None = None,
    ) -> Any:
        k = self.calls
        self.calls += 1
        ki = self.leaf_ids.get(id(kernel))
        bi = None if bias is None else self.leaf_ids.get(id(bias))
        if self.plan is None:  # discovery: use stand-ins, so that other uses of the leaves show
            kk = kernel if ki is None else self.slots[ki]
            bb = bias if bi is None else self.slots[bi]
            y = compute(x, kk, bb)
            self.records.append(_Record(ki, bi, x, y, conv))
            return y
        records, active, perts = self.plan
        if k >= len(records) or (records[k].kernel, records[k].bias) != (ki, bi):
            raise RuntimeError(
                "the factored path: the model called its layers differently in two traces "
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


# --- convolutions --------------------------------------------------------------------------

Padding = str | int | Sequence[int | tuple[int, int]]


class _ConvSpec(NamedTuple):
    """A convolution's configuration besides its inputs and kernel (``lax.conv_general_dilated``'s
    arguments, channels last: inputs ``(batch, *spatial, in)``, kernel ``(*window, in/groups, out)``)."""

    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    feature_group_count: int
    precision: Any


def _dimension_numbers(spatial: int) -> jax.lax.ConvDimensionNumbers:
    """Channels last, as flax: ``(N, *S, C)`` inputs and outputs, ``(*window, I, O)`` kernels."""
    lhs = (0, spatial + 1, *range(1, spatial + 1))
    return jax.lax.ConvDimensionNumbers(lhs, (spatial + 1, spatial, *range(spatial)), lhs)


def _convolve(x: Any, kernel: Any, bias: Any, spec: _ConvSpec) -> Any:
    """The convolution of ``x`` ``(*batch, *S, C)`` (any number of batch axes, flattened as
    flax does), plus ``bias``; ``x``, ``kernel`` and ``bias`` of one dtype."""
    spatial = kernel.ndim - 2
    lead = x.shape[: x.ndim - spatial - 1]
    flat = jnp.reshape(x, (-1, *x.shape[len(lead) :]))
    y = jax.lax.conv_general_dilated(
        flat, kernel, spec.strides, spec.padding, lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation, dimension_numbers=_dimension_numbers(spatial),
        feature_group_count=spec.feature_group_count, precision=spec.precision,
    )  # fmt: skip
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return jnp.reshape(y, (*lead, *y.shape[1:]))


def _per_spatial_dim(value: Any, spatial: int, name: str) -> tuple[int, ...]:
    """An int, or one positive int per spatial dimension."""
    out = (value,) * spatial if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        out = tuple(operator.index(v) for v in out)
    except TypeError:
        out = None
    if out is None or len(out) != spatial or min(out) < 1:
        raise ValueError(f"{name} must be a positive int or {spatial} positive ints; got {value!r}")
    return out


def _padding(padding: Any, spatial: int) -> str | tuple[tuple[int, int], ...]:
    """``"SAME"``, ``"VALID"``, an int, or per spatial dimension an int or a ``(low, high)`` pair."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', ints or (low, high) pairs; got {padding!r}")
        # "VALID" as numbers: lax takes no padding string with input dilation
        return "SAME" if padding.upper() == "SAME" else ((0, 0),) * spatial
    per_dim = [padding] * spatial if isinstance(padding, int) else padding
    try:
        pairs = tuple((int(p), int(p)) if isinstance(p, int) else tuple(int(q) for q in p) for p in per_dim)
    except TypeError:
        pairs = ()
    if len(pairs) != spatial or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"padding must be 'SAME', 'VALID', an int, or {spatial} ints or (low, high) pairs; "
            f"got {padding!r}"
        )
    return pairs


def conv(
    x: Any,
    kernel: Any,
    bias: Any = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """A convolution (channels last, as ``flax.linen.Conv``) that the factored path can see.

    Use it in place of ``jax.lax.conv_general_dilated`` in a hand-written
    convolutional layer. Outside the factored path it is exactly that
    convolution plus ``bias``; inside :func:`factored_statistics` it records
    ``x`` and adds a zero perturbation to the output, and each environment's
    kernel gradient comes from JAX's own convolution transpose of that
    environment's ``x`` and output gradient (no im2col patches). ``kernel`` and
    ``bias`` must be leaves of the differentiated parameters, passed as they
    are (as for :func:`dense`).

    Args:
        x: inputs ``(*batch, *spatial, in)`` (e.g. NHWC; any number of batch
            axes, none for one example); any float dtype.
        kernel: ``(*window, in / feature_group_count, out)`` (e.g. HWIO).
        bias: ``(out,)`` or ``None``.
        strides: the window strides, an int or one per spatial dimension.
        padding: ``"SAME"``, ``"VALID"``, an int, or per spatial dimension an
            int or a ``(low, high)`` pair (``"SAME"`` is not defined with ``input_dilation``).
        input_dilation: dilation of ``x`` (a transposed convolution's stride).
        kernel_dilation: dilation of the kernel (atrous convolution).
        feature_group_count: groups of input and output channels.
        precision: passed to ``jax.lax.conv_general_dilated``.

    Returns:
        ``(*batch, *spatial_out, out)``, in the promoted dtype of ``x``, ``kernel`` and ``bias``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.backends import jax as gj
        >>> x = jnp.ones((2, 5, 5, 3))  # 2 examples, 5 x 5 pixels, 3 channels
        >>> gj.conv(x, jnp.ones((3, 3, 3, 4)), jnp.arange(4.0), padding="VALID").shape
        (2, 3, 3, 4)
        >>> gj.conv(jnp.ones((7, 2)), jnp.ones((3, 1, 4)), strides=2, feature_group_count=2)[:, 0]
        Array([2., 3., 3., 2.], dtype=float32)
    """
    shape, k_shape = tuple(jnp.shape(x)), tuple(jnp.shape(kernel))
    spatial = len(k_shape) - 2
    if spatial < 1:
        raise ValueError(f"kernel must have shape (*window, in / groups, out); got shape {k_shape}")
    groups = feature_group_count
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or k_shape[-1] % groups:
        raise ValueError(
            f"feature_group_count must be a positive int dividing the kernel's {k_shape[-1]} output "
            f"channels; got {groups!r}"
        )
    if len(shape) < spatial + 1 or shape[-1] != k_shape[-2] * groups:
        raise ValueError(
            f"x must have shape (*batch, *spatial, in) with {spatial} spatial dimensions and in = "
            f"kernel.shape[-2] * feature_group_count = {k_shape[-2] * groups}; got x {shape} and "
            f"kernel {k_shape}"
        )
    if bias is not None and tuple(jnp.shape(bias)) != (k_shape[-1],):
        raise ValueError(
            f"bias must have shape (out,) = ({k_shape[-1]},) or be None; got shape {tuple(jnp.shape(bias))}"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x has dtype {jnp.result_type(x)}; conv needs floating inputs")
    spec = _ConvSpec(
        _per_spatial_dim(strides, spatial, "strides"),
        _padding(padding, spatial),
        _per_spatial_dim(input_dilation, spatial, "input_dilation"),
        _per_spatial_dim(kernel_dilation, spatial, "kernel_dilation"),
        groups,
        precision,
    )

    def compute(x: Any, kernel: Any, bias: Any) -> Any:  # with jnp's dtype promotion
        dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
        x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
        return _convolve(x, kernel, None if bias is None else jnp.asarray(bias, dtype), spec)

    trace = _current()
    if trace is None:
        return compute(x, kernel, bias)
    return trace.tap(x, kernel, bias, compute, conv=spec)


def _conv_gradient(spec: _ConvSpec, shape: tuple[int, ...], per_environment: bool) -> Callable[..., Any]:
    """Per-environment kernel gradients: ``(e, n, *S, C), (e, n, *S', O) -> (e, *shape)``.

    JAX's own transpose of the convolution with respect to the kernel (what
    ``jax.grad`` runs for the layer), one per environment; with
    ``per_environment=False`` the same ``vmap``-ped: one convolution with the
    environments as feature groups.

    One per environment under ``jit`` on CPU (the namespace's
    ``gradand_unroll_environments``): XLA runs the grouped convolution several
    times slower. Measured, 1 thread, MNIST convnet's kernels, ms per chunk
    (per environment / ``vmap`` / ``lax.map`` / one plain weight gradient of the whole batch):
    4 x 16 examples, 3x3x32x64 on 26x26x32: 15.8 / 60.2 / 1466 / 35.1; 3x3x1x32 on 28x28x1:
    0.60 / 1.65 / 8.2 / 0.80; 128 x 1: 26.5 / 149 / 1813 / 71.5 and 1.30 / 8.96 / 31.0 / 2.19.
    """

    def one(x: Any, d: Any) -> Any:
        kernel = jax.ShapeDtypeStruct(shape, d.dtype)
        return jax.linear_transpose(lambda k: _convolve(x, k, None, spec), kernel)(d)[0]

    def gradient(x: Any, d: Any) -> Any:
        if per_environment or x.shape[0] == 1:
            return jnp.stack([one(x[e], d[e]) for e in range(x.shape[0])])
        return jax.vmap(one)(x, d)

    return gradient


# --- flax.linen.Dense and flax.linen.Conv, intercepted --------------------------------------


def _flax_interceptor() -> Any:
    """``flax.linen.intercept_methods`` with the Dense and Conv taps, when flax is already imported."""
    if "flax.linen" not in sys.modules:
        return contextlib.nullcontext()
    import flax.linen as nn

    return nn.intercept_methods(_intercept)


def _intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    import flax.linen as nn

    if _current() is None or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv):
        return _intercept_conv(next_fun, args, kwargs, context)
    return _intercept_dense(next_fun, args, kwargs, context)


def _plain_flax_call(m: Any, cls: type, args: tuple, kwargs: dict, *custom: str) -> bool:
    """Whether ``m`` is ``cls`` with flax's own ``__call__``, none of the ``custom`` attributes set,
    its kernel created, and called on one positional input: a call the factored path can tap."""
    return (
        isinstance(m, cls)
        and type(m).__call__ is cls.__call__
        and all(getattr(m, name, None) is None for name in custom)
        and not m.is_initializing()
        and len(args) == 1
        and not kwargs
        and m.has_variable("params", "kernel")
    )


def _intercept_dense(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    import flax.linen as nn
    from flax.linen.dtypes import promote_dtype

    m = context.module
    trace = _current()
    if trace is None or not _plain_flax_call(m, nn.Dense, args, kwargs, "dot_general", "dot_general_cls"):
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


def _intercept_conv(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """``flax.linen.Conv.__call__`` through :func:`_convolve`: the same convolution, tapped.

    Not a subclass that overrides ``__call__``, nor one with a ``mask`` or a custom
    ``conv_general_dilated``. ``"CIRCULAR"``, ``"REFLECT"`` and ``"CAUSAL"`` padding pad the
    inputs first, as flax does: the padded inputs are the convolution's ``X``.
    """
    import flax.linen as nn
    from flax.linen.dtypes import promote_dtype
    from flax.linen.linear import canonicalize_padding

    m = context.module
    trace = _current()
    kernel_size = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    spatial = len(kernel_size)
    custom = ("mask", "conv_general_dilated", "conv_general_dilated_cls")
    if trace is None or not _plain_flax_call(m, nn.Conv, args, kwargs, *custom):
        return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0])
    kernel = m.get_variable("params", "kernel")
    if x.ndim < spatial + 1 or not jnp.issubdtype(x.dtype, jnp.floating) or kernel.ndim != spatial + 2:
        return next_fun(*args, **kwargs)
    bias = m.get_variable("params", "bias") if m.use_bias else None

    def per_dim(v: Any) -> tuple[int, ...]:
        return (1 if v is None else v,) * spatial if v is None or isinstance(v, int) else tuple(v)

    kernel_dilation = per_dim(m.kernel_dilation)
    padding = canonicalize_padding(m.padding, spatial)
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):  # padded first, as flax does
        if padding == "CAUSAL":
            if spatial != 1:
                return next_fun(*args, **kwargs)  # flax raises its own error
            pads = [(kernel_dilation[0] * (kernel_size[0] - 1), 0)]
        else:
            pads = [((k - 1) * d // 2, ((k - 1) * d + 1) // 2) for k, d in zip(kernel_size, kernel_dilation)]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}[padding]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - spatial - 1) + pads + [(0, 0)], mode=mode)
        padding = "VALID"
    elif not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    spec = _ConvSpec(
        per_dim(m.strides), padding, per_dim(m.input_dilation), kernel_dilation,
        m.feature_group_count, m.precision,
    )  # fmt: skip

    def compute(x: Any, kernel: Any, bias: Any) -> Any:  # flax's Conv.__call__, minus parameter creation
        x, kernel, bias = getattr(m, "promote_dtype", promote_dtype)(x, kernel, bias, dtype=m.dtype)
        return _convolve(x, kernel, bias, spec)

    return trace.tap(x, kernel, bias, compute, conv=spec)


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
    """Source: the factored fast path, for models built from dense and conv layers; ``(losses, stats)``.

    Same arguments and result (up to float rounding) as
    ``gj.vectorized_statistics(loss_fn, combiner, params, *batch)``, at about
    the cost of an ordinary step. ``loss_fn(params, *batch, **kwargs)`` is the
    loss of **one** environment; the batch is stacked over environments on
    axis 0. The environments are ``vmap``-ped as there, so layers that mix the
    examples *of one environment* see that environment's batch: a
    ``flax.linen.BatchNorm`` in train mode normalises each environment with
    its own batch statistics (with or without convolutions before it), and
    its updated ``batch_stats`` (``mutable=["batch_stats"]``, returned in
    ``aux``) come back stacked per environment, ``(E, features)``, as from
    :func:`vectorized_statistics`: reduce them yourself (e.g. the mean over
    environments, or environment 0) before storing them. Its ``scale`` and
    ``bias`` fall back (their per-environment gradients come from the same
    batched backward pass).

    How: the loss is traced once to find the calls of supported layers
    (:data:`FACTORED_LAYERS`: every ``flax.linen.Dense`` and
    ``flax.linen.Conv``, intercepted with ``flax.linen.intercept_methods``,
    no model change; and :func:`dense` and :func:`conv` in hand-written
    models) whose kernel and bias are leaves of ``params`` used nowhere else.
    One batched backward pass then gives, per environment, the gradient
    ``Δ_e`` at each such layer's output (with respect to a zero perturbation
    added there, as flax's ``Module.perturb`` does), and the layer's inputs
    ``X_e``; both go to the core's :func:`gradand.layer_statistics` (one
    :class:`gradand.LayerFactors` per call of the layer), which forms
    ``X_eᵀ Δ_e`` chunk by chunk (bias: ``Σ Δ_e``), or, with one example per
    environment, the statistics from outer products without any
    per-example gradient array. A convolution's kernel gradients come from
    JAX's own transpose of the convolution with respect to its kernel, given
    each environment's raw inputs and output gradients (no im2col patches):
    one per environment under ``jit`` on CPU, one ``vmap``-ped (environments
    as feature groups) elsewhere.

    With ``env_ids`` (one environment id per example, ``num_envs`` static)
    ``loss_fn`` is one example's loss, as in :func:`vectorized_statistics`:
    each example's ``X`` and ``Δ`` (divided by its environment's size) are
    gathered into its environment's rows, padded with zero rows to the
    largest environment (to the batch size under ``jit``, where the sizes are
    not known: the per-environment products then cost E times those of
    environments stacked on axis 0).

    Every other leaf of ``params`` (LayerNorm and BatchNorm scales,
    embeddings, ``nn.DenseGeneral``, a kernel also used outside its layer,
    e.g. in a weight-decay term or tied transposed) falls back: with
    ``fallback="vectorized"`` its per-environment gradients come from ``vmap``
    of ``grad`` (only for those leaves, in the same pass); with
    ``fallback="error"`` a ``ValueError`` names them. A kernel shared by
    several supported layers is factored. Layers inside flax lifted
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
                "the factored path: the model called its layers a different number of times "
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
    """Per-example ``X`` and ``Δ`` ``(N, ...)`` -> ``(E, m, ...)``: each environment's ``m`` examples.

    ``Δ`` is divided by the example's environment size (an environment's loss is the mean of its
    examples'); examples past an environment's size are zeros, which add nothing to ``Xᵀ Δ`` (nor
    to a convolution's kernel gradient). An
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
        if w is not None:
            a = a * w.astype(a.dtype).reshape(n, *(1,) * (a.ndim - 1))
        a = jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)])
        return a[pad]  # (E, m, ...)

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
    # a convolution's kernel: its raw inputs and output gradients per environment, and the
    # per-environment transposes (one per environment under jit on CPU, else vmapped)
    per_environment = bool(XP.gradand_unroll_environments(envs))
    factors = []
    for j, r in enumerate(records):
        if i == r.bias or (i == r.kernel and r.conv is None):
            x = None if i == r.bias else _rows(x_of[j], envs).astype(acc)
            factors.append(gradand.LayerFactors(x, _rows(d_of[j], envs).astype(acc)))
        elif i == r.kernel:
            spatial = len(r.conv.strides)
            x, d = x_of[j], d_of[j]
            x = x.reshape(envs, -1, *x.shape[x.ndim - spatial - 1 :]).astype(acc)
            d = d.reshape(envs, -1, *d.shape[d.ndim - spatial - 1 :]).astype(acc)
            gradient = _conv_gradient(r.conv, tuple(leaf.shape), per_environment)
            factors.append(gradand.LayerFactors(x, d, gradient))
    convolution = any(f.gradient is not None for f in factors)
    if policy == "checkify":
        for f in factors:
            if f.inputs is not None:
                _check_finite(f.inputs, f"{name} (layer inputs)")
            _check_finite(f.deltas, f"{name} (output gradients)")
        policy = "propagate"
    if chunk_size is None:
        one_product = any(f.inputs is None for f in factors) or (
            len(factors) == 1 and factors[0].deltas.shape[1] == 1 and not convolution
        )  # a bias, or the outer-product path
        chunk_size = envs if one_product else _chunk_size(leaf, envs)

    def engine(parts: list[gradand.LayerFactors], n: int, how: str) -> Statistics:
        return gradand.layer_statistics(
            parts, combiner, shape=leaf.shape, layout="in_out", chunk_size=min(chunk_size, n),
            scale=loss_scale, nan_policy=how, name=name, xp=XP,
        )  # fmt: skip

    n_chunks = envs // chunk_size
    if n_chunks < _SCAN_CHUNKS or not per_environment or convolution:
        # a convolution's chunks unrolled too: XLA on CPU runs a kernel-gradient convolution
        # inside a loop (scan) 50-80x slower than outside (3x3x32x64 kernel, 16 examples of
        # 26x26x32: 1017 ms in a 4-step scan, 12 ms unrolled; 1 thread)
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
            gradand.LayerFactors(None if f.inputs is None else f.inputs[head:], f.deltas[head:], f.gradient)
            for f in factors
        ]
        s = s + engine(rest, envs - head, traced)
    # the number of environments is static: a Python int, so the vote threshold stays exact
    return s.replace(count=envs, dtype=leaf.dtype)


def _chunk_of(factors: list[gradand.LayerFactors], size: int, i: Any) -> list[gradand.LayerFactors]:
    """Chunk ``i`` (possibly traced) of ``size`` environments of every factor."""

    def cut(a: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(a, i * size, size, axis=0)

    return [
        gradand.LayerFactors(None if f.inputs is None else cut(f.inputs), cut(f.deltas), f.gradient)
        for f in factors
    ]


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
