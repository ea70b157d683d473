"""TensorFlow and Keras 3 backend: AND-masked gradients from a tape, in ``fit()``, across replicas.

Importing this module registers :mod:`gradand.backends.tensorflow.xp`, a
namespace of ``tf`` ops, with the core, so every core function
(``gradand.combine``, ``statistics``, ``finalize``, ``temporal``) takes
``tf.Tensor``/``tf.Variable`` arguments, eagerly and inside ``tf.function``
(XLA included). On top of that:

- :func:`combined_gradients` — ``tape`` + the environments' losses + variables
  → combined gradients for ``optimizer.apply_gradients``, with per-variable
  mask info; by a loop over the environments or vectorised; all-reduced across
  replicas under ``tf.distribute``. Its steps: :func:`environment_statistics`
  (or :func:`vectorized_statistics`), :func:`all_reduce_statistics`,
  :func:`finalize_gradients`.
- :func:`factored_statistics` (and :func:`factored_gradients`) — the fast
  path for Keras models: every environment's gradients of the ``Dense``
  layers from one forward and one backward pass and a batched matrix product
  per layer (per-example environments with no per-example gradients at all),
  the other variables by ``tape.jacobian``.
- :class:`EnvironmentModel` (a wrapper) and :class:`EnvironmentTrainStep` (a
  mixin): Keras ``fit()`` on batches with an environment axis or index, the
  combiner a constructor argument, mask metrics in the progress bar.
- :class:`TemporalAndMask` — the temporal AND-mask (paper Algorithm 1) as a
  Keras optimizer, saved and loaded with the model.
- :func:`environment_batches` — a ``tf.data`` pipeline of per-environment
  batches stacked on a leading environment axis.
- :func:`environment_losses`, :func:`environment_hessians` — a Keras model's
  per-environment losses of a flat parameter vector and Hessians, for
  :mod:`gradand.consistency` (the paper's inconsistency score).

Example:
    >>> import tensorflow as tf
    >>> import gradand
    >>> import gradand.backends.tensorflow as gtf
    >>> w = tf.Variable([0.0, 0.0])
    >>> x = tf.constant([[1.0, 2.0], [1.0, -2.0]])  # one input row per environment
    >>> with tf.GradientTape(persistent=True) as tape:
    ...     losses = [tf.reduce_sum(w * x[e]) for e in range(2)]
    >>> grads, info = gtf.combined_gradients(tape, losses, [w], gradand.AndMask(rescale=False))
    >>> grads[0].numpy()
    array([1., 0.], dtype=float32)
"""

from __future__ import annotations

import gradand
from gradand.backends.tensorflow import xp

gradand.register_namespace(xp.is_tensorflow_array, xp)


def _exclude_from_autograph() -> None:
    """Let ``tf.function`` call gradand's (pure Python, control-flow-free) code as it is.

    AutoGraph would otherwise try to convert the core's functions when they
    are called inside a ``tf.function``, fail on harmless constructs, warn and
    fall back to running them unconverted. Registering ``gradand`` like
    AutoGraph's own ``numpy``/``keras`` entries skips that. Best effort: if
    TensorFlow's internal layout changes, AutoGraph's fallback still works.
    """
    try:
        from tensorflow.python.autograph.core import config as ag_config
        from tensorflow.python.autograph.core import config_lib
    except ImportError:  # pragma: no cover - TensorFlow internals moved
        return
    rules = getattr(ag_config, "CONVERSION_RULES", None)
    if isinstance(rules, tuple) and not any(getattr(r, "_prefix", None) == "gradand" for r in rules):
        ag_config.CONVERSION_RULES = (config_lib.DoNotConvert("gradand"), *rules)


_exclude_from_autograph()

from gradand.backends.tensorflow._consistency import environment_hessians, environment_losses  # noqa: E402
from gradand.backends.tensorflow._data import environment_batches  # noqa: E402
from gradand.backends.tensorflow._factored import factored_gradients, factored_statistics  # noqa: E402
from gradand.backends.tensorflow._gradients import (  # noqa: E402
    CombinedGradients,
    all_reduce_statistics,
    combined_gradients,
    environment_statistics,
    finalize_gradients,
    vectorized_statistics,
)
from gradand.backends.tensorflow._keras import EnvironmentModel, EnvironmentTrainStep  # noqa: E402
from gradand.backends.tensorflow._optimizer import TemporalAndMask  # noqa: E402

__all__ = [
    "CombinedGradients",
    "EnvironmentModel",
    "EnvironmentTrainStep",
    "TemporalAndMask",
    "all_reduce_statistics",
    "combined_gradients",
    "environment_batches",
    "environment_hessians",
    "environment_losses",
    "environment_statistics",
    "factored_gradients",
    "factored_statistics",
    "finalize_gradients",
    "vectorized_statistics",
    "xp",
]
