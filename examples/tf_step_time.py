"""Step time of AND-masked TensorFlow training steps relative to a plain-averaging ``tf.function`` step.

The spirals MLP (3 x 256 hidden units, ReLU, one logit) on 16 environments x
256 examples per step, Adam. Every variant is timed in the same process, in
interleaved rounds (each round times every variant once, in a new random
order). The report gives each variant's median time per step and the median
(and interquartile range) over rounds of its time divided by the same round's
baseline time: one forward and one backward pass over all 16 x 256 examples
with the mean loss (what training without gradand costs).

Run: python examples/tf_step_time.py                (a few minutes)
     python examples/tf_step_time.py --quick        (seconds, a smoke test)

Measured UNDER LOAD (a shared 2-core CPU, load average about 8; TensorFlow 2.21
CPU build), 15 rounds x 5 steps:

    variant                                                   ms/step   ratio     ratio IQR
    baseline: mean loss, one backward (tf.function)              79.3    1.00     1.00-1.00
    baseline, XLA                                                97.7    1.24     1.11-2.14
    TemporalAndMask optimizer on the baseline step               71.2    1.01     0.60-1.56
    Mean() via combined_gradients, loop                         101.9    1.36     1.22-2.02
    AndMask(1.0), loop                                          109.7    1.50     1.24-1.99
    AndMask(1.0), loop, XLA                                     118.2    1.49     1.26-2.10
    AndMask(1.0), vectorized (tape.jacobian)                    851.3   12.83    8.81-18.23
    AndMask(1.0), vectorized_statistics (vectorized_map)         88.9    1.16     0.86-1.59
    AndMask(1.0), vectorized_statistics, XLA                    112.1    1.47     1.25-1.93
    GeometricMean(1.0), loop                                    122.6    1.43     1.34-2.21
    SandMask(0.5, k=10), loop                                   115.8    1.44     1.37-1.77
    Keras train_on_batch, plain model                            79.8    1.00     0.88-1.13
    Keras train_on_batch, EnvironmentModel(AndMask(1.0))        111.7    1.46     1.28-1.79
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import gradand
from gradand.backends import tensorflow as gtf
from gradand.experiments.spirals import make_spirals


def mlp(inputs: int, hidden: int, layers: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    body = [keras.layers.Dense(hidden, activation="relu") for _ in range(layers)]
    return keras.Sequential([keras.Input((inputs,)), *body, keras.layers.Dense(1)])


def env_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(keras.losses.binary_crossentropy(y, model(x, training=True), from_logits=True))


def variants(x: tf.Tensor, y: tf.Tensor, hidden: int, layers: int) -> dict[str, Callable[[], object]]:
    n_envs, features = x.shape[0], x.shape[-1]

    def baseline(jit: bool = False, optimizer: str = "adam") -> Callable[[], object]:
        model = mlp(features, hidden, layers)
        opt = keras.optimizers.Adam(1e-3) if optimizer == "adam" else gtf.TemporalAndMask(1e-3)
        flat_x, flat_y = tf.reshape(x, (-1, features)), tf.reshape(y, (-1, 1))

        @tf.function(jit_compile=jit)
        def step() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = env_loss(model, flat_x, flat_y)  # mean over all environments' examples
            opt.apply_gradients(
                zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            )
            return loss

        return step

    def combined(combiner: gradand.Combiner, method: str, jit: bool = False) -> Callable[[], object]:
        model = mlp(features, hidden, layers)
        opt = keras.optimizers.Adam(1e-3)

        @tf.function(jit_compile=jit)
        def step() -> tf.Tensor:
            with tf.GradientTape(persistent=True) as tape:
                losses = [env_loss(model, x[e], y[e]) for e in range(n_envs)]
            grads, _ = gtf.gradient(tape, losses, model.trainable_variables, combiner, method=method)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return losses[0]

        return step

    def vmapped(combiner: gradand.Combiner, jit: bool = False) -> Callable[[], object]:
        model = mlp(features, hidden, layers)
        opt = keras.optimizers.Adam(1e-3)
        variables = model.trainable_variables

        @tf.function(jit_compile=jit)
        def step() -> tf.Tensor:
            _, stats = gtf.vectorized_statistics(
                lambda a, b: env_loss(model, a, b), variables, (x, y), combiner
            )
            grads, _ = gtf.finalize_gradients(stats, combiner)
            opt.apply_gradients(zip(grads, variables))
            return grads[0]

        return step

    def keras_fit_step(environment_model: bool) -> Callable[[], object]:
        model = mlp(features, hidden, layers)
        if environment_model:
            model = gtf.EnvironmentModel(model, combiner=gradand.AndMask(1.0))
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            jit_compile=False,
        )
        data = (x, y) if environment_model else (tf.reshape(x, (-1, features)), tf.reshape(y, (-1, 1)))
        return lambda: model.train_on_batch(*data)

    and_mask = gradand.AndMask(1.0)
    return {
        "baseline: mean loss, one backward (tf.function)": baseline(),
        "baseline, XLA": baseline(jit=True),
        "TemporalAndMask optimizer on the baseline step": baseline(optimizer="temporal"),
        "Mean() via gtf.gradient, streaming": combined(gradand.Mean(), "streaming"),
        "AndMask(1.0), loop": combined(and_mask, "streaming"),
        "AndMask(1.0), loop, XLA": combined(and_mask, "streaming", jit=True),
        "AndMask(1.0), vectorized (tape.jacobian)": combined(and_mask, "vectorized"),
        "AndMask(1.0), vectorized_statistics (vectorized_map)": vmapped(and_mask),
        "AndMask(1.0), vectorized_statistics, XLA": vmapped(and_mask, jit=True),
        "GeometricMean(1.0), loop": combined(gradand.GeometricMean(1.0), "streaming"),
        "SandMask(0.5, k=10), loop": combined(gradand.SandMask(0.5, k=10.0), "streaming"),
        "Keras train_on_batch, plain model": keras_fit_step(False),
        "Keras train_on_batch, EnvironmentModel(AndMask(1.0))": keras_fit_step(True),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--examples", type=int, default=256, help="examples per environment and step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per variant and round")
    parser.add_argument("--quick", action="store_true", help="tiny run, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.examples, args.hidden, args.rounds, args.steps = 2, 16, 16, 2, 1
    tf.get_logger().setLevel("ERROR")  # every variant traces its own step: no retracing warnings
    data = make_spirals(n_envs=args.envs, examples_per_env=args.examples, n_test=2, shortcut_dims=8, seed=0)
    x, y = tf.constant(data.train_x), tf.constant(data.train_y[..., None])
    steps = variants(x, y, args.hidden, args.layers)
    for step in steps.values():  # trace / compile, and warm up
        for _ in range(2):
            _block(step())
    times: dict[str, list[float]] = {name: [] for name in steps}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for name in rng.permutation(list(steps)):
            start = time.perf_counter()
            for _ in range(args.steps):
                out = steps[name]()
            _block(out)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = next(iter(steps))
    # paired: each round's time over the same round's baseline time, then the median over rounds
    ratios = {name: [t / b for t, b in zip(times[name], times[base])] for name in steps}
    print(f"{args.envs} environments x {args.examples} examples, MLP {args.layers}x{args.hidden}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps")  # fmt: skip
    print(f"{'variant':<56}{'ms/step':>9}{'ratio':>8}{'  ratio IQR':>14}")
    for name in steps:
        q1, _, q3 = statistics.quantiles(ratios[name], n=4) if args.rounds > 1 else (ratios[name][0],) * 3
        print(f"{name:<56}{1e3 * statistics.median(times[name]):>9.1f}"
              f"{statistics.median(ratios[name]):>8.2f}{f'{q1:.2f}-{q3:.2f}':>14}")  # fmt: skip
    return {name: statistics.median(r) for name, r in ratios.items()}


def _block(out: object) -> None:
    for t in tf.nest.flatten(out):
        if hasattr(t, "numpy"):
            t.numpy()


if __name__ == "__main__":
    main()
