"""The temporal AND-mask (paper Algorithm 1) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from gradand.backends.torch._common import XP
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step

__all__ = ["TemporalAndMaskAdam"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "sign_avg")


_HPARAM_KEYS = ("lr", "betas", "beta3", "threshold", "eps", "weight_decay", "weight_decay_order")


def _check_group(index: int, group: dict[str, Any]) -> dict[str, Any]:
    """The core's check of one param group, the error naming the group."""
    missing = [k for k in _HPARAM_KEYS if k not in group]
    if missing:
        raise ValueError(
            f"param_groups[{index}] has no {missing}; TemporalAndMaskAdam needs {list(_HPARAM_KEYS)}"
        )
    try:
        return check_temporal_hparams(**{k: group[k] for k in _HPARAM_KEYS})
    except (TypeError, ValueError) as error:
        raise type(error)(f"param_groups[{index}]: {error}") from None


def _snapshot(group: dict[str, Any]) -> tuple[Any, ...]:
    """The group's hyperparameters as they are now (``betas`` copied: a list can change in place)."""
    betas = group.get("betas")
    return tuple(
        (tuple(betas) if isinstance(betas, (tuple, list)) else betas) if k == "betas" else group.get(k)
        for k in _HPARAM_KEYS
    )


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` hold the same hyperparameter values (NaN never does: it is checked again)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float, str, np.generic)):
        return bool(a == b)
    return a is b


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

    Hyperparameters are validated with
    :func:`gradand.temporal.check_temporal_hparams` on construction, in
    ``add_param_group`` and again at every ``step()`` for a group whose values
    changed since the last step (set by hand or by a learning-rate
    scheduler); the error names the group, e.g. ``param_groups[1]: threshold
    must be in [0, 1] ...``. (``torch.optim.Adam`` checks only its
    constructor's arguments.) They are Python or NumPy numbers (stored as
    Python floats); ``bool`` and tensors are refused (``torch.optim.Adam``
    takes tensor ``lr``/``betas`` for capturable and fused steps, which this
    optimizer does not have), and ``eps`` must be > 0 (Adam allows 0).

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
        defaults = check_temporal_hparams(
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
        """Add a parameter group, validating its hyperparameters first (stored as Python floats)."""
        if isinstance(param_group, dict):  # anything else: torch's own TypeError
            hp = _check_group(len(self.param_groups), {**self.defaults, **param_group})
            param_group.update({k: hp[k] for k in _HPARAM_KEYS if k in param_group})
        super().add_param_group(param_group)

    def _group_hparams(self, index: int, group: dict[str, Any]) -> dict[str, Any]:
        """The group's validated hyperparameters; validated again only when one of them changed."""
        cache = self.__dict__.setdefault("_hparam_cache", {})
        key = _snapshot(group)
        hit = cache.get(index)
        if hit is not None and _same(hit[0], key):
            return hit[1]
        hp = _check_group(index, group)
        cache[index] = (key, hp)
        return hp

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step (``closure`` re-evaluates the loss, as in ``torch.optim``).

        Each group's hyperparameters are validated again when they changed
        since the last step (``param_groups[i]["threshold"] = 5`` raises a
        ``ValueError`` naming the group and the hyperparameter, before any
        parameter moves).
        """
        hparams = [self._group_hparams(i, g) for i, g in enumerate(self.param_groups)]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, (group, hp) in enumerate(zip(self.param_groups, hparams)):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"TemporalAndMaskAdam does not support sparse gradients (param_groups[{gi}] "
                        f"parameter {i}, shape {tuple(p.shape)})"
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
                    betas=hp["betas"],
                    beta3=hp["beta3"],
                    threshold=hp["threshold"],
                    eps=hp["eps"],
                    weight_decay=hp["weight_decay"],
                    weight_decay_order=hp["weight_decay_order"],
                    xp=XP,
                )
                state["exp_avg"].copy_(out.exp_avg)
                state["exp_avg_sq"].copy_(out.exp_avg_sq)
                state["sign_avg"].copy_(out.sign_avg)
                if p.dtype == out.direction.dtype:
                    p.add_(out.direction, alpha=-hp["lr"])
                else:  # half-precision parameter: update in float32, round once
                    p.copy_(p.to(out.direction.dtype) - hp["lr"] * out.direction)
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
