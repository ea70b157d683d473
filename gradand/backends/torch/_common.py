"""Shared helpers of the PyTorch backend: validation, the torch namespace, writing ``.grad``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import array_api_compat
import torch

import gradand
from gradand._namespace import check_nan_policy

#: The core's array namespace for torch tensors, passed as ``xp=`` so that the
#: core does not look it up per call (cheaper, and nothing for ``torch.compile``
#: to trace through).
XP: Any = array_api_compat.array_namespace(torch.empty(0))


def check_combiner(combiner: Any) -> None:
    if not isinstance(combiner, gradand.Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (gradand.Mean(), gradand.AndMask(...), ...); "
            f"got {type(combiner).__name__}"
        )


def check_policy(nan_policy: str) -> None:
    check_nan_policy(nan_policy)


def as_param_list(params: Iterable[torch.Tensor] | torch.Tensor, name: str = "params") -> list[torch.Tensor]:
    """``params`` as a list of distinct floating tensors that require grad."""
    if isinstance(params, torch.Tensor):
        params = [params]
    try:
        out = list(params)
    except TypeError:
        raise TypeError(
            f"{name} must be an iterable of tensors (e.g. model.parameters()); got {type(params).__name__}"
        ) from None
    if not out:
        raise ValueError(f"{name} is empty: pass the tensors to differentiate, e.g. model.parameters()")
    seen: set[int] = set()
    for i, p in enumerate(out):
        if isinstance(p, dict):
            raise TypeError(
                f"{name}[{i}] is a dict (an optimizer parameter group?); pass the tensors themselves, "
                f"e.g. model.parameters() or group['params']"
            )
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor; got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(
                f"{name}[{i}] (shape {tuple(p.shape)}) has dtype {p.dtype}; need a floating dtype"
            )
        if not p.requires_grad:
            raise ValueError(
                f"{name}[{i}] (shape {tuple(p.shape)}) does not require grad; pass only trainable "
                f"tensors, e.g. [p for p in model.parameters() if p.requires_grad]"
            )
        if id(p) in seen:
            raise ValueError(f"{name}[{i}] (shape {tuple(p.shape)}) appears twice in {name}")
        seen.add(id(p))
    return out


def as_loss_list(losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """One scalar loss tensor per environment, validated."""
    if isinstance(losses, torch.Tensor):
        if losses.ndim != 1:
            raise ValueError(
                f"losses must be a 1-D tensor (one loss per environment) or a sequence of scalar "
                f"tensors; got a tensor of shape {tuple(losses.shape)}"
                + (
                    " (a single scalar: wrap it in a list, or use loss.backward())"
                    if losses.ndim == 0
                    else ""
                )
            )
        out = list(losses.unbind(0))
    else:
        try:
            out = list(losses)
        except TypeError:
            raise TypeError(
                f"losses must be a 1-D tensor or a sequence of scalar tensors; got {type(losses).__name__}"
            ) from None
    if not out:
        raise ValueError("losses is empty: need at least one environment's loss")
    for e, loss in enumerate(out):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"losses[{e}] must be a torch.Tensor (one environment's loss); got {type(loss).__name__}"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"losses[{e}] has shape {tuple(loss.shape)}; each environment's loss must be a scalar "
                f"(reduce it, e.g. with .mean())"
            )
        if not loss.is_floating_point():
            raise TypeError(f"losses[{e}] has dtype {loss.dtype}; a loss must be floating point")
        if not loss.requires_grad:
            raise ValueError(
                f"losses[{e}] does not require grad: it was computed without autograd (torch.no_grad(), "
                f".detach()) or from no parameter that requires grad"
            )
    return [loss.reshape(()) for loss in out]


def grad_scale(grad_scaler: Any) -> float | None:
    """The scale of a ``torch.amp.GradScaler`` (``None`` when absent or disabled)."""
    if grad_scaler is None:
        return None
    if not hasattr(grad_scaler, "get_scale") or not hasattr(grad_scaler, "is_enabled"):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler; got {type(grad_scaler).__name__}")
    if not grad_scaler.is_enabled():
        return None
    return float(grad_scaler.get_scale())


def unscale(g: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Undo a loss scale in at least float32 (a half-precision division would underflow)."""
    if scale is None:
        return g
    acc = torch.float32 if torch.finfo(g.dtype).bits < 32 else g.dtype
    return g.to(acc) / scale


def poison_if_nonfinite(update: torch.Tensor, stats: gradand.Statistics) -> torch.Tensor:
    """NaN everywhere when a statistic is non-finite, so that a GradScaler skips the step."""
    arrays = list(stats.arrays().values())
    bad = torch.stack([~torch.isfinite(a).all() for a in arrays]).any()
    return torch.where(bad, torch.full_like(update, float("nan")), update)


def accumulate_grad(param: torch.Tensor, update: torch.Tensor) -> None:
    """Add ``update`` into ``param.grad`` (or set it), like ``loss.backward()`` does."""
    update = update.detach().to(dtype=param.dtype, device=param.device)
    if param.grad is None:
        param.grad = update.reshape(param.shape).contiguous()
    else:
        param.grad.add_(update.reshape(param.shape))


def detach_info(info: gradand.MaskInfo) -> gradand.MaskInfo:
    return gradand.MaskInfo(info.survivor_fraction.detach(), info.agreement.detach())


def finalize_into_grads(
    params: Sequence[torch.Tensor],
    stats: Sequence[gradand.Statistics],
    combiner: gradand.Combiner,
    scale: float | None,
    write: Sequence[bool] | None = None,
) -> list[gradand.MaskInfo]:
    """The core's :func:`gradand.finalize_many` of every parameter's statistics, added into ``.grad``.

    With a loss ``scale`` (GradScaler) the update is rescaled and poisoned with
    NaN where a statistic is not finite (so the scaler skips the step);
    ``write[i] = False`` computes parameter ``i``'s info without touching its
    ``.grad``. Returns one detached :class:`gradand.MaskInfo` per parameter.
    """
    updates, infos = gradand.finalize_many(stats, combiner, return_info=True, xp=XP)
    for i, (p, s, update) in enumerate(zip(params, stats, updates)):
        if scale is not None:
            update = poison_if_nonfinite(update * scale, s)
        if write is None or write[i]:
            accumulate_grad(p, update)
    return [detach_info(info) for info in infos]


def with_context(err: Exception, context: str) -> Exception:
    """The same exception type with ``context`` prepended to its message."""
    return type(err)(f"{context}: {err}")
