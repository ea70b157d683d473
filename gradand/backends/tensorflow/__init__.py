"""TensorFlow and Keras 3 backend: AND-masked gradients from a tape, in ``fit()``, across replicas.

Importing this module registers a namespace of ``tf`` ops with the core, so
every core function (``gradand.combine``, ``statistics``, ``finalize``,
``temporal``) takes ``tf.Tensor``/``tf.Variable`` arguments, eagerly and inside
``tf.function`` (XLA included). The backend has the same three layers as
every gradand backend (docs: "One concept, one name"):

- sources, each returning ``(losses, stats)``: :func:`streaming_statistics`
  (one ``tape.gradient`` per environment), :func:`vectorized_statistics`
  (``tape.jacobian`` or ``tf.vectorized_map``), :func:`factored_statistics`
  (Keras ``Dense``, ``Conv1D/2D/3D`` and ``BatchNormalization`` layers' ``X`` and ``Δ``
  handed to :func:`gradand.layer_statistics`);
- :func:`all_reduce_statistics`: merged over the replicas of ``tf.distribute``;
- the sink :func:`finalize_gradients`: ``(grads, infos)`` for ``optimizer.apply_gradients``.

The one-line entry points compose them and return ``(grads, gradand.Result)``:
:func:`gradient` (from a tape and the environments' losses) and
:func:`model_gradient` (from a Keras model and a batch, with an environment
axis or ``env_ids``). Also: :class:`EnvironmentModel` /
:class:`EnvironmentTrainStep` (Keras ``fit``), :class:`TemporalAndMask`
(paper Algorithm 1 as a Keras optimizer), :func:`environment_batches`
(``tf.data``), :func:`environment_losses` / :func:`environment_hessians`
(for :mod:`gradand.consistency`).

Example:
    >>> import tensorflow as tf
    >>> import gradand
    >>> import gradand.backends.tensorflow as gtf
    >>> w = tf.Variable([0.0, 0.0])
    >>> x = tf.constant([[1.0, 2.0], [1.0, -2.0]])  # one input row per environment
    >>> with tf.GradientTape(persistent=True) as tape:
    ...     losses = [tf.reduce_sum(w * x[e]) for e in range(2)]
    >>> grads, result = gtf.gradient(tape, losses, [w], gradand.AndMask(rescale=False))
    >>> grads[0].numpy(), float(result.summary.survivor_fraction)
    (array([1., 0.], dtype=float32), 0.5)
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

from gradand.backends.tensorflow._all_reduce import all_reduce_statistics  # noqa: E402
from gradand.backends.tensorflow._consistency import environment_hessians, environment_losses  # noqa: E402
from gradand.backends.tensorflow._data import environment_batches  # noqa: E402
from gradand.backends.tensorflow._deprecated import (  # noqa: E402, F401 (deprecated, not in __all__)
    CombinedGradients,
    combined_gradients,
    environment_statistics,
    factored_gradients,
)
from gradand.backends.tensorflow._entry import gradient, model_gradient  # noqa: E402
from gradand.backends.tensorflow._factored import FACTORED_LAYERS, factored_statistics  # noqa: E402
from gradand.backends.tensorflow._keras import EnvironmentModel, EnvironmentTrainStep  # noqa: E402
from gradand.backends.tensorflow._optimizer import TemporalAndMask  # noqa: E402
from gradand.backends.tensorflow._sink import finalize_gradients  # noqa: E402
from gradand.backends.tensorflow._sources import streaming_statistics, vectorized_statistics  # noqa: E402

__all__ = [
    "FACTORED_LAYERS",
    "EnvironmentModel",
    "EnvironmentTrainStep",
    "TemporalAndMask",
    "all_reduce_statistics",
    "environment_batches",
    "environment_hessians",
    "environment_losses",
    "factored_statistics",
    "finalize_gradients",
    "gradient",
    "model_gradient",
    "streaming_statistics",
    "vectorized_statistics",
]

#: Deprecated names (gradand 0.1), still importable; each warns when called.
DEPRECATED: tuple[str, ...] = (
    "CombinedGradients",
    "combined_gradients",
    "environment_statistics",
    "factored_gradients",
)
