"""Keras 3: fit() on environment batches equals the numpy core; spirals; the temporal optimizer; saving."""

from __future__ import annotations

import numpy as np
import pytest

import gradand

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
gtf = pytest.importorskip("gradand.backends.tensorflow")

E, B, D = 4, 8, 3


def _data(seed=0, n_env=E):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_env, B, D)).astype(np.float32)
    y = (rng.random((n_env, B, 1)) > 0.5).astype(np.float32)
    return x, y


def _net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((D,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(1)]
    )


def _bce():
    return keras.losses.BinaryCrossentropy(from_logits=True)


def _sgd_oracle(net, x, y, combiner, lr=0.1, present=None):
    """Weights after one SGD step on the numpy core's combination of TF per-environment gradients."""
    present = range(x.shape[0]) if present is None else present
    with tf.GradientTape(persistent=True) as tape:
        losses = [_bce()(y[e], net(x[e])) for e in present]
    out = []
    for v in net.trainable_variables:
        g = np.stack([tape.gradient(loss, v).numpy() for loss in losses])
        out.append(v.numpy() - lr * gradand.combine(g, combiner))
    return out


LAYOUTS = [
    ("axis0", "loop", False),
    ("axis1", "loop", False),
    ("axis0", "vectorized", False),
    ("axis1", "vectorized", True),
    ("index", "loop", False),
]


@pytest.mark.parametrize(("layout", "method", "jit"), LAYOUTS, ids=lambda v: str(v))
def test_one_fit_step_applies_the_numpy_cores_combination(layout, method, jit):
    x, y = _data()
    c = gradand.SandMask(0.3, k=5.0)
    expected = _sgd_oracle(_net(), x, y, c)
    kw = {"num_environments": E} if layout == "index" else {"environment_axis": int(layout[-1])}
    model = gtf.EnvironmentModel(_net(), combiner=c, method=method, **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce(), jit_compile=jit)
    if layout == "axis0":
        history = model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)
    elif layout == "axis1":
        history = model.fit(
            np.swapaxes(x, 0, 1), np.swapaxes(y, 0, 1), batch_size=B, verbose=0, shuffle=False
        )
    else:
        order = np.random.default_rng(1).permutation(E * B)
        env = np.repeat(np.arange(E), B)[order]
        batch = (x.reshape(-1, D)[order], y.reshape(-1, 1)[order], env)
        history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)
    for v, ref in zip(model.model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert set(history.history) == {"loss", "survivor_fraction", "agreement"}
    assert 0.0 < history.history["survivor_fraction"][0] <= 1.0


def test_an_environment_absent_from_an_index_batch_is_left_out_of_that_step():
    x, y = _data(2)
    c = gradand.AndMask(0.6)
    expected = _sgd_oracle(_net(), x, y, c, present=[0, 1, 3])
    keep = np.repeat(np.arange(E), B) != 2
    batch = (x.reshape(-1, D)[keep], y.reshape(-1, 1)[keep], np.repeat(np.arange(E), B)[keep])
    model = gtf.EnvironmentModel(_net(), combiner=c, num_environments=E)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce())
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)
    for v, ref in zip(model.model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_weight_decay_is_added_to_the_combined_gradient_after_the_mask():
    x, y = _data(7)
    c = gradand.AndMask(1.0)
    net = _net()
    decay = [0.1 * 0.05 * v.numpy() for v in net.trainable_variables]
    expected = [w - d for w, d in zip(_sgd_oracle(net, x, y, c), decay)]
    model = gtf.EnvironmentModel(_net(), combiner=c, weight_decay=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce())
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)
    for v, ref in zip(model.model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert model.get_config()["weight_decay"] == 0.05


def test_mean_keeps_every_component_and_reports_it_in_the_progress_bar_logs():
    x, y = _data(3)
    model = gtf.EnvironmentModel(_net(), combiner=gradand.Mean())
    model.compile(optimizer="sgd", loss=_bce(), metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)])
    logs = model.fit(
        tf.data.Dataset.from_tensors((x, y)).repeat(2), epochs=1, verbose=0, shuffle=False
    ).history
    assert logs["survivor_fraction"] == [1.0]
    assert 0.0 <= logs["agreement"][0] <= 1.0 and "binary_accuracy" in logs
    assert "survivor_fraction" not in [m.name for m in model.metrics]  # training logs only


