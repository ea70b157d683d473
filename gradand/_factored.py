"""The factored engine: per-environment statistics of a parameter from its layer's inputs and outputs.

For a dense layer ``y = x Wᵀ (+ b)``, environment ``e``'s weight gradient is
``G_e = Δ_eᵀ X_e`` and its bias gradient ``Σ_rows Δ_e``, where ``X_e`` are
the layer's inputs on that environment's rows and ``Δ_e`` the gradients of
that environment's loss at the layer's output; for a convolution (or a
BatchNorm scale) the backend hands over the framework's own weight-gradient
op of ``X_e`` and ``Δ_e`` (``LayerFactors.gradient``). One forward and one backward
pass of the whole batch give every ``X`` and ``Δ``; this module turns them into
the core's :class:`~gradand.Statistics` — one batched product per chunk of
environments, the outer-product path when every environment is one example,
and the NaN check on the summed statistics. Each backend only finds its
layers and hands over ``X`` and ``Δ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from gradand._combiners import Combiner
from gradand._namespace import (
    NanPolicy,
    accumulation_dtype,
    apply_nan_policy,
    array_namespace,
    check_float,
    check_nan_policy,
    transposed,
)
from gradand._outer import OUTER_STATISTICS, outer_statistics
from gradand._stats import Fold, Statistics, _dense_statistics

__all__ = ["LayerFactors", "layer_statistics"]

#: Bytes of per-environment gradients materialised at once when ``chunk_size`` is automatic:
#: cache-sized (TensorFlow, spirals MLP 64 x 64 on CPU: 12% faster than 8 MiB; the same at 16 x 256).
CHUNK_BYTES = 2 * 2**20

Layout = Literal["out_in", "in_out"]


class LayerFactors(NamedTuple):
    """One call of a layer that uses the parameter: what its gradient factors into.

    Attributes:
        inputs: ``(E, rows, in)``, each environment's layer inputs (im2col
            patches for a convolution); ``None`` when the parameter is the
            layer's bias.
        deltas: ``(E, rows, out)``, the gradient of each environment's own
            loss at the layer's output, on the same rows.
        gradient: for a layer whose weight gradient is not ``Δᵀ X`` (a
            convolution given its raw inputs), the framework's own
            weight-gradient op: ``gradient(inputs[sl], deltas[sl])`` returns
            the per-environment gradients ``(e, *shape)`` of a chunk of
            environments. ``inputs`` and ``deltas`` then only need the
            environments on axis 0 (e.g. ``(E, n, C, H, W)`` and
            ``(E, n, O, H', W')``); it must be linear in ``deltas``.
    """

    inputs: Any
    deltas: Any
    gradient: Any = None


def _check_factors(factors: Sequence[LayerFactors], name: str) -> int:
    if not factors:
        raise ValueError(f"{name}: factors is empty; pass one LayerFactors per layer call using it")
    envs = None
    for i, f in enumerate(factors):
        if not isinstance(f, LayerFactors):
            raise TypeError(f"{name}: factors[{i}] must be gradand.LayerFactors; got {type(f).__name__}")
        d, x = f.deltas, f.inputs
        if f.gradient is not None:  # the framework's op: only the environments must line up
            if not callable(f.gradient):
                raise TypeError(f"{name}: factors[{i}].gradient must be callable; got {f.gradient!r}")
            if x is None or len(d.shape) < 2 or len(x.shape) < 2 or x.shape[0] != d.shape[0]:
                raise ValueError(
                    f"{name}: factors[{i}] with a gradient op needs inputs and deltas with the "
                    f"environments on axis 0; got shapes "
                    f"{None if x is None else tuple(x.shape)} and {tuple(d.shape)}"
                )
        elif len(d.shape) != 3:
            raise ValueError(
                f"{name}: factors[{i}].deltas must be (E, rows, out); got shape {tuple(d.shape)}"
            )
        elif x is not None and (len(x.shape) != 3 or tuple(x.shape[:2]) != tuple(d.shape[:2])):
            raise ValueError(
                f"{name}: factors[{i}].inputs must be (E, rows, in) with the deltas' (E, rows) = "
                f"{tuple(d.shape[:2])}; got shape {tuple(x.shape)}"
            )
        if envs is None:
            envs = d.shape[0]
        elif d.shape[0] != envs:
            raise ValueError(
                f"{name}: every layer call must cover the same environments; factors[0] has "
                f"{envs} and factors[{i}] has {d.shape[0]}"
            )
    if envs == 0:
        raise ValueError(f"{name}: the factors hold 0 environments; need at least one")
    return int(envs)


def _gradients(
    factors: Sequence[LayerFactors], sl: slice, layout: Layout, xp: Any, seed: float | None = None
) -> Any:
    """``(e, *matrix)``: the chunk's per-environment gradients summed over the layer calls.

    ``seed``: a power of two the output gradients are multiplied by first (exact): the products
    then come scaled as a :class:`Fold` sums them, at the cost of scaling ``Δ``, not ``Δᵀ X``.
    """
    g = None
    whole = sl.start == 0 and sl.stop == factors[0].deltas.shape[0]  # no slicing op (traced graphs)
    for f in factors:
        d = f.deltas if whole else f.deltas[sl, ...]
        if seed is not None:
            d = d * seed
        if f.inputs is None:  # a bias: the sum of the output gradients over the rows
            if d.shape[1] != 1:
                gi = xp.sum(d, axis=1)
            elif d.shape[0] is not None:  # the outer path's reshape of the same Δ (graphs share it)
                gi = xp.reshape(d, (d.shape[0], -1))
            else:
                gi = d[:, 0, ...]
        else:
            x = f.inputs if whole else f.inputs[sl, ...]
            if x.dtype != d.dtype:  # e.g. bfloat16 inputs recorded under autocast, float32 deltas
                common = xp.result_type(x.dtype, d.dtype)
                x, d = xp.astype(x, common), xp.astype(d, common)
            if f.gradient is not None:  # the framework's weight-gradient op (a convolution)
                gi = f.gradient(x, d)
            elif layout == "in_out":
                gi = transposed(x, xp) @ d
            elif x.shape[-1] < d.shape[-1]:  # narrow inputs: the (in, out) product is faster on CPUs
                gi = xp.matrix_transpose(transposed(x, xp) @ d)
            else:
                gi = transposed(d, xp) @ x
        g = gi if g is None else g + gi
    return g


def layer_statistics(
    factors: Sequence[LayerFactors],
    combiner: Combiner,
    *,
    shape: Sequence[int],
    layout: Layout = "out_in",
    chunk_size: int | None = None,
    scale: float | None = None,
    nan_policy: NanPolicy = "raise",
    name: str = "parameter",
    xp: Any = None,
    _defer_check: bool = False,
) -> Statistics:
    """Statistics of one parameter's per-environment gradients, from its layers' ``X`` and ``Δ``.

    Equal (up to rounding) to ``gradand.statistics(G, combiner)`` of the
    materialised per-environment gradients ``G[e] = Σ_calls Δ_eᵀ X_e``
    (``Σ_calls Σ_rows Δ_e`` for a bias), reshaped to ``shape``, without ever
    holding more than ``chunk_size`` environments' gradients. A parameter used
    by several calls of its layer (a module called twice, a shared weight)
    passes one :class:`LayerFactors` per call.

    When every environment is one example (``rows == 1``), the weight has a
    single call and the combiner's statistics factor through an outer product,
    the statistics come from :func:`gradand.outer_statistics`: no
    per-example gradient array at all.

    Args:
        factors: the calls of the layer(s) that use the parameter.
        combiner: the combiner whose statistics to compute.
        shape: the parameter's shape (e.g. ``(out, C, kh, kw)`` for a convolution).
        layout: ``"out_in"`` when the parameter is stored ``(out, in)``
            (PyTorch's ``nn.Linear``), ``"in_out"`` for ``(in, out)`` kernels
            (flax, Keras).
        chunk_size: environments per batched product; ``None`` picks chunks of
            about 2 MiB of gradients, which stay in a CPU cache (one chunk for a bias or a small layer).
        scale: the loss scale the deltas carry (mixed precision); the
            gradients are divided by it before the statistics.
        nan_policy: as in :func:`gradand.statistics`; ``"raise"`` is checked on
            the (E times smaller) statistics, then reported by the core.
        name: the parameter's name, for error messages.
        xp: the array namespace, when it cannot be inferred (TensorFlow).

    Returns:
        The parameter's :class:`~gradand.Statistics`, with ``count = E``.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> rng = np.random.default_rng(0)
        >>> x, d = rng.standard_normal((4, 8, 3)), rng.standard_normal((4, 8, 2))  # E=4, 8 rows
        >>> c = gradand.AndMask(threshold=0.5)
        >>> fast = gradand.layer_statistics([gradand.LayerFactors(x, d)], c, shape=(2, 3))
        >>> slow = gradand.statistics(np.swapaxes(d, 1, 2) @ x, c)  # materialised (4, 2, 3)
        >>> bool(np.array_equal(fast.sign_sum, slow.sign_sum)), bool(np.allclose(fast.mean, slow.mean))
        (True, True)
    """
    check_nan_policy(nan_policy)
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out'; got {layout!r}")
    factors = list(factors)
    envs = _check_factors(factors, name)
    arrays = [a for f in factors for a in (f.inputs, f.deltas) if a is not None]
    xp = array_namespace(*arrays, xp=xp, name=f"{name}: the factors")
    for i, f in enumerate(factors):
        check_float(f.deltas, xp, f"{name}: factors[{i}].deltas")
        if f.inputs is not None:
            check_float(f.inputs, xp, f"{name}: factors[{i}].inputs")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int; got {chunk_size!r}")
    shape = tuple(int(n) for n in shape)
    try:
        s = _statistics(factors, combiner, shape, layout, chunk_size, scale, nan_policy, envs, xp)
        if nan_policy == "raise" and not _defer_check and s.mean is not None:
            # the checked mean is kept: in a traced graph (tf.function) the check is on the data path
            s = s.replace(mean=apply_nan_policy(s.mean, xp, "raise", "a per-environment gradient"))
    except ValueError as err:
        raise ValueError(f"{name} (shape {shape}): {err}") from None
    return s


def _statistics(
    factors: list[LayerFactors],
    combiner: Combiner,
    shape: tuple[int, ...],
    layout: Layout,
    chunk_size: int | None,
    scale: float | None,
    nan_policy: str,
    envs: int,
    xp: Any,
) -> Statistics:
    # "raise": compute without the full-size check, then check the E times smaller means once
    policy = "propagate" if nan_policy == "raise" else nan_policy
    later = nan_policy == "raise"  # then a NaN's vote does not matter: the check below raises
    first = factors[0]
    outer = (
        len(factors) == 1
        and first.inputs is not None
        and first.gradient is None
        and first.deltas.shape[1] == 1
        and set(combiner.statistics) <= OUTER_STATISTICS
    )
    if chunk_size is None:
        per_env = math.prod(shape) * 4
        chunk_size = envs if outer else max(1, CHUNK_BYTES // max(per_env, 1))
    # a namespace may ask for sums over environments unrolled (XLA on CPU reduces over a leading
    # axis several times slower than it fuses a sum of per-environment terms)
    hook = getattr(xp, "gradand_unroll_environments", None)
    unroll = not outer and hook is not None and bool(hook(envs))
    out = Statistics()
    fold = seed = None
    if not outer and (unroll or chunk_size < envs):  # chunks folded as they come: sums, no merges
        fold = Fold(combiner, envs, nan_policy=policy, xp=xp, _checked_later=later)
        # the fold's power of two on Δ when Δ is smaller than the products (few rows), else on them
        # (a size unknown until run time, TensorFlow's padded environments in a graph: on the products)
        sizes = [tuple(f.deltas.shape[1:]) for f in factors]
        known = all(n is not None for size in sizes for n in size)
        rows = sum(math.prod(size) for size in sizes) if known else None
        seed = fold.seed(first.deltas.dtype, xp) if rows is not None and rows < math.prod(shape) else None
    for start in range(0, envs, chunk_size):
        sl = slice(start, min(start + chunk_size, envs))
        if outer:
            if sl.stop - sl.start == envs:  # one row per environment: a reshape, which graphs fold
                x, d = xp.reshape(first.inputs, (envs, -1)), xp.reshape(first.deltas, (envs, -1))
            else:
                x, d = first.inputs[sl, 0, :], first.deltas[sl, 0, :]
            dtype = d.dtype
            if x.dtype != d.dtype:
                x = xp.astype(x, xp.result_type(x.dtype, d.dtype))
            if scale is not None:  # unscaled in the accumulation dtype: no float16 underflow
                d = xp.astype(d, accumulation_dtype(d.dtype, xp)) / scale
            in_out = layout == "in_out"
            part = outer_statistics(
                x, d, combiner, nan_policy=policy, xp=xp, _checked_later=later, _in_out=in_out
            )
            if shape != tuple(part.shape):
                part = _reshaped(part, shape, xp)
            out = part if out.is_empty else out + part
        else:
            g = _gradients(factors, sl, layout, xp, seed)
            dtype = g.dtype  # the update comes back in the gradients' dtype
            if scale is not None:
                g = xp.astype(g, accumulation_dtype(g.dtype, xp)) / scale
            if tuple(g.shape[1:]) != shape:
                g = xp.reshape(g, (g.shape[0], *shape))
            if fold is None:  # one chunk: the dense statistics
                out = _dense_statistics(g, combiner, 0, g.shape[0], policy, xp, later)
            elif unroll or g.shape[0] == 1:  # one environment at a time: sums the compiler fuses
                for e in range(g.shape[0]):
                    fold.add(g[e, ...], seeded=seed is not None)
            else:
                fold.add(g, axis=0, seeded=seed is not None)
    if fold is not None:
        out = fold.result()
    if out.dtype != dtype:
        out = out.replace(dtype=dtype)
    return out


def _reshaped(s: Statistics, shape: tuple[int, ...], xp: Any) -> Statistics:
    """Outer statistics (already in the kernel's layout) reshaped to the parameter's shape."""
    return s.replace(**{k: xp.reshape(v, shape) for k, v in s.arrays().items()})
