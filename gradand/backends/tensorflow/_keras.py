"""Keras 3 (TensorFlow backend): ``fit()`` with per-environment gradients combined by a gradand combiner.

:class:`EnvironmentModel` wraps any ``keras.Model``; :class:`EnvironmentTrainStep`
is the same ``train_step`` as a mixin for your own ``keras.Model`` subclass.
Either trains on batches that carry environments:

- an environment **axis** (default, ``environment_axis=0``): every tensor of
  ``x``, ``y`` (and ``sample_weight``) has shape ``(E, B, ...)``, e.g. from
  :func:`environment_batches`; with ``environment_axis=1`` the shape is
  ``(B, E, ...)``, so ``fit(x, y, batch_size=B)`` works on numpy arrays that
  stack the environments on axis 1;
- an environment **index** (``num_environments=E``): batches are
  ``(x, y, environment)`` or ``(x, y, environment, sample_weight)`` with an
  integer ``environment`` of shape ``(B,)``. A batch drawn from a shuffled
  stream of examples may legitimately miss an environment: that step's
  statistics are over the environments present (``count`` is their number).
  An index outside ``[0, num_environments)`` stops training with an error
  naming the index and ``num_environments`` (``tf.errors.InvalidArgumentError``
  inside the compiled step, ``ValueError`` with ``run_eagerly=True``).

With ``environment_axis=0`` the environments are the first axis of every
batch, so ``fit`` must be given whole batches (a ``tf.data.Dataset``, e.g.
:func:`environment_batches`): numpy arrays or tensors passed to ``fit`` would
be cut along the environment axis by ``batch_size``, so they raise
``ValueError`` (use ``environment_axis=1`` for arrays ``(N, E, ...)``).

Each environment's loss is the compiled loss on its examples; their gradients
are combined per variable (:func:`combined_gradients`) and handed to the
optimizer. ``fit`` shows ``survivor_fraction`` (fraction of all parameters
whose update survives the mask) and ``agreement`` (mean sign agreement) next
to the loss. They are training metrics only: ``evaluate`` and validation
report what the same Keras model without gradand reports.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import gradand
from gradand import Combiner
from gradand._namespace import NAN_POLICIES
from gradand.backends.tensorflow._batchnorm import check_vectorized
from gradand.backends.tensorflow._common import METHODS, check_method, replicas
from gradand.backends.tensorflow._entry import finish
from gradand.backends.tensorflow._sources import fold_statistics, vectorized_statistics

__all__ = ["EnvironmentModel", "EnvironmentTrainStep"]

_CONFIG_KEYS = ("combiner", "environment_axis", "num_environments", "method", "nan_policy", "weight_decay")


def combiner_to_config(combiner: Combiner) -> dict[str, Any]:
    """A JSON-able description of a (dataclass) combiner, for Keras ``get_config``."""
    if not dataclasses.is_dataclass(combiner):
        raise TypeError(
            f"cannot serialise combiner {combiner!r}: only dataclass combiners (like gradand's own) "
            f"can be saved with a Keras model"
        )
    fields = {f.name: getattr(combiner, f.name) for f in dataclasses.fields(combiner)}
    return {"module": type(combiner).__module__, "class_name": type(combiner).__qualname__, "config": fields}


def combiner_from_config(config: Any) -> Combiner:
    """Inverse of :func:`combiner_to_config` (a combiner passes through)."""
    if isinstance(config, Combiner):
        return config
    if not isinstance(config, dict) or not {"module", "class_name", "config"} <= set(config):
        raise ValueError(f"not a combiner config (expected module, class_name, config); got {config!r}")
    module = gradand if config["module"].startswith("gradand.") else importlib.import_module(config["module"])
    cls = getattr(module, config["class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, Combiner)):
        raise ValueError(f"{config['module']}.{config['class_name']} is not a gradand Combiner")
    return cls(**config["config"])


def _check_environment_config(
    combiner: Any,
    environment_axis: Any,
    num_environments: Any,
    method: Any,
    nan_policy: Any,
    weight_decay: Any,
) -> tuple[Combiner, str]:
    combiner = combiner_from_config(combiner) if isinstance(combiner, dict) else combiner
    if not isinstance(combiner, Combiner):
        raise TypeError(
            f"combiner must be a gradand combiner (gradand.AndMask(), ...); got {type(combiner).__name__}"
        )
    if isinstance(environment_axis, bool) or not isinstance(environment_axis, int) or environment_axis < 0:
        raise ValueError(f"environment_axis must be an int >= 0; got {environment_axis!r}")
    if num_environments is not None and (
        isinstance(num_environments, bool) or not isinstance(num_environments, int) or num_environments < 1
    ):
        raise ValueError(
            f"num_environments must be None (environment axis) or an int >= 1; got {num_environments!r}"
        )
    method = check_method(method, METHODS)
    if num_environments is not None and method == "vectorized":
        raise ValueError(
            "method='vectorized' needs equal-sized environments on an axis; with an environment index "
            "(num_environments given) use method='streaming'"
        )
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}; got {nan_policy!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}")
    return combiner, method


def _merge_leading(t: Any) -> Any:
    """(E, B, ...) -> (E*B, ...)."""
    return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], axis=0))


def _fill(structure: Any, values: list[Any]) -> Any:
    """``structure`` with its non-None leaves replaced, in order, by ``values``."""
    it = iter(values)
    return tf.nest.map_structure(lambda t: None if t is None else next(it), structure)


def _concat(parts: list[Any]) -> Any:
    if parts[0] is None:
        return None
    return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *parts)


class EnvironmentTrainStep:
    """Mixin for a ``keras.Model`` subclass: ``fit()`` combines per-environment gradients.

    Put it before ``keras.Model`` in the bases; it takes the keyword
    arguments below and passes the rest to ``keras.Model``. Works with
    functional (``MyModel(inputs, outputs, combiner=...)``) and subclassed
    models; :class:`EnvironmentModel` wraps an existing model instead.

    Args:
        combiner: how to combine the environments' gradients (required,
            e.g. ``gradand.AndMask(threshold=0.8)``).
        environment_axis: the axis of every batch tensor that indexes
            environments (0: ``(E, B, ...)``, 1: ``(B, E, ...)``).
        num_environments: set it to train on batches ``(x, y, environment)``
            with an integer environment index per example instead of an axis.
        method: ``"streaming"`` (one forward/backward pass per environment; memory
            independent of E; a ``BatchNormalization`` normalises each environment
            by itself) or ``"vectorized"`` (``tf.vectorized_map`` over the
            environment axis; needs an axis; refuses a trainable ``BatchNormalization``,
            whose moving statistics it cannot update per environment).
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``. With a
            ``keras.optimizers.LossScaleOptimizer`` use ``"propagate"``, so
            that it sees overflowing steps and skips them.
        weight_decay: an L2 term ``weight_decay · θ`` added to the combined
            gradient, after the mask, before the optimizer (the reference
            implementation's setting: with Adam it steadily shrinks the
            masked weights). Keras's own ``weight_decay`` of the optimizer is
            decoupled instead; both can be used.

    Under ``tf.distribute`` (``environment_axis=0`` only) each replica gets
    some of the environments, their statistics are all-reduced with SUM, and
    every replica applies the update of all environments together.

    Example:
        >>> import keras
        >>> import numpy as np
        >>> import gradand
        >>> from gradand.backends.tensorflow import EnvironmentTrainStep
        >>> class Net(EnvironmentTrainStep, keras.Model):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.dense = keras.layers.Dense(1)
        ...     def call(self, x):
        ...         return self.dense(x)
        >>> net = Net(combiner=gradand.AndMask(threshold=0.5), environment_axis=1)
        >>> net.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.ones((8, 2, 3)), np.ones((8, 2, 1))  # 8 examples x 2 environments
        >>> history = net.fit(x, y, batch_size=4, epochs=1, verbose=0)
        >>> sorted(history.history)
        ['agreement', 'loss', 'survivor_fraction']
    """

    def __init__(
        self,
        *args: Any,
        combiner: Combiner | None = None,
        environment_axis: int = 0,
        num_environments: int | None = None,
        method: str = "streaming",
        nan_policy: str = "raise",
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if combiner is None and not _LOADING.active:
            raise TypeError(
                f"{type(self).__name__} needs combiner=, how to combine the environments' gradients "
                f"(e.g. combiner=gradand.AndMask(threshold=0.8); gradand.Mean() is plain averaging)"
            )
        super().__init__(*args, **kwargs)
        self.configure_environments(
            combiner=gradand.Mean() if combiner is None else combiner,  # replaced by from_config
            environment_axis=environment_axis,
            num_environments=num_environments,
            method=method,
            nan_policy=nan_policy,
            weight_decay=weight_decay,
        )
        # Not tracked as attributes, so that evaluate() and validation do not report them.
        trackers = (keras.metrics.Mean(name="survivor_fraction"), keras.metrics.Mean(name="agreement"))
        object.__setattr__(self, "_gradand_trackers", trackers)

    def configure_environments(
        self,
        *,
        combiner: Combiner,
        environment_axis: int = 0,
        num_environments: int | None = None,
        method: str = "streaming",
        nan_policy: str = "raise",
        weight_decay: float = 0.0,
    ) -> None:
        """Validate and set the environment settings (call ``compile()`` again after a change)."""
        self.combiner, method = _check_environment_config(
            combiner, environment_axis, num_environments, method, nan_policy, weight_decay
        )
        self.environment_axis = environment_axis
        self.num_environments = num_environments
        self.method = method
        self.nan_policy = nan_policy
        self.weight_decay = float(weight_decay)
        if num_environments is not None:
            self.supports_jit = False  # tf.dynamic_partition has data-dependent shapes

    # --- serialisation -------------------------------------------------------------------
    def environment_config(self) -> dict[str, Any]:
        """The environment settings as a JSON-able dict (part of ``get_config()``)."""
        return {
            "combiner": combiner_to_config(self.combiner),
            "environment_axis": self.environment_axis,
            "num_environments": self.num_environments,
            "method": self.method,
            "nan_policy": self.nan_policy,
            "weight_decay": self.weight_decay,
        }

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(self.environment_config())
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:
        config = dict(config)
        settings = {k: config.pop(k) for k in _CONFIG_KEYS if k in config}
        if "combiner" not in settings:
            raise TypeError(f"cannot load {cls.__name__}: its config stores no combiner")
        with _LOADING:
            model = super().from_config(config, custom_objects=custom_objects)  # type: ignore[misc]
        model.configure_environments(**settings)
        return model

    def reset_metrics(self) -> None:
        super().reset_metrics()  # type: ignore[misc]
        for tracker in self._gradand_trackers:
            tracker.reset_state()

    # --- training --------------------------------------------------------------------------
    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """``keras.Model.fit`` on environment batches (``validation_data`` takes ordinary batches)."""
        x = args[0] if args else kwargs.get("x")
        if self.num_environments is None and self.environment_axis == 0 and _is_arrays(x):
            raise ValueError(
                "with environment_axis=0, fit() would cut numpy arrays or tensors into batches along the "
                "environment axis (batch_size splits the environments); pass a tf.data.Dataset of whole "
                "batches (E, B, ...) (e.g. gtf.environment_batches) or arrays (N, E, ...) with "
                "environment_axis=1"
            )
        object.__setattr__(self, "_gradand_build_from_environments", True)
        try:
            return super().fit(*args, **kwargs)
        finally:
            object.__setattr__(self, "_gradand_build_from_environments", False)

    def _symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> Any:
        # Keras builds the model (under tf.distribute) from the first training batch;
        # give it one environment's batch, the shape the model is called on.
        if getattr(self, "_gradand_build_from_environments", False):
            object.__setattr__(self, "_gradand_build_from_environments", False)
            if data_batch is None and iterator is not None:
                for _, _, data_or_iterator in iterator:
                    if isinstance(data_or_iterator, (list, tuple)):
                        data_batch = data_or_iterator[0]
                    else:
                        data_batch = next(data_or_iterator)
                    break
            if data_batch is not None:
                data_batch = self._one_environment_batch(data_batch)
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)  # type: ignore[misc]

    def _one_environment_batch(self, data: Any) -> Any:
        x, y, sample_weight, env = self._unpack(data)
        if env is not None:
            return (x, y)
        axis = self.environment_axis
        first = lambda t: None if t is None else tf.gather(t, 0, axis=axis)  # noqa: E731
        return tuple(tf.nest.map_structure(first, t) for t in (x, y, sample_weight) if t is not None)

    def _environment_loss(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        """(loss to differentiate, unscaled loss, predictions) of one environment."""
        y_pred = self(x, training=True)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        # Keras divides losses by the number of replicas (it sums gradients across them);
        # gradand all-reduces statistics instead, so each environment's own loss is used.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss * tf.cast(replicas, loss.dtype)
        scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        return scaled, loss, y_pred

    def _unpack(self, data: Any) -> tuple[Any, Any, Any, Any]:
        if self.num_environments is None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            return x, y, sample_weight, None
        if not isinstance(data, tuple) or len(data) not in (3, 4):
            raise ValueError(
                f"with num_environments={self.num_environments}, batches must be (x, y, environment) or "
                f"(x, y, environment, sample_weight) with an integer environment index per example; "
                f"got {type(data).__name__} of length {len(data) if isinstance(data, tuple) else '-'}"
            )
        x, y, env = data[:3]
        sample_weight = data[3] if len(data) == 4 else None
        if not env.dtype.is_integer:
            raise TypeError(f"the environment index must be an integer tensor; got dtype {env.dtype.name}")
        return x, y, sample_weight, env

    def _environment_parts(self, x: Any, y: Any, sample_weight: Any, env: Any) -> tuple[list[Any], Any]:
        """Per-environment ``(x_e, y_e, sample_weight_e)`` and, for an index, who is present."""
        structure = (x, y, sample_weight)
        leaves = [t for t in tf.nest.flatten(structure) if t is not None]
        if env is not None:
            n = self.num_environments
            env = _checked_index(tf.cast(tf.reshape(env, [-1]), tf.int32), n)
            split = [tf.dynamic_partition(t, env, n) for t in leaves]
            present = tf.math.bincount(env, minlength=n, maxlength=n) > 0
            presence = [present[e] for e in range(n)]
        else:
            axis = self.environment_axis
            n = (
                leaves[0].shape[axis]
                if leaves[0].shape.rank is not None and axis < leaves[0].shape.rank
                else None
            )
            if n is None:
                raise ValueError(
                    f"environment_axis={axis} must be a static axis of every batch tensor; got a tensor of "
                    f"shape {tuple(leaves[0].shape)}"
                )
            for t in leaves:
                if t.shape.rank is None or axis >= t.shape.rank or t.shape[axis] != n:
                    raise ValueError(
                        f"every batch tensor must hold the {n} environments on axis {axis}; got a tensor "
                        f"of shape {tuple(t.shape)}"
                    )
            split = [tf.unstack(t, num=n, axis=axis) for t in leaves]
            presence = None
        parts = [_fill(structure, [s[e] for s in split]) for e in range(n)]
        return parts, presence

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight, env = self._unpack(data)
        _, n_replicas = replicas()
        if n_replicas > 1 and (self.num_environments is not None or self.environment_axis != 0):
            raise ValueError(
                "under a tf.distribute strategy the environments must be split across replicas: use "
                "batches with environment_axis=0 (e.g. environment_batches(...)); with an environment "
                "index or environment_axis != 0 each replica would see part of every environment"
            )
        variables = self.trainable_variables
        if self.method == "vectorized":
            check_vectorized(self, training=True)
            stats, x_all, y_all, sw_all, y_pred, losses = self._vectorized(x, y, sample_weight, variables)
            mean_loss = tf.reduce_mean(losses)
        else:
            parts, present = self._environment_parts(x, y, sample_weight, env)
            scaled, losses, preds = [], [], []
            with tf.GradientTape(persistent=True) as tape:
                for x_e, y_e, sw_e in parts:
                    s, loss, y_pred_e = self._environment_loss(x_e, y_e, sw_e)
                    scaled.append(s)
                    losses.append(loss)
                    preds.append(y_pred_e)
            stats = fold_statistics(
                tape, scaled, variables, self.combiner, nan_policy=self.nan_policy, present=present
            )
            del tape
            if present is None:
                mean_loss = tf.add_n(losses) / len(losses)
            else:
                w = tf.cast(tf.stack(present), losses[0].dtype)
                mean_loss = tf.reduce_sum(tf.stack(losses) * w) / tf.reduce_sum(w)
            x_all, y_all, sw_all = (_concat([p[k] for p in parts]) for k in range(3))
            y_pred = _concat(preds)
        grads, result = finish(tf.zeros((1,)), stats, self.combiner, variables)
        if self.weight_decay:
            share = self.weight_decay / n_replicas  # each replica's share: the optimizer sums them
            grads = [None if g is None else g + tf.cast(share, g.dtype) * v for g, v in zip(grads, variables)]
        if variables:
            self.optimizer.apply_gradients(zip(grads, variables))
        survivors, agreement = self._gradand_trackers
        survivors.update_state(result.summary.survivor_fraction)
        agreement.update_state(result.summary.agreement)
        first = next(t for t in tf.nest.flatten(x_all) if t is not None)
        self._loss_tracker.update_state(mean_loss, sample_weight=tf.shape(first)[0])
        logs = dict(self.compute_metrics(x_all, y_all, y_pred, sample_weight=sw_all))
        return {**logs, "survivor_fraction": survivors.result(), "agreement": agreement.result()}

    def _vectorized(self, x: Any, y: Any, sample_weight: Any, variables: Any) -> tuple[Any, ...]:
        axis = self.environment_axis

        def env_first(t: Any) -> Any:
            if t is None or axis == 0:
                return t
            perm = [axis, *[d for d in range(t.shape.rank) if d != axis]]
            return tf.transpose(t, perm)

        x, y, sample_weight = (tf.nest.map_structure(env_first, t) for t in (x, y, sample_weight))
        has_weight = sample_weight is not None
        elems = (x, y, sample_weight) if has_weight else (x, y)

        def env_loss(*data: Any) -> Any:
            x_e, y_e = data[0], data[1]
            s, loss, y_pred_e = self._environment_loss(x_e, y_e, data[2] if has_weight else None)
            return s, (loss, y_pred_e)

        _, stats, (losses, y_pred) = vectorized_statistics(
            env_loss,
            variables,
            elems,
            self.combiner,
            nan_policy=self.nan_policy,
            has_aux=True,
            loss_scale=1.0,
        )
        merge = lambda t: tf.nest.map_structure(_merge_leading, t) if t is not None else None  # noqa: E731
        return stats, merge(x), merge(y), merge(sample_weight), merge(y_pred), losses


class _Loading:
    """Set while Keras rebuilds a model from its config (the combiner is configured right after)."""

    active = False

    def __enter__(self) -> None:
        type(self).active = True

    def __exit__(self, *exc: Any) -> None:
        type(self).active = False


_LOADING = _Loading()


def _is_arrays(x: Any) -> bool:
    leaves = tf.nest.flatten(x) if x is not None else []
    return bool(leaves) and all(isinstance(t, (np.ndarray, tf.Tensor)) for t in leaves)


def _checked_index(env: Any, n: int) -> Any:
    """``env`` after a check that every index is in ``[0, n)``, with an error naming them."""
    bad = tf.logical_or(env < 0, env >= n)
    if tf.executing_eagerly():
        if bool(tf.reduce_any(bad)):
            wrong = sorted({int(i) for i in tf.boolean_mask(env, bad).numpy()})
            raise ValueError(f"environment index {wrong} outside [0, num_environments={n})")
        return env
    msg = f"gradand: an environment index is outside [0, num_environments={n}); the indices:"
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [msg, env])]):
        return tf.identity(env)


@keras.saving.register_keras_serializable(package="gradand")
class EnvironmentModel(EnvironmentTrainStep, keras.Model):
    """Wrap a ``keras.Model`` so that ``fit()`` combines its per-environment gradients.

    ``EnvironmentModel(model, combiner=..., ...)`` calls ``model`` for
    inference (``predict``, ``evaluate`` on ordinary batches) and trains it
    with the :class:`EnvironmentTrainStep` ``train_step``; the keyword
    arguments are those of :class:`EnvironmentTrainStep`. ``model.save`` /
    ``keras.models.load_model`` round-trip the wrapped model, the combiner and
    the settings.

    Example:
        >>> import keras
        >>> import numpy as np
        >>> import gradand
        >>> from gradand.backends.tensorflow import EnvironmentModel
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> model = EnvironmentModel(net, combiner=gradand.AndMask(threshold=0.5), environment_axis=1)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.ones((8, 2, 3)), np.ones((8, 2, 1))  # 8 examples x 2 environments
        >>> history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
        >>> len(history.history["survivor_fraction"])
        2
        >>> model.predict(np.ones((5, 3)), verbose=0).shape  # inference on ordinary batches
        (5, 1)
    """

    def __init__(self, model: keras.Model, **kwargs: Any) -> None:
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"model must be a keras.Model (or layer); got {type(model).__name__}")
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            **self.environment_config(),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> EnvironmentModel:
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        if "combiner" not in config:
            raise TypeError(f"cannot load {cls.__name__}: its config stores no combiner")
        config["combiner"] = combiner_from_config(config["combiner"])
        return cls(model, **config)
