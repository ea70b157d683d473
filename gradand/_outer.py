"""Per-example statistics of a linear layer without per-example gradients.

For a linear layer ``y = x Wᵀ`` the gradient of example ``b``'s loss with
respect to ``W`` is an outer product ``δ_b x_bᵀ`` (``δ_b = ∂loss_b/∂y_b``).
Signs and squares factor through outer products, so the sums over examples
come from one matrix product each, with no (B, out, in) array:

    mean_b g_b = (Δ / B)ᵀ X,   Σ_b sign(g_b) = sign(Δ)ᵀ sign(X),   Σ_b g_b² = (Δ²)ᵀ (X²).

``M2 = Σ_b g_b² - B · mean²`` (for ``SandMask``) is formed from the sum of
squares, which cancels when the examples' gradients nearly coincide; it is
clamped at 0. The dense and streaming paths do not have this limit.

The mean of ``log(|g| + eps)`` does not factor (the ``eps``), so ``GeometricMean`` is not
supported here; backends fall back to materialising per-example gradients.
"""

from __future__ import annotations

from typing import Any

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
from gradand._stats import Statistics, vote_signs

__all__ = ["OUTER_STATISTICS", "outer_statistics"]

#: The statistics that factor through an outer product.
OUTER_STATISTICS: frozenset[str] = frozenset({"mean", "sign_sum", "m2"})


def outer_statistics(
    inputs: Any,
    deltas: Any,
    combiner: Combiner,
    *,
    nan_policy: NanPolicy = "raise",
    xp: Any = None,
    _checked_later: bool = False,
    _in_out: bool = False,
) -> Statistics:
    """Statistics over examples of per-example linear-layer weight gradients ``δ_b x_bᵀ``.

    Every example is its own environment. Equal to
    ``gradand.statistics(deltas[:, :, None] * inputs[:, None, :], combiner)``
    without building that (B, out, in) array. (Where ``δ x`` underflows to 0 in
    the materialised product, its sign here is still ``sign(δ) sign(x)``.)

    Args:
        inputs: layer inputs ``X``, shape (B, in).
        deltas: per-example output gradients ``Δ``, shape (B, out): the
            gradient of each example's *own* loss (for a mean loss over B
            examples, multiply autograd's output gradient by B).
        combiner: a combiner whose statistics are all in :data:`OUTER_STATISTICS`
            (``Mean``, ``AndMask``, ``SandMask``).
        nan_policy: as in :func:`gradand.statistics`.
        xp: the array namespace, when it cannot be inferred.

    Returns:
        :class:`~gradand.Statistics` of shape (out, in) with ``count = B``.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> rng = np.random.default_rng(0)
        >>> x, d = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
        >>> c = gradand.AndMask(threshold=0.6)
        >>> fast = gradand.outer_statistics(x, d, c)
        >>> slow = gradand.statistics(d[:, :, None] * x[:, None, :], c)
        >>> bool(np.array_equal(fast.sign_sum, slow.sign_sum)), bool(np.allclose(fast.mean, slow.mean))
        (True, True)
    """
    check_nan_policy(nan_policy)
    xp = array_namespace(inputs, deltas, xp=xp, name="inputs and deltas")
    check_float(inputs, xp, "inputs")
    check_float(deltas, xp, "deltas")
    if len(inputs.shape) != 2 or len(deltas.shape) != 2 or inputs.shape[0] != deltas.shape[0]:
        raise ValueError(
            f"inputs must be (B, in) and deltas (B, out) with the same B; got inputs "
            f"{tuple(inputs.shape)} and deltas {tuple(deltas.shape)}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs and deltas hold 0 examples; need at least one")
    needed = set(combiner.statistics)
    if not needed <= OUTER_STATISTICS:
        raise ValueError(
            f"{combiner!r} needs {sorted(needed - OUTER_STATISTICS)}, which do not factor "
            f"through an outer product; compute per-example gradients instead"
        )
    acc = accumulation_dtype(deltas.dtype, xp)
    x = inputs if inputs.dtype == acc else xp.astype(inputs, acc)
    d = deltas if deltas.dtype == acc else xp.astype(deltas, acc)
    x, x_finite = apply_nan_policy(x, xp, nan_policy, "inputs", report=True)
    d, d_finite = apply_nan_policy(d, xp, nan_policy, "deltas", report=True)
    n = inputs.shape[0]
    # (out, in) = Δᵀ X; with _in_out the (in, out) = Xᵀ Δ of a kernel stored that way, no transpose
    a, b = (transposed(x, xp), d) if _in_out else (transposed(d, xp), x)
    values: dict[str, Any] = {}
    mean = None
    if "mean" in needed or "m2" in needed:
        mean = a @ (b / n) if _in_out else (a / n) @ b
    if "mean" in needed:
        values["mean"] = mean
    if "sign_sum" in needed:
        # a NaN casts no vote, only for its own example, as in the dense path; the float
        # product of ±1/0 votes is exact below 2**24 examples
        known = _checked_later  # a caller that raises on a non-finite mean afterwards
        hook = getattr(xp, "gradand_sign_product", None)
        if hook is not None:  # a namespace's exact integer product (PyTorch on CPU: int8 GEMM)
            values["sign_sum"] = hook(a, b)
        else:
            a_ok, b_ok = (x_finite, d_finite) if _in_out else (d_finite, x_finite)
            votes = vote_signs(a, xp, finite=a_ok or known) @ vote_signs(b, xp, finite=b_ok or known)
            values["sign_sum"] = xp.astype(votes, xp.int32)
    if "m2" in needed:
        m2 = (a * a) @ (b * b) - n * (mean * mean)
        values["m2"] = xp.where(m2 > 0, m2, xp.zeros_like(m2))
    return Statistics(count=n, dtype=deltas.dtype, **values)
