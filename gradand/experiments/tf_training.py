"""The experiments' training loops in TensorFlow + Keras 3, on :mod:`gradand.backends.tensorflow`.

The same models and optimisation as :mod:`gradand.experiments.torch_training`
(Kaiming-normal weights, biases 0.01, Adam with L2 weight decay added to the
gradient, a ×``lr_decay`` step, L1 as ``l1 · sign(θ)``). Per-environment
gradients are combined by :func:`gradand.backends.tensorflow.vectorized_statistics`
and :func:`gradand.backends.tensorflow.finalize_gradients` inside a
``tf.function``; plain averaging (``Mean``) uses ``tape.gradient`` of the
mean loss over the step's whole batch (equal to the mean of equally sized
environments' gradients; batch norm then normalises over the whole batch, as
in the reference code).

Importing this module without TensorFlow installed works (the doctest
collector imports every module); calling it raises a clear error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # tensorflow and keras are an optional extra
    import keras
    import tensorflow as tf
except ImportError:  # pragma: no cover - exercised only without tensorflow
    tf = keras = None

from gradand._combiners import Combiner, Mean
from gradand._result import summarize
from gradand.experiments._report import progress
from gradand.experiments._schedule import schedule as epoch_schedule

__all__ = ["build_mlp", "resolve_device", "train_classifier", "train_patchwork"]


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


def _loss(kind: str, logits: Any, y: Any) -> Any:
    if kind == "bce":
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits[..., 0]))
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def train_classifier(
    model: Any,
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    combiner: Combiner,
    loss: str,
    epochs: int,
    batch_size: int,
    lr: float,
    envs_per_step: int | None = None,
    weight_decay: float = 0.0,
    l1: float = 0.0,
    lr_milestone: float | None = None,
    lr_decay: float = 0.1,
    eval_every: int = 1,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """TensorFlow twin of :func:`gradand.experiments.torch_training.train_classifier`.

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
    gtf = _need_tf()
    dev = resolve_device(device)
    if loss not in ("bce", "ce"):
        raise ValueError(f"loss must be 'bce' or 'ce'; got {loss!r}")
    n_envs, n_per_env = train_x.shape[0], train_x.shape[1]
    _, group, groups_per_epoch, steps_per_epoch = epoch_schedule(n_envs, n_per_env, batch_size, envs_per_step)
    use_mean = isinstance(combiner, Mean)
    label_dtype = tf.float32 if loss == "bce" else tf.int32

    with tf.device(dev):
        variables = model.trainable_variables
        sizes = [int(np.prod(v.shape)) for v in variables]
        if lr_milestone is None:
            rate: Any = lr
        else:
            boundary = max(1, int(lr_milestone * epochs)) * steps_per_epoch - 1
            rate = keras.optimizers.schedules.PiecewiseConstantDecay([boundary], [lr, lr * lr_decay])
        opt = keras.optimizers.Adam(rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8)

        def finish(grads: list[Any]) -> None:
            out = []
            for g, v in zip(grads, variables):
                if weight_decay > 0:
                    g = g + weight_decay * v
                if l1 > 0:
                    g = g + l1 * tf.sign(v)
                out.append(g)
            opt.apply_gradients(zip(out, variables))

        @tf.function(reduce_retracing=True)
        def step_mean(xb: Any, yb: Any) -> Any:
            with tf.GradientTape() as tape:
                flat_x = tf.reshape(xb, tf.concat([[-1], tf.shape(xb)[2:]], 0))
                value = _loss(loss, model(flat_x, training=True), tf.reshape(yb, [-1]))
            finish(tape.gradient(value, variables))
            return tf.constant(1.0)

        def env_loss(xe: Any, ye: Any) -> Any:
            return _loss(loss, model(xe, training=True), ye)

        @tf.function(reduce_retracing=True)
        def step_combined(xb: Any, yb: Any) -> Any:
            _, stats = gtf.vectorized_statistics(
                env_loss, variables, (xb, yb), combiner, nan_policy="propagate"
            )
            grads, infos = gtf.finalize_gradients(stats, combiner)
            finish(list(grads))
            return summarize(infos, sizes).survivor_fraction

        @tf.function(reduce_retracing=True)
        def predict(x: Any) -> Any:
            out = model(x, training=False)
            return (
                tf.cast(out[..., 0] > 0, tf.float32)
                if loss == "bce"
                else tf.argmax(out, -1, output_type=tf.int32)
            )

        x_all = tf.constant(train_x)
        y_all = tf.constant(train_y, dtype=label_dtype)
        evals = {name: (tf.constant(ex), np.asarray(ey)) for name, (ex, ey) in eval_sets.items()}
        curve: dict[str, list[float]] = {"epoch": [], **{name: [] for name in evals}}
        survivors: list[Any] = []
        rng = np.random.default_rng(seed)
        step_fn = step_mean if use_mean else step_combined
        start = time.perf_counter()
        total = epochs * steps_per_epoch
        bar = progress(range(total), total=total, desc=desc, enabled=show_progress)
        it = iter(bar)
        for epoch in range(epochs):
            perm = np.argsort(rng.random((n_envs, n_per_env)), axis=1)
            env_order = rng.permutation(n_envs) if group < n_envs else np.arange(n_envs)
            for s in range(steps_per_epoch):
                next(it, None)
                b, g = divmod(s, groups_per_epoch)
                envs = env_order[g * group : (g + 1) * group]
                idx = perm[envs, b * batch_size : (b + 1) * batch_size]
                gather = np.stack([np.repeat(envs, batch_size), idx.reshape(-1)], axis=1)
                shape = (len(envs), batch_size)
                xb = tf.reshape(tf.gather_nd(x_all, gather), (*shape, *train_x.shape[2:]))
                yb = tf.reshape(tf.gather_nd(y_all, gather), (*shape, *train_y.shape[2:]))
                kept = step_fn(xb, yb)
                if not use_mean:
                    survivors.append(kept)
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                curve["epoch"].append(epoch + 1)
                for name, (ex, ey) in evals.items():
                    pred = np.concatenate(
                        [np.asarray(predict(ex[i : i + 4096])) for i in range(0, len(ey), 4096)]
                    )
                    curve[name].append(float(np.mean(pred == ey)))
        if hasattr(bar, "close"):
            bar.close()
    return {
        "final": {name: curve[name][-1] for name in evals},
        "curve": curve,
        "survivor_fraction": float(np.mean([float(k) for k in survivors])) if survivors else 1.0,
        "steps": total,
        "seconds": time.perf_counter() - start,
    }


