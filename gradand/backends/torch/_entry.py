"""The one-line entry points: a source, the all-reduce, the sink, composed; and the deprecated names."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

import gradand
from gradand.backends.torch._common import (
    as_param_list,
    check_model,
    deprecated,
    loss_scale_of,
    pick_loss_scale,
    trainable,
)
from gradand.backends.torch._distributed import all_reduce_statistics
from gradand.backends.torch._factored import factored_statistics
from gradand.backends.torch._sink import finalize_gradients
from gradand.backends.torch._streaming import streaming_statistics
from gradand.backends.torch._vectorized import environment_batches, vectorized_statistics

__all__ = ["backward", "factored_backward", "model_backward", "vmap_backward"]

LossFn = Callable[[Any, Any], torch.Tensor]
METHODS = ("streaming", "vectorized", "factored")


def _result(losses: torch.Tensor, params: Sequence[torch.Tensor], infos: list[Any]) -> gradand.Result:
    loss = losses.detach().to(torch.float64).mean().to(losses.dtype)
    return gradand.Result(loss, losses.detach(), infos, gradand.summarize(infos, [p.numel() for p in params]))


def backward(
    losses: Sequence[torch.Tensor] | torch.Tensor | Iterable[torch.Tensor],
    params: Iterable[torch.Tensor],
    combiner: gradand.Combiner,
    *,
    nan_policy: str = "raise",
    loss_scale: Any = None,
    all_reduce: bool = False,
    group: Any = None,
    retain_graph: bool | None = None,
    grad_scaler: Any = None,
) -> gradand.Result:
    """Like ``loss.backward()``, but combining the environments' gradients with ``combiner``.

    :func:`streaming_statistics` (one autograd pass per environment, folded
    into running statistics: extra memory independent of the number of
    environments), :func:`all_reduce_statistics` when ``all_reduce``, then
    :func:`finalize_gradients`, which *adds* the update to ``.grad`` (sets it
    when ``None``), so ``optimizer.zero_grad()``/``optimizer.step()`` and
    gradient accumulation work as with ``loss.backward()``. A parameter no
    loss depends on keeps its ``.grad`` (and gets a ``None`` info), unless
    ``all_reduce`` (other ranks may use it).

    The losses may share one graph (one forward pass over every environment;
    each backward then walks the whole batch) or come from one forward pass
    per environment (recommended; a generator runs them one at a time).

    Args:
        losses: one scalar loss per environment: a sequence of 0-d tensors,
            a 1-D tensor, or a lazy iterable.
        params: the tensors to differentiate (e.g. ``model.parameters()``).
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        nan_policy: ``"raise"`` (a NaN/Inf gradient raises ``ValueError``
            naming the environment and parameter), ``"zero"`` or ``"propagate"``.
        loss_scale: the scale the losses carry: a number, or the
            ``torch.amp.GradScaler`` whose ``scale(...)`` was applied to them.
            Gradients are unscaled in float32 before combining (``SandMask``
            and ``GeometricMean`` are not scale-equivariant) and the update
            is scaled again into ``.grad``, so ``scaler.step(optimizer)``
            works unchanged; non-finite gradients make ``.grad`` NaN instead
            of raising, so that the scaler skips the step.
        all_reduce: sum the statistics over the ranks of ``group`` before
            finalizing: each rank passes its own environments' losses and
            every rank gets the update of all of them (without DDP's
            averaging: the plain module, or inside ``ddp.no_sync()``).
        group: the process group for ``all_reduce``.
        retain_graph: keep the graph after the last environment.
        grad_scaler: deprecated name of ``loss_scale``.

    Returns:
        A :class:`gradand.Result`: ``loss`` (the mean of ``losses``,
        detached), ``losses``, ``infos`` (one :class:`gradand.MaskInfo` per
        parameter, in order) and ``summary``.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])  # environment e's loss: x[e] @ w
        >>> r = gt.backward([x[0] @ w, x[1] @ w], [w], gradand.AndMask(threshold=1.0, rescale=False))
        >>> w.grad  # the environments agree on the first component only
        tensor([2., 0.])
        >>> float(r.loss), float(r.summary.survivor_fraction)
        (2.0, 0.5)
    """
    loss_scale = pick_loss_scale(loss_scale, grad_scaler)
    params = as_param_list(params)
    losses, stats = streaming_statistics(
        losses, params, combiner, nan_policy=nan_policy, loss_scale=loss_scale,
        retain_graph=retain_graph, zero_unused=all_reduce,
    )  # fmt: skip
    if all_reduce:
        stats = all_reduce_statistics(stats, group=group)
    _, infos = finalize_gradients(stats, params, combiner, loss_scale=loss_scale)
    if loss_scale is not None:  # report the losses as they are, not as scaled for the backward pass
        losses = losses / _scale_value(loss_scale)
    return _result(losses, params, infos)


def model_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    *,
    method: str = "factored",
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
    chunk_size: int | None = None,
    fallback: str = "vectorized",
    nan_policy: str = "raise",
    loss_scale: Any = None,
    all_reduce: bool = False,
    group: Any = None,
    randomness: str = "different",
    grad_scaler: Any = None,
) -> gradand.Result:
    """One training step's gradients from a model and a batch, combined into ``.grad``.

    A source, chosen by ``method``, then :func:`all_reduce_statistics` when
    ``all_reduce``, then :func:`finalize_gradients`:

    - ``"factored"`` (default, :func:`factored_statistics`): one forward and
      one backward pass over every example; ``nn.Linear``, ``nn.Conv1d/2d/3d``
      and ``nn.BatchNorm1d/2d/3d`` parameters from the core's factored
      engine (BatchNorm with per-environment batch statistics in train mode),
      the others by a batched backward pass (``fallback="vectorized"``) or
      refused (``"error"``). Close to the cost of an ordinary step.
    - ``"vectorized"`` (:func:`vectorized_statistics`): ``torch.func.vmap``
      over environments, any model without train-mode BatchNorm.
    - ``"streaming"`` (:func:`streaming_statistics`): one forward and
      backward pass per environment (what DomainBed does): any model
      (BatchNorm in train mode sees per-environment batches), memory of one
      environment.

    Args:
        model: the module; its parameters that require grad are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, one environment's
            loss (e.g. ``torch.nn.functional.cross_entropy``).
        inputs: ``(E, n, ...)``: E environments of n examples (``(B, 1, ...)``
            makes every example its own environment); with ``env_ids``, ``(N, ...)``.
        targets: ``(E, n, ...)``; with ``env_ids``, ``(N, ...)``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        method: ``"factored"``, ``"vectorized"`` or ``"streaming"``.
        env_ids: optional ``(N,)`` integer tensor, each example's environment;
            environments may have different sizes; one with no example raises
            ``ValueError`` naming it.
        num_envs: the number of environments with ``env_ids`` (default
            ``max(env_ids) + 1``).
        chunk_size: environments per vectorised pass or batched product
            (bounded memory; same result).
        fallback: ``"vectorized"`` or ``"error"`` (factored method only).
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``.
        loss_scale: a number or a ``torch.amp.GradScaler``: the losses are
            multiplied by the scale inside the pass, gradients unscaled before
            combining and the update scaled again into ``.grad`` (see :func:`backward`).
        all_reduce: sum the statistics over the ranks of ``group`` before
            finalizing (each rank passes its own environments).
        group: the process group for ``all_reduce``.
        randomness: ``torch.func.vmap``'s ``randomness`` (vectorized method).
        grad_scaler: deprecated name of ``loss_scale``.

    Returns:
        A :class:`gradand.Result` (``loss``, ``losses`` (E,), ``infos`` per
        parameter that requires grad in ``model.parameters()`` order, ``summary``).

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
        >>> env_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # environments of 3, 2 and 5 examples
        >>> ce = torch.nn.functional.cross_entropy
        >>> r = gt.model_backward(model, ce, x, y, gradand.AndMask(threshold=0.5), env_ids=env_ids)
        >>> r.losses.shape, len(r.infos), model[0].weight.grad.shape
        (torch.Size([3]), 4, torch.Size([4, 3]))
    """
    loss_scale = pick_loss_scale(loss_scale, grad_scaler)
    _initialise_scaler(loss_scale, model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    params = [p for _, p in trainable(model)] if isinstance(model, torch.nn.Module) else []
    if method == "factored":
        losses, stats = factored_statistics(
            model, loss_fn, inputs, targets, combiner, env_ids=env_ids, num_envs=num_envs,
            chunk_size=chunk_size, fallback=fallback, nan_policy=nan_policy, loss_scale=loss_scale,
        )  # fmt: skip
    elif method == "vectorized":
        losses, stats = vectorized_statistics(
            model, loss_fn, inputs, targets, combiner, env_ids=env_ids, num_envs=num_envs,
            chunk_size=chunk_size, randomness=randomness, nan_policy=nan_policy, loss_scale=loss_scale,
        )  # fmt: skip
    else:
        check_model(model, loss_fn, inputs, targets)
        env_losses = _environment_losses(model, loss_fn, inputs, targets, env_ids, num_envs, loss_scale)
        losses, stats = streaming_statistics(
            env_losses, params, combiner, nan_policy=nan_policy, loss_scale=loss_scale,
            zero_unused=all_reduce,
        )  # fmt: skip
        if loss_scale is not None:
            losses = losses / _scale_value(loss_scale)
    if all_reduce:
        stats = all_reduce_statistics(stats, group=group)
    _, infos = finalize_gradients(stats, params, combiner, loss_scale=loss_scale)
    return _result(losses, params, infos)


def _initialise_scaler(loss_scale: Any, model: torch.nn.Module) -> None:
    """A ``GradScaler`` creates its scale on the first ``scaler.scale(...)``; ``scaler.step`` needs it.

    Here gradand scales the losses itself, so it makes that first call (on the model's device).
    """
    if loss_scale is None or isinstance(loss_scale, (int, float)) or not loss_scale.is_enabled():
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_scale.scale(torch.zeros((), device=device))


def _scale_value(loss_scale: Any) -> float:
    return loss_scale_of(loss_scale) or 1.0


def _environment_losses(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    env_ids: torch.Tensor | None,
    num_envs: int | None,
    loss_scale: Any,
) -> Iterable[torch.Tensor]:
    """A generator of each environment's (scaled) loss, one forward pass each (the streaming method)."""
    n_env, _ = environment_batches(inputs, targets, env_ids, num_envs)
    scale = loss_scale_of(loss_scale)
    if env_ids is None:
        batches = ((inputs[e], targets[e]) for e in range(n_env))
    else:
        ids = env_ids.to(inputs.device).long()
        batches = ((inputs[ids == e], targets[(ids == e).to(targets.device)]) for e in range(n_env))
    for x, y in batches:
        loss = loss_fn(model(x), y)
        yield loss if scale is None else loss * scale


def vmap_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    **options: Any,
) -> tuple[torch.Tensor, list[gradand.MaskInfo]]:
    """Deprecated: ``model_backward(..., method="vectorized")``, returning ``(loss, infos)``.

    Example:
        >>> import warnings, torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(6, 1, 2), torch.randn(6, 1, 1)
        >>> with warnings.catch_warnings(record=True):
        ...     loss, infos = gt.vmap_backward(model, torch.nn.functional.mse_loss, x, y, gradand.Mean())
        >>> loss.shape, len(infos)
        (torch.Size([]), 2)
    """
    deprecated(
        "gt.vmap_backward", 'gt.model_backward(..., method="vectorized") (it returns a gradand.Result)'
    )
    r = model_backward(model, loss_fn, inputs, targets, combiner, method="vectorized", **options)
    return r.loss, r.infos


def factored_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    **options: Any,
) -> tuple[torch.Tensor, list[gradand.MaskInfo]]:
    """Deprecated: ``model_backward(..., method="factored")``, returning ``(loss, infos)``.

    Example:
        >>> import warnings, torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(3, 4, 2), torch.randn(3, 4, 1)
        >>> with warnings.catch_warnings(record=True):
        ...     loss, infos = gt.factored_backward(model, torch.nn.functional.mse_loss, x, y, gradand.Mean())
        >>> loss.shape, len(infos)
        (torch.Size([]), 2)
    """
    deprecated(
        "gt.factored_backward", 'gt.model_backward(..., method="factored") (it returns a gradand.Result)'
    )
    r = model_backward(model, loss_fn, inputs, targets, combiner, method="factored", **options)
    return r.loss, r.infos
