"""The factored TensorFlow path equals vectorized_statistics + finalize_gradients (convolutions and
BatchNormalization: one pass per environment); errors name their cause."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradand

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
gtf = pytest.importorskip("gradand.backends.tensorflow")

BCE = keras.losses.BinaryCrossentropy(from_logits=True)
COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(0.0),
    gradand.AndMask(0.5, rescale=False),
    gradand.AndMask(1.0),
    gradand.SandMask(0.3, k=10.0),
    gradand.GeometricMean(0.5),
]


def _mlp(seed=0, d=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(5, activation="relu", use_bias=False),
            keras.layers.Dense(1),
        ]
    )


def _mixed(seed=0):
    """Dense layers (factored) and a LayerNormalization (falls back)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(1, use_bias=False),
        ]
    )


def _data(n_env, n_ex, seed=0, d=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_env, n_ex, d)).astype(np.float32)
    y = (rng.random((n_env, n_ex, 1)) > 0.5).astype(np.float32)
    return tf.constant(x), tf.constant(y)


def _reference(model, x, y, combiner, nan_policy="raise"):
    _, stats = gtf.vectorized_statistics(
        lambda a, b: BCE(b, model(a, training=True)),
        model.trainable_variables,
        (x, y),
        combiner,
        nan_policy=nan_policy,
    )
    return gtf.finalize_gradients(stats, combiner)[0]


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("n_ex", [5, 1], ids=["envs", "per-example"])
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_equals_vectorized_statistics(combiner, n_ex):
    model = _mlp()
    x, y = _data(7, n_ex)
    _, stats = gtf.factored_statistics(model, BCE, x, y, combiner)
    assert all(s.count == 7 for s in stats)
    got = gtf.finalize_gradients(stats, combiner)[0]
    _assert_close(got, _reference(model, x, y, combiner))


