"""The temporal AND-mask (paper Algorithm 1) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradand.backends.torch._common import XP
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step

__all__ = ["TemporalAndMaskAdam"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "sign_avg")


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 moments for half-precision parameters, the parameter's dtype otherwise."""
    return torch.float32 if torch.finfo(p.dtype).bits < 32 else p.dtype


class TemporalAndMaskAdam(torch.optim.Optimizer):
    """Adam that masks the components whose gradient sign has not been consistent over steps.

    Paper Algorithm 1 (used for CoinRun): besides Adam's moving averages of
    ``g`` and ``g²`` it keeps a moving average of ``sign(g)`` over steps
    (rate ``beta3``) and applies only the components with
    ``|bias-corrected sign average| >= threshold``. It needs no
    per-environment gradients: call ``loss.backward()`` as usual. The math is
    :func:`gradand.temporal.temporal_and_mask_step`, called per parameter.

    State is kept in float32 for float16/bfloat16 parameters (the update is
    cast to the parameter's dtype) and survives ``state_dict()`` /
    ``load_state_dict()`` unchanged (PyTorch would otherwise cast it to the
    parameter's dtype on load).

    Args:
        params: parameters or parameter groups, as for any optimizer.
        lr: learning rate.
        betas: Adam's ``(beta1, beta2)``.
        beta3: rate of the moving average of ``sign(g)``.
        threshold: τ in [0, 1]; components with ``|ŝ| < τ`` are not updated.
        eps: Adam's epsilon.
        weight_decay: L2 coefficient.
        weight_decay_order: ``"after"`` (decay added after the mask, not
            masked; the reference code's advice) or ``"before"`` (added to
            the gradient, masked with it).

    Example:
        >>> import torch
        >>> from gradand.backends import torch as gt
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = gt.TemporalAndMaskAdam([w], lr=0.1, threshold=1.0)
        >>> (w * torch.tensor([1.0, -2.0])).sum().backward()
        >>> opt.step()
        >>> w.detach()  # first step: every sign is consistent, Adam moves each by lr
        tensor([ 0.9000, -0.9000])
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.9,
        threshold: float = 0.5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        weight_decay_order: str = "after",
    ) -> None:
        betas = tuple(betas) if isinstance(betas, list) else betas
        check_temporal_hparams(
            lr=lr,
            betas=betas,
            beta3=beta3,
            threshold=threshold,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_order=weight_decay_order,
        )
        defaults = dict(
            lr=lr,
            betas=betas,
            beta3=beta3,
            threshold=threshold,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_order=weight_decay_order,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating its hyperparameters first."""
        g = {**self.defaults, **param_group}
        check_temporal_hparams(
            lr=g["lr"],
            betas=tuple(g["betas"]),
            beta3=g["beta3"],
            threshold=g["threshold"],
            eps=g["eps"],
            weight_decay=g["weight_decay"],
            weight_decay_order=g["weight_decay_order"],
        )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step (``closure`` re-evaluates the loss, as in ``torch.optim``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"TemporalAndMaskAdam does not support sparse gradients (param_groups parameter {i}, "
                        f"shape {tuple(p.shape)})"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in _STATE_KEYS:
                        state[key] = torch.zeros_like(
                            p, dtype=_state_dtype(p), memory_format=torch.preserve_format
                        )
                state["step"] += 1
                out = temporal_and_mask_step(
                    p.grad,
                    p,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["sign_avg"],
                    state["step"],
                    betas=tuple(group["betas"]),
                    beta3=group["beta3"],
                    threshold=group["threshold"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    weight_decay_order=group["weight_decay_order"],
                    xp=XP,
                )
                state["exp_avg"].copy_(out.exp_avg)
                state["exp_avg_sq"].copy_(out.exp_avg_sq)
                state["sign_avg"].copy_(out.sign_avg)
                if p.dtype == out.direction.dtype:
                    p.add_(out.direction, alpha=-group["lr"])
                else:  # half-precision parameter: update in float32, round once
                    p.copy_(p.to(out.direction.dtype) - group["lr"] * out.direction)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, keeping float32 moments for half-precision parameters."""
        saved = state_dict["state"]
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            for key in _STATE_KEYS:
                if key in saved[pid]:
                    value = saved[pid][key]
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)
