"""Flat-vector per-environment losses and Hessians of a model, for :mod:`gradand.consistency`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jacrev

from gradand.backends.torch._vectorized import LossFn, environment_groups

__all__ = ["environment_hessians", "environment_losses"]


def _subset(model: torch.nn.Module, params: Sequence[str] | None) -> list[tuple[str, torch.Tensor]]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ValueError(
                "model has no parameter that requires grad; name the parameters with params=[...]"
            )
        return chosen
    if isinstance(params, str):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: name at least one parameter (e.g. ['0.weight'])")
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(f"params names {unknown} that are not parameters of the model; it has {list(named)}")
    return [(n, named[n]) for n in params]


def _environments(inputs: Any, targets: Any, env_ids: Any, num_envs: int | None) -> list[tuple[Any, Any]]:
    if env_ids is None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs has {inputs.shape[0]} environments (shape {tuple(inputs.shape)}) but targets has "
                f"{targets.shape[0]} (shape {tuple(targets.shape)})"
            )
        return [(inputs[e], targets[e]) for e in range(inputs.shape[0])]
    environment_groups(env_ids, num_envs, n_examples=inputs.shape[0])  # validates
    n = int(env_ids.max()) + 1 if num_envs is None else num_envs
    return [(inputs[env_ids == e], targets[env_ids == e]) for e in range(n)]


class _Flat:
    """Maps a flat parameter vector to the named tensors of a parameter subset."""

    def __init__(self, model: torch.nn.Module, params: Sequence[str] | None) -> None:
        chosen = _subset(model, params)
        self.names = [n for n, _ in chosen]
        self.shapes = [tuple(p.shape) for _, p in chosen]
        self.sizes = [math.prod(s) for s in self.shapes]
        first = chosen[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.model = model
        chosen_names = set(self.names)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen_names}
        self.fixed.update(dict(model.named_buffers()))
        self.theta = torch.cat([p.detach().reshape(-1).to(self.dtype) for _, p in chosen])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.sizes)
        return {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def loss(self, theta: torch.Tensor, loss_fn: LossFn, x: Any, y: Any) -> torch.Tensor:
        out = functional_call(self.model, (self.unflatten(theta), self.fixed), (x,))
        loss = loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar tensor; got {getattr(loss, 'shape', type(loss))}")
        return loss


def environment_losses(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Sequence[str] | None = None,
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
) -> tuple[list[Callable[[np.ndarray], float]], np.ndarray]:
    """Per-environment losses as functions of a flat parameter vector, and the current vector.

    What :func:`gradand.consistency.empirical_inconsistency` takes: each
    callable maps a 1-D numpy vector θ (the chosen parameters, flattened in
    order) to that environment's loss, with every other parameter and buffer
    fixed at its current value; the model itself is not modified.

    Args:
        model: the module (use ``model.eval()`` for dropout/BatchNorm).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inputs: ``(E, n, ...)``, or ``(N, ...)`` with ``env_ids``.
        targets: ``(E, n, ...)``, or ``(N, ...)`` with ``env_ids``.
        params: names of the parameters to vary (``model.named_parameters()``
            names); ``None``: every parameter that requires grad.
        env_ids: optional ``(N,)`` environment index per example.
        num_envs: number of environments with ``env_ids``.

    Returns:
        ``(losses, theta_star)``: one callable per environment, and the
        current parameters as a float64 numpy vector.

    Example:
        >>> import torch
        >>> from gradand.backends import torch as gt
        >>> from gradand.consistency import empirical_inconsistency
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 environments, 1 example each
        >>> y = model(x).detach()  # theta* is a zero-loss minimum of both
        >>> losses, theta = gt.environment_losses(model, torch.nn.functional.mse_loss, x, y)
        >>> losses[0](theta), theta.shape
        (0.0, (2,))
    """
    flat = _Flat(model, params)
    envs = _environments(inputs, targets, env_ids, num_envs)

    def make(x: Any, y: Any) -> Callable[[np.ndarray], float]:
        def loss(theta: np.ndarray) -> float:
            t = torch.as_tensor(np.asarray(theta), device=flat.device).to(flat.dtype)
            if t.shape != flat.theta.shape:
                raise ValueError(f"theta must have shape {tuple(flat.theta.shape)}; got {tuple(t.shape)}")
            with torch.no_grad():
                return float(flat.loss(t, loss_fn, x, y))

        return loss

    theta_star = flat.theta.detach().to("cpu", torch.float64).numpy()
    return [make(x, y) for x, y in envs], theta_star


def environment_hessians(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    params: Sequence[str] | None = None,
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
) -> np.ndarray:
    """Each environment's Hessian with respect to a subset of the parameters, ``(E, P, P)``.

    Computed with ``torch.func.jacrev(jacrev(...))`` (reverse over reverse) of the loss as a function of the
    chosen parameters flattened in order (P numbers; memory and time grow as
    P², so choose a small subset, e.g. the last layer), in the parameters'
    dtype (use ``model.double()`` for accuracy), returned as float64 numpy,
    symmetrised ``(H + Hᵀ)/2`` so that :func:`gradand.consistency.inconsistency`
    accepts it.

    Args:
        model, loss_fn, inputs, targets, params, env_ids, num_envs: as in
            :func:`environment_losses`.

    Returns:
        float64 array ``(E, P, P)``.

    Example:
        >>> import torch
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)
        >>> h = gt.environment_hessians(model, torch.nn.functional.mse_loss, x, model(x).detach())
        >>> h[0].tolist(), h[1].tolist()  # 2 x xᵀ for the MSE of one example
        ([[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 8.0]])
    """
    flat = _Flat(model, params)
    envs = _environments(inputs, targets, env_ids, num_envs)
    out = []
    for x, y in envs:
        h = jacrev(jacrev(lambda t, x=x, y=y: flat.loss(t, loss_fn, x, y)))(flat.theta)
        h = h.detach().to("cpu", torch.float64).numpy()
        out.append(0.5 * (h + h.T))
    return np.stack(out)
