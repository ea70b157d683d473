"""TensorFlow strategies: a plain ``tf.function`` step, ``gradient(method="streaming")``
(labelled by its old name, which tests/test_benchmarks.py expects), ``vectorized_statistics``
and ``factored_statistics``, each inside ``tf.function`` with a Keras model and Adam. A
gradand strategy whose backend refuses the model (``ValueError``, e.g. BatchNorm in training
mode under ``vectorized_statistics``) is left out (``_common.accepted``)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf
from _common import COMBINER, Workload, accepted, data, peak_rss_of

import gradand.backends.tensorflow as gtf

PLAIN = "plain averaging"


def configure(threads: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.get_logger().setLevel("ERROR")


def versions() -> dict[str, str]:
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def model_for(w: Workload) -> keras.Model:
    keras.utils.set_random_seed(0)
    if w.model == "mlp":
        body = [keras.layers.Dense(w.hidden, activation="relu") for _ in range(w.layers)]
        return keras.Sequential([keras.Input((w.inputs,)), *body, keras.layers.Dense(1)])
    if w.model == "convnet":  # the PyTorch examples' MNIST net, without dropout
        return keras.Sequential([
            keras.Input((w.image, w.image, w.channels)),
            keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
            keras.layers.Dense(w.hidden, activation="relu"), keras.layers.Dense(w.classes),
        ])  # fmt: skip
    if w.model == "resnet":
        return _resnet(w)
    return keras.Sequential([
        keras.Input((w.image, w.image, w.channels)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(w.classes),
    ])  # fmt: skip


def _resnet(w: Workload) -> keras.Model:
    """ResNet-18 layout at ``w.width`` channels in the first stage; BatchNormalization with torch's
    momentum and epsilon, in training mode when the model is called with ``training=True``."""
    layers = keras.layers

    def conv(h, channels: int, size: int = 3, stride: int = 1):  # "same": Keras pads stride 2 after only
        return layers.Conv2D(channels, size, strides=stride, padding="same", use_bias=False)(h)

    def bn(h):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(h)

    inputs = keras.Input((w.image, w.image, w.channels))
    h = layers.ReLU()(bn(conv(inputs, w.width)))
    cin = w.width
    for stage in range(4):
        cout = w.width * 2**stage
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            out = bn(conv(layers.ReLU()(bn(conv(h, cout, stride=stride))), cout))
            shortcut = h if stride == 1 and cin == cout else bn(conv(h, cout, size=1, stride=stride))
            h = layers.ReLU()(layers.Add()([out, shortcut]))
            cin = cout
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(w.classes)(h))


def strategies(w: Workload, device: str, only: str | None = None) -> dict[str, Callable[[], object]]:
    """One ``tf.function`` training step per strategy; ``only``: build just that strategy (memory).

    Each gradand strategy is traced and run once here; one that its backend refuses for this
    model (``ValueError``) is left out (``_common.accepted``).
    """
    if device != "cpu":
        raise SystemExit(
            "the TensorFlow part runs on CPU only (tensorflow-cpu); use --frameworks torch,jax on CUDA"
        )
    xs, ys = data(w)
    if w.model != "mlp":
        xs = xs.transpose(0, 1, 3, 4, 2)  # NHWC
    x, y = tf.constant(xs), tf.constant(ys)
    E = w.envs
    flat_x, flat_y = tf.reshape(x, (-1, *x.shape[2:])), tf.reshape(y, (-1, *y.shape[2:]))

    def loss_of(model: keras.Model, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        out = model(a, training=True)
        if w.model == "mlp":
            return tf.reduce_mean(keras.losses.binary_crossentropy(b, out, from_logits=True))
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(b, out, from_logits=True))

    def plain() -> Callable[[], object]:
        model, opt = model_for(w), keras.optimizers.Adam(1e-3)

        @tf.function
        def step() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_of(model, flat_x, flat_y)
            opt.apply_gradients(
                zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            )
            return loss

        return step

    def loop() -> Callable[[], object]:
        model, opt = model_for(w), keras.optimizers.Adam(1e-3)

        @tf.function
        def step() -> tf.Tensor:
            with tf.GradientTape(persistent=True) as tape:
                losses = [loss_of(model, x[e], y[e]) for e in range(E)]
            grads, _ = gtf.gradient(tape, losses, model.trainable_variables, COMBINER, method="streaming")
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return losses[0]

        return step

    def vectorized() -> Callable[[], object]:  # refused for the resnet: its BatchNormalization layers
        # write their moving statistics, which tf.vectorized_map cannot do once per environment
        model, opt = model_for(w), keras.optimizers.Adam(1e-3)
        variables = model.trainable_variables

        @tf.function
        def step() -> tf.Tensor:
            _, stats = gtf.vectorized_statistics(
                lambda a, b: loss_of(model, a, b), variables, (x, y), COMBINER
            )
            grads, _ = gtf.finalize_gradients(stats, COMBINER)
            opt.apply_gradients(zip(grads, variables))
            return grads[0]

        return step

    def factored() -> Callable[[], object]:
        model, opt = model_for(w), keras.optimizers.Adam(1e-3)
        variables = model.trainable_variables

        def loss_fn(out: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
            if w.model == "mlp":
                return tf.reduce_mean(keras.losses.binary_crossentropy(b, out, from_logits=True))
            return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(b, out, from_logits=True))

        @tf.function
        def step() -> tf.Tensor:
            _, stats = gtf.factored_statistics(model, loss_fn, x, y, COMBINER)
            grads, _ = gtf.finalize_gradients(stats, COMBINER)
            opt.apply_gradients(zip(grads, variables))
            return grads[0]

        return step

    builders = {
        PLAIN: plain,
        'gradand combined_gradients(method="loop")': loop,
        "gradand vectorized_statistics": vectorized,
        "gradand factored_statistics": factored,
    }
    out = {name: build() for name, build in builders.items() if only is None or name == only}
    return accepted("tensorflow", w, out, lambda name, step: sync(step()))


def sync(out: object) -> None:
    for t in tf.nest.flatten(out):
        if hasattr(t, "numpy"):
            t.numpy()


def peak_memory(w: Workload, strategy: str, device: str) -> float:
    """Peak RSS in bytes over three steps, after one warm-up step that traces the ``tf.function``.

    TensorFlow's import and tracing peak higher than a small model's steps, so the
    process-wide ``ru_maxrss`` would hide the step's own memory: on Linux the peak is
    reset after the warm-up (``/proc/self/clear_refs``) and read from ``VmHWM``.
    """
    step = strategies(w, device, only=strategy)[strategy]
    sync(step())
    return peak_rss_of(lambda: sync(step()), steps=3)