@settings(max_examples=12)
@given(
    n_env=st.integers(1, 6),
    n_ex=st.integers(1, 4),
    threshold=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([None, 1, 2]),
)
def test_and_mask_equals_vectorized_for_drawn_sizes(n_env, n_ex, threshold, seed, chunk):
    model = _mlp(seed % 3)
    x, y = _data(n_env, n_ex, seed)
    combiner = gradand.AndMask(threshold)
    _, stats = gtf.factored_statistics(model, BCE, x, y, combiner, chunk_size=chunk)
    _, ref = gtf.vectorized_statistics(
        lambda a, b: BCE(b, model(a, training=True)), model.trainable_variables, (x, y), combiner
    )
    for s, r in zip(stats, ref):
        assert s.count == r.count == n_env
        np.testing.assert_array_equal(s.sign_sum.numpy(), r.sign_sum.numpy())
        np.testing.assert_allclose(s.mean.numpy(), r.mean.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_ex", [4, 1], ids=["envs", "per-example"])
def test_fallback_variables_mixed_with_factored_ones(n_ex):
    model = _mixed()
    x, y = _data(5, n_ex)
    for combiner in (gradand.AndMask(0.6), gradand.GeometricMean(0.5)):
        got = gtf.model_gradient(model, BCE, x, y, combiner)[0]
        _assert_close(got, _reference(model, x, y, combiner))
    with pytest.raises(ValueError, match=r"outside them.*gamma.*fallback='vectorized'"):
        gtf.factored_statistics(model, BCE, x, y, gradand.AndMask(), fallback="error")


def test_tf_function_and_xla_equal_eager():
    model = _mixed()
    combiner = gradand.AndMask(0.7)
    for n_ex in (3, 1):
        x, y = _data(6, n_ex)
        eager = gtf.model_gradient(model, BCE, x, y, combiner)
        step = tf.function(lambda a, b: gtf.model_gradient(model, BCE, a, b, combiner))
        xla = tf.function(lambda a, b: gtf.model_gradient(model, BCE, a, b, combiner), jit_compile=True)
        for other in (step(x, y), xla(x, y)):
            _assert_close(other[0], eager[0])
            for i, j in zip(other[1].infos, eager[1].infos):
                np.testing.assert_allclose(float(i.survivor_fraction), float(j.survivor_fraction), atol=1e-6)
    assert not any("call" in vars(layer) for layer in model.layers), "Dense.call was not restored"


def test_training_step_updates_like_combined_gradients():
    combiner = gradand.AndMask(0.5)
    x, y = _data(4, 8)
    models = [_mlp(1), _mlp(1)]
    opts = [keras.optimizers.SGD(0.5), keras.optimizers.SGD(0.5)]

    @tf.function
    def factored_step():
        grads, _ = gtf.model_gradient(models[0], BCE, x, y, combiner)
        opts[0].apply_gradients(zip(grads, models[0].trainable_variables))

    @tf.function
    def loop_step():
        with tf.GradientTape(persistent=True) as tape:
            losses = [BCE(y[e], models[1](x[e], training=True)) for e in range(4)]
        grads, _ = gtf.gradient(tape, losses, models[1].trainable_variables, combiner)
        opts[1].apply_gradients(zip(grads, models[1].trainable_variables))

    for _ in range(3):
        factored_step()
        loop_step()
    _assert_close(models[0].trainable_variables, models[1].trainable_variables, rtol=1e-5, atol=1e-5)


def test_shared_layer_and_rank3_inputs():
    """A Dense layer called twice, and Dense on (examples, time, features) inputs."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 3))
    shared = keras.layers.Dense(3, activation="tanh")
    h = shared(shared(inp))
    out = keras.layers.Dense(1)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for n_ex in (3, 1):
        x = tf.constant(rng.standard_normal((5, n_ex, 4, 3)).astype(np.float32))
        y = tf.constant((rng.random((5, n_ex, 1)) > 0.5).astype(np.float32))
        for combiner in (gradand.AndMask(0.6), gradand.SandMask(0.2, k=5.0)):
            got = gtf.model_gradient(model, BCE, x, y, combiner)[0]
            _assert_close(got, _reference(model, x, y, combiner))


def test_variables_subset_structure_and_losses():
    model = _mlp()
    x, y = _data(4, 3)
    combiner = gradand.AndMask(0.5)
    variables = {"first": model.layers[0].kernel, "last": model.layers[2].bias}
    grads, result = gtf.model_gradient(model, BCE, x, y, combiner, variables=variables)
    assert set(grads) == {"first", "last"} and len(result.infos) == 2
    full = gtf.finalize_gradients(gtf.factored_statistics(model, BCE, x, y, combiner)[1], combiner)[0]
    np.testing.assert_allclose(grads["first"].numpy(), full[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(grads["last"].numpy(), full[-1].numpy(), rtol=1e-6)
    losses, _ = gtf.factored_statistics(model, BCE, x, y, combiner)
    want = [float(BCE(y[e], model(x[e]))) for e in range(4)]
    np.testing.assert_allclose(losses.numpy(), want, rtol=1e-5)


def test_unconnected_variable_is_none():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    unused = keras.layers.Dense(2)
    out = keras.layers.Dense(1)(inp)
    _ = unused(inp)  # built, but not on the path to the output
    model = keras.Model(inp, out)
    x, y = _data(3, 2)
    _, stats = gtf.factored_statistics(
        model,
        BCE,
        x,
        y,
        gradand.AndMask(),
        variables=[*model.trainable_variables, *unused.trainable_variables],
    )
    assert stats[0] is not None and stats[1] is not None
    assert stats[2] is None and stats[3] is None


@pytest.mark.parametrize("n_ex", [3, 1], ids=["envs", "per-example"])
def test_nan_policy_matches_vectorized(n_ex):
    model = _mlp()
    x, y = _data(4, n_ex)
    x = tf.tensor_scatter_nd_update(x, [[1, 0, 0]], [float("nan")])
    combiner = gradand.AndMask(0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gtf.factored_statistics(model, BCE, x, y, combiner)
    step = tf.function(lambda: [s.mean for s in gtf.factored_statistics(model, BCE, x, y, combiner)[1]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        step()
    got = gtf.finalize_gradients(
        gtf.factored_statistics(model, BCE, x, y, combiner, nan_policy="zero")[1], combiner
    )[0]
    _assert_close(got, _reference(model, x, y, combiner, nan_policy="zero"))


def test_errors_name_the_argument():
    model = _mlp()
    x, y = _data(3, 4)
    c = gradand.AndMask()
    with pytest.raises(ValueError, match=r"inputs must have shape \(E, n, \.\.\.\).*got shape \(3,\)"):
        gtf.factored_statistics(model, BCE, x[0, 0], y, c)
    with pytest.raises(
        ValueError, match=r"inputs must have shape \(E, n, 3\).*\(None, 3\); got shape \(4, 3\)"
    ):
        gtf.factored_statistics(model, BCE, x[0], y, c)
    with pytest.raises(ValueError, match=r"inputs must have shape \(E, n, 3\).*got shape \(3, 4, 2\)"):
        gtf.factored_statistics(model, BCE, x[..., :2], y, c)
    with pytest.raises(ValueError, match=r"targets must have the same \(E, n\).*\(3, 4, 3\).*\(2, 4, 1\)"):
        gtf.factored_statistics(model, BCE, x, y[:2], c)
    with pytest.raises(ValueError, match=r"targets must have the same \(E, n\).*n=4.*n=2"):
        gtf.factored_statistics(model, BCE, x, y[:, :2], c)
    with pytest.raises(TypeError, match=r"inputs must have a floating dtype.*int32 with shape \(3, 4, 3\)"):
        gtf.factored_statistics(model, BCE, tf.cast(x, tf.int32), y, c)
    with pytest.raises(ValueError, match=r"inputs has shape \(0, 4, 3\); need at least one environment"):
        gtf.factored_statistics(model, BCE, x[:0], y[:0], c)
    with pytest.raises(ValueError, match="at least one environment"):
        gtf.factored_statistics(model, BCE, x[:, :0], y[:, :0], c)
    with pytest.raises(ValueError, match=r"loss_fn must return one environment's loss as a scalar"):
        gtf.factored_statistics(model, lambda o, t: t - o, x, y, c)
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gtf.factored_statistics(model, BCE, x, y, "and")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gtf.factored_statistics(model, "bce", x, y, c)
    with pytest.raises(ValueError, match=r"fallback must be one of .*got 'loop'"):
        gtf.factored_statistics(model, BCE, x, y, c, fallback="loop")
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1; got 0"):
        gtf.factored_statistics(model, BCE, x, y, c, chunk_size=0)
    with pytest.raises(ValueError, match="nan_policy"):
        gtf.factored_statistics(model, BCE, x, y, c, nan_policy="ignore")
    assert not any("call" in vars(layer) for layer in model.layers)


def test_model_output_without_batch_axis_is_refused():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    out = keras.layers.Lambda(lambda t: tf.reduce_sum(t, axis=0))(keras.layers.Dense(2)(inp))
    model = keras.Model(inp, out)
    x, y = _data(3, 4)
    with pytest.raises(ValueError, match=r"the 12 examples \(E·n = 3·4\) on axis 0; got shape \(2,\)"):
        gtf.factored_statistics(model, BCE, x, y, gradand.AndMask())


def test_loss_scale_divides_the_gradients_back():
    model = _mlp()
    x, y = _data(4, 2)
    combiner = gradand.SandMask(0.4, k=10.0)
    want = gtf.factored_statistics(model, BCE, x, y, combiner)[1]
    got = gtf.factored_statistics(model, lambda o, t: 4.0 * BCE(t, o), x, y, combiner, loss_scale=4.0)[1]
    for s, r in zip(got, want):
        np.testing.assert_allclose(s.mean.numpy(), r.mean.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s.m2.numpy(), r.m2.numpy(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        gtf.factored_statistics(model, BCE, x, y, combiner, loss_scale=0.0)


class _ScaledDense(keras.layers.Dense):
    """A Dense subclass with its own ``call``: not factored, its variables fall back."""

    def call(self, inputs, training=None):
        return 2.0 * super().call(inputs, training=training)


def test_dense_subclass_with_its_own_call_falls_back():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), _ScaledDense(4, activation="relu", name="scaled"), keras.layers.Dense(1)]
    )
    x, y = _data(3, 4)
    combiner = gradand.AndMask(0.6)
    _assert_close(gtf.model_gradient(model, BCE, x, y, combiner)[0], _reference(model, x, y, combiner))
    with pytest.raises(
        ValueError, match=r"outside them: \['[\w/]*scaled/kernel \(3, 4\)', '[\w/]*scaled/bias \(4,\)'\]"
    ):
        gtf.factored_statistics(model, BCE, x, y, combiner, fallback="error")


def _ragged(sizes, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (rng.random((n, 1)) > 0.5).astype(np.float32)
    env = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(n)
    return tf.constant(x[order]), tf.constant(y[order]), tf.constant(env[order])


def _per_environment_loop(model, x, y, env, combiner):
    """The oracle: one tape.gradient per environment of its own examples, combined by the numpy core."""
    per_var = [[] for _ in model.trainable_variables]
    for e in range(int(tf.reduce_max(env)) + 1):
        rows = tf.where(env == e)[:, 0]
        with tf.GradientTape() as tape:
            loss = BCE(tf.gather(y, rows), model(tf.gather(x, rows), training=True))
        for k, g in enumerate(tape.gradient(loss, model.trainable_variables)):
            per_var[k].append(g.numpy())
    return [gradand.combine(np.stack(g), combiner) for g in per_var]


@pytest.mark.parametrize("method", ["factored", "vectorized", "streaming"])
@pytest.mark.parametrize("sizes", [(3, 1, 6, 2), (1, 1, 1)], ids=["ragged", "one-each"])
def test_env_ids_of_different_sizes_equal_the_per_environment_loop(method, sizes):
    model = _mixed() if method == "factored" else _mlp()
    x, y, env = _ragged(sizes)
    combiner = gradand.SandMask(0.3, k=10.0)
    grads, result = gtf.model_gradient(model, BCE, x, y, combiner, method=method, env_ids=env)
    _assert_close([g.numpy() for g in grads], _per_environment_loop(model, x, y, env, combiner))
    assert tuple(result.losses.shape) == (len(sizes),)
    step = tf.function(
        lambda a, b, e: gtf.model_gradient(model, BCE, a, b, combiner, method=method, env_ids=e,
                                           num_envs=len(sizes))[0]
    )  # fmt: skip
    _assert_close([g.numpy() for g in step(x, y, env)], [g.numpy() for g in grads])


def test_env_ids_errors_name_the_environment():
    model = _mlp()
    x, y, env = _ragged((2, 2, 2))
    c = gradand.AndMask()
    with pytest.raises(ValueError, match=r"env_ids holds \[7\], outside \[0, num_envs=3\)"):
        gtf.model_gradient(model, BCE, x, y, c, env_ids=tf.where(env == 2, 7, env), num_envs=3)
    with pytest.raises(ValueError, match=r"environment\(s\) \[3\] of num_envs=4 have no example"):
        gtf.model_gradient(model, BCE, x, y, c, env_ids=env, num_envs=4)
    step = tf.function(lambda e: gtf.model_gradient(model, BCE, x, y, c, env_ids=e, num_envs=3)[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
        step(tf.where(env == 2, 7, env))


def test_result_fields_and_loss_fn_order():
    model = _mlp()
    x, y = _data(4, 3)
    c = gradand.AndMask(0.5)
    _, result = gtf.model_gradient(model, lambda out, tgt: BCE(tgt, out), x, y, c)
    assert isinstance(result, gradand.Result)
    want = [float(BCE(y[e], model(x[e]))) for e in range(4)]
    np.testing.assert_allclose(result.losses.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(float(result.loss), np.mean(want), rtol=1e-5)
    summary = gradand.summarize(result.infos, [int(np.prod(v.shape)) for v in model.trainable_variables])
    assert float(result.summary.survivor_fraction) == pytest.approx(float(summary.survivor_fraction))
    assert float(result.summary.agreement) == pytest.approx(float(summary.agreement))
    fn = gtf.model_gradient(model, keras.losses.binary_crossentropy, x, y, gradand.Mean())[1]
    plain = gtf.model_gradient(model, keras.losses.BinaryCrossentropy(), x, y, gradand.Mean())[1]
    np.testing.assert_allclose(fn.losses.numpy(), plain.losses.numpy(), rtol=1e-5)


def test_factored_path_delegates_to_the_core_engine(monkeypatch):
    calls = []
    engine = gradand.layer_statistics

    def spy(factors, combiner, **kw):
        calls.append((len(factors), kw["shape"], kw["layout"]))
        return engine(factors, combiner, **kw)

    monkeypatch.setattr(gradand, "layer_statistics", spy)
    model = _mlp()
    x, y = _data(3, 2)
    gtf.factored_statistics(model, BCE, x, y, gradand.AndMask())
    assert [shape for _, shape, _ in calls] == [tuple(v.shape) for v in model.trainable_variables]
    assert all(layout == "in_out" and n == 1 for n, _, layout in calls)


def test_deprecated_factored_gradients_warns_and_keeps_the_keras_order():
    model = _mlp()
    x, y = _data(4, 2)
    c = gradand.AndMask(0.5)
    grads, _ = gtf.model_gradient(model, BCE, x, y, c)
    with pytest.warns(DeprecationWarning, match="factored_gradients"):
        old = gtf.factored_gradients(model, lambda t, o: BCE(t, o), x, y, c)
    assert isinstance(old, gtf.CombinedGradients)
    _assert_close(old.gradients, grads, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="fallback='jacobian' is now fallback='vectorized'"):
        gtf.factored_statistics(model, BCE, x, y, c, fallback="jacobian")


# --- convolutions and BatchNormalization ------------------------------------------------------------


def _randomized(model, seed=1):
    """Every trainable variable drawn at random: no gradient that is zero by symmetry (zero biases)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(0.5 * rng.standard_normal(v.shape).astype(np.float32))
    return model


def _conv2d(seed=0):
    keras.utils.set_random_seed(seed)
    return _randomized(keras.Sequential([
        keras.Input((9, 9, 3)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(6, 3, dilation_rate=2, groups=2),  # valid, dilated, grouped
        keras.layers.Flatten(), keras.layers.Dense(1),
    ]))  # fmt: skip


def _conv1d(seed=0):
    keras.utils.set_random_seed(seed)
    return _randomized(keras.Sequential([
        keras.Input((16, 3)),
        keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="tanh"),
        keras.layers.Conv1D(6, 3, strides=2, padding="same", groups=2, use_bias=False),
        keras.layers.Conv1D(2, 2, padding="valid"),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1),
    ]))  # fmt: skip


