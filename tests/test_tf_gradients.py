"""Tape -> combined gradients: equal to the numpy core; loop == vectorised; eager == tf.function == XLA."""

from __future__ import annotations

import numpy as np
import pytest

import gradand

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
gtf = pytest.importorskip("gradand.backends.tensorflow")

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(0.7),
    gradand.AndMask(1.0, rescale=False),
    gradand.GeometricMean(0.5),
    gradand.SandMask(0.3, k=10.0),
]
E, B = 4, 8


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((E, B, 3)).astype(np.float32)
    y = (rng.random((E, B, 1)) > 0.5).astype(np.float32)
    return x, y


def _net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    )


def _env_losses(net, x, y):
    return [
        tf.reduce_mean(keras.losses.binary_crossentropy(y[e], net(x[e]), from_logits=True))
        for e in range(x.shape[0])
    ]


def _oracle(net, x, y, combiner):
    """Per-environment gradients from TF, combined by the numpy core."""
    with tf.GradientTape(persistent=True) as tape:
        losses = _env_losses(net, x, y)
    per_var = [np.stack([tape.gradient(loss, v).numpy() for loss in losses]) for v in net.trainable_variables]
    return [gradand.combine(g, combiner, return_info=True) for g in per_var]


def _close(grads, oracle):
    assert len(grads) == len(oracle)
    for g, (ref, _) in zip(grads, oracle):
        np.testing.assert_allclose(g.numpy(), ref, rtol=1e-5, atol=1e-6)


# Every combiner by the loop; the (slower to trace) vectorised Jacobian for two of them.
CASES = [(c, "streaming") for c in COMBINERS] + [(c, "vectorized") for c in (COMBINERS[1], COMBINERS[4])]


@pytest.mark.parametrize(
    ("combiner", "method"), CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v
)
def test_combined_gradients_equal_the_numpy_core_and_report_per_variable_info(combiner, method):
    x, y = _data()
    net = _net()
    oracle = _oracle(net, x, y, combiner)
    with tf.GradientTape(persistent=True) as tape:
        losses = _env_losses(net, x, y)
    grads, result = gtf.gradient(tape, losses, net.trainable_variables, combiner, method=method)
    _close(grads, oracle)
    for i, (_, ref_info) in zip(result.infos, oracle):
        np.testing.assert_allclose(float(i.survivor_fraction), float(ref_info.survivor_fraction), rtol=1e-6)
        np.testing.assert_allclose(float(i.agreement), float(ref_info.agreement), rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("method", ["streaming", "vectorized"])
def test_tf_function_step_equals_the_eager_step(method, jit_compile):
    x, y = _data(1)
    net = _net(1)
    c = gradand.SandMask(0.3, k=5.0)
    oracle = _oracle(net, x, y, c)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            losses = _env_losses(net, x, y)
        return gtf.gradient(tape, losses, net.trainable_variables, c, method=method)

    grads, result = step(tf.constant(x), tf.constant(y))
    _close(grads, oracle)
    assert 0.0 <= float(result.infos[0].survivor_fraction) <= 1.0


def test_vectorized_map_statistics_equal_the_loop_statistics():
    x, y = _data(2)
    net = _net(2)
    c = gradand.GeometricMean(0.5)

    def env_loss(x_e, y_e):
        return tf.reduce_mean(keras.losses.binary_crossentropy(y_e, net(x_e), from_logits=True))

    data = (tf.constant(x), tf.constant(y))
    _, stats = gtf.vectorized_statistics(env_loss, net.trainable_variables, data, c)
    assert all(s.count == E for s in stats)
    grads, _ = gtf.finalize_gradients(stats, c)
    _close(grads, _oracle(net, x, y, c))


def test_vectorized_map_statistics_return_stacked_aux_values():
    w = tf.Variable([1.0, -1.0])
    x = tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2))
    _, stats, aux = gtf.vectorized_statistics(
        lambda x_e: (tf.reduce_sum(w * x_e), x_e * 2.0), [w], x, gradand.Mean(), has_aux=True
    )
    np.testing.assert_allclose(aux.numpy(), 2.0 * x.numpy())
    np.testing.assert_allclose(stats[0].mean.numpy(), x.numpy().mean(0), rtol=1e-6)


def test_a_one_dimensional_loss_tensor_works_like_a_list_of_losses():
    x, y = _data(3)
    net = _net(3)
    c = gradand.AndMask(0.5)
    for method in ("streaming", "vectorized"):
        with tf.GradientTape(persistent=True) as tape:
            losses = tf.stack(_env_losses(net, x, y))
        grads, _ = gtf.gradient(tape, losses, net.trainable_variables, c, method=method)
        _close(grads, _oracle(net, x, y, c))


