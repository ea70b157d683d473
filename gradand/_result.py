"""The one result object every backend entry point returns, and its summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import array_api_compat

from gradand._combine import MaskInfo
from gradand._namespace import array_namespace

__all__ = ["Result", "summarize"]


class Result(NamedTuple):
    """What a gradand training step reports, the same in every backend.

    A ``NamedTuple`` (a pytree in JAX, so ``jit`` returns it).

    Attributes:
        loss: the mean over environments of the per-environment losses (0-d).
            ``Mean()`` is the mean of the environments' means, so with
            environments of different sizes it differs from a batch loss.
        losses: the per-environment losses, shape ``(E,)`` (this worker's
            environments in distributed training).
        infos: a :class:`gradand.MaskInfo` per parameter tensor, in the
            framework's structure: a list in the order of the parameters
            (PyTorch, TensorFlow; ``None`` for a tensor no loss depends on) or
            a pytree like the gradients (JAX).
        summary: one :class:`gradand.MaskInfo` over all tensors, weighted by
            their sizes (:func:`gradand.summarize`): the fraction of all
            parameters whose update survives, and the mean agreement.
        aux: the loss function's auxiliary outputs, per environment, when the
            entry point was asked for them; otherwise ``None``.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> infos = [gradand.MaskInfo(np.float32(1.0), np.float32(1.0)),
        ...          gradand.MaskInfo(np.float32(0.0), np.float32(0.5))]
        >>> r = gradand.Result(np.float32(0.5), np.array([0.25, 0.75]), infos,
        ...                    gradand.summarize(infos, [1, 3]))
        >>> float(r.summary.survivor_fraction), float(r.summary.agreement)
        (0.25, 0.625)
    """

    loss: Any
    losses: Any
    infos: Any
    summary: MaskInfo
    aux: Any = None


def summarize(infos: Sequence[MaskInfo | None], sizes: Sequence[int], *, xp: Any = None) -> MaskInfo:
    """One :class:`~gradand.MaskInfo` over many tensors, each weighted by its number of elements.

    ``survivor_fraction`` is then the fraction of all parameters whose update
    survives the mask, ``agreement`` the mean agreement over all parameters.
    Tensors whose info is ``None`` (no loss depends on them) are left out;
    with none left, both fields are NaN. 0-d results in float32 (or the
    infos' wider float type), in the infos' namespace and device.

    Example:
        >>> import numpy as np
        >>> import gradand
        >>> infos = [gradand.MaskInfo(np.float32(1.0), np.float32(1.0)), None,
        ...          gradand.MaskInfo(np.float32(0.0), np.float32(0.5))]
        >>> s = gradand.summarize(infos, [1, 7, 3])
        >>> float(s.survivor_fraction), float(s.agreement)
        (0.25, 0.625)
    """
    infos = list(infos)
    sizes = [int(n) for n in sizes]
    if len(infos) != len(sizes):
        raise ValueError(
            f"summarize() needs one size per info; got {len(infos)} infos and {len(sizes)} sizes"
        )
    pairs = [(i, n) for i, n in zip(infos, sizes) if i is not None and n > 0]
    if not pairs:
        nan = float("nan")
        if xp is None:
            return MaskInfo(nan, nan)
        return MaskInfo(xp.asarray(nan, dtype=xp.float32), xp.asarray(nan, dtype=xp.float32))
    first = pairs[0][0].survivor_fraction
    xp = array_namespace(first, xp=xp, name="infos")
    wide = xp.isdtype(first.dtype, "real floating") and xp.finfo(first.dtype).bits > 32
    dt = first.dtype if wide else xp.float32
    sizes_ = [float(n) for _, n in pairs]
    total = float(sum(sizes_))
    values = [v if v.dtype == dt else xp.astype(v, dt) for info, _ in pairs for v in info]
    if len(pairs) > 1 and hasattr(xp, "stack"):  # a few ops, whatever the number of tensors
        w = xp.asarray(sizes_, dtype=dt, device=_device(values[0]))
        both = xp.sum(xp.reshape(xp.stack(values), (len(pairs), 2)) * w[:, None], axis=0) / total
        fields = [both[0], both[1]]  # all ones give exactly 1
    else:
        fields = []
        for k in range(2):
            acc = None
            for v, n in zip(values[k::2], sizes_):
                acc = v * n if acc is None else acc + v * n
            fields.append(acc / total)
    return MaskInfo(*fields)


def _device(x: Any) -> Any:
    try:
        return array_api_compat.device(x)
    except Exception:  # a namespace array-api-compat does not know (TensorFlow): no device argument
        return None


def sizes_of(tensors: Sequence[Any]) -> list[int]:
    """The number of elements of each tensor (0 for ``None``)."""
    return [0 if t is None else math.prod(t.shape) for t in tensors]