def _conv3d(seed=0):
    keras.utils.set_random_seed(seed)
    return _randomized(keras.Sequential([
        keras.Input((5, 5, 5, 2)),
        keras.layers.Conv3D(4, 2, groups=2, activation="tanh"),
        keras.layers.Conv3D(3, 2, strides=2, padding="same"),
        keras.layers.Flatten(), keras.layers.Dense(1),
    ]))  # fmt: skip


def _images(model, n_env, n_ex, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_env, n_ex, *model.inputs[0].shape[1:])).astype(np.float32)
    y = (rng.random((n_env, n_ex, 1)) > 0.5).astype(np.float32)
    return tf.constant(x), tf.constant(y)


def _loop(model, x, y, combiner):
    """The oracle for (E, n, ...) batches: one tape.gradient per environment, combined by the numpy core."""
    per_var = [[] for _ in model.trainable_variables]
    for e in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = BCE(y[e], model(x[e], training=True))
        for k, g in enumerate(tape.gradient(loss, model.trainable_variables)):
            per_var[k].append(g.numpy())
    return [gradand.combine(np.stack(g), combiner) for g in per_var]


@pytest.mark.parametrize("n_ex", [5, 1], ids=["envs", "per-example"])
@pytest.mark.parametrize("make", [_conv2d, _conv1d, _conv3d], ids=["2d", "1d", "3d"])
def test_conv_layers_are_factored_and_equal_the_per_environment_loop(make, n_ex):
    """Strides, dilation, "same"/"valid"/"causal", groups: no variable falls back, eagerly and in a graph."""
    model = make()
    x, y = _images(model, 4, n_ex)
    combiner = gradand.AndMask(0.5)
    want = _loop(model, x, y, combiner)
    got = gtf.model_gradient(model, BCE, x, y, combiner, fallback="error")[0]
    _assert_close(got, want, rtol=1e-4, atol=1e-5)
    step = tf.function(lambda a, b: gtf.model_gradient(model, BCE, a, b, combiner, fallback="error")[0])
    _assert_close(step(x, y), want, rtol=1e-4, atol=1e-5)
    assert not any("call" in vars(layer) for layer in model.layers), "Conv call was not restored"


