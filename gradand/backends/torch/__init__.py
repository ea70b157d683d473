"""PyTorch backend: AND-masked training in an ordinary PyTorch loop.

Two or three lines change in the loop you already have::

    losses = torch.stack([loss_fn(model(x[e]), y[e]) for e in range(n_envs)])
    gt.backward(losses, model.parameters(), gradand.AndMask(threshold=1.0))  # instead of loss.backward()
    optimizer.step()

or, from a model and a batch, ``gt.model_backward(model, loss_fn, inputs, targets, combiner)``.
Both write the update into ``.grad`` and return a :class:`gradand.Result`.

Three public layers, which the entry points compose:

- sources, ``(losses, stats)`` with one :class:`gradand.Statistics` per
  parameter: :func:`streaming_statistics` (one autograd pass per
  environment), :func:`vectorized_statistics` (``torch.func.vmap``),
  :func:`factored_statistics` (one forward and backward pass; ``nn.Linear``/
  ``nn.Conv2d`` layers through the core's :func:`gradand.layer_statistics`);
- :func:`all_reduce_statistics`: the statistics summed over the ranks of a
  process group (and the DDP hook :func:`comm_hook`, :func:`register_comm_hook`);
- the sink :func:`finalize_gradients`: the update added into ``.grad``,
  ``(grads, infos)``.

Also :class:`TemporalAndMaskAdam` (paper Algorithm 1), and
:func:`environment_losses`/:func:`environment_hessians` for
:mod:`gradand.consistency`.

Mixed precision: statistics are summed in float32 for float16/bfloat16
gradients and the update comes back in the parameter's dtype. With a
``torch.amp.GradScaler``, pass ``loss_scale=scaler`` (and, to
:func:`backward`, the scaled losses): gradients are unscaled before they are
combined and ``scaler.step`` works as usual.

``torch.compile``: the combine step (the core's ``statistics``/``finalize``/
``combine`` on torch tensors) compiles with ``fullgraph=True`` when
``nan_policy`` is ``"zero"`` or ``"propagate"``; the entry points work under
``torch.compile`` with graph breaks.

Example:
    >>> import torch, gradand
    >>> from gradand.backends import torch as gt
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(4, 8, 3), torch.randn(4, 8, 1)  # 4 environments of 8 examples
    >>> losses = torch.stack([torch.nn.functional.mse_loss(model(x[e]), y[e]) for e in range(4)])
    >>> r = gt.backward(losses, model.parameters(), gradand.AndMask(threshold=1.0))
    >>> model.weight.grad.shape, len(r.infos), r.losses.shape
    (torch.Size([1, 3]), 2, torch.Size([4]))
"""

from gradand.backends.torch._consistency import environment_hessians, environment_losses
from gradand.backends.torch._distributed import (
    CommHookState,
    all_reduce_statistics,
    comm_hook,
    register_comm_hook,
)
from gradand.backends.torch._entry import backward, factored_backward, model_backward, vmap_backward
from gradand.backends.torch._factored import FACTORED_LAYERS, factored_statistics
from gradand.backends.torch._optim import TemporalAndMaskAdam
from gradand.backends.torch._sink import finalize_gradients
from gradand.backends.torch._streaming import streaming_statistics
from gradand.backends.torch._vectorized import environment_groups, vectorized_statistics

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
    "factored_statistics",
    "finalize_gradients",
    "model_backward",
    "register_comm_hook",
    "streaming_statistics",
    "vectorized_statistics",
    "vmap_backward",
]
