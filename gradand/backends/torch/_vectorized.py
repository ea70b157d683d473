"""The vectorised strategy: per-environment gradients in one ``torch.func.vmap`` pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

import gradand
from gradand.backends.torch._common import (
    XP,
    check_combiner,
    check_policy,
    finalize_into_grads,
    grad_scale,
    unscale,
    with_context,
)

__all__ = ["environment_groups", "vmap_backward"]

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
                f"replace them by GroupNorm/LayerNorm, or use gradand.backends.torch.backward "
                f"with one forward pass per environment (batch statistics per environment)"
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
    order = torch.argsort(ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    groups = []
    for n in torch.unique(counts).tolist():
        envs = torch.nonzero(counts == n).flatten()
        idx = starts[envs][:, None] + torch.arange(n, device=ids.device)
        groups.append(order[idx])
    return groups


def _chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def vmap_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    *,
    chunk_size: int | None = None,
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
    randomness: str = "different",
    nan_policy: str = "raise",
    grad_scaler: Any = None,
    all_reduce: bool = False,
    group: Any = None,
) -> tuple[torch.Tensor, list[gradand.MaskInfo]]:
    """Per-environment gradients in one vectorised pass, combined into ``.grad``.

    ``torch.func.vmap`` over the environment axis of
    ``grad(loss_fn(functional_call(model, params, x_e), y_e))`` gives every
    environment's gradient at once; their statistics are summed with the
    core and ``gradand.finalize`` gives the update, which is *added* to the
    ``.grad`` of the model's parameters that require grad (set when
    ``None``). Same result as :func:`backward` with one loss per environment.

    Buffers (e.g. BatchNorm running statistics in eval mode) are read,
    unbatched, by every environment. BatchNorm layers in *train* mode raise
    ``ValueError``: per-environment batch statistics are ill-defined for one
    example per environment and their running statistics cannot be updated
    in place under vmap; put them in eval mode, use GroupNorm/LayerNorm, or
    use :func:`backward` with one forward pass per environment. Random
    operations (dropout) draw independently per environment
    (``randomness="different"``).

    Args:
        model: the module; its parameters that require grad are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, one environment's loss
            (e.g. ``torch.nn.functional.cross_entropy``).
        inputs: ``(E, n, ...)``: E environments of n examples (``(B, 1, ...)``
            makes every example its own environment); with ``env_ids``,
            ``(N, ...)``.
        targets: ``(E, n, ...)``; with ``env_ids``, ``(N, ...)``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        chunk_size: environments per vmap pass (``None``: all at once). Each
            chunk's gradients are folded into the statistics and freed, so
            memory is ``chunk_size`` gradients; the result is the same.
        env_ids: optional ``(N,)`` integer tensor, the environment of each
            example; environments may have different sizes (one vmap pass
            per distinct size).
        num_envs: the number of environments with ``env_ids`` (default
            ``max(env_ids) + 1``); every environment needs an example.
        randomness: ``torch.func.vmap``'s ``randomness`` (``"different"``,
            ``"same"`` or ``"error"``).
        nan_policy: as in :func:`backward`.
        grad_scaler: a ``torch.amp.GradScaler``: the loss is multiplied by its
            scale inside the pass, gradients unscaled before combining, and
            the update rescaled into ``.grad`` (see :func:`backward`).
        all_reduce: sum the statistics over the ranks of ``group`` before
            finalizing (each rank passes its own environments).
        group: the process group for ``all_reduce``.

    Returns:
        ``(loss, infos)``: the mean of the environments' losses (detached) and
        one :class:`gradand.MaskInfo` per parameter that requires grad, in
        ``model.parameters()`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(6, 1, 2), torch.randn(6, 1, 1)  # 6 examples, each its own environment
        >>> mse = torch.nn.functional.mse_loss
        >>> loss, infos = gt.vmap_backward(model, mse, x, y, gradand.AndMask(threshold=0.5))
        >>> model.weight.grad.shape, loss.shape
        (torch.Size([1, 2]), torch.Size([]))
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable (outputs, targets) -> scalar; got {type(loss_fn).__name__}"
        )
    check_combiner(combiner)
    check_policy(nan_policy)
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    check_batch_norm(model)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    trainable = {n: p.detach() for n, p in named}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    scale = grad_scale(grad_scaler)
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

    if env_ids is None:
        if inputs.ndim < 2:
            raise ValueError(
                f"inputs must have shape (E, n, ...): environments, then examples; got shape "
                f"{tuple(inputs.shape)} (for one example per environment use inputs[:, None], "
                f"or pass env_ids)"
            )
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs has {inputs.shape[0]} environments (shape {tuple(inputs.shape)}) but targets has "
                f"{targets.shape[0]} (shape {tuple(targets.shape)}); the leading axis is the environment"
            )
        if inputs.shape[0] == 0:
            raise ValueError(f"inputs has 0 environments (shape {tuple(inputs.shape)}); need at least one")
        batches = [(inputs, targets)]
    else:
        if inputs.shape[:1] != targets.shape[:1]:
            raise ValueError(
                f"with env_ids, inputs (shape {tuple(inputs.shape)}) and targets (shape "
                f"{tuple(targets.shape)}) must hold the same number of examples on axis 0"
            )
        groups = environment_groups(env_ids.to(inputs.device), num_envs, n_examples=inputs.shape[0])
        batches = [(inputs[idx], targets[idx.to(targets.device)]) for idx in groups]

    stats = {n: gradand.Statistics() for n in trainable}
    loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
    n_env = 0
    for xs, ys in batches:
        for sl in _chunks(xs.shape[0], chunk_size):
            grads, (_, losses) = per_env(trainable, xs[sl], ys[sl])
            loss_sum = loss_sum + losses.detach().to(torch.float64).sum()
            n_env += losses.shape[0]
            for n, g in grads.items():
                try:
                    s = gradand.statistics(unscale(g, scale), combiner, axis=0, nan_policy=policy, xp=XP)
                except ValueError as err:
                    raise with_context(err, f"parameter {n!r} (shape {tuple(g.shape[1:])})") from None
                stats[n] = stats[n] + s
            grads = g = s = None  # free this chunk's gradients before the next pass
    names = list(trainable)
    reduced = [stats[n] for n in names]
    if all_reduce:
        from gradand.backends.torch._distributed import all_reduce_statistics

        reduced = all_reduce_statistics(reduced, group=group)
    infos = finalize_into_grads([p for _, p in named], reduced, combiner, scale)
    mean_loss = (loss_sum / n_env).to(losses.dtype)
    return mean_loss, infos