def test_conv_kernel_goes_to_the_core_as_raw_inputs_with_the_weight_gradient_op(monkeypatch):
    seen = {}
    engine = gradand.layer_statistics

    def spy(factors, combiner, **kw):
        seen[kw["name"]] = factors
        return engine(factors, combiner, **kw)

    monkeypatch.setattr(gradand, "layer_statistics", spy)
    model = _conv2d()
    x, y = _images(model, 3, 2)
    gtf.factored_statistics(model, BCE, x, y, gradand.AndMask(), fallback="error")
    first = model.layers[0]
    kernel, bias = (seen[f"variable {v.path!r}"] for v in (first.kernel, first.bias))
    assert kernel[0].gradient is not None and tuple(kernel[0].inputs.shape) == (3, 2, 9, 9, 3)
    assert tuple(kernel[0].deltas.shape) == (3, 2, 5, 5, 4)  # no im2col patches
    assert bias[0].inputs is None and tuple(bias[0].deltas.shape) == (3, 2 * 5 * 5, 4)


def test_conv_with_env_ids_of_different_sizes_equals_the_per_environment_loop():
    model = _conv2d()
    rng = np.random.default_rng(3)
    sizes = (3, 1, 4, 2)
    env = np.repeat(np.arange(4), sizes)[rng.permutation(10)]
    x = tf.constant(rng.standard_normal((10, 9, 9, 3)).astype(np.float32))
    y = tf.constant((rng.random((10, 1)) > 0.5).astype(np.float32))
    env = tf.constant(env)
    combiner = gradand.SandMask(0.3, k=10.0)
    want = _per_environment_loop(model, x, y, env, combiner)
    got = gtf.model_gradient(model, BCE, x, y, combiner, env_ids=env, fallback="error")[0]
    _assert_close(got, want, rtol=1e-4, atol=1e-5)
    step = tf.function(
        lambda a, b, e: gtf.model_gradient(model, BCE, a, b, combiner, env_ids=e, num_envs=4,
                                           fallback="error")[0]
    )  # fmt: skip
    _assert_close(step(x, y, env), want, rtol=1e-4, atol=1e-5)