class FunctionalNet(gtf.EnvironmentTrainStep, keras.Model):
    pass


def test_the_mixin_trains_a_functional_model_and_keeps_its_settings_through_get_config():
    inputs = keras.Input((D,))
    outputs = keras.layers.Dense(1)(keras.layers.Dense(4, activation="relu")(inputs))
    keras.utils.set_random_seed(0)
    model = FunctionalNet(inputs, outputs, combiner=gradand.GeometricMean(0.5), environment_axis=1)
    model.compile(optimizer="sgd", loss=_bce())
    x, y = _data(4)
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(np.swapaxes(x, 0, 1), np.swapaxes(y, 0, 1), batch_size=B, verbose=0)
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
    clone = FunctionalNet.from_config(model.get_config())
    assert clone.combiner == gradand.GeometricMean(0.5) and clone.environment_axis == 1


def _spirals(n_envs, n, seed):
    """Two interleaved spirals (1.5 turns), label = arm; environments differ in their noise level."""
    rng = np.random.default_rng(seed)
    envs = []
    for e in range(n_envs):
        label = rng.integers(0, 2, n)
        t = np.sqrt(rng.random(n))
        angle = 3.0 * np.pi * t + np.pi * label
        noise = 0.02 * (1 + e)
        points = np.stack([t * np.cos(angle), t * np.sin(angle)], 1) + noise * rng.standard_normal((n, 2))
        envs.append((points.astype(np.float32), label[:, None].astype(np.float32)))
    return envs


def test_keras_fit_with_the_and_mask_learns_spirals_above_chance():
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model = gtf.EnvironmentModel(net, combiner=gradand.AndMask(0.5))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=_bce(),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    model.fit(
        gtf.environment_batches(_spirals(4, 256, seed=0), 64, seed=0), epochs=8, verbose=0, shuffle=False
    )
    x_test, y_test = _spirals(1, 1000, seed=1)[0]
    accuracy = float(np.mean((model.predict(x_test, verbose=0) > 0) == (y_test > 0.5)))
    assert accuracy > 0.62, accuracy  # chance is 0.5


def _numpy_temporal(grads, p, **kw):
    state = [np.zeros_like(p)] * 3
    for step, g in enumerate(grads, start=1):
        out = gradand.temporal.temporal_and_mask_step(g, p, *state, step, **kw)
        p = p - 0.05 * out.direction
        state = [out.exp_avg, out.exp_avg_sq, out.sign_avg]
    return p


@pytest.mark.parametrize("order", ["before", "after"])
def test_temporal_and_mask_optimizer_equals_the_numpy_temporal_step(order):
    rng = np.random.default_rng(5)
    grads = [(rng.standard_normal(6) + 0.4).astype(np.float32) for _ in range(6)]
    p0 = rng.standard_normal(6).astype(np.float32)
    kw = dict(
        betas=(0.9, 0.99), beta3=0.8, threshold=0.6, eps=1e-8, weight_decay=0.1, weight_decay_order=order
    )
    expected = _numpy_temporal(grads, p0.astype(np.float64), **kw)
    opt = gtf.TemporalAndMask(
        0.05, beta_1=0.9, beta_2=0.99, beta_3=0.8, threshold=0.6, weight_decay=0.1, weight_decay_order=order
    )
    w = keras.Variable(p0)
    step = tf.function(lambda g: opt.apply([g], [w]))
    for g in grads:
        step(tf.constant(g))
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_temporal_and_mask_with_threshold_one_keeps_components_whose_sign_never_changes():
    opt = gtf.TemporalAndMask(0.01, threshold=1.0)
    w = keras.Variable(np.zeros(2, np.float32))
    step = tf.function(lambda g: opt.apply([g], [w]))
    rng = np.random.default_rng(8)
    history = []
    for t in range(30):  # component 0 always positive; component 1 flips sign every step
        g = np.array([1.0 + rng.random(), (-1.0) ** t], np.float32)
        before = w.numpy().copy()
        step(tf.constant(g))
        history.append(w.numpy() - before)
    moved = np.array(history) != 0
    assert moved[:, 0].all()  # masked at no step (float32 round-off must not flicker the mask)
    assert not moved[1:, 1].any()  # after the first step the flipping component is masked


