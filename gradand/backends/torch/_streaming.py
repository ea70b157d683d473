"""The streaming source: one autograd pass per environment, folded into running statistics."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

import gradand
from gradand._stats import Fold
from gradand.backends.torch._common import (
    XP,
    as_loss_list,
    as_param_list,
    check_combiner,
    check_policy,
    loss_scale_of,
    unscale,
    with_context,
)

__all__ = ["streaming_statistics"]


def _checked(loss: Any, e: int) -> torch.Tensor:
    """One loss of a lazy iterable, validated as :func:`as_loss_list` does."""
    try:
        (out,) = as_loss_list([loss])
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("losses[0]", f"losses[{e}]")) from None
    return out


def streaming_statistics(
    losses: Sequence[torch.Tensor] | torch.Tensor | Iterable[torch.Tensor],
    params: Iterable[torch.Tensor],
    combiner: gradand.Combiner,
    *,
    nan_policy: str = "raise",
    loss_scale: Any = None,
    retain_graph: bool | None = None,
    zero_unused: bool = False,
) -> tuple[torch.Tensor, list[gradand.Statistics | None]]:
    """Source: the statistics of each parameter's per-environment gradients, one environment at a time.

    For each environment ``e``, ``torch.autograd.grad(losses[e], params)``
    gives its gradient, which is folded into the core's running
    :class:`gradand.Statistics` at once and freed: the extra memory is a few
    float32 copies of the parameters, whatever the number of environments.

    ``losses`` may be a sequence (or 1-D tensor) of losses sharing one graph
    (kept until the last environment; each backward walks the whole batch) or
    from one forward pass per environment, or a lazy iterable (a generator)
    that runs each environment's forward pass when asked: then only one
    environment's graph exists at a time.

    An environment whose loss does not depend on a parameter gives it a zero
    gradient (no sign vote, but it counts). A parameter that no environment's
    loss depends on gets ``None`` (its ``.grad`` is then left alone by
    :func:`finalize_gradients`), or zero statistics with ``zero_unused=True``
    (needed before :func:`all_reduce_statistics`: other ranks may use it).

    Args:
        losses: one scalar loss per environment.
        params: the tensors to differentiate, all requiring grad.
        combiner: the combiner whose statistics to compute.
        nan_policy: ``"raise"`` (a NaN/Inf gradient raises ``ValueError``
            naming the environment and parameter), ``"zero"`` or ``"propagate"``.
        loss_scale: the scale the losses carry (a number or a
            ``torch.amp.GradScaler``): each gradient is unscaled in float32
            before its statistics; non-finite gradients then propagate
            instead of raising, so that the scaler can skip the step.
        retain_graph: keep the graph after the last environment (and after
            each environment of a lazy iterable).
        zero_unused: zero statistics instead of ``None`` for unused parameters.

    Returns:
        ``(losses, stats)``: the detached losses ``(E,)`` as given and one
        statistic per parameter, in ``params`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])  # environment e's loss: x[e] @ w
        >>> losses, stats = gt.streaming_statistics([x[0] @ w, x[1] @ w], [w], gradand.AndMask())
        >>> losses, stats[0].count, stats[0].sign_sum
        (tensor([3., 1.]), 2, tensor([2, 0], dtype=torch.int32))
    """
    check_combiner(combiner)
    check_policy(nan_policy)
    lazy = not isinstance(losses, (torch.Tensor, Sequence))
    items: Iterator[Any] = iter(losses) if lazy else iter(as_loss_list(losses))  # type: ignore[arg-type]
    n_known = None if lazy else len(losses)  # type: ignore[arg-type]
    param_list = as_param_list(params)
    scale = loss_scale_of(loss_scale)
    policy = "propagate" if scale is not None and nan_policy == "raise" else nan_policy
    folds = [Fold(combiner, n_known, nan_policy=policy, xp=XP) for _ in param_list]
    seeds = {f.seed(p.dtype, XP) for f, p in zip(folds, param_list)}
    seed = seeds.pop() if len(seeds) == 1 and scale is None else None  # the folds' scale, for free
    used = [False] * len(param_list)
    values = []
    for e, loss in enumerate(items):
        if lazy:
            loss = _checked(loss, e)
        keep = bool(retain_graph) if lazy or e == n_known - 1 else True  # type: ignore[operator]
        seeded = seed is not None and loss.dtype in (torch.float32, torch.float64)
        out = torch.full_like(loss, seed) if seeded else None
        grads = torch.autograd.grad(loss, param_list, grad_outputs=out, retain_graph=keep, allow_unused=True)
        values.append(loss.detach())
        for i, (p, g) in enumerate(zip(param_list, grads)):
            if g is None:
                if not folds[i].needs_values:
                    folds[i].skip()  # a zero gradient: no vote, nothing added
                    continue
                g = torch.zeros_like(p)
            else:
                used[i] = True
            try:
                g = unscale(g, scale)
                folds[i].add(g, seeded=seeded, owned=g.is_contiguous() and g is not out)
            except ValueError as err:
                raise with_context(err, f"environment {e}, params[{i}] (shape {tuple(p.shape)})") from None
        grads = g = None  # free this environment's gradients before the next backward
        if policy == "raise" and not bool(torch.isfinite(values[-1])):
            # finite gradients of a non-finite loss: e.g. the mean over an empty environment
            # (x[env == e] with no example), whose zero gradient would be a silent "no vote"
            raise ValueError(
                f"the loss of environment {e} is {float(values[-1])} while its gradients are finite: "
                f"an environment with no example in the batch? It would silently cast no vote; "
                f"pass nan_policy='zero' or 'propagate' to go on anyway"
            )
    if not values:
        raise ValueError("losses is empty: need at least one environment's loss")
    out = [f.result(p) if u or zero_unused else None for f, p, u in zip(folds, param_list, used)]
    return torch.stack(values), out
