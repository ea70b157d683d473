"""The temporal AND-mask (paper Algorithm 1) as a Keras 3 optimizer."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from gradand.backends.tensorflow import xp
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step

__all__ = ["TemporalAndMask"]

# core argument name (regex) -> this optimizer's argument name
_ARGUMENT_NAMES = {
    "lr": "learning_rate",
    "betas[0]": "beta_1",
    "betas[1]": "beta_2",
    "beta3": "beta_3",
    "eps": "epsilon",
}


_UNSET = object()  # no learning rate given to _check


class _Hparams(NamedTuple):
    beta_1: float
    beta_2: float
    beta_3: float
    threshold: float
    epsilon: float
    weight_decay: float
    weight_decay_order: str


def _check(learning_rate: Any, **hp: Any) -> dict[str, Any]:
    """The core's check, in this optimizer's argument names; the values as Python floats.

    ``learning_rate``: a number (checked, >= 0), a schedule or a callable (as
    Keras takes them; not checked), or ``_UNSET`` (not given).
    """
    if isinstance(learning_rate, (bool, np.bool_)) or not (
        learning_rate is _UNSET or callable(learning_rate) or isinstance(learning_rate, numbers.Real)
    ):
        raise TypeError(
            f"learning_rate must be a real number, a keras.optimizers.schedules.LearningRateSchedule "
            f"or a callable; got {learning_rate!r} ({type(learning_rate).__name__})"
        )
    numeric = isinstance(learning_rate, numbers.Real)
    out = check_temporal_hparams(
        lr=learning_rate if numeric else 0.0,
        betas=(hp["beta_1"], hp["beta_2"]),
        beta3=hp["beta_3"],
        threshold=hp["threshold"],
        eps=hp["epsilon"],
        weight_decay=hp["weight_decay"],
        weight_decay_order=hp["weight_decay_order"],
        names=_ARGUMENT_NAMES,  # named as this class names them
    )
    return {
        "learning_rate": out["lr"] if numeric else learning_rate,
        "beta_1": out["betas"][0],
        "beta_2": out["betas"][1],
        "beta_3": out["beta3"],
        "threshold": out["threshold"],
        "epsilon": out["eps"],
        "weight_decay": out["weight_decay"],
        "weight_decay_order": out["weight_decay_order"],
    }


@keras.saving.register_keras_serializable(package="gradand")
class TemporalAndMask(keras.optimizers.Optimizer):
    """Adam that masks the components whose gradient sign is not consistent over *steps*.

    Paper Algorithm 1 (used for CoinRun): besides Adam's moving averages of
    ``g`` and ``g²`` it keeps a moving average of ``sign(g)`` over steps (rate
    ``beta_3``) and zeroes the update where its bias-corrected magnitude is
    below ``threshold``. It needs no per-environment gradients (use it with an
    ordinary ``fit``); each step calls :func:`gradand.temporal.temporal_and_mask_step`.
    Saved and loaded with the model (``get_config``/``from_config``, registered
    as ``gradand>TemporalAndMask``).

    Bias corrections ``1 - β^t`` are computed in the variables' dtype (as in
    ``keras.optimizers.Adam``), so float32 results differ from a float64
    reference by about ``1e-5`` relative.

    Hyperparameters are validated with
    :func:`gradand.temporal.check_temporal_hparams` on construction (so on
    ``from_config`` too) and when set afterwards (``opt.threshold = 0.9``;
    ``opt.learning_rate = 0.01``, or a 0-d tensor, which Keras also takes
    there, checked by its value when it has one), a ``TypeError`` or
    ``ValueError`` naming the argument as this class does. Numbers may be Python or NumPy scalars
    (Keras's own optimizers take only a Python float learning rate); ``bool``
    is refused. A schedule or callable learning rate is taken as Keras takes
    it, its values unchecked, and so is a value assigned directly to the
    learning-rate variable (``opt.learning_rate.assign(...)``). As in Keras's
    Adam, the other hyperparameters are Python floats read when the step is
    traced: set them before the first ``fit``/``apply``, or a compiled step
    keeps the old values.

    Args:
        learning_rate: a number >= 0, a ``keras.optimizers.schedules`` schedule, or
            a callable taking no argument, as in Keras.
        beta_1, beta_2: Adam's moment decay rates.
        beta_3: decay rate of the moving average of ``sign(g)``.
        threshold: τ in [0, 1]: keep components with ``|mean sign| >= τ``.
        epsilon: Adam's denominator epsilon.
        weight_decay: weight decay coefficient >= 0 (None is 0; not Keras's
            decoupled one: applied as ``weight_decay_order`` says).
        weight_decay_order: ``"after"`` (added to the update after the mask;
            the reference authors' advice) or ``"before"`` (an L2 term added
            to the gradient, so masked too).
        **kwargs: the other ``keras.optimizers.Optimizer`` arguments
            (``clipnorm``, ``global_clipnorm``, ``use_ema``, ``name``, ...).

    Example:
        >>> import keras
        >>> import numpy as np
        >>> from gradand.backends.tensorflow import TemporalAndMask
        >>> opt = TemporalAndMask(learning_rate=0.1, threshold=1.0)
        >>> w = keras.Variable(np.zeros(2, "float32"))
        >>> opt.apply([keras.ops.convert_to_tensor(np.array([1.0, -3.0], "float32"))], [w])
        >>> np.round(keras.ops.convert_to_numpy(w), 4)  # Adam's first step: -lr * sign(g)
        array([-0.1,  0.1], dtype=float32)
        >>> TemporalAndMask.from_config(opt.get_config()).threshold
        1.0
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        beta_3: float = 0.9,
        threshold: float = 0.5,
        epsilon: float = 1e-8,
        weight_decay: float | None = 0.0,
        weight_decay_order: str = "after",
        name: str = "temporal_and_mask",
        **kwargs: Any,
    ) -> None:
        hp = _check(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            beta_3=beta_3,
            threshold=threshold,
            epsilon=epsilon,
            weight_decay=0.0 if weight_decay is None else weight_decay,
            weight_decay_order=weight_decay_order,
        )
        # Keras's own decoupled weight decay stays off: the temporal step applies its own.
        super().__init__(learning_rate=hp.pop("learning_rate"), weight_decay=None, name=name, **kwargs)
        self._hparams = _Hparams(**hp)

    # Each hyperparameter is checked again when set after construction (``opt.threshold = 2``
    # raises); the learning rate too, through Keras's own ``learning_rate`` setter.
    def _set(self, key: str, value: Any) -> None:
        current = self._hparams._asdict()
        current[key] = 0.0 if key == "weight_decay" and value is None else value
        hp = _check(_UNSET, **current)
        del hp["learning_rate"]
        self._hparams = _Hparams(**hp)

    beta_1 = property(lambda self: self._hparams.beta_1, lambda self, v: self._set("beta_1", v))
    beta_2 = property(lambda self: self._hparams.beta_2, lambda self, v: self._set("beta_2", v))
    beta_3 = property(lambda self: self._hparams.beta_3, lambda self, v: self._set("beta_3", v))
    threshold = property(lambda self: self._hparams.threshold, lambda self, v: self._set("threshold", v))
    epsilon = property(lambda self: self._hparams.epsilon, lambda self, v: self._set("epsilon", v))
    temporal_weight_decay = property(
        lambda self: self._hparams.weight_decay, lambda self, v: self._set("weight_decay", v)
    )
    weight_decay_order = property(
        lambda self: self._hparams.weight_decay_order, lambda self, v: self._set("weight_decay_order", v)
    )

    @property
    def learning_rate(self) -> Any:
        return keras.optimizers.Optimizer.learning_rate.fget(self)

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if callable(value):  # a schedule: as Keras takes it
            pass
        elif isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            value = _check(value, **self._hparams._asdict())["learning_rate"]
        else:  # a tensor, which Keras assigns to its variable: checked by value when it has one
            array = np.asarray(value) if tf.executing_eagerly() or not tf.is_tensor(value) else None
            if array is not None:
                number = array.item() if array.shape == () and array.dtype.kind in "iuf" else value
                _check(number, **self._hparams._asdict())
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs, self._exp_avg_sqs, self._sign_avgs = self.add_optimizer_variables(
            var_list, ["exp_avg", "exp_avg_sq", "sign_avg"]
        )

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        index = self._get_variable_index(variable)
        m, v, s = self._exp_avgs[index], self._exp_avg_sqs[index], self._sign_avgs[index]
        state = tf.convert_to_tensor(m)
        step = tf.cast(self.iterations + 1, state.dtype)
        out = temporal_and_mask_step(
            tf.convert_to_tensor(gradient),
            tf.convert_to_tensor(variable),
            state,
            tf.convert_to_tensor(v),
            tf.convert_to_tensor(s),
            step,
            betas=(self.beta_1, self.beta_2),
            beta3=self.beta_3,
            threshold=self.threshold,
            eps=self.epsilon,
            weight_decay=self.temporal_weight_decay,
            weight_decay_order=self.weight_decay_order,  # type: ignore[arg-type]
            xp=xp,
        )
        self.assign(m, out.exp_avg)
        self.assign(v, out.exp_avg_sq)
        self.assign(s, out.sign_avg)
        lr = tf.cast(learning_rate, out.direction.dtype)
        self.assign_sub(variable, tf.cast(lr * out.direction, variable.dtype))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "beta_3": self.beta_3,
                "threshold": self.threshold,
                "epsilon": self.epsilon,
                "weight_decay": self.temporal_weight_decay,
                "weight_decay_order": self.weight_decay_order,
            }
        )
        return config
