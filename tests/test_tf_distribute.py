"""tf.distribute MirroredStrategy on two logical CPUs: all-reduced statistics give the single-replica update.

The logical devices must be configured before TensorFlow initialises its
devices, so everything runs in ONE subprocess (TensorFlow imports slowly),
which prints a JSON report that the tests below check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, runpy
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import gradand
import gradand.backends.tensorflow as gtf

report = {}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report["replicas"] = strategy.num_replicas_in_sync
rng = np.random.default_rng(0)
E, B, D = 4, 8, 3
x = rng.standard_normal((E, B, D)).astype(np.float32)
y = (rng.random((E, B, 1)) > 0.5).astype(np.float32)
batches = tf.data.Dataset.from_tensors((x, y)).repeat(3)

# 1. all_reduce_statistics: each replica reduces its own environments; the sum is the global statistics.
c = gradand.SandMask(0.3, k=10.0)
g = rng.standard_normal((E, 5)).astype(np.float32)
parts = strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.constant(g[2 * ctx.replica_id_in_sync_group : 2 * ctx.replica_id_in_sync_group + 2]))

@tf.function
def reduce_and_finalize(part):
    def fn(p):
        [s] = gtf.all_reduce_statistics([gradand.statistics(p, c)])
        return gradand.finalize(s, c), s.count, tf.shape(p)[0]
    return strategy.run(fn, args=(part,))

update, count, local = reduce_and_finalize(parts)
report["all_reduce"] = {
    "local_counts": [int(t) for t in strategy.experimental_local_results(local)],
    "global_counts": [float(t) for t in strategy.experimental_local_results(count)],
    "max_error": max(float(np.abs(u.numpy() - gradand.combine(g, c)).max())
                     for u in strategy.experimental_local_results(update)),
}

def net():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((D,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)]
    return keras.Sequential(layers)

def gap(a, b):
    return max(float(np.abs(np.asarray(u) - np.asarray(v)).max()) for u, v in zip(a, b))

# 2. A custom loop with SGD (scale-sensitive): mirrored == single (== the numpy core: test_tf_keras), with the
#    losses of a keras.losses.Loss (divided by the replicas: the default loss_scale) or plain means.
def custom_loop(strategy, steps, kind="loss_object"):
    with strategy.scope():
        model = net()
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    shapes = []
    def replica_step(xb, yb):
        with tf.GradientTape(persistent=True) as tape:
            if kind == "loss_object":
                losses = [bce(yb[e], model(xb[e])) for e in range(xb.shape[0])]
            else:
                losses = [tf.reduce_mean(keras.losses.binary_crossentropy(yb[e], model(xb[e]),
                                                                          from_logits=True))
                          for e in range(xb.shape[0])]
        shapes.append(int(xb.shape[0]))
        scale = None if kind == "loss_object" else 1.0
        grads, info = gtf.combined_gradients(tape, losses, model.trainable_variables, c, loss_scale=scale)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    step = tf.function(lambda batch: strategy.run(replica_step, args=batch))
    for batch in strategy.experimental_distribute_dataset(batches.take(steps)):
        step(batch)
    return model.trainable_variables, shapes

mirrored, shapes = custom_loop(strategy, 3)
mirrored_means, _ = custom_loop(strategy, 3, kind="mean")
single, _ = custom_loop(tf.distribute.get_strategy(), 3)
report["custom_loop"] = {"environments_per_replica": shapes, "gap": gap(mirrored, single),
                         "gap_plain_means": gap(mirrored_means, single)}

# 3. Keras fit with SGD and weight decay: mirrored == single.
def fit(strategy, **kw):
    with strategy.scope():
        model = gtf.EnvironmentModel(net(), combiner=c, **kw)
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    history = model.fit(batches, epochs=1, verbose=0, shuffle=False).history
    return model.trainable_variables, history

m_vars, m_hist = fit(strategy, weight_decay=0.05)  # the L2 term too is split into replica shares
s_vars, s_hist = fit(tf.distribute.get_strategy(), weight_decay=0.05)
report["fit"] = {"gap": gap(m_vars, s_vars), "mirrored_logs": m_hist, "single_logs": s_hist}

# 4. The example runs in this process too (its own device setup is skipped when already done).
example = runpy.run_path(EXAMPLE_PATH, run_name="example")
report["example"] = example["main"](["--quick"], strategy=strategy)  # one MirroredStrategy per process
# 5. Environments that are not split across replicas get a clear error (last: the
# replica that raises leaves the other one's collectives aborted).
try:
    fit(strategy, environment_axis=1)
    report["axis1_error"] = None
except ValueError as error:
    report["axis1_error"] = str(error)

print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0"}
    code = WORKER.replace("EXAMPLE_PATH", repr(str(ROOT / "examples" / "tf_mirrored.py")))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("REPORT") :])


def test_two_logical_cpus_give_two_replicas(report):
    assert report["replicas"] == 2


def test_all_reduced_statistics_count_every_replicas_environments_and_finalize_to_the_numpy_core(report):
    r = report["all_reduce"]
    assert r["local_counts"] == [2, 2]
    assert r["global_counts"] == [4.0, 4.0]
    assert r["max_error"] < 1e-5


def test_mirrored_custom_loop_applies_the_single_replica_update(report):
    r = report["custom_loop"]
    assert set(r["environments_per_replica"]) == {2}  # each replica holds half of the 4 environments
    assert r["gap"] < 1e-5  # keras.losses.Loss objects: divided by the replicas, the default loss_scale
    assert r["gap_plain_means"] < 1e-5  # plain per-environment means with loss_scale=1.0


def test_mirrored_keras_fit_applies_the_single_replica_update(report):
    r = report["fit"]
    assert r["gap"] < 1e-5
    for key in ("loss", "survivor_fraction", "agreement"):
        assert r["mirrored_logs"][key][0] == pytest.approx(r["single_logs"][key][0], rel=1e-5)


def test_environments_not_split_across_replicas_are_rejected(report):
    assert report["axis1_error"] is not None
    assert "environments must be split across replicas" in report["axis1_error"]


def test_the_mirrored_example_matches_single_replica_training(report):
    assert report["example"]["fit"] < 1e-5
    assert report["example"]["custom_loop"] < 1e-5
