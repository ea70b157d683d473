"""The streaming strategy: one autograd pass per environment, folded into running statistics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

import gradand
from gradand.backends.torch._common import (
    XP,
    as_loss_list,
    as_param_list,
    check_combiner,
    check_policy,
    finalize_into_grads,
    grad_scale,
    unscale,
    with_context,
)

__all__ = ["backward"]


def backward(
    losses: Sequence[torch.Tensor] | torch.Tensor,
    params: Iterable[torch.Tensor],
    combiner: gradand.Combiner,
    *,
    nan_policy: str = "raise",
    retain_graph: bool | None = None,
    grad_scaler: Any = None,
    all_reduce: bool = False,
    group: Any = None,
) -> list[gradand.MaskInfo]:
    """Like ``loss.backward()``, but combining the environments' gradients with ``combiner``.

    For each environment ``e``, ``torch.autograd.grad(losses[e], params)``
    gives its gradient, which is folded into the core's running
    :class:`gradand.Statistics` at once and freed: the extra memory is a few
    float32 copies of the parameters, whatever the number of environments.
    Then ``gradand.finalize`` per parameter tensor, and the update is
    *added* to ``.grad`` (set when ``.grad`` is ``None``), so gradient
    accumulation, ``optimizer.zero_grad()`` and ``optimizer.step()`` work as
    with ``loss.backward()``.

    The losses may come from separate forward passes, one per environment
    (recommended: each backward walks only that environment's part), or
    share one graph (one forward pass over a batch holding every
    environment): the graph is then kept until the last environment and
    each of the E backward passes walks the whole batch, about E times the
    cost of one ``loss.backward()``.

    An environment whose loss does not depend on a parameter gives it a zero
    gradient: no sign vote, but it counts in the number of environments. A
    parameter that no environment's loss depends on keeps its ``.grad``
    unchanged (``None`` stays ``None``, like ``loss.backward()``), unless
    ``all_reduce`` (other ranks may use it).

    Args:
        losses: one scalar loss per environment: a sequence of 0-d tensors,
            or a 1-D tensor.
        params: the tensors to differentiate (e.g. ``model.parameters()``),
            all requiring grad.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        nan_policy: ``"raise"`` (a NaN/Inf gradient raises ``ValueError``
            naming the environment and parameter; costs a host sync per
            environment and tensor), ``"zero"`` or ``"propagate"``.
        retain_graph: keep the graph after the last environment (the graph is
            always kept for the ones before).
        grad_scaler: a ``torch.amp.GradScaler`` whose ``scale(...)`` was
            applied to ``losses``. Each environment's gradient is unscaled in
            float32 *before* combining (``SandMask`` and ``GeometricMean``
            are not scale-equivariant), and the update written to ``.grad``
            is multiplied by the scale again, so ``scaler.step(optimizer)``
            and ``scaler.update()`` work unchanged. Non-finite gradients
            then make ``.grad`` NaN instead of raising, so that the scaler
            skips the step and lowers the scale.
        all_reduce: sum the statistics over the ranks of ``group`` before
            finalizing (:func:`all_reduce_statistics`): each rank passes its
            own environments' losses, every rank gets the update of all of
            them. Use it without DDP's gradient averaging (the plain module,
            or inside ``ddp.no_sync()``).
        group: the process group for ``all_reduce``.

    Returns:
        One :class:`gradand.MaskInfo` per parameter tensor, in order (0-d
        tensors: the survivor fraction and the mean agreement).

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])  # environment e's loss: x[e] @ w
        >>> infos = gt.backward([x[0] @ w, x[1] @ w], [w], gradand.AndMask(threshold=1.0, rescale=False))
        >>> w.grad  # the environments agree on the first component only
        tensor([2., 0.])
        >>> float(infos[0].survivor_fraction)
        0.5
    """
    check_combiner(combiner)
    check_policy(nan_policy)
    loss_list = as_loss_list(losses)
    param_list = as_param_list(params)
    scale = grad_scale(grad_scaler)
    policy = "propagate" if scale is not None and nan_policy == "raise" else nan_policy
    stats = [gradand.Statistics() for _ in param_list]
    used = [False] * len(param_list)
    last = len(loss_list) - 1
    for e, loss in enumerate(loss_list):
        keep = True if e < last else bool(retain_graph)
        grads = torch.autograd.grad(loss, param_list, retain_graph=keep, allow_unused=True)
        for i, (p, g) in enumerate(zip(param_list, grads)):
            if g is None:
                g = torch.zeros_like(p)
            else:
                used[i] = True
            try:
                s = gradand.statistics(unscale(g, scale), combiner, axis=None, nan_policy=policy, xp=XP)
            except ValueError as err:
                raise with_context(err, f"environment {e}, params[{i}] (shape {tuple(p.shape)})") from None
            stats[i] = stats[i] + s
        grads = g = s = None  # free this environment's gradients before the next backward
    if all_reduce:
        from gradand.backends.torch._distributed import all_reduce_statistics

        stats = all_reduce_statistics(stats, group=group)
    return finalize_into_grads(param_list, stats, combiner, scale, [u or all_reduce for u in used])
