"""The vectorised source: per-environment gradients in one ``torch.func.vmap`` pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

import gradand
from gradand.backends.torch._common import (
    XP,
    check_chunk_size,
    check_combiner,
    check_model,
    check_policy,
    loss_scale_of,
    trainable,
    unscale,
    with_context,
)

__all__ = ["environment_groups", "vectorized_statistics"]

LossFn = Callable[[Any, Any], torch.Tensor]


def check_batch_norm(model: torch.nn.Module) -> None:
    """Refuse normalisation layers that update running statistics (train mode) under vmap."""
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.modules.batchnorm._NormBase) or not m.training:
            continue
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or m.track_running_stats:
            raise ValueError(
                f"model contains {type(m).__name__} {name or '(the model itself)'!r} in train mode. "
                f"Per-environment gradients under vmap would need per-environment batch statistics "
                f"(ill-defined for one example per environment) and cannot update its running "
                f"statistics in place. Use model.eval() for these layers (running statistics, "
                f"e.g. `for m in model.modules(): m.eval() if isinstance(m, nn.BatchNorm2d) else None`), "
                f"replace them by GroupNorm/LayerNorm, or use method='factored' (nn.BatchNorm1d/2d/3d "
                f"with batch statistics per environment in one forward pass) or "
                f"gradand.backends.torch.backward (one forward pass per environment)"
            )


def environment_groups(
    env_ids: torch.Tensor, num_envs: int | None = None, *, n_examples: int | None = None
) -> list[torch.Tensor]:
    """Index matrices grouping examples by environment, one per environment size.

    Returns a list of int64 tensors of shape ``(k, n)``: row ``j`` holds the
    indices of the ``n`` examples of one environment; all environments with
    ``n`` examples share a matrix. Environments are checked to be non-empty.

    Example:
        >>> import torch
        >>> from gradand.backends.torch import environment_groups
        >>> environment_groups(torch.tensor([1, 0, 1, 0, 2]))
        [tensor([[4]]), tensor([[1, 3],
                [0, 2]])]
    """
    if not isinstance(env_ids, torch.Tensor):
        raise TypeError(
            f"env_ids must be a torch.Tensor of environment indices; got {type(env_ids).__name__}"
        )
    if (
        env_ids.ndim != 1
        or env_ids.dtype.is_floating_point
        or env_ids.dtype.is_complex
        or env_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"env_ids must be a 1-D integer tensor (one environment index per example); got shape "
            f"{tuple(env_ids.shape)} and dtype {env_ids.dtype}"
        )
    if n_examples is not None and env_ids.shape[0] != n_examples:
        raise ValueError(
            f"env_ids has {env_ids.shape[0]} entries but inputs has {n_examples} examples; need one "
            f"environment index per example"
        )
    if env_ids.numel() == 0:
        raise ValueError("env_ids is empty: need at least one example")
    ids = env_ids.long()
    lo, hi = int(ids.min()), int(ids.max())
    if num_envs is None:
        num_envs = hi + 1
    if lo < 0 or hi >= num_envs:
        raise ValueError(f"env_ids must lie in [0, num_envs={num_envs}); got values in [{lo}, {hi}]")
    counts = torch.bincount(ids, minlength=num_envs)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"environment(s) {empty[:10]}{'...' if len(empty) > 10 else ''} of num_envs={num_envs} have "
            f"no example; every environment needs at least one (or pass a smaller num_envs)"
        )
    return [idx for _, idx in _groups(ids, counts)]


def _groups(ids: torch.Tensor, counts: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(envs, idx)`` per environment size: the environments of that size and their examples' indices."""
    order = torch.argsort(ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    groups = []
    for n in torch.unique(counts).tolist():
        envs = torch.nonzero(counts == n).flatten()
        idx = starts[envs][:, None] + torch.arange(n, device=ids.device)
        groups.append((envs, order[idx]))
    return groups


def environment_batches(
    inputs: torch.Tensor, targets: torch.Tensor, env_ids: torch.Tensor | None, num_envs: int | None
) -> tuple[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """``(E, [(envs, idx), ...])``: the environments per size (``[(None, None)]`` for ``(E, n, ...)``)."""
    if env_ids is None:
        if num_envs is not None:
            raise ValueError("num_envs is only used with env_ids (else inputs is (E, n, ...))")
        if inputs.ndim < 2:
            raise ValueError(
                f"inputs must have shape (E, n, ...): environments, then examples; got shape "
                f"{tuple(inputs.shape)} (for one example per environment use inputs[:, None], "
                f"or pass env_ids)"
            )
        if inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)} ({inputs.shape[0]} environments of "
                f"{inputs.shape[1]} examples); need at least one environment and one example each"
            )
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"targets must have shape (E, n, ...) like inputs: inputs has {inputs.shape[0]} "
                f"environments (shape {tuple(inputs.shape)}) but targets has {targets.shape[0]} "
                f"(shape {tuple(targets.shape)}); the leading axis is the environment"
            )
        if targets.ndim < 2 or targets.shape[:2] != inputs.shape[:2]:
            raise ValueError(
                f"targets must have shape (E, n, ...) with the same E and n as inputs (the leading "
                f"axis is the environment); got inputs {tuple(inputs.shape)} and targets "
                f"{tuple(targets.shape)}"
            )
        return inputs.shape[0], [(None, None)]
    if inputs.shape[:1] != targets.shape[:1]:
        raise ValueError(
            f"with env_ids, inputs (shape {tuple(inputs.shape)}) and targets (shape "
            f"{tuple(targets.shape)}) must hold the same number of examples on axis 0"
        )
    environment_groups(env_ids, num_envs, n_examples=inputs.shape[0])  # validates
    ids = env_ids.to(inputs.device).long()
    n_envs = int(ids.max()) + 1 if num_envs is None else num_envs
    return n_envs, _groups(ids, torch.bincount(ids, minlength=n_envs))