class _OwnCallConv(keras.layers.Conv2D):
    """A Conv2D subclass with its own ``call``: not factored, its variables fall back."""

    def call(self, inputs):
        return 2.0 * super().call(inputs)


def test_convolutions_it_cannot_factor_fall_back_to_the_vectorized_path():
    keras.utils.set_random_seed(0)
    model = _randomized(keras.Sequential([
        keras.Input((6, 6, 2)),
        _OwnCallConv(3, 3, name="own"),
        keras.layers.Conv2DTranspose(2, 2, name="transposed"),
        keras.layers.Conv2D(2, 3, name="plain"),
        keras.layers.Flatten(), keras.layers.Dense(1),
    ]))  # fmt: skip
    x, y = _images(model, 3, 2)
    combiner = gradand.AndMask(0.6)
    _assert_close(gtf.model_gradient(model, BCE, x, y, combiner)[0], _loop(model, x, y, combiner), rtol=1e-4)
    with pytest.raises(ValueError, match=r"outside them: \[[^]]*own/kernel[^]]*transposed/bias \(2,\)'\]"):
        gtf.factored_statistics(model, BCE, x, y, combiner, fallback="error")


def _bn_model(seed=0):
    """BatchNormalization after a convolution (over examples and positions) and after a Dense layer."""
    keras.utils.set_random_seed(seed)
    return _randomized(keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(momentum=0.8, name="bn_conv"),
        keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(3, use_bias=False),
        keras.layers.BatchNormalization(center=False, epsilon=1e-2, name="bn_dense"),
        keras.layers.Dense(1),
    ]))  # fmt: skip