def train_patchwork(
    combiner: Combiner,
    *,
    environments: Sequence[int] = (0, 1, 2, 3),
    steps: int = 1000,
    lr: float = 0.3,
    lr_decay: float = 0.9995,
    weight_decay: float = 0.01,
    device: str = "cpu",
) -> Any:
    """The patchwork regression through :func:`gradand.backends.tensorflow.gradient` (float64).

    Example:
        >>> import gradand
        >>> from gradand.experiments.tf_training import train_patchwork
        >>> result = train_patchwork(gradand.AndMask(threshold=1.0, rescale=False), steps=300)
        >>> result.weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    gtf = _need_tf()
    from gradand.experiments.patchwork import PatchworkResult, inputs

    env = list(environments)
    if not env or any(not 0 <= e < 4 for e in env):
        raise ValueError(f"environments must be a non-empty subset of 0..3; got {environments!r}")
    xn, yn = inputs()
    with tf.device(resolve_device(device)):
        x = tf.constant(xn[env], dtype=tf.float64)
        y = tf.constant(yn[env], dtype=tf.float64)
        w = tf.Variable(tf.zeros(5, dtype=tf.float64))
        rate = tf.Variable(tf.constant(lr, dtype=tf.float64))

        @tf.function
        def step() -> Any:
            with tf.GradientTape(persistent=True) as tape:
                losses = [0.5 * (tf.tensordot(x[i], w, 1) - y[i]) ** 2 for i in range(len(env))]
            grads, _ = gtf.gradient(tape, losses, [w], combiner, nan_policy="propagate")
            w.assign_sub(rate * (grads[0] + weight_decay * w))
            rate.assign(rate * lr_decay)
            return w.read_value()

        traj = np.concatenate([np.zeros((1, 5)), np.stack([step().numpy() for _ in range(steps)])])
    wn = traj[-1]
    per_env = 0.5 * (xn @ wn - yn) ** 2
    held = [e for e in range(4) if e not in env]
    return PatchworkResult(
        weights=wn,
        trajectory=traj,
        train_loss=float(per_env[env].mean()),
        heldout_loss=float(per_env[held].mean()) if held else math.nan,
    )
