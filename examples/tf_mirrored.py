"""The AND-mask under ``tf.distribute.MirroredStrategy``: environments split across replicas.

The CPU is split into logical devices (this must happen before TensorFlow
initialises its devices, so it is the first thing the script does), one
replica each. ``environment_batches`` yields ``(E, B, ...)`` batches, and the
strategy hands each replica its share of the E environments. Each replica
computes the statistics of its own environments, an all-reduce SUM adds them
up, and every replica applies the update of all environments together: the
same update that one replica seeing every environment applies. The script
trains the same model both ways, with ``fit`` and with a custom loop, and
prints the largest weight difference (float32 round-off).

Run: python examples/tf_mirrored.py             (about a minute on a laptop CPU)
     python examples/tf_mirrored.py --quick     (seconds, a smoke test)
"""

from __future__ import annotations

import argparse

import tensorflow as tf


def split_cpu(replicas: int) -> list[str]:
    """Split the CPU into ``replicas`` logical devices (before TensorFlow initialises them)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [d.name for d in tf.config.list_logical_devices("CPU")[:replicas]]


def main(argv: list[str] | None = None, strategy: tf.distribute.Strategy | None = None) -> dict[str, float]:
    """Train with and without ``strategy`` (a new MirroredStrategy by default) and compare.

    Pass the process's existing MirroredStrategy to reuse it: with TensorFlow
    2.21 on CPU, a second MirroredStrategy in one process aborts its collectives.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--envs", type=int, default=8, help="environments (a multiple of --replicas)")
    parser.add_argument("--examples", type=int, default=256, help="examples per environment")
    parser.add_argument("--batch", type=int, default=64, help="examples per environment and step")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.examples, args.batch, args.epochs = 4, 32, 16, 1

    import keras

    import gradand
    from gradand.backends import tensorflow as gtf
    from gradand.experiments.spirals import make_spirals

    data = make_spirals(
        n_envs=args.envs, examples_per_env=args.examples, n_test=500, shortcut_dims=8, seed=args.seed
    )
    environments = [(data.train_x[e], data.train_y[e][:, None]) for e in range(args.envs)]
    batches = gtf.environment_batches(environments, args.batch, shuffle=False)
    combiner = gradand.SandMask(threshold=0.5, k=10.0)  # its variance term needs the global count

    def build() -> keras.Model:
        keras.utils.set_random_seed(args.seed)
        net = keras.Sequential(
            [
                keras.Input((data.train_x.shape[-1],)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model = gtf.EnvironmentModel(net, combiner=combiner)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True)
        )
        return model

    # 1. Keras fit: the model is built under the strategy's scope; fit distributes the batches.
    if strategy is None:
        strategy = tf.distribute.MirroredStrategy(split_cpu(args.replicas))
    print(f"{strategy.num_replicas_in_sync} replicas, {args.envs} environments: "
          f"{args.envs // strategy.num_replicas_in_sync} per replica")  # fmt: skip
    with strategy.scope():
        mirrored = build()
    mirrored.fit(batches, epochs=args.epochs, verbose=0, shuffle=False)
    single = build()  # no strategy: one replica sees all environments
    single.fit(batches, epochs=args.epochs, verbose=0, shuffle=False)
    fit_gap = max(
        float(tf.reduce_max(tf.abs(a - b)))
        for a, b in zip(mirrored.trainable_variables, single.trainable_variables)
    )
    print(f"fit:         max |mirrored - single| over the weights = {fit_gap:.2e}")

    # 2. A custom loop: gtf.gradient all-reduces the statistics inside strategy.run.
    def custom_loop(strategy: tf.distribute.Strategy) -> list[tf.Variable]:
        with strategy.scope():
            keras.utils.set_random_seed(args.seed)
            net = keras.Sequential(
                [
                    keras.Input((data.train_x.shape[-1],)),
                    keras.layers.Dense(64, "relu"),
                    keras.layers.Dense(1),
                ]
            )
            optimizer = keras.optimizers.Adam(1e-2)
            optimizer.build(net.trainable_variables)  # create the slots under the scope, not inside the step

        # Inside strategy.run a keras.losses.Loss divides each loss by the number of replicas
        # (TensorFlow's convention); gtf.gradient expects exactly that (see loss_scale).
        bce = keras.losses.BinaryCrossentropy(from_logits=True)

        def replica_step(x, y):  # this replica's environments: (E / replicas, batch, ...)
            with tf.GradientTape(persistent=True) as tape:
                losses = [bce(y[e], net(x[e], training=True)) for e in range(x.shape[0])]
            grads, _ = gtf.gradient(tape, losses, net.trainable_variables, combiner)
            optimizer.apply_gradients(zip(grads, net.trainable_variables))

        step = tf.function(lambda batch: strategy.run(replica_step, args=batch))
        for _ in range(args.epochs):
            for batch in strategy.experimental_distribute_dataset(batches):
                step(batch)
        return net.trainable_variables

    loop_gap = max(
        float(tf.reduce_max(tf.abs(a - b)))
        for a, b in zip(custom_loop(strategy), custom_loop(tf.distribute.get_strategy()))
    )
    print(f"custom loop: max |mirrored - single| over the weights = {loop_gap:.2e}")
    return {"fit": fit_gap, "custom_loop": loop_gap}


if __name__ == "__main__":
    main()