def test_gradients_keep_the_structure_of_the_variables():
    a, b = tf.Variable([1.0, 2.0]), tf.Variable(3.0)
    with tf.GradientTape(persistent=True) as tape:
        losses = [tf.reduce_sum(a) * b, tf.reduce_sum(a * a) + b]
    grads, result = gtf.gradient(tape, losses, {"a": a, "b": b}, gradand.Mean())
    assert set(grads) == {"a", "b"}
    np.testing.assert_allclose(grads["a"].numpy(), [(3.0 + 2.0) / 2, (3.0 + 4.0) / 2])
    np.testing.assert_allclose(float(grads["b"]), (3.0 + 1.0) / 2)
    assert len(result.infos) == 2 and isinstance(result.infos[1], gradand.MaskInfo)  # tf.nest order


def test_a_variable_no_loss_depends_on_gets_none_and_a_partly_used_one_counts_zero_votes():
    used, partly, unused = tf.Variable([1.0, 1.0]), tf.Variable([1.0, 1.0]), tf.Variable([5.0])
    for method in ("streaming", "vectorized"):
        with tf.GradientTape(persistent=True) as tape:
            losses = [
                tf.reduce_sum(used * [1.0, 2.0]) + tf.reduce_sum(partly),
                tf.reduce_sum(used * [3.0, -2.0]),
            ]
        grads, result = gtf.gradient(
            tape, losses, [used, partly, unused], gradand.AndMask(0.5, rescale=False), method=method
        )
        assert grads[2] is None and result.infos[2] is None
        np.testing.assert_allclose(grads[0].numpy(), [2.0, 0.0])
        # environment 2 does not touch `partly`: its zero gradient casts no vote, agreement 1/2
        np.testing.assert_allclose(grads[1].numpy(), [0.5, 0.5])
        np.testing.assert_allclose(float(result.infos[1].agreement), 0.5)


