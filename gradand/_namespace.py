"""Finding the array namespace of the user's arrays, and validating them.

The core is written against the Python array API standard. ``array_namespace``
asks array-api-compat for the namespace of an array (numpy, torch, jax.numpy,
cupy, array-api-strict, ...). Frameworks that array-api-compat does not cover
(TensorFlow) register a namespace of their own with :func:`register_namespace`;
that is how the TensorFlow backend runs the same core inside ``tf.function``.
Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import array_api_compat

__all__ = ["array_namespace", "register_namespace"]

NanPolicy = Literal["raise", "propagate", "zero"]
NAN_POLICIES = ("raise", "propagate", "zero")

# (predicate, namespace) pairs registered by backends, checked before array-api-compat.
_REGISTERED: list[tuple[Callable[[Any], bool], Any]] = []


def register_namespace(predicate: Callable[[Any], bool], xp: Any) -> Callable[[], None]:
    """Teach the core a namespace for arrays that array-api-compat does not know.

    ``predicate(x)`` says whether ``x`` belongs to ``xp``. Backends call this on
    import (the TensorFlow backend registers its namespace of ``tf`` ops); users
    rarely need it. Returns a function that removes the registration.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> class Wrapped:  # a toy array type
        ...     pass
        >>> undo = gradand.register_namespace(lambda x: isinstance(x, Wrapped), np)
        >>> gradand.array_namespace(Wrapped()) is np
        True
        >>> undo()
    """
    entry = (predicate, xp)
    _REGISTERED.insert(0, entry)

    def unregister() -> None:
        if entry in _REGISTERED:
            _REGISTERED.remove(entry)

    return unregister


def array_namespace(*arrays: Any, xp: Any = None, name: str = "grads") -> Any:
    """The array namespace shared by ``arrays`` (or ``xp`` when given).

    Raises ``TypeError`` naming the argument when something is not an array.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> gradand.array_namespace(np.zeros(3)).__name__
        'array_api_compat.numpy'
    """
    if xp is not None:
        return xp
    arrays = tuple(a for a in arrays if a is not None)
    for predicate, registered in _REGISTERED:
        if arrays and all(predicate(a) for a in arrays):
            return registered
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError:
        fallback = arrays[0] if arrays else None
        bad = next((a for a in arrays if not array_api_compat.is_array_api_obj(a)), None)
        if bad is None and len(arrays) > 1:  # every one is an array, of different libraries
            kinds = sorted({f"{type(a).__module__.split('.')[0]}.{type(a).__name__}" for a in arrays})
            raise TypeError(
                f"{name} mix arrays of different libraries ({', '.join(kinds)}); pass arrays of one "
                f"library (convert with np.asarray(...) or torch.as_tensor(...))"
            ) from None
        bad = fallback if bad is None else bad
        raise TypeError(
            f"{name} must be an array (numpy, torch, jax, cupy, array-api-strict, or a "
            f"tf.Tensor with gradand.backends.tensorflow imported); got {type(bad).__name__}"
        ) from None


def check_float(x: Any, xp: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype}. Gradients are never integer or complex: cast with "
            f"x.astype(float) / x.float() if this is intended."
        )


def transposed(a: Any, xp: Any) -> Any:
    """``a`` with its last two axes swapped, for a matrix product.

    A namespace may supply ``gradand_matrix_transpose`` (JAX on CPU: XLA multiplies a
    transposed operand nearly twice as slowly as one laid out as transposed, so its hook
    makes the transpose a real one).
    """
    hook = getattr(xp, "gradand_matrix_transpose", None)
    return hook(a) if hook is not None else xp.matrix_transpose(a)


class HookedNamespace:
    """An array namespace plus a backend's hooks for the core (``gradand_*`` attributes).

    A backend subclasses it with its hooks as attributes and passes the array-api-compat
    namespace it extends; every other name is looked up there once and cached on the instance.

    Example:
        >>> import numpy as np
        >>> import array_api_compat
        >>> from gradand._namespace import HookedNamespace
        >>> class Hooked(HookedNamespace):
        ...     gradand_vote_signs = staticmethod(np.sign)
        >>> xp = Hooked(array_api_compat.array_namespace(np.zeros(1)))
        >>> xp.sum(xp.asarray([1.0, 2.0])), xp.gradand_vote_signs(-3.0)
        (np.float64(3.0), np.float64(-1.0))
    """

    # The core's optional hooks, absent (None) unless a subclass supplies them: found on the class,
    # so that the core's lookups of a hook a backend lacks do not fall through to ``__getattr__``.
    gradand_vote_signs: Any = None
    gradand_check_finite: Any = None
    gradand_check_is_exhaustive: bool = False
    gradand_dense_mean: Any = None
    gradand_scaled_sum: Any = None  # (v, f) -> Σ over axis 0 of v·f, f a power of two (the fold's chunks)
    gradand_unroll_environments: Any = None
    gradand_sign_product: Any = None
    gradand_add_into: Any = None  # (acc, v) -> acc + v written into acc (mutable arrays)
    gradand_sign_into: Any = None  # (g) -> sign(g) written into g, NaN casting no vote
    gradand_select: Any = None  # (mask, d) -> where(mask, d, d - d): masked +0, NaN and Inf kept NaN
    gradand_matrix_transpose: Any = None  # (a) -> a's last two axes swapped, laid out for a product

    def __init__(self, base: Any) -> None:
        self._base = base

    def __getattr__(self, name: str) -> Any:  # first lookup of a name: cache it on the instance
        if name == "_base":
            raise AttributeError(name)
        value = getattr(self._base, name)
        setattr(self, name, value)
        return value


def accumulation_dtype(dtype: Any, xp: Any) -> Any:
    """float32 for 16-bit floats, otherwise ``dtype`` itself."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def check_nan_policy(nan_policy: str) -> None:
    if not isinstance(nan_policy, str) or nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}; got {nan_policy!r}")


