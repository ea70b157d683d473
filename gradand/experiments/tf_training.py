"""The experiments' TensorFlow + Keras 3 backend (:class:`gradand.experiments.training.Backend`).

The same models and optimisation as :mod:`gradand.experiments.torch_training`
(Kaiming-normal weights, biases 0.01, Adam with L2 weight decay added to the
gradient, a ×``lr_decay`` step, L1 as ``l1 · sign(θ)``). Per-environment
gradients are combined by :func:`gradand.backends.tensorflow.model_gradient`
(``method="factored"``, measured 4% faster here than ``vectorized_statistics``)
inside a ``tf.function``; plain averaging (``Mean``) uses ``tape.gradient`` of the
mean loss over the step's whole batch (equal to the mean of equally sized
environments' gradients; batch norm then normalises over the whole batch, as
in the reference code). The training loop is :func:`gradand.experiments.training.fit`.

Importing this module without TensorFlow installed works (the doctest
collector imports every module); calling it raises a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:  # tensorflow and keras are an optional extra
    import keras
    import tensorflow as tf
except ImportError:  # pragma: no cover - exercised only without tensorflow
    tf = keras = None

from gradand._combiners import Combiner, Mean
from gradand.experiments import training

__all__ = ["BACKEND", "build_mlp", "resolve_device", "train_classifier", "train_patchwork"]


def _need_tf() -> Any:
    if tf is None:
        raise ImportError(
            "the TensorFlow backend needs tensorflow and keras: pip install 'gradand[tensorflow]'"
        )
    import gradand.backends.tensorflow as gtf

    return gtf


def resolve_device(device: str) -> str:
    """The TensorFlow device name for ``cpu``, ``cuda``/``gpu`` or ``cuda:N``, checked to exist.

    Example:
        >>> from gradand.experiments.tf_training import resolve_device
        >>> resolve_device("cpu")
        '/CPU:0'
    """
    _need_tf()
    kind, _, index = device.partition(":")
    kind = {"cpu": "CPU", "cuda": "GPU", "gpu": "GPU"}.get(kind, "")
    if not kind or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r} is not a TensorFlow device (expected cpu, cuda or cuda:N)")
    i = int(index) if index else 0
    found = tf.config.list_physical_devices(kind)
    if i >= len(found):
        raise ValueError(
            f"--device {device!r}: TensorFlow sees {len(found)} {kind} device(s) on this machine"
        )
    return f"/{kind}:{i}"


def build_mlp(
    in_features: int,
    out_features: int,
    *,
    hidden_units: int,
    hidden_layers: int,
    dropout: float = 0.0,
    batch_norm: bool = False,
    activation: str = "leaky_relu",
    seed: int = 0,
) -> Any:
    """The reference MLP as a Keras model: Dense → [BatchNorm] → activation → [Dropout], repeated.

    Example:
        >>> from gradand.experiments.tf_training import build_mlp
        >>> model = build_mlp(10, 1, hidden_units=8, hidden_layers=2, batch_norm=True)
        >>> model.output_shape, len(model.trainable_variables)
        ((None, 1), 10)
    """
    _need_tf()
    layers = keras.layers
    init = keras.initializers
    stack: list[Any] = [keras.Input((in_features,))]
    for i in range(hidden_layers):
        stack.append(
            layers.Dense(
                hidden_units,
                kernel_initializer=init.HeNormal(seed=seed * 1000 + i),
                bias_initializer=init.Constant(0.01),
            )
        )
        if batch_norm:
            stack.append(layers.BatchNormalization(momentum=0.9, epsilon=1e-5))  # torch's 0.1 / 1e-5
        stack.append(layers.LeakyReLU(negative_slope=0.01) if activation == "leaky_relu" else layers.ReLU())
        if dropout > 0:
            stack.append(layers.Dropout(dropout, seed=seed * 1000 + 500 + i))
    stack.append(
        layers.Dense(
            out_features,
            kernel_initializer=init.HeNormal(seed=seed * 1000 + 999),
            bias_initializer=init.Constant(0.01),
        )
    )
    return keras.Sequential(stack)


def _example_losses(kind: str, logits: Any, y: Any) -> Any:
    """Per-example losses of logits (..., k) and labels (...)."""
    if kind == "bce":
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits[..., 0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


class _Trainer:
    """:class:`gradand.experiments.training.Trainer` of a Keras model (Keras Adam, ``tf.function`` steps)."""

    def __init__(self, model: Any, options: training.TrainOptions) -> None:
        combiner, loss, weight_decay, l1, _, device, penalty = options  # dropout layers carry build()'s seed
        gtf = _need_tf()
        self._device = dev = resolve_device(device)
        self.model = model
        variables = model.trainable_variables
        with tf.device(dev):
            self._opt = opt = keras.optimizers.Adam(0.0, beta_1=0.9, beta_2=0.999, epsilon=1e-8)

        def env_loss(out: Any, y: Any) -> Any:
            return tf.reduce_mean(_example_losses(loss, out, y))

        def gradients(x: Any, y: Any, factors: Any) -> Any:
            """The objective, in one place: ``(gradients, kept fraction)``.

            ``factors``: the penalty's (weight, scale) this step (``Penalty.factors``).
            """
            if isinstance(combiner, Mean):
                with tf.GradientTape() as tape:
                    out = model(tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0)), training=True)
                    out = tf.reshape(out, tf.concat([tf.shape(x)[:2], tf.shape(out)[1:]], 0))
                    if penalty is None:
                        value = tf.reduce_mean(tf.reduce_mean(_example_losses(loss, out, y), axis=1))
                    else:
                        s = tf.ones(tf.shape(x)[:1], out.dtype)  # one logit scale per environment
                        with tf.GradientTape() as inner:
                            inner.watch(s)
                            scaled = out * tf.reshape(s, [-1] + [1] * (len(out.shape) - 1))
                            losses = tf.reduce_mean(_example_losses(loss, scaled, y), axis=1)
                            total = tf.reduce_sum(losses)
                        if penalty.kind == "irm":  # IRMv1: d L_e(s · logits) / ds at s = 1, per environment
                            term = tf.reduce_mean(inner.gradient(total, s) ** 2)
                        else:  # V-REx: the variance of the environments' losses
                            term = tf.reduce_mean((losses - tf.reduce_mean(losses)) ** 2)
                        value = (tf.reduce_mean(losses) + factors[0] * term) * factors[1]
                return tape.gradient(value, variables), tf.constant(1.0)
            grads, result = gtf.model_gradient(model, env_loss, x, y, combiner, nan_policy="propagate")
            return list(grads), result.summary.survivor_fraction

        @tf.function(reduce_retracing=True)
        def step(x: Any, y: Any, factors: Any) -> Any:
            with tf.device(dev):
                grads, kept = gradients(x, y, factors)
                out = []
                for g, v in zip(grads, variables):
                    if weight_decay > 0:
                        g = g + weight_decay * v
                    if l1 > 0:
                        g = g + l1 * tf.sign(v)
                    out.append(g)
                opt.apply_gradients(zip(out, variables))
                return kept

        @tf.function(reduce_retracing=True)
        def predict(x: Any) -> Any:
            with tf.device(dev):
                out = model(x, training=False)
                if loss == "bce":
                    return tf.cast(out[..., 0] > 0, tf.float32)
                return tf.argmax(out, -1, output_type=tf.int32)

        self._step, self._predict = step, predict
        self._use_mean = isinstance(combiner, Mean)
        self._penalty, self._steps = penalty, 0

    def put(self, array: np.ndarray) -> Any:
        with tf.device(self._device):
            return tf.constant(array)

    def take(self, array: Any, index: np.ndarray) -> Any:
        with tf.device(self._device):
            return tf.gather(array, index)

    def set_learning_rate(self, rate: float) -> None:
        self._opt.learning_rate = rate

    def step(self, x: Any, y: Any) -> Any:
        factors = self._penalty.factors(self._steps) if self._penalty is not None else (0.0, 1.0)
        self._steps += 1
        kept = self._step(x, y, tf.constant(factors, tf.float32))
        return None if self._use_mean else kept

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self._predict(x))


class _Backend(training.Backend):
    """The TensorFlow :class:`gradand.experiments.training.Backend` (``BACKEND``)."""

    trainer_type = _Trainer
    name = "tensorflow"
    resolve_device = staticmethod(resolve_device)

    def build(self, spec: training.MLPSpec | training.CNNSpec, *, seed: int) -> Any:
        if not isinstance(spec, training.MLPSpec):
            raise ValueError(
                "the TensorFlow backend trains the MLP on flat inputs (digits); "
                "use --backend torch for CIFAR-10"
            )
        return build_mlp(**spec, seed=seed)

    def patchwork_gradient(
        self, combiner: Combiner, x: np.ndarray, y: np.ndarray, *, device: str = "cpu"
    ) -> Callable[[np.ndarray], np.ndarray]:
        gtf = _need_tf()
        dev = resolve_device(device)
        with tf.device(dev):
            xt, yt = tf.constant(x, dtype=tf.float64), tf.constant(y, dtype=tf.float64)

        @tf.function
        def grad(w: Any) -> Any:
            with tf.device(dev):
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(w)
                    losses = [0.5 * (tf.tensordot(xt[i], w, 1) - yt[i]) ** 2 for i in range(len(x))]
                grads, _ = gtf.gradient(tape, losses, [w], combiner, nan_policy="propagate")
                return grads[0]

        return lambda w: grad(tf.constant(w, dtype=tf.float64)).numpy()

    def dense_layers(self, model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        _need_tf()
        layers = list(getattr(model, "layers", ()))
        other = [type(x).__name__ for x in layers if isinstance(x, keras.layers.BatchNormalization)]
        if other or not layers:
            raise ValueError("model must be a Keras MLP without batch norm")
        return [
            (np.asarray(x.kernel, dtype=np.float64), np.asarray(x.bias, dtype=np.float64))
            for x in layers
            if isinstance(x, keras.layers.Dense)
        ]


#: The TensorFlow backend of the experiments (``training.get_backend("tensorflow")``).
BACKEND = _Backend()


def train_classifier(model: Any, **options: Any) -> dict[str, Any]:
    """:func:`gradand.experiments.training.train_classifier` with ``backend="tensorflow"`` (same arguments).

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.tf_training import build_mlp, train_classifier
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 16, 3)).astype(np.float32)
        >>> y = (x[..., 0] > 0).astype(np.float32)
        >>> evals = {"train": (x.reshape(-1, 3), y.reshape(-1))}
        >>> out = train_classifier(build_mlp(3, 1, hidden_units=8, hidden_layers=1), train_x=x, train_y=y,
        ...     eval_sets=evals, combiner=gradand.AndMask(0.5), loss="bce", epochs=2, batch_size=8, lr=1e-2,
        ...     show_progress=False)
        >>> sorted(out["final"]), out["steps"]
        (['train'], 4)
    """
    return training.train_classifier(model, backend=BACKEND, **options)


def train_patchwork(combiner: Combiner, **options: Any) -> Any:
    """:func:`gradand.experiments.patchwork.train` with the combined gradient from TensorFlow (float64).

    Example:
        >>> import gradand
        >>> from gradand.experiments.tf_training import train_patchwork
        >>> result = train_patchwork(gradand.AndMask(threshold=1.0, rescale=False), steps=300)
        >>> result.weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    from gradand.experiments.patchwork import train

    return train(combiner, backend="tensorflow", **options)
