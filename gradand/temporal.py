"""The temporal AND-mask (paper Algorithm 1): Adam that masks by sign agreement over *steps*.

It needs no per-environment gradients, so it costs what ordinary training
costs: besides Adam's moving averages of ``g`` and ``g²`` it keeps an
exponential moving average ``s`` of ``sign(g)`` over steps (rate ``beta3``)
and masks the components whose ``|ŝ| < threshold``, where ``ŝ`` is ``s``
bias-corrected like Adam's moments (so the first step is not masked just
because the average starts at 0).

This module holds the math once; the PyTorch optimizer, the optax
transformation and the Keras optimizer in :mod:`gradand.backends` call
:func:`temporal_and_mask_step` per parameter.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np

from gradand._namespace import array_namespace, check_float

__all__ = ["TemporalStep", "check_temporal_hparams", "temporal_and_mask_step"]

WeightDecayOrder = Literal["before", "after"]


class TemporalStep(NamedTuple):
    """Result of one :func:`temporal_and_mask_step` for one parameter tensor.

    Attributes:
        direction: what to subtract from the parameter, times the learning
            rate: ``mask ⊙ m̂ / (√v̂ + eps)`` (plus ``weight_decay · param`` with
            ``weight_decay_order="after"``).
        exp_avg: new first moment ``m``.
        exp_avg_sq: new second moment ``v``.
        sign_avg: new moving average of ``sign(g)``, ``s``.
        mask: the float mask in {0, 1} that was applied.
    """

    direction: Any
    exp_avg: Any
    exp_avg_sq: Any
    sign_avg: Any
    mask: Any


def _real(name: str, value: Any) -> float:
    """``value`` as a finite Python float: a Python or NumPy real scalar, never a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (a Python or NumPy scalar); got {value!r} ({type(value).__name__})"
        )
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return result