def apply_nan_policy(x: Any, xp: Any, nan_policy: str, name: str, *, report: bool = False) -> Any:
    """Check or clean non-finite entries of ``x`` according to ``nan_policy``.

    ``"raise"`` raises ``ValueError`` when the values can be inspected (eager
    arrays): one sum first (a finite sum has no NaN/Inf term), a full look
    only when it is not finite. Inside a trace (``jax.jit``, ``tf.function``)
    the values are not known; a namespace may then supply
    ``gradand_check_finite`` (TensorFlow's ``tf.debugging.check_numerics``),
    otherwise the check is skipped there and a non-finite value propagates to
    the update (never a silent 0). ``"zero"`` replaces NaN/Inf by 0 (no vote,
    nothing added to the sum). ``"propagate"`` does nothing.

    With ``report=True`` returns ``(x, finite)``: whether no NaN/Inf can be left in ``x``
    (checked, cleaned, or guarded by the namespace's check).
    """
    out, finite = _apply_nan_policy(x, xp, nan_policy, name)
    return (out, finite) if report else out


def _apply_nan_policy(x: Any, xp: Any, nan_policy: str, name: str) -> tuple[Any, bool]:
    if nan_policy == "propagate":
        return x, False
    if nan_policy == "zero":
        return xp.where(xp.isfinite(x), x, xp.zeros_like(x)), True
    hook = getattr(xp, "gradand_check_finite", None)
    if hook is not None:  # the namespace's own check; it says whether nothing non-finite gets past
        return hook(x, name), bool(getattr(xp, "gradand_check_is_exhaustive", False))
    try:
        if bool(xp.isfinite(xp.sum(x))):
            return x, True
        finite = xp.isfinite(x)
        ok = bool(xp.all(finite))
    except Exception:  # a tracer (jax.jit) or a symbolic tensor: values unknown here
        return x, False
    if not ok:
        n_bad = int(xp.sum(xp.astype(xp.logical_not(finite), x.dtype)))  # x is float32+
        size = array_api_compat.size(x)
        raise ValueError(
            f"{name} contains NaN or Inf ({n_bad} of {size} entries of shape {tuple(x.shape)}); "
            f"a non-finite gradient would poison the update. Pass nan_policy='zero' to drop "
            f"those components (they cast no vote and add nothing), or nan_policy='propagate' "
            f"to let them through (the update is then NaN there)."
        )
    return x, True  # finite values whose sum overflowed
