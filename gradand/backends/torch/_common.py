"""Shared helpers of the PyTorch backend: validation, the torch namespace, writing ``.grad``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import array_api_compat
import torch

import gradand
from gradand._namespace import HookedNamespace, check_nan_policy

#: The core's array namespace for torch tensors, passed as ``xp=`` so that the
#: core does not look it up per call (cheaper, and nothing for ``torch.compile``
#: to trace through).
_COMPAT: Any = array_api_compat.array_namespace(torch.empty(0))


class _TorchNamespace(HookedNamespace):
    """array-api-compat's torch namespace, plus the core's hook for sign votes.

    ``gradand_vote_signs`` is ``torch.sign``: one pass, and it maps NaN to 0 (no vote), which is
    what the core's votes need — the NaN-preserving array-API ``sign`` takes several passes.
    """

    gradand_vote_signs = staticmethod(torch.sign)

    @staticmethod
    def gradand_add_into(acc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return acc.add_(v)

    @staticmethod
    def gradand_sign_into(g: torch.Tensor) -> torch.Tensor:
        return g.sign_()  # NaN becomes 0: no vote

    @staticmethod
    def gradand_select(mask: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``where(mask, d, d - d)`` as ``d · mask + 0``: the same bits but for a kept ``-0.0``
        (``+0.0``). ``torch.where`` on CPU branches per element: 430 us for 134k float32
        entries with a random mask, this 30 us."""
        return (direction * mask.view(torch.uint8)).add_(0.0)

    @staticmethod
    def gradand_sign_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``sign(a) @ sign(b)`` as exact int32 votes (NaN casts none), for the outer-product path.

        On CPU an int8 product with int32 sums (``torch._int_mm``: 6x faster than the float32
        product of 256 x 128 x 256 signs here); elsewhere the float product, exact below 2**24 rows.
        """
        sa, sb = torch.sign(a), torch.sign(b)
        if a.device.type == "cpu" and hasattr(torch, "_int_mm"):
            try:
                return torch._int_mm(sa.to(torch.int8), sb.to(torch.int8))
            except RuntimeError:  # a build or shape without the integer kernel
                pass
        return (sa @ sb).to(torch.int32)


XP: Any = _TorchNamespace(_COMPAT)


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


def loss_scale_of(loss_scale: Any, name: str = "loss_scale") -> float | None:
    """The scale the losses carry: a number, or a ``torch.amp.GradScaler``'s (``None``: unscaled)."""
    if loss_scale is None:
        return None
    if isinstance(loss_scale, bool):
        raise TypeError(f"{name} must be a number or a torch.amp.GradScaler; got {loss_scale!r}")
    if isinstance(loss_scale, (int, float)):
        value = float(loss_scale)
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"{name} must be a finite number > 0; got {loss_scale!r}")
        return value
    if not hasattr(loss_scale, "get_scale") or not hasattr(loss_scale, "is_enabled"):
        raise TypeError(f"{name} must be a number or a torch.amp.GradScaler; got {type(loss_scale).__name__}")
    if not loss_scale.is_enabled():
        return None
    return float(loss_scale.get_scale())


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """``DeprecationWarning`` for an old name, pointing at the user's line (``stacklevel`` frames up)."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def pick_loss_scale(loss_scale: Any, grad_scaler: Any, stacklevel: int = 4) -> Any:
    """``loss_scale=``, or the deprecated ``grad_scaler=`` (with a warning)."""
    if grad_scaler is None:
        return loss_scale
    deprecated("grad_scaler=", "loss_scale= (a number or a torch.amp.GradScaler)", stacklevel)
    if loss_scale is not None:
        raise TypeError("pass loss_scale= only (grad_scaler= is its deprecated name)")
    return grad_scaler


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")


def check_model(model: Any, loss_fn: Any, inputs: Any, targets: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable (outputs, targets) -> scalar; got {type(loss_fn).__name__}"
        )
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of the model's parameters that require grad, in ``parameters()`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    return named


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


def accumulate_grad(param: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Add ``update`` into ``param.grad`` (or set it), like ``loss.backward()`` does; returns it as added."""
    update = update.detach().to(dtype=param.dtype, device=param.device).reshape(param.shape)
    if param.grad is None:
        param.grad = update.contiguous()
    else:
        param.grad.add_(update)
    return update


def detach_info(info: gradand.MaskInfo) -> gradand.MaskInfo:
    return gradand.MaskInfo(info.survivor_fraction.detach(), info.agreement.detach())


def with_context(err: Exception, context: str) -> Exception:
    """The same exception type with ``context`` prepended to its message."""
    return type(err)(f"{context}: {err}")