def test_saving_and_loading_keeps_model_combiner_and_temporal_optimizer_state(tmp_path):
    x, y = _data(6)
    xs, ys = np.swapaxes(x, 0, 1), np.swapaxes(y, 0, 1)
    model = gtf.EnvironmentModel(_net(), combiner=gradand.SandMask(0.3, k=5.0), environment_axis=1)
    model.compile(optimizer=gtf.TemporalAndMask(0.01, threshold=0.8, weight_decay=0.01), loss=_bce())
    model.fit(xs, ys, batch_size=4, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, gtf.EnvironmentModel) and loaded.combiner == gradand.SandMask(0.3, k=5.0)
    assert isinstance(loaded.optimizer, gtf.TemporalAndMask)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(loaded.predict(x[0], verbose=0), model.predict(x[0], verbose=0))
    for m in (model, loaded):
        m.fit(xs, ys, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_environment_batches_stack_one_batch_per_environment():
    envs = [(np.full((7, 2), e, np.float32), np.full(7, e, np.int64)) for e in range(3)]
    batches = list(gtf.environment_batches(envs, batch_size=3, shuffle=False))
    assert len(batches) == 2  # 7 // 3, the remainder dropped
    x, y = batches[0]
    assert tuple(x.shape) == (3, 3, 2) and tuple(y.shape) == (3, 3)
    np.testing.assert_array_equal(y.numpy(), [[0] * 3, [1] * 3, [2] * 3])


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"combiner": "and_mask"}, TypeError, r"combiner must be a gradand combiner.*got str"),
        ({"method": "pfor"}, ValueError, r"method must be one of \('streaming', 'vectorized'\); got 'pfor'"),
        ({"environment_axis": -1}, ValueError, r"environment_axis must be an int >= 0; got -1"),
        ({"num_environments": 0}, ValueError, r"num_environments must be None .* got 0"),
        ({"num_environments": 3, "method": "vectorized"}, ValueError, r"vectorized' needs equal-sized"),
        ({"nan_policy": "ignore"}, ValueError, r"nan_policy must be one of"),
        ({"weight_decay": -1.0}, ValueError, r"weight_decay must be a number >= 0; got -1.0"),
    ],
)
def test_bad_environment_settings_get_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        gtf.EnvironmentModel(_net(), **{"combiner": gradand.AndMask(), **kwargs})


def test_a_model_that_is_not_keras_is_rejected():
    with pytest.raises(TypeError, match=r"model must be a keras.Model.*got function"):
        gtf.EnvironmentModel(lambda x: x)


def test_batches_without_the_environment_axis_get_a_clear_error():
    model = gtf.EnvironmentModel(_net(), combiner=gradand.AndMask(), environment_axis=2)
    model.compile(optimizer="sgd", loss=_bce())
    x, y = _data()
    with pytest.raises(ValueError, match=r"every batch tensor must hold the .* environments on axis 2"):
        model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)


def test_index_batches_without_an_index_get_a_clear_error():
    model = gtf.EnvironmentModel(_net(), combiner=gradand.AndMask(), num_environments=2)
    model.compile(optimizer="sgd", loss=_bce())
    x, y = _data()
    with pytest.raises(ValueError, match=r"batches must be \(x, y, environment\)"):
        model.fit(tf.data.Dataset.from_tensors((x[0], y[0])), epochs=1, verbose=0, shuffle=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta_3": 1.0}, r"^beta_3 must be in \[0, 1\); got 1.0"),
        ({"beta_1": -0.1}, r"^beta_1 must be in \[0, 1\)"),
        ({"threshold": 1.5}, r"^threshold must be in \[0, 1\]"),
        ({"epsilon": 0.0}, r"^epsilon must be > 0"),
        ({"learning_rate": -1.0}, r"^learning_rate must be >= 0"),
        ({"weight_decay_order": "late"}, r"^weight_decay_order must be 'before'"),
    ],
)
def test_bad_temporal_hyperparameters_are_named_as_the_optimizer_names_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gtf.TemporalAndMask(**kwargs)


def test_environment_batches_reject_bad_input():
    with pytest.raises(ValueError, match=r"batch_size must be a positive int; got 0"):
        gtf.environment_batches([np.zeros((4, 2))], 0)
    with pytest.raises(ValueError, match=r"environments is empty"):
        gtf.environment_batches([], 2)
    with pytest.raises(ValueError, match=r"same structure of tensors"):
        gtf.environment_batches([np.zeros((4, 2)), np.zeros((4, 3))], 2)


