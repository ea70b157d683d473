"""The one-line entry point: ``value_and_grad`` = a source, the all-reduce, the sink, one Result.

``jax.value_and_grad`` for a loss of *one* environment, with the environments
combined by a combiner instead of averaged. The composition is visible in
:func:`value_and_grad`'s inner function:

    losses, stats = vectorized_statistics(...) | factored_statistics(...)   # source
    stats = all_reduce_statistics(stats, axis_name)                          # with axis_name
    grads, infos = finalize_gradients(stats, combiner)                       # sink
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

import gradand
from gradand import Combiner
from gradand.backends.jax._all_reduce import AxisName, PyTree, all_reduce_statistics
from gradand.backends.jax._batch import _normalize_argnums, check_env_ids, environment_sizes
from gradand.backends.jax._factored import factored_statistics
from gradand.backends.jax._sink import finalize_gradients, make_result
from gradand.backends.jax._sources import check_chunk_size, check_loss_scale, vectorized_statistics
from gradand.backends.jax._tree import check_combiner, check_nan_policy

__all__ = ["GradInfo", "factored_value_and_grad", "value_and_grad"]

METHODS = ("vectorized", "streaming", "factored")
_UNSET: Any = object()


def _fallback(fallback: str, stacklevel: int = 3) -> str:
    if fallback == "vmap":
        warnings.warn(
            "fallback='vmap' is deprecated; use fallback='vectorized'",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return "vectorized"
    if fallback not in ("vectorized", "error"):
        raise ValueError(f"fallback must be 'vectorized' or 'error'; got {fallback!r}")
    return fallback


def value_and_grad(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    *,
    method: str = "vectorized",
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    in_axes: Any = None,
    chunk_size: int | None = None,
    fallback: str = "vectorized",
    nan_policy: str = "raise",
    loss_scale: float | None = None,
    axis_name: AxisName | None = None,
    num_envs: int | None = None,
    chunk: Any = _UNSET,
) -> Callable[..., tuple[tuple[jax.Array, gradand.Result], PyTree]]:
    """Like ``jax.value_and_grad``, but the gradients of the environments are combined, not averaged.

    ``loss_fn(params, batch, ...)`` is the loss of **one** environment (or of
    one example, for per-example masking). The returned function takes the
    same arguments with the batch stacked over environments on axis 0 and
    returns ``((loss, result), grads)``: the mean of the per-environment
    losses, a :class:`gradand.Result` (``losses``, ``infos`` — a pytree of
    :class:`gradand.MaskInfo` like the gradients —, ``summary``, ``aux``), and
    the combined gradient with the structure of ``params`` (any pytree). It is
    pure and jit-able; give ``grads`` to an optax optimizer as usual. It is
    the composition of a source (:func:`vectorized_statistics`,
    :func:`streaming_statistics` or :func:`factored_statistics`),
    :func:`all_reduce_statistics` (with ``axis_name``) and the sink
    :func:`finalize_gradients`.

    With ``gradand.Mean()`` the gradient is ``jax.grad`` of the mean loss;
    with ``gradand.AndMask(threshold)`` only the components on which a
    fraction ``threshold`` of the environments agree in sign survive.

    Environments of different sizes: give ``num_envs=E`` here and call the
    returned function with ``env_ids=`` (an int array, one environment id per
    example) and the batch *not* stacked by environment. ``loss_fn`` is then
    evaluated per example, and each environment's loss and gradient are the
    mean over its examples (segment sums, jit-able). Eagerly, an environment
    with no example raises; under ``jit`` it is left out of the statistics'
    count and its entry of ``result.losses`` is NaN.

    Args:
        loss_fn: ``loss_fn(*args, **kwargs) -> loss`` for one environment; a
            scalar, or ``(loss, aux)`` with ``has_aux=True``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``,
            ``gradand.GeometricMean(...)``, ``gradand.SandMask(...)``.
        method: ``"vectorized"`` (``vmap`` of ``grad``), ``"streaming"`` (one
            environment per ``lax.scan`` step: ``chunk_size=1``) or
            ``"factored"`` (the fast path for dense and convolutional layers:
            :func:`factored_statistics`; ``argnums=0``, no ``in_axes`` or
            ``axis_name``).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``result.aux`` then
            holds the per-environment ``aux`` stacked on axis 0.
        argnums: which positional argument(s) to differentiate (as in JAX).
        in_axes: where each positional argument holds its environment axis,
            as in ``jax.vmap``; ``None``: axis 0 of every argument except the
            differentiated ones. Keyword arguments are passed unmapped.
        chunk_size: environments per pass (``lax.scan`` steps carrying only the
            statistics: memory O(chunk_size · P)); the factored path: per
            batched product. ``None``: all at once.
        fallback: ``"vectorized"`` or ``"error"``: what the factored path does
            with leaves it cannot factor.
        nan_policy: ``"raise"`` (only when called eagerly: under ``jit`` the
            values are unknown and the check is skipped), ``"zero"`` (drop
            non-finite components), ``"propagate"``, or ``"checkify"`` (wrap the
            jitted step with ``jax.experimental.checkify.checkify``).
        loss_scale: a number the loss is multiplied by inside the gradient
            (float16 training); the gradients are divided by it, in float32,
            before the statistics. The reported losses are unscaled.
        axis_name: inside ``shard_map``/``pmap``, the mesh axis (or tuple of
            axes) over which the environments are split: the statistics are
            merged with :func:`all_reduce_statistics`, so every device gets the
            update of all environments.
        num_envs: the number of environments, with ``env_ids`` (static).
        chunk: deprecated name of ``chunk_size``.

    Returns:
        A function with ``loss_fn``'s arguments (and ``env_ids=``) returning
        ``((loss, result), grads)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> def loss(w, batch):  # one environment's loss
        ...     x, y = batch
        ...     return jnp.mean((x @ w - y) ** 2)
        >>> x = jnp.array([[[1.0, 1.0]], [[1.0, -1.0]]])  # 2 environments x 1 example x 2 features
        >>> y = jnp.array([[1.0], [1.0]])
        >>> step = jax.jit(gj.value_and_grad(loss, gradand.AndMask(rescale=False)))
        >>> (mean_loss, result), grads = step(jnp.zeros(2), (x, y))
        >>> mean_loss, grads, result.losses
        (Array(1., dtype=float32), Array([-2.,  0.], dtype=float32), Array([1., 1.], dtype=float32))
        >>> float(result.summary.survivor_fraction)
        0.5
    """
    if chunk is not _UNSET:
        warnings.warn("chunk= is deprecated; use chunk_size=", DeprecationWarning, stacklevel=2)
        if chunk_size is not None:
            raise TypeError("pass chunk_size= only (chunk= is its deprecated name)")
        chunk_size = chunk
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    check_combiner(combiner)
    check_nan_policy(nan_policy)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    fallback = _fallback(fallback)
    argnums_t = _normalize_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    check_chunk_size(chunk_size)
    check_loss_scale(loss_scale)
    if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1):
        raise ValueError(f"num_envs must be None or a positive int; got {num_envs!r}")
    if method == "factored" and (argnums_t != (0,) or in_axes is not None or axis_name is not None):
        raise ValueError("method='factored' takes argnums=0 and no in_axes or axis_name; use 'vectorized'")
    if method == "streaming":
        if chunk_size not in (None, 1):
            raise ValueError(f"method='streaming' is chunk_size=1; got chunk_size={chunk_size!r}")
        chunk_size = 1

    @functools.wraps(loss_fn)
    def combined_value_and_grad(
        *args: Any, env_ids: Any = None, **kwargs: Any
    ) -> tuple[tuple[jax.Array, gradand.Result], PyTree]:
        if env_ids is None and num_envs is not None:
            raise ValueError("num_envs was given to value_and_grad: call the function with env_ids=")
        if method == "factored":
            out, stats = factored_statistics(
                loss_fn, combiner, *args, has_aux=has_aux, fallback=fallback, chunk_size=chunk_size,
                nan_policy=nan_policy, loss_scale=loss_scale, env_ids=env_ids, num_envs=num_envs,
                kwargs=kwargs,
            )  # fmt: skip
        else:
            out, stats = vectorized_statistics(
                loss_fn, combiner, *args, argnums=argnums, in_axes=in_axes, has_aux=has_aux,
                chunk_size=chunk_size, nan_policy=nan_policy, env_ids=env_ids, num_envs=num_envs,
                loss_scale=loss_scale, axis_name=axis_name, kwargs=kwargs,
            )  # fmt: skip
        if axis_name is not None:
            stats = all_reduce_statistics(stats, axis_name)
        grads, infos = finalize_gradients(stats, combiner)
        losses, aux = out if has_aux else (out, None)
        present = None
        if env_ids is not None:
            ids = check_env_ids(env_ids, num_envs, len(env_ids))
            present = environment_sizes(ids, num_envs) > 0
        result = make_result(losses, grads, infos, aux, present=present, axis_name=axis_name)
        return (result.loss, result), grads

    return combined_value_and_grad


class GradInfo(NamedTuple):
    """Deprecated (0.x): what ``value_and_grad`` reported before :class:`gradand.Result`.

    Only :func:`factored_value_and_grad` (deprecated, it warns) still returns
    it; use ``result.infos`` (a pytree of :class:`gradand.MaskInfo`) instead. Fields:
    ``losses`` ``(E,)``, ``survivor_fraction`` and ``agreement`` (pytrees of
    0-d float32 like the gradients), ``aux``.

    Example:
        >>> from gradand.backends.jax import GradInfo
        >>> GradInfo(losses=None, survivor_fraction={}, agreement={}, aux=None).aux is None
        True
    """

    losses: jax.Array
    survivor_fraction: PyTree
    agreement: PyTree
    aux: Any


def grad_info(result: gradand.Result) -> GradInfo:
    """The old :class:`GradInfo` of a :class:`gradand.Result`."""
    is_info = lambda x: isinstance(x, gradand.MaskInfo)  # noqa: E731
    fractions = jax.tree.map(lambda i: i.survivor_fraction, result.infos, is_leaf=is_info)
    agreements = jax.tree.map(lambda i: i.agreement, result.infos, is_leaf=is_info)
    return GradInfo(result.losses, fractions, agreements, result.aux)


def factored_value_and_grad(
    loss_fn: Callable[..., Any],
    combiner: Combiner,
    *,
    has_aux: bool = False,
    fallback: str = "vmap",
    nan_policy: str = "raise",
) -> Callable[..., tuple[tuple[jax.Array, GradInfo], PyTree]]:
    """Deprecated: ``value_and_grad(loss_fn, combiner, method="factored")``, returning the old ``GradInfo``.

    Example:
        >>> import warnings, jax.numpy as jnp
        >>> import gradand
        >>> from gradand.backends import jax as gj
        >>> def loss(p, x, y):
        ...     return jnp.mean((gj.dense(x, p["w"])[..., 0] - y) ** 2)
        >>> x = jnp.array([[[1.0, 2.0]], [[1.0, -1.0]]])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     (loss_value, info), grads = gj.factored_value_and_grad(loss, gradand.AndMask())(
        ...         {"w": jnp.zeros((2, 1))}, x, jnp.ones((2, 1)))
        >>> info.losses
        Array([1., 1.], dtype=float32)
    """
    warnings.warn(
        "factored_value_and_grad is deprecated; use value_and_grad(loss_fn, combiner, method='factored'), "
        "which returns ((loss, gradand.Result), grads)",
        DeprecationWarning,
        stacklevel=2,
    )
    fallback = "vectorized" if fallback == "vmap" else fallback  # the old default: no second warning
    fn = value_and_grad(
        loss_fn, combiner, method="factored", has_aux=has_aux, fallback=fallback, nan_policy=nan_policy
    )

    @functools.wraps(loss_fn)
    def factored(*args: Any, **kwargs: Any) -> tuple[tuple[jax.Array, GradInfo], PyTree]:
        (loss, result), grads = fn(*args, **kwargs)
        return (loss, grad_info(result)), grads

    return factored