def test_embedding_gradients_given_as_indexed_slices_are_combined_densely():
    emb = keras.layers.Embedding(5, 2)
    emb.build((None,))
    ids = tf.constant([[0, 1], [1, 3]])
    with tf.GradientTape(persistent=True) as tape:
        losses = [tf.reduce_sum(emb(ids[e])) for e in range(2)]
    grads, _ = gtf.gradient(
        tape, losses, emb.trainable_variables, gradand.AndMask(1.0, rescale=False)
    )
    # row 1 gets gradient 1 from both environments; rows 0 and 3 from one each (the other casts no vote)
    np.testing.assert_allclose(grads[0].numpy(), [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("method", ["streaming", "vectorized"])
def test_loss_scale_undoes_a_scaling_of_the_losses_before_combining(method):
    x, y = _data(4)
    net = _net(4)
    c = gradand.SandMask(0.3, k=10.0)  # not scale-equivariant: the scale must be undone exactly
    with tf.GradientTape(persistent=True) as tape:
        losses = [0.25 * loss for loss in _env_losses(net, x, y)]
    grads, _ = gtf.gradient(
        tape, losses, net.trainable_variables, c, method=method, loss_scale=0.25
    )
    _close(grads, _oracle(net, x, y, c))
    _, stats = gtf.vectorized_statistics(
        lambda x_e, y_e: 0.25 * _env_losses(net, x_e[None], y_e[None])[0],
        net.trainable_variables,
        (tf.constant(x), tf.constant(y)),
        c,
        loss_scale=0.25,
    )
    _close(gtf.finalize_gradients(stats, c)[0], _oracle(net, x, y, c))


def test_summary_weights_each_variable_by_its_size():
    info = [
        gradand.MaskInfo(tf.constant(1.0), tf.constant(1.0)),
        None,
        gradand.MaskInfo(tf.constant(0.0), tf.constant(0.5)),
    ]
    out = gtf.CombinedGradients([tf.zeros(1), None, tf.zeros((3,))], info)
    fraction, agreement = out.summary()
    assert float(fraction) == pytest.approx(0.25) and float(agreement) == pytest.approx(0.625)


def test_all_reduce_outside_a_strategy_leaves_the_statistics_unchanged():
    s = gradand.statistics(tf.constant([[1.0, -1.0], [2.0, 1.0]]), gradand.AndMask())
    out = gtf.all_reduce_statistics([s, None])
    assert out[0] is s and out[1] is None


def test_an_optimizer_applies_the_combined_gradients():
    w = tf.Variable([1.0, 1.0])
    with tf.GradientTape(persistent=True) as tape:
        losses = [tf.reduce_sum(w * [1.0, 2.0]), tf.reduce_sum(w * [3.0, -2.0])]
    grads, _ = gtf.gradient(tape, losses, [w], gradand.AndMask(rescale=False))
    keras.optimizers.SGD(0.5).apply_gradients(zip(grads, [w]))
    np.testing.assert_allclose(w.numpy(), [0.0, 1.0])


# --- bad input ---------------------------------------------------------------------------------


def _tape_and_losses(persistent=True):
    w = tf.Variable([1.0, 2.0])
    with tf.GradientTape(persistent=persistent) as tape:
        losses = [tf.reduce_sum(w), tf.reduce_sum(w * w)]
    return tape, losses, w


def test_loop_on_a_non_persistent_tape_says_to_make_it_persistent():
    tape, losses, w = _tape_and_losses(persistent=False)
    with pytest.raises(ValueError, match=r"persistent=True"):
        gtf.gradient(tape, losses, [w], gradand.AndMask())


def test_vectorized_works_on_a_non_persistent_tape():
    tape, losses, w = _tape_and_losses(persistent=False)
    grads, _ = gtf.gradient(tape, losses, [w], gradand.Mean(), method="vectorized")
    np.testing.assert_allclose(grads[0].numpy(), [(1 + 2) / 2, (1 + 4) / 2])


@pytest.mark.parametrize(
    ("losses", "error", "match"),
    [
        ([], ValueError, r"losses is empty"),
        ("not losses", TypeError, r"losses must be a list of scalar tensors.*got str"),
        ([1.0, 2.0], TypeError, r"losses\[0\] must be a scalar tf.Tensor.*got float"),
        ([tf.zeros(3)], ValueError, r"losses\[0\] must be a scalar.*got shape \(3,\)"),
        ([tf.constant(1)], TypeError, r"losses\[0\] must have a floating dtype; got int32"),
        (tf.zeros((2, 2)), ValueError, r"1-D tensor.*got a tensor of shape \(2, 2\)"),
    ],
)
def test_bad_losses_get_a_clear_error(losses, error, match):
    tape, _, w = _tape_and_losses()
    with pytest.raises(error, match=match):
        gtf.gradient(tape, losses, [w], gradand.AndMask())


def test_bad_arguments_get_a_clear_error():
    tape, losses, w = _tape_and_losses()
    with pytest.raises(TypeError, match=r"tape must be a tf.GradientTape; got list"):
        gtf.gradient([], losses, [w], gradand.AndMask())
    with pytest.raises(ValueError, match=r"method must be one of \('streaming', 'vectorized'\); got 'pfor'"):
        gtf.gradient(tape, losses, [w], gradand.AndMask(), method="pfor")
    with pytest.raises(ValueError, match=r"variables is empty"):
        gtf.gradient(tape, losses, [], gradand.AndMask())
    with pytest.raises(TypeError, match=r"combiner must be a gradand combiner.*got str"):
        gtf.gradient(tape, losses, [w], "and_mask")
    with pytest.raises(ValueError, match=r"nan_policy must be one of"):
        gtf.gradient(tape, losses, [w], gradand.AndMask(), nan_policy="ignore")
    with pytest.raises(ValueError, match=r"loss_scale must be a finite number > 0.*got 0"):
        gtf.gradient(tape, losses, [w], gradand.AndMask(), loss_scale=0)


def test_nan_gradients_raise_eagerly_and_in_graph_mode_and_can_be_zeroed():
    w = tf.Variable([1.0, 1.0])

    def losses():
        return [tf.reduce_sum(w * [1.0, float("nan")]), tf.reduce_sum(w * [2.0, 1.0])]

    with tf.GradientTape(persistent=True) as tape:
        ls = losses()
    with pytest.raises(ValueError, match=r"grads contains NaN or Inf \(1 of 2 entries"):
        gtf.gradient(tape, ls, [w], gradand.AndMask())

    @tf.function
    def step(policy):
        with tf.GradientTape(persistent=True) as tape:
            ls = losses()
        return gtf.gradient(tape, ls, [w], gradand.AndMask(0.5, rescale=False), nan_policy=policy)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"gradand: grads contains NaN or Inf"):
        step("raise")
    grads, _ = step("zero")
    np.testing.assert_allclose(grads[0].numpy(), [1.5, 0.5])


def test_vectorized_statistics_rejects_environments_of_different_counts():
    w = tf.Variable([1.0])
    with pytest.raises(ValueError, match=r"same static, non-zero number of environments.*\['2', '3'\]"):
        gtf.vectorized_statistics(
            lambda a, b: tf.reduce_sum(w * a) + tf.reduce_sum(b), [w], (tf.zeros((2, 1)), tf.zeros((3, 1))),
            gradand.Mean(),
        )  # fmt: skip


def _bn_net():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                             keras.layers.Dense(1)])  # fmt: skip


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("writer", ["batchnorm", "counter", "nested tf.function", "tf.cond"])
def test_vectorized_statistics_refuses_a_loss_fn_that_writes_variables(graph, writer):
    """Under vectorized_map the environments' writes would collapse into one: refused, whatever writes."""
    net, (x, y), counter = _bn_net(), _data(), tf.Variable(0.0)
    bn = net.layers[1]

    @tf.function
    def bump():
        counter.assign_add(1.0)

    def loss(a, b):
        out = net(a, training=writer == "batchnorm")
        if writer == "counter":
            counter.assign_add(1.0)
        elif writer == "nested tf.function":
            bump()
        elif writer == "tf.cond":
            tf.cond(tf.reduce_sum(a) > -1e9, lambda: counter.assign_add(1.0), lambda: counter.assign_sub(1.0))
        return tf.reduce_mean((out - b) ** 2)

    def run():
        return gtf.vectorized_statistics(loss, net.trainable_variables, (tf.constant(x), tf.constant(y)),
                                         gradand.AndMask())  # fmt: skip

    with pytest.raises(ValueError, match=r"loss_fn writes variables .*vectorized_map.*streaming_statistics"):
        tf.function(run)() if graph else run()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), 0.0)
    assert counter.numpy() == 0.0


