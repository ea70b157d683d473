"""gradand for JAX: AND-masked gradients as transforms, optax transformations, and across devices.

Four ways in, all pure and jit-able, over any pytree of parameters:

- :func:`value_and_grad` — ``jax.value_and_grad`` for a loss of *one*
  environment (or example), evaluated over a batch stacked on an environment
  axis; returns ``((mean_loss, info), combined_grads)``. ``chunk=`` folds the
  environments through ``lax.scan`` (bounded memory), ``axis_name=`` combines
  across devices inside ``shard_map``/``pmap``.
- :func:`reduce_environments` — an optax transformation that combines
  per-environment updates (leading axis); chain it before any optimizer.
  :func:`temporal_and_mask` — the paper's temporal AND-mask (Algorithm 1) as
  an optax optimizer, hyperparameters injectable with ``optax.inject_hyperparams``.
- :func:`factored_value_and_grad` — the same result as :func:`value_and_grad`
  at about the cost of an ordinary step for models built from dense layers
  (every ``flax.linen.Dense``, intercepted, and :func:`dense` in hand-written
  models): one batched backward pass to the layer outputs and one batched
  product per layer instead of per-environment kernel gradients;
  per-example environments need no per-example gradient array
  (:data:`FACTORED_LAYERS` lists what is factored; the rest falls back).
- :func:`statistics` / :func:`finalize` / :func:`combine` — the core's verbs on
  pytrees of stacked gradients, for hand-written loops (gradient accumulation:
  merge statistics of several micro-batches, then finalize once).

The math is the core's (:mod:`gradand`); this module only maps it over
pytrees, ``vmap``s the gradient and moves statistics through ``lax.scan`` and
``lax.psum`` (importing it registers :class:`gradand.Statistics` as a pytree).
Statistics are float32 for float16/bfloat16 gradients; updates come back in
the gradient's dtype, on its device and sharding.

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
    ...     (mean_loss, info), grads = grad_fn(params, batch)
    ...     updates, state = opt.update(grads, state, params)
    ...     return optax.apply_updates(params, updates), state, mean_loss
    >>> params = {"w": jnp.zeros(3)}
    >>> state = opt.init(params)
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 3))  # 4 environments x 8 examples
    >>> params, state, mean_loss = step(params, state, (x, x[..., 0]))
    >>> params["w"].shape
    (3,)
"""

from gradand.backends.jax._factored import FACTORED_LAYERS, dense, factored_value_and_grad
from gradand.backends.jax._grad import GradInfo, value_and_grad
from gradand.backends.jax._optax import (
    ReduceEnvironmentsState,
    TemporalAndMaskState,
    reduce_environments,
    scale_by_temporal_and_mask,
    temporal_and_mask,
)
from gradand.backends.jax._tree import NAN_POLICIES, TreeInfo, combine, finalize, statistics

__all__ = [
    "FACTORED_LAYERS",
    "NAN_POLICIES",
    "GradInfo",
    "ReduceEnvironmentsState",
    "TemporalAndMaskState",
    "TreeInfo",
    "combine",
    "dense",
    "factored_value_and_grad",
    "finalize",
    "reduce_environments",
    "scale_by_temporal_and_mask",
    "statistics",
    "temporal_and_mask",
    "value_and_grad",
]