def _chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def vectorized_statistics(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    *,
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
    chunk_size: int | None = None,
    randomness: str = "different",
    nan_policy: str = "raise",
    loss_scale: Any = None,
) -> tuple[torch.Tensor, list[gradand.Statistics]]:
    """Source: per-environment gradients in one ``torch.func.vmap`` pass, reduced to statistics.

    ``torch.func.vmap`` over the environment axis of
    ``grad(loss_fn(functional_call(model, params, x_e), y_e))`` gives every
    environment's gradient at once (in chunks of ``chunk_size``
    environments, each folded into the statistics and freed).

    Buffers (e.g. BatchNorm running statistics in eval mode) are read,
    unbatched, by every environment. BatchNorm layers in *train* mode raise
    ``ValueError``: per-environment batch statistics are ill-defined for one
    example per environment and their running statistics cannot be updated
    in place under vmap; put them in eval mode, use GroupNorm/LayerNorm, or
    use ``model_backward(..., method="streaming")``. Random operations
    (dropout) draw independently per environment (``randomness="different"``).

    Args:
        model: the module; its parameters that require grad are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, one environment's loss.
        inputs: ``(E, n, ...)``: E environments of n examples (``(B, 1, ...)``
            makes every example its own environment); with ``env_ids``,
            ``(N, ...)``.
        targets: ``(E, n, ...)``; with ``env_ids``, ``(N, ...)``.
        combiner: the combiner whose statistics to compute.
        env_ids: optional ``(N,)`` integer tensor, the environment of each
            example; environments may have different sizes (one vmap pass
            per distinct size).
        num_envs: the number of environments with ``env_ids`` (default
            ``max(env_ids) + 1``); every environment needs an example.
        chunk_size: environments per vmap pass (``None``: all at once).
        randomness: ``torch.func.vmap``'s ``randomness``.
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``.
        loss_scale: a number or a ``torch.amp.GradScaler``: the loss is
            multiplied by the scale inside the pass and the gradients
            unscaled in float32 before their statistics.

    Returns:
        ``(losses, stats)``: the detached per-environment losses ``(E,)``
        (unscaled) and one :class:`gradand.Statistics` per parameter that
        requires grad, in ``model.parameters()`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(6, 1, 2), torch.randn(6, 1, 1)  # 6 examples, each its own environment
        >>> mse = torch.nn.functional.mse_loss
        >>> losses, stats = gt.vectorized_statistics(model, mse, x, y, gradand.AndMask())
        >>> losses.shape, stats[0].count, stats[0].shape
        (torch.Size([6]), 6, (1, 2))
    """
    check_model(model, loss_fn, inputs, targets)
    check_combiner(combiner)
    check_policy(nan_policy)
    check_chunk_size(chunk_size)
    check_batch_norm(model)
    named = trainable(model)
    params = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    scale = loss_scale_of(loss_scale)
    policy = "propagate" if scale is not None and nan_policy == "raise" else nan_policy

    def env_loss(params: dict[str, torch.Tensor], x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (params, frozen, buffers), (x,))
        loss = loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return one environment's loss as a scalar tensor; got {shape} "
                f"(reduce it with .mean() or reduction='mean')"
            )
        scaled = loss if scale is None else loss * scale
        return scaled, loss.detach()

    per_env = vmap(grad_and_value(env_loss, has_aux=True), in_dims=(None, 0, 0), randomness=randomness)
    n_envs, groups = environment_batches(inputs, targets, env_ids, num_envs)
    stats = {n: gradand.Statistics() for n in params}
    parts, order = [], []
    for envs, idx in groups:
        xs, ys = (inputs, targets) if idx is None else (inputs[idx], targets[idx.to(targets.device)])
        for sl in _chunks(xs.shape[0], chunk_size):
            grads, (_, losses) = per_env(params, xs[sl], ys[sl])
            parts.append(losses.detach())
            order.append(torch.arange(n_envs, device=inputs.device)[sl] if envs is None else envs[sl])
            for n, g in grads.items():
                try:
                    s = gradand.statistics(unscale(g, scale), combiner, axis=0, nan_policy=policy, xp=XP)
                except ValueError as err:
                    raise with_context(err, f"parameter {n!r} (shape {tuple(g.shape[1:])})") from None
                stats[n] = stats[n] + s
            grads = g = s = None  # free this chunk's gradients before the next pass
    losses = torch.cat(parts)
    if len(groups) > 1:  # back into environment order
        losses = torch.empty_like(losses).index_copy_(0, torch.cat(order).to(losses.device), losses)
    return losses, [stats[n] for n in params]