def test_vectorized_statistics_accepts_batchnorm_in_inference_mode():
    net, (x, y) = _bn_net(), _data()
    _, stats = gtf.vectorized_statistics(
        lambda a, b: tf.reduce_mean((net(a, training=False) - b) ** 2), net.trainable_variables,
        (tf.constant(x), tf.constant(y)), gradand.AndMask(),
    )  # fmt: skip
    assert all(s is not None for s in stats[:2])


@pytest.mark.parametrize("method", ["streaming", "vectorized"])
def test_result_loss_is_the_mean_of_the_losses_and_summary_is_gradand_summarize(method):
    net, x, y = _net(), *_data()
    c = gradand.AndMask(0.5)
    with tf.GradientTape(persistent=True) as tape:
        losses = _env_losses(net, x, y)
    _, result = gtf.gradient(tape, losses, net.trainable_variables, c, method=method)
    assert isinstance(result, gradand.Result) and result.aux is None
    np.testing.assert_allclose(result.losses.numpy(), [float(v) for v in losses], rtol=1e-6)
    np.testing.assert_allclose(float(result.loss), np.mean([float(v) for v in losses]), rtol=1e-6)
    want = gradand.summarize(result.infos, [int(np.prod(v.shape)) for v in net.trainable_variables])
    assert float(result.summary.survivor_fraction) == pytest.approx(float(want.survivor_fraction))
    assert float(result.summary.agreement) == pytest.approx(float(want.agreement))


def test_deprecated_aliases_warn_and_give_the_same_numbers():
    net, x, y = _net(), *_data()
    c = gradand.SandMask(0.3, k=10.0)
    with tf.GradientTape(persistent=True) as tape:
        losses = _env_losses(net, x, y)
    grads, result = gtf.gradient(tape, losses, net.trainable_variables, c)
    _, stats = gtf.streaming_statistics(tape, losses, net.trainable_variables, c)
    with pytest.warns(DeprecationWarning, match="combined_gradients"):
        old = gtf.combined_gradients(tape, losses, net.trainable_variables, c)
    assert isinstance(old, gtf.CombinedGradients)
    for a, b in zip(old.gradients, grads):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(old.summary().survivor_fraction) == pytest.approx(float(result.summary.survivor_fraction))
    with pytest.warns(DeprecationWarning, match="environment_statistics"):
        old_stats = gtf.environment_statistics(tape, losses, net.trainable_variables, c)
    for a, b in zip(old_stats, stats):
        np.testing.assert_array_equal(a.mean.numpy(), b.mean.numpy())
    with pytest.warns(DeprecationWarning, match="method='loop' is now method='streaming'"):
        loop, _ = gtf.gradient(tape, losses, net.trainable_variables, c, method="loop")
    for a, b in zip(loop, grads):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert "xp" not in gtf.__all__ and "combined_gradients" not in gtf.__all__ and gtf.xp is not None


def test_loss_scale_may_be_a_keras_loss_scale_optimizer():
    net, x, y = _net(), *_data()
    c = gradand.AndMask(0.5)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=64.0)
    with tf.GradientTape(persistent=True) as tape:
        losses = _env_losses(net, x, y)
        scaled = [opt.scale_loss(loss) for loss in losses]
    want, _ = gtf.gradient(tape, losses, net.trainable_variables, c)
    got, result = gtf.gradient(tape, scaled, net.trainable_variables, c, loss_scale=opt)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.losses.numpy(), [float(v) for v in losses], rtol=1e-6)