# --- Keras traps (issue 12) -----------------------------------------------------------------------


def test_a_missing_combiner_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"EnvironmentModel needs combiner="):
        gtf.EnvironmentModel(_net())


def test_evaluate_and_validation_report_what_the_plain_keras_model_reports():
    x, y = _data()
    metrics = [keras.metrics.BinaryAccuracy(threshold=0.0)]
    plain = _net()
    plain.compile(optimizer="sgd", loss=_bce(), metrics=metrics)
    model = gtf.EnvironmentModel(_net(), combiner=gradand.AndMask(0.5))
    model.compile(optimizer="sgd", loss=_bce(), metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)])
    flat_x, flat_y = x.reshape(-1, D), y.reshape(-1, 1)
    history = model.fit(
        tf.data.Dataset.from_tensors((x, y)), validation_data=(flat_x, flat_y), epochs=1, verbose=0
    ).history
    assert set(history) == {"loss", "binary_accuracy", "survivor_fraction", "agreement",
                            "val_loss", "val_binary_accuracy"}  # fmt: skip
    got = model.evaluate(flat_x, flat_y, verbose=0)
    want = plain.evaluate(flat_x, flat_y, verbose=0)
    assert len(got) == len(want) == 2
    assert set(model.evaluate(flat_x, flat_y, verbose=0, return_dict=True)) == {"loss", "binary_accuracy"}


def test_environment_axis_0_refuses_arrays_that_batch_size_would_split():
    x, y = _data()
    model = gtf.EnvironmentModel(_net(), combiner=gradand.AndMask())
    model.compile(optimizer="sgd", loss=_bce())
    with pytest.raises(ValueError, match=r"batch_size splits the environments"):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0)


def test_an_environment_missing_from_an_index_batch_is_left_out_of_that_step():
    x, y = _data()
    c = gradand.AndMask(0.5)
    present = [0, 2, 3]  # a shuffled stream's batch may miss environment 1: the documented behaviour
    expected = _sgd_oracle(_net(), x, y, c, present=present)
    model = gtf.EnvironmentModel(_net(), combiner=c, num_environments=E)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce())
    env = np.repeat(np.array(present), B)
    batch = (x[present].reshape(-1, D), y[present].reshape(-1, 1), env)
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)
    for v, ref in zip(model.model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
def test_an_environment_index_out_of_range_names_the_index_and_num_environments(eager):
    x, y = _data()
    model = gtf.EnvironmentModel(_net(), combiner=gradand.AndMask(), num_environments=E)
    model.compile(optimizer="sgd", loss=_bce(), run_eagerly=eager)
    env = np.repeat(np.arange(E), B)
    env[3] = 9
    batch = (x.reshape(-1, D), y.reshape(-1, 1), env)
    error = ValueError if eager else tf.errors.InvalidArgumentError
    with pytest.raises(error, match=r"outside \[0, num_environments=4\)"):
        model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False)


def _batch_norm_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((D,)), keras.layers.Dense(5, use_bias=False),
        keras.layers.BatchNormalization(momentum=0.7), keras.layers.Activation("tanh"), keras.layers.Dense(1),
    ])  # fmt: skip


def test_fit_with_batch_norm_equals_a_factored_step_including_the_moving_statistics():
    """fit (one forward pass per environment) and model_gradient's factored path (per-environment
    batch statistics in one pass) give the same weights and moving statistics; the vectorized
    method, which cannot update them per environment, is refused."""
    x, y = _data()
    c = gradand.AndMask(0.5)
    net = _batch_norm_net()
    grads, _ = gtf.model_gradient(net, _bce(), tf.constant(x), tf.constant(y), c, fallback="error")
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads, net.trainable_variables))
    model = gtf.EnvironmentModel(_batch_norm_net(), combiner=c)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce())
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)
    assert len(model.model.weights) == len(net.weights) == 7  # moving mean and variance included
    for a, b in zip(model.model.weights, net.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    vectorized = gtf.EnvironmentModel(_batch_norm_net(), combiner=c, method="vectorized")
    vectorized.compile(optimizer=keras.optimizers.SGD(0.1), loss=_bce())
    with pytest.raises(ValueError, match=r"BatchNormalization layer .* method='vectorized' cannot"):
        vectorized.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
