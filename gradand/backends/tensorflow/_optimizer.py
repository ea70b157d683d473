"""The temporal AND-mask (paper Algorithm 1) as a Keras 3 optimizer."""

from __future__ import annotations

import re
from typing import Any

import keras
import tensorflow as tf

from gradand.backends.tensorflow import xp
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step

__all__ = ["TemporalAndMask"]

# core argument name (regex) -> this optimizer's argument name
_ARGUMENT_NAMES = (
    (r"^lr\b", "learning_rate"),
    (r"^betas\[0\]", "beta_1"),
    (r"^betas\[1\]", "beta_2"),
    (r"^beta3\b", "beta_3"),
    (r"^eps\b", "epsilon"),
)


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

    Args:
        learning_rate: a float or a ``keras.optimizers.schedules`` schedule.
        beta_1, beta_2: Adam's moment decay rates.
        beta_3: decay rate of the moving average of ``sign(g)``.
        threshold: τ in [0, 1]: keep components with ``|mean sign| >= τ``.
        epsilon: Adam's denominator epsilon.
        weight_decay: weight decay coefficient (not Keras's decoupled one:
            applied as ``weight_decay_order`` says).
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
        weight_decay: float = 0.0,
        weight_decay_order: str = "after",
        name: str = "temporal_and_mask",
        **kwargs: Any,
    ) -> None:
        try:
            check_temporal_hparams(
                lr=learning_rate if isinstance(learning_rate, (int, float)) else 0.0,
                betas=(beta_1, beta_2),
                beta3=beta_3,
                threshold=threshold,
                eps=epsilon,
                weight_decay=weight_decay,
                weight_decay_order=weight_decay_order,
            )
        except (TypeError, ValueError) as error:  # name the arguments as this class does
            message = str(error)
            for core, keras_name in _ARGUMENT_NAMES:
                message = re.sub(core, keras_name, message)
            raise type(error)(message) from None
        # Keras's own decoupled weight decay stays off: the temporal step applies its own.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.beta_3 = float(beta_3)
        self.threshold = float(threshold)
        self.epsilon = float(epsilon)
        self.temporal_weight_decay = float(weight_decay)
        self.weight_decay_order = weight_decay_order

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