def _moving(model):
    return [v.numpy() for v in model.non_trainable_variables]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_batch_norm_in_training_mode_equals_one_forward_pass_per_environment(graph):
    """Per-environment batch statistics in one pass: the streaming path's gradients and moving statistics."""
    factored, streaming = _bn_model(), _bn_model()
    x, y = _images(factored, 4, 3)
    combiner = gradand.AndMask(0.5)

    def run(model, method, **kw):
        step = lambda: gtf.model_gradient(model, BCE, x, y, combiner, method=method, **kw)[0]  # noqa: E731
        return (tf.function(step) if graph else step)()

    for _ in range(2):  # the second step starts from the updated moving statistics
        got, want = run(factored, "factored", fallback="error"), run(streaming, "streaming")
        _assert_close(got, want, rtol=1e-4, atol=1e-5)
        _assert_close(_moving(factored), _moving(streaming), rtol=1e-5, atol=1e-6)
    assert not np.allclose(_moving(factored)[0], 0.0), "the moving mean was not updated"
    assert not any("call" in vars(layer) for layer in factored.layers)


def test_batch_norm_with_env_ids_and_a_channel_axis_equals_the_per_environment_loop():
    """Environments of different sizes (segment sums), BatchNormalization(axis=1) on (B, C, T) inputs."""
    keras.utils.set_random_seed(0)
    make = lambda: _randomized(keras.Sequential([  # noqa: E731
        keras.Input((3,)), keras.layers.Dense(8, use_bias=False), keras.layers.Reshape((4, 2)),
        keras.layers.BatchNormalization(axis=1, momentum=0.7),
        keras.layers.Flatten(), keras.layers.Dense(1),
    ]))  # fmt: skip
    factored, loop = make(), make()
    x, y, env = _ragged((3, 2, 5, 2), seed=1)
    combiner = gradand.AndMask(0.5)
    got = gtf.model_gradient(factored, BCE, x, y, combiner, env_ids=env, fallback="error")[0]
    _assert_close(got, _per_environment_loop(loop, x, y, env, combiner), rtol=1e-4, atol=1e-5)
    _assert_close(_moving(factored), _moving(loop), rtol=1e-5, atol=1e-6)
    step = tf.function(
        lambda a, b, e: gtf.model_gradient(factored, BCE, a, b, combiner, env_ids=e, num_envs=4)[0]
    )
    _assert_close(step(x, y, env), _per_environment_loop(loop, x, y, env, combiner), rtol=1e-4, atol=1e-5)
    _assert_close(_moving(factored), _moving(loop), rtol=1e-5, atol=1e-6)


