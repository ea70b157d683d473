"""PyTorch backend: AND-masked training in an ordinary PyTorch loop.

Two or three lines change in the loop you already have::

    losses = torch.stack([loss_fn(model(x[e]), y[e]) for e in range(n_envs)])
    gt.backward(losses, model.parameters(), gradand.AndMask(threshold=1.0))  # instead of loss.backward()
    optimizer.step()

- :func:`backward` (streaming): one autograd pass per environment, folded into
  the core's running statistics; extra memory independent of the number of
  environments.
- :func:`vmap_backward` (vectorised): per-environment gradients in one
  ``torch.func.vmap`` pass, chunkable; environments on a leading axis or an
  environment index per example; every example its own environment.
- :func:`factored_backward` (factored): one forward and one backward pass over
  every example; per-environment gradients of ``nn.Linear``/``nn.Conv2d``
  layers as ``Δ_eᵀ X_e`` from the gradients at the layers' outputs (with one
  example per environment, no per-example gradient array); close to the cost
  of an ordinary step. Other parameters fall back to a batched backward pass.
- :class:`TemporalAndMaskAdam`: the temporal AND-mask (paper Algorithm 1) as a
  ``torch.optim.Optimizer``.
- :func:`all_reduce_statistics`, :func:`comm_hook`, :func:`register_comm_hook`:
  distributed training, summing statistics over ranks instead of averaging
  gradients.
- :func:`environment_losses`, :func:`environment_hessians`: flat-vector losses
  and Hessians for :mod:`gradand.consistency`.

Everything here converts gradients to the core's arrays and back; the math of
every combiner lives in :mod:`gradand` once.

Mixed precision: statistics are summed in float32 for float16/bfloat16
gradients and the update comes back in the parameter's dtype. With a
``torch.amp.GradScaler``, pass ``grad_scaler=scaler`` (and the scaled losses):
gradients are unscaled before they are combined (``SandMask`` and
``GeometricMean`` are not scale-equivariant) and ``scaler.step`` works as usual.

``torch.compile``: the combine step (the core's ``statistics``/``finalize``/
``combine`` on torch tensors, e.g. after ``torch.func.vmap(torch.func.grad(...))``)
compiles with ``fullgraph=True`` when ``nan_policy`` is ``"zero"`` or
``"propagate"`` (``"raise"`` reads values on the host: a graph break); pass
``xp=gradand.array_namespace(torch.empty(0))`` to skip the namespace lookup.
``torch.compile(vmap_backward)`` and :func:`backward` work with graph breaks
(Python loops over environments, writes to ``.grad``).

Example:
    >>> import torch, gradand
    >>> from gradand.backends import torch as gt
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(4, 8, 3), torch.randn(4, 8, 1)  # 4 environments of 8 examples
    >>> losses = torch.stack([torch.nn.functional.mse_loss(model(x[e]), y[e]) for e in range(4)])
    >>> infos = gt.backward(losses, model.parameters(), gradand.AndMask(threshold=1.0))
    >>> model.weight.grad.shape, len(infos)
    (torch.Size([1, 3]), 2)
"""

from gradand.backends.torch._consistency import environment_hessians, environment_losses
from gradand.backends.torch._distributed import (
    CommHookState,
    all_reduce_statistics,
    comm_hook,
    register_comm_hook,
)
from gradand.backends.torch._factored import FACTORED_LAYERS, factored_backward
from gradand.backends.torch._optim import TemporalAndMaskAdam
from gradand.backends.torch._streaming import backward
from gradand.backends.torch._vectorized import environment_groups, vmap_backward

__all__ = [
    "FACTORED_LAYERS",
    "CommHookState",
    "TemporalAndMaskAdam",
    "all_reduce_statistics",
    "backward",
    "comm_hook",
    "environment_groups",
    "environment_hessians",
    "environment_losses",
    "factored_backward",
    "register_comm_hook",
    "vmap_backward",
]
