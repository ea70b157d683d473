"""gradand for JAX: AND-masked gradients as transforms, optax transformations, and across devices.

The one line is :func:`value_and_grad` — ``jax.value_and_grad`` for a loss of
*one* environment, evaluated over a batch stacked on an environment axis (or
with ``env_ids``, environments of any sizes), returning
``((loss, gradand.Result), grads)``. It composes three public layers:

- sources, ``(loss_fn, combiner, params, batch, ...) -> (losses, stats)``:
  :func:`vectorized_statistics` (``vmap`` of ``grad``; ``chunk_size`` folds
  environments through ``lax.scan``), :func:`streaming_statistics` (one
  environment at a time) and :func:`factored_statistics` (dense and
  convolutional layers — every ``flax.linen.Dense`` and ``flax.linen.Conv``,
  and :func:`dense` / :func:`conv` in hand-written models — handed to the
  core's factored engine :func:`gradand.layer_statistics`;
  :data:`FACTORED_LAYERS`);
- :func:`all_reduce_statistics` — ``lax.psum`` inside ``shard_map``/``pmap``;
- the sink :func:`finalize_gradients` — ``(grads, infos)``.

Besides: :func:`reduce_environments` (an optax transformation combining
per-environment updates), :func:`temporal_and_mask` (the paper's Algorithm 1
as an optax optimizer), :func:`statistics` / :func:`finalize` / :func:`combine`
(the core's verbs on pytrees of stacked gradients) and
:func:`environment_losses` / :func:`environment_hessians` for
:mod:`gradand.consistency`.

The math is the core's (:mod:`gradand`); importing this module registers
:class:`gradand.Statistics` as a pytree. Statistics are float32 for
float16/bfloat16 gradients; updates come back in the gradient's dtype, on its
device and sharding.

NaN/Inf: the core's ``nan_policy="raise"`` needs concrete values, so under
``jit`` (and in ``lax.scan`` chunks) it is skipped. Use
``nan_policy="checkify"`` with ``jax.experimental.checkify.checkify`` around
the step, ``nan_policy="zero"`` to drop non-finite components, or
``jax.config.update("jax_debug_nans", True)`` while debugging.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gradand
    >>> from gradand.backends import jax as gj
    >>> def loss(params, batch):  # the loss of one environment
    ...     x, y = batch
    ...     return jnp.mean((x @ params["w"] - y) ** 2)
    >>> grad_fn = gj.value_and_grad(loss, gradand.AndMask(threshold=1.0))
    >>> opt = optax.adam(1e-2)
    >>> @jax.jit
    ... def step(params, state, batch):
    ...     (mean_loss, result), grads = grad_fn(params, batch)
    ...     updates, state = opt.update(grads, state, params)
    ...     return optax.apply_updates(params, updates), state, mean_loss
    >>> params = {"w": jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 3))  # 4 environments x 8 examples
    >>> params, state, mean_loss = step(params, state, (x, x[..., 0]))
    >>> params["w"].shape
    (3,)
"""

from gradand.backends.jax._all_reduce import all_reduce_statistics
from gradand.backends.jax._consistency import environment_hessians, environment_losses
from gradand.backends.jax._entry import GradInfo, factored_value_and_grad, value_and_grad
from gradand.backends.jax._factored import FACTORED_LAYERS, conv, dense, factored_statistics
from gradand.backends.jax._optax import (
    ReduceEnvironmentsState,
    TemporalAndMaskState,
    reduce_environments,
    scale_by_temporal_and_mask,
    temporal_and_mask,
)
from gradand.backends.jax._sink import finalize_gradients
from gradand.backends.jax._sources import streaming_statistics, vectorized_statistics
from gradand.backends.jax._tree import NAN_POLICIES, TreeInfo, combine, finalize, statistics

__all__ = [
    "FACTORED_LAYERS",
    "NAN_POLICIES",
    "GradInfo",
    "ReduceEnvironmentsState",
    "TemporalAndMaskState",
    "TreeInfo",
    "all_reduce_statistics",
    "combine",
    "conv",
    "dense",
    "environment_hessians",
    "environment_losses",
    "factored_statistics",
    "factored_value_and_grad",
    "finalize",
    "finalize_gradients",
    "reduce_environments",
    "scale_by_temporal_and_mask",
    "statistics",
    "streaming_statistics",
    "temporal_and_mask",
    "value_and_grad",
    "vectorized_statistics",
]