def check_temporal_hparams(
    *,
    lr: float,
    betas: tuple[float, float],
    beta3: float,
    threshold: float,
    eps: float,
    weight_decay: float,
    weight_decay_order: str,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate the temporal AND-mask's hyperparameters, naming the bad one; return them as floats.

    Every optimizer built on :func:`temporal_and_mask_step` (PyTorch, optax,
    Keras) validates with this one function. Numbers may be Python or NumPy
    scalars (``np.float32(0.5)``, ``np.int64(1)``); ``bool`` is refused, and so
    are arrays and tensors (a backend turns a concrete 0-d array into a number
    first). A wrong type raises ``TypeError``; a value out of range, or NaN or
    infinite, raises ``ValueError``. The ranges: ``lr >= 0``, ``betas`` a pair
    and ``beta1, beta2, beta3`` in ``[0, 1)``, ``threshold`` in ``[0, 1]``,
    ``eps > 0``, ``weight_decay >= 0``, ``weight_decay_order`` ``"before"`` or
    ``"after"``. ``names`` renames the arguments in the error messages as a
    framework calls them (``{"lr": "learning_rate", "betas[0]": "b1"}`` for optax).

    Returns:
        The hyperparameters as Python floats (``betas`` a tuple), keyed by
        the argument names, so a caller can pass them on to
        :func:`temporal_and_mask_step` (a NumPy scalar times a framework's
        array can turn into a NumPy array, or fail under a tracer).

    Example:
        >>> import numpy as np
        >>> from gradand.temporal import check_temporal_hparams
        >>> hp = check_temporal_hparams(lr=np.float32(1e-3), betas=[0.9, 0.999], beta3=0.9,
        ...                             threshold=np.int64(1), eps=1e-8, weight_decay=0,
        ...                             weight_decay_order="after")
        >>> hp["betas"], hp["threshold"]
        ((0.9, 0.999), 1.0)
        >>> check_temporal_hparams(**{**hp, "threshold": 5})
        Traceback (most recent call last):
        ...
        ValueError: threshold must be in [0, 1] (...); got 5
    """
    try:
        return _checked_hparams(lr, betas, beta3, threshold, eps, weight_decay, weight_decay_order)
    except (TypeError, ValueError) as error:
        if not names:
            raise
        message = str(error)
        for core, name in names.items():  # the message starts with the argument's name
            message = re.sub(rf"^{re.escape(core)}(?![\w\[])", name, message)
        raise type(error)(message) from None


def _checked_hparams(
    lr: Any, betas: Any, beta3: Any, threshold: Any, eps: Any, weight_decay: Any, weight_decay_order: Any
) -> dict[str, Any]:
    lr_value = _real("lr", lr)
    if lr_value < 0:
        raise ValueError(f"lr must be >= 0; got {lr!r}")
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r} ({type(betas).__name__})")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    rates = []
    for name, b in (("betas[0]", betas[0]), ("betas[1]", betas[1]), ("beta3", beta3)):
        value = _real(name, b)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {b!r}")
        rates.append(value)
    tau = _real("threshold", threshold)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(
            f"threshold must be in [0, 1] (the minimum |moving average of sign(g)| for a component "
            f"to move); got {threshold!r}"
        )
    eps_value = _real("eps", eps)
    if eps_value <= 0:
        raise ValueError(f"eps must be > 0; got {eps!r}")
    decay = _real("weight_decay", weight_decay)
    if decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
    if not isinstance(weight_decay_order, str) or weight_decay_order not in ("before", "after"):
        raise ValueError(
            f"weight_decay_order must be 'before' (L2 term added to the gradient, so it is "
            f"masked too) or 'after' (decay added after the mask); got {weight_decay_order!r}"
        )
    return {
        "lr": lr_value,
        "betas": (rates[0], rates[1]),
        "beta3": rates[2],
        "threshold": tau,
        "eps": eps_value,
        "weight_decay": decay,
        "weight_decay_order": weight_decay_order,
    }


def _may_be_nonzero(weight_decay: Any) -> bool:
    """``bool(weight_decay)``, or True when it is a traced array whose value is unknown.

    Lets ``weight_decay`` be a traced hyperparameter (``optax.inject_hyperparams``,
    a ``tf.Variable`` inside ``tf.function``): the decay term is then always
    added, which is exact for a zero value too.
    """
    try:
        return bool(weight_decay)
    except TypeError:  # a jax tracer (ConcretizationTypeError) or a symbolic tensor
        return True


def temporal_and_mask_step(
    grad: Any,
    param: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    sign_avg: Any,
    step: Any,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float = 0.9,
    threshold: float = 0.5,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_order: WeightDecayOrder = "after",
    xp: Any = None,
) -> TemporalStep:
    """One temporal AND-mask Adam step for one tensor (pure; no in-place update).

    With ``g`` the gradient and ``t = step`` (1 for the first step):

    - ``weight_decay_order="before"``: ``g ← g + weight_decay · param`` (masked too);
    - ``m = β1 m + (1-β1) g``, ``v = β2 v + (1-β2) g²``, ``s = β3 s + (1-β3) sign(g)``;
    - ``m̂, v̂, ŝ`` = the three divided by ``1 - β^t``;
    - ``mask = 1[|ŝ| >= threshold - eps_s / (1 - β3)]`` (``eps_s`` the machine epsilon of the
      state dtype: a slack that absorbs the rounding of the moving average, so ``threshold=1``
      keeps exactly the components whose sign never changed), ``direction = mask ⊙ m̂ / (√v̂ + eps)``;
    - ``weight_decay_order="after"``: ``direction += weight_decay · param`` (not masked;
      the reference authors' advice: much higher weight decay, applied after the mask).

    The parameter update is ``param - lr · direction``. Moments are kept in
    the dtype of ``exp_avg`` (pass float32 state for half-precision params).
    The hyperparameters are not validated here (they may be traced values
    under ``jit``); the optimizers validate them with
    :func:`check_temporal_hparams`.

    Example:
        >>> import numpy as np
        >>> from gradand.temporal import temporal_and_mask_step
        >>> z = np.zeros(2)
        >>> out = temporal_and_mask_step(np.array([0.5, -2.0]), z, z, z, z, 1, threshold=1.0)
        >>> out.mask, out.direction.round(4)
        (array([1., 1.]), array([ 1., -1.]))
    """
    xp = array_namespace(grad, xp=xp, name="grad")
    check_float(grad, xp, "grad")
    beta1, beta2 = betas
    state_dtype = exp_avg.dtype
    g = grad if grad.dtype == state_dtype else xp.astype(grad, state_dtype)
    p = param if param.dtype == state_dtype else xp.astype(param, state_dtype)
    decay = _may_be_nonzero(weight_decay)
    if decay and weight_decay_order == "before":
        g = g + weight_decay * p
    m = beta1 * exp_avg + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq + (1.0 - beta2) * (g * g)
    s = beta3 * sign_avg + (1.0 - beta3) * xp.sign(g)
    c1 = 1.0 - beta1**step
    c2 = 1.0 - beta2**step
    c3 = 1.0 - beta3**step
    s_hat = s / c3
    # The moving average of ±1 carries rounding error up to about eps / (1 - β3) (measured:
    # 0.25 eps / (1 - β3) in float32 over 20k steps); without this slack τ = 1 would flicker
    # for components whose sign never changed.
    slack = xp.finfo(s.dtype).eps / (1.0 - beta3)
    mask = xp.astype(xp.abs(s_hat) >= threshold - slack, s.dtype)
    denom = xp.sqrt(v / c2) + eps
    direction = mask * (m / c1) / denom
    if decay and weight_decay_order == "after":
        direction = direction + weight_decay * p
    return TemporalStep(direction, m, v, s, mask)