class _OwnCallBatchNorm(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask)


@pytest.mark.parametrize(
    "norm, reason",
    [
        (lambda: keras.layers.BatchNormalization(renorm=True, name="bn"), "renorm=True"),
        (lambda: keras.layers.BatchNormalization(synchronized=True, name="bn"), "synchronized=True"),
        (lambda: _OwnCallBatchNorm(name="bn"), "_OwnCallBatchNorm has its own call"),
    ],
    ids=["renorm", "synchronized", "own-call"],
)
def test_batch_norm_it_cannot_split_per_environment_is_refused_in_training_mode(norm, reason):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), norm(), keras.layers.Dense(1)])
    x, y = _data(3, 4)
    with pytest.raises(ValueError, match=rf"BatchNormalization layer 'bn' \({reason}.*training=False"):
        gtf.factored_statistics(model, BCE, x, y, gradand.AndMask())
    _, stats = gtf.factored_statistics(model, BCE, x, y, gradand.AndMask(), training=False)
    assert len(stats) == len(model.trainable_variables)
    model.layers[1].trainable = False  # a frozen BatchNormalization runs in inference mode
    gtf.factored_statistics(model, BCE, x, y, gradand.AndMask())
    assert not any("call" in vars(layer) for layer in model.layers)


def test_batch_norm_in_inference_mode_is_factored_and_keeps_its_moving_statistics():
    model = _bn_model()
    x, y = _images(model, 3, 2)
    before = _moving(model)
    combiner = gradand.AndMask(0.5)
    want = gtf.model_gradient(model, BCE, x, y, combiner, method="vectorized", training=False)[0]
    got = gtf.model_gradient(model, BCE, x, y, combiner, training=False, fallback="error")[0]
    _assert_close(got, want, rtol=1e-4, atol=1e-5)
    _assert_close(_moving(model), before, rtol=0, atol=0)


def test_conv_and_batch_norm_on_images_of_any_size_and_under_xla_equal_one_pass_per_environment():
    def make():
        keras.utils.set_random_seed(0)
        return _randomized(keras.Sequential([
            keras.Input((None, None, 1)),
            keras.layers.Conv2D(4, 3, use_bias=False), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.Conv2D(3, 3, strides=2, padding="same"),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1),
        ]))  # fmt: skip

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((3, 4, 7, 9, 1)).astype(np.float32))
    y = tf.constant((rng.random((3, 4, 1)) > 0.5).astype(np.float32))
    combiner = gradand.AndMask(0.5)
    spec = [tf.TensorSpec((3, 4, None, None, 1)), tf.TensorSpec((3, 4, 1))]
    for compiled in (
        tf.function(input_signature=spec),  # height and width unknown when traced
        tf.function(jit_compile=True),
    ):
        factored, streaming = make(), make()
        step = compiled(
            lambda a, b, m=factored: gtf.model_gradient(m, BCE, a, b, combiner, fallback="error")[0]
        )
        want = gtf.model_gradient(streaming, BCE, x, y, combiner, method="streaming")[0]
        _assert_close(step(x, y), want, rtol=1e-4, atol=1e-5)
        _assert_close(_moving(factored), _moving(streaming), rtol=1e-5, atol=1e-6)
