"""The sink: finalized updates added into ``.grad``, one :class:`gradand.MaskInfo` per tensor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

import gradand
from gradand.backends.torch._common import (
    XP,
    accumulate_grad,
    as_param_list,
    check_combiner,
    detach_info,
    loss_scale_of,
    poison_if_nonfinite,
)

__all__ = ["finalize_gradients"]


def finalize_gradients(
    stats: Sequence[gradand.Statistics | None],
    params: Iterable[torch.Tensor],
    combiner: gradand.Combiner,
    *,
    loss_scale: Any = None,
) -> tuple[list[torch.Tensor | None], list[gradand.MaskInfo | None]]:
    """Finalize each tensor's statistics and *add* the update into its ``.grad``.

    :func:`gradand.finalize_many` of every parameter's statistics (the
    element-wise work done once over all tensors); each update is added to
    ``.grad`` (set when ``.grad`` is ``None``), like ``loss.backward()``, so
    gradient accumulation and ``optimizer.step()`` work unchanged. A ``None``
    statistic (no loss depends on that parameter) leaves its ``.grad`` alone
    and gives ``None`` for its update and info.

    Args:
        stats: one :class:`gradand.Statistics` (or ``None``) per parameter,
            from a source (:func:`streaming_statistics`, ...) or
            :func:`all_reduce_statistics`.
        params: the parameters, in the order of ``stats``.
        combiner: the combiner the statistics were computed for.
        loss_scale: the scale the losses carried (a number or a
            ``torch.amp.GradScaler``): the update is multiplied by it again,
            as ``loss.backward()`` of scaled losses would give, and is NaN
            where a statistic is not finite, so that ``scaler.step`` skips
            the step.

    Returns:
        ``(grads, infos)``: the updates added to ``.grad`` and the detached
        :class:`gradand.MaskInfo` of each parameter, in ``params`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> w = torch.zeros(2, requires_grad=True)
        >>> c = gradand.AndMask(threshold=1.0, rescale=False)
        >>> s = gradand.statistics(torch.tensor([[1.0, 2.0], [3.0, -2.0]]), c)  # 2 environments
        >>> grads, infos = gt.finalize_gradients([s], [w], c)
        >>> w.grad, float(infos[0].survivor_fraction)
        (tensor([2., 0.]), 0.5)
    """
    check_combiner(combiner)
    param_list = as_param_list(params)
    stats = list(stats)
    if len(stats) != len(param_list):
        raise ValueError(f"need one statistic per parameter; got {len(stats)} for {len(param_list)} params")
    scale = loss_scale_of(loss_scale)
    present = [i for i, s in enumerate(stats) if s is not None]
    grads: list[torch.Tensor | None] = [None] * len(param_list)
    infos: list[gradand.MaskInfo | None] = [None] * len(param_list)
    if not present:
        return grads, infos
    updates, found = gradand.finalize_many([stats[i] for i in present], combiner, return_info=True, xp=XP)
    for i, update, info in zip(present, updates, found):
        if scale is not None:
            update = poison_if_nonfinite(update * scale, stats[i])
        grads[i] = accumulate_grad(param_list[i], update)
        infos[i] = detach_info(info)
    return grads, infos
