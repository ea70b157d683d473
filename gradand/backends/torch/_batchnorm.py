"""BatchNorm per environment in one forward pass over the whole batch (the factored source).

A ``BatchNorm`` layer in training mode normalises with its batch's statistics, so its
examples interact. ``backward`` (one forward pass per environment) gives every
environment its own batch statistics; the factored source runs one forward pass over
every example, so while it runs each plain ``nn.BatchNorm1d/2d/3d`` computes the same
statistics per environment: per channel, the mean and the biased variance over that
environment's examples (and positions), from segment sums over the environment ids. The
running statistics are then updated as the per-environment forward passes would have
updated them, one environment after the other in environment order.

The layer is also split for the factored engine: ``y = t + β`` with ``t = x̂ ⊙ γ``, so
that ``Δ = ∂L/∂t`` gives ``γ``'s per-environment gradient ``Σ Δ ⊙ x̂`` and ``β``'s
``Σ Δ`` (``Δ`` at ``t`` equals ``Δ`` at ``y``), and an in-place activation on ``y``
(``nn.ReLU(inplace=True)``, as in torchvision's ResNets) leaves ``t`` untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["per_environment_batch_norm", "plain_batch_norms"]

_BN = torch.nn.modules.batchnorm._BatchNorm


def plain_batch_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``nn.BatchNorm1d/2d/3d`` layers of ``model`` with PyTorch's own ``forward``."""
    return [
        m for m in model.modules()
        if isinstance(m, _BN) and type(m).forward is _BN.forward
        and not isinstance(m, torch.nn.SyncBatchNorm)
    ]  # fmt: skip


@contextlib.contextmanager
def per_environment_batch_norm(
    layers: list[torch.nn.Module],
    env: torch.Tensor,
    n_env: int,
    record: Callable[..., None],
) -> Iterator[None]:
    """While active, ``layers`` normalise each environment of the batch with its own statistics.

    Args:
        layers: from :func:`plain_batch_norms`.
        env: ``(B,)`` int64, each example's environment.
        n_env: the number of environments.
        record: called as ``record(layer, x̂, t, x, y)`` for a layer with affine
            parameters (``t = x̂ ⊙ γ``, the tensor whose gradient is ``Δ``; ``x`` the
            layer's input, ``y = t + β`` its output).
    """
    counts = torch.bincount(env, minlength=n_env)
    originals = {}
    for m in layers:
        originals[m] = m.__dict__.get("forward")
        m.forward = _forward(m, env, counts, n_env, record)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for m, f in originals.items():
            if f is None:
                del m.forward
            else:
                m.forward = f


def _forward(m, env, counts, n_env, record):
    batch = env.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[0] != batch:
            raise ValueError(
                f"{type(m).__name__} got input of shape {tuple(x.shape)}; the factored path needs "
                f"the batch's {batch} examples on axis 0 to give each environment its own batch "
                f"statistics"
            )
        m._check_input_dim(x)
        dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as PyTorch's kernels
            x = x.float()
        view = (1, -1) + (1,) * (x.ndim - 2)
        batch_stats = m.training or m.running_mean is None
        if batch_stats:
            per_channel = counts * (x[0, 0].numel())  # values per channel and environment
            if bool((per_channel == 1).any()):
                raise ValueError(
                    f"{type(m).__name__}: an environment has 1 value per channel (input shape "
                    f"{tuple(x.shape)}); batch statistics need more than 1 value per channel in "
                    f"each environment (as in the one-forward-pass-per-environment path)"
                )
            xhat, mean, var = _Normalize.apply(x, env, n_env, per_channel.to(x.dtype)[:, None], m.eps)
            if m.training and m.running_mean is not None:
                _update_running(m, mean, var, per_channel)
        else:  # running statistics (eval mode)
            xhat = (x - m.running_mean.reshape(view)) * torch.rsqrt(m.running_var.reshape(view) + m.eps)
        if m.weight is None:
            return xhat.to(dtype)
        t = xhat * m.weight.reshape(view)
        y = (t + m.bias.reshape(view)).to(dtype)
        record(m, xhat, t, x, y)
        return y

    return forward


def _segment_sums(t: torch.Tensor, env: torch.Tensor, n_env: int) -> torch.Tensor:
    """``(B, C, *S) -> (E, C)``: the sums over each environment's examples and positions."""
    per_example = t.sum(tuple(range(2, t.ndim))) if t.ndim > 2 else t
    return per_example.new_zeros(n_env, t.shape[1]).index_add_(0, env, per_example)


def _by_example(t: torch.Tensor, env: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(E, C) -> (B, C, 1, ...)``: each example's environment's row, broadcastable to the input."""
    rows = t[env]
    return rows.reshape(*rows.shape, *(1,) * (ndim - 2))


class _Normalize(torch.autograd.Function):
    """``x̂``: ``x`` normalised by its environment's per-channel mean and biased variance.

    Forward and backward in a few full passes (the autograd graph of the same arithmetic
    takes three times as many): with ``g = ∂L/∂x̂`` and ``N`` values per channel and
    environment, ``∂L/∂x = rstd · (g - mean_N(g) - x̂ · mean_N(g ⊙ x̂))``, BatchNorm's own
    backward per environment.
    """

    @staticmethod
    def forward(ctx, x, env, n_env, n, eps):  # type: ignore[override]
        mean = _segment_sums(x, env, n_env) / n
        xhat = x - _by_example(mean, env, x.ndim)
        var = _segment_sums(xhat * xhat, env, n_env) / n
        rstd = torch.rsqrt(var + eps)
        xhat.mul_(_by_example(rstd, env, x.ndim))
        ctx.save_for_backward(xhat, rstd, env, n)
        ctx.n_env = n_env
        ctx.mark_non_differentiable(mean, var)
        return xhat, mean, var

    @staticmethod
    def backward(ctx, g, _mean, _var):  # type: ignore[override]
        xhat, rstd, env, n = ctx.saved_tensors
        g_mean = _by_example(_segment_sums(g, env, ctx.n_env) / n, env, g.ndim)
        gx_mean = _by_example(_segment_sums(g * xhat, env, ctx.n_env) / n, env, g.ndim)
        dx = torch.addcmul(g, xhat, gx_mean, value=-1.0).sub_(g_mean)
        return dx.mul_(_by_example(rstd, env, g.ndim)), None, None, None, None


@torch.no_grad()
def _update_running(m, mean: torch.Tensor, var: torch.Tensor, per_channel: torch.Tensor) -> None:
    """Each environment's update of the running statistics, in environment order."""
    n = per_channel.to(var.dtype)
    unbiased = var * (n / (n - 1))[:, None]
    n_env = mean.shape[0]
    if m.momentum is None:  # a cumulative average: the factor depends on the count
        for e in range(n_env):
            m.num_batches_tracked.add_(1)
            f = 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - f).add_(mean[e].to(m.running_mean.dtype), alpha=f)
            m.running_var.mul_(1 - f).add_(unbiased[e].to(m.running_var.dtype), alpha=f)
        return
    m.num_batches_tracked.add_(n_env)
    f = float(m.momentum)
    # r_E = (1-f)^E r_0 + Σ_e f (1-f)^(E-1-e) s_e
    powers = torch.arange(n_env - 1, -1, -1, dtype=mean.dtype, device=mean.device)
    weights = f * (1 - f) ** powers
    keep = (1 - f) ** n_env
    m.running_mean.mul_(keep).add_((weights @ mean).to(m.running_mean.dtype))
    m.running_var.mul_(keep).add_((weights @ unbiased).to(m.running_var.dtype))
