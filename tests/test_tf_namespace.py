"""The core runs unchanged on tf tensors: eagerly, in tf.function and under XLA, equal to the numpy core."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import combiners, stacked_grads, with_specials

import gradand

tf = pytest.importorskip("tensorflow")
gtf = pytest.importorskip("gradand.backends.tensorflow")

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(0.7),
    gradand.AndMask(1.0, rescale=False),
    gradand.GeometricMean(0.5),
    gradand.SandMask(0.4, k=10.0),
]


def _grads(seed=0, shape=(5, 3, 4)):
    return (np.random.default_rng(seed).standard_normal(shape) + 0.3).astype(np.float32)


def test_tf_tensors_and_variables_get_the_registered_namespace():
    assert gradand.array_namespace(tf.constant([1.0])) is gtf.xp
    assert gradand.array_namespace(tf.Variable([1.0])) is gtf.xp


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_eager_combine_equals_the_numpy_core(combiner):
    g = _grads()
    ref, ref_info = gradand.combine(g, combiner, return_info=True)
    out, info = gradand.combine(tf.constant(g), combiner, return_info=True)
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float32 and tuple(out.shape) == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(info.survivor_fraction), float(ref_info.survivor_fraction), rtol=1e-6)
    np.testing.assert_allclose(float(info.agreement), float(ref_info.agreement), rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_tf_function_equals_eager(combiner, jit_compile):
    g = tf.constant(_grads(1))

    @tf.function(jit_compile=jit_compile)
    def step(x):
        return gradand.combine(x, combiner, return_info=True)

    eager, eager_info = gradand.combine(g, combiner, return_info=True)
    graph, graph_info = step(g)
    np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(graph_info.agreement), float(eager_info.agreement), rtol=1e-6)


# Moderate magnitudes: TF and numpy may sum in different orders, which matters only
# under catastrophic cancellation (1e15 + 1 - 1e15), not for the combiners' logic.
_moderate = st.one_of(st.just(0.0), st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False))


@settings(max_examples=25)
@given(g=stacked_grads(max_envs=5, max_side=3, elements=_moderate), combiner=combiners())
def test_any_combiner_on_any_float64_stack_equals_the_numpy_core(g, combiner):
    ref = gradand.combine(g, combiner)
    out = gradand.combine(tf.constant(g), combiner)
    assert out.dtype == tf.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_update_keeps_the_gradient_dtype_and_statistics_accumulate_in_float32_at_least(dtype):
    g = tf.cast(tf.constant(_grads(2)), dtype)
    stats = gradand.statistics(g, gradand.AndMask())
    assert stats.mean.dtype == (tf.float64 if dtype == "float64" else tf.float32)
    assert gradand.combine(g, gradand.AndMask(0.5)).dtype == tf.as_dtype(dtype)


def test_streaming_and_merged_statistics_equal_the_dense_result():
    g = _grads(3)
    c = gradand.SandMask(0.3, k=5.0)
    streamed = gradand.Statistics()
    for e in range(g.shape[0]):
        streamed = streamed + gradand.statistics(tf.constant(g[e]), c, axis=None)
    merged = gradand.merge(
        gradand.statistics(tf.constant(g[:2]), c), gradand.statistics(tf.constant(g[2:]), c)
    )
    ref = gradand.combine(g, c)
    np.testing.assert_allclose(gradand.finalize(streamed, c).numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gradand.finalize(merged, c).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_a_tensor_environment_count_as_after_an_all_reduce_gives_the_same_update():
    g = _grads(4)
    for c in COMBINERS:
        stats = gradand.statistics(tf.constant(g), c)
        as_tensor = stats.replace(count=tf.constant(float(stats.count)))
        np.testing.assert_allclose(
            gradand.finalize(as_tensor, c).numpy(), gradand.finalize(stats, c).numpy(), rtol=1e-6
        )


def test_outer_statistics_on_tf_equal_the_per_example_statistics():
    rng = np.random.default_rng(5)
    x, d = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    c = gradand.AndMask(0.6)
    fast = gradand.outer_statistics(tf.constant(x), tf.constant(d), c)
    slow = gradand.statistics(d[:, :, None] * x[:, None, :], c)
    np.testing.assert_allclose(fast.mean.numpy(), slow.mean, rtol=1e-5)
    np.testing.assert_array_equal(fast.sign_sum.numpy(), slow.sign_sum)


def test_temporal_step_on_tf_equals_the_numpy_step():
    rng = np.random.default_rng(6)
    p = rng.standard_normal(5).astype(np.float32)
    state_np = [np.zeros(5, np.float32)] * 3
    state_tf = [tf.zeros(5)] * 3
    kw = dict(betas=(0.9, 0.99), beta3=0.8, threshold=0.6, eps=1e-8, weight_decay=0.01)
    for step in range(1, 6):
        g = rng.standard_normal(5).astype(np.float32) + 0.5
        a = gradand.temporal.temporal_and_mask_step(g, p, *state_np, step, **kw)
        b = gradand.temporal.temporal_and_mask_step(
            tf.constant(g), tf.constant(p), *state_tf, tf.constant(float(step)), **kw
        )
        np.testing.assert_array_equal(b.mask.numpy(), a.mask)
        np.testing.assert_allclose(b.direction.numpy(), a.direction, rtol=1e-4, atol=1e-6)
        state_np, state_tf = [a.exp_avg, a.exp_avg_sq, a.sign_avg], [b.exp_avg, b.exp_avg_sq, b.sign_avg]


def test_nan_raises_value_error_eagerly_naming_the_count_and_shape():
    g = _grads()
    g[0, 1, 2] = np.nan
    with pytest.raises(
        ValueError, match=r"grads contains NaN or Inf \(1 of 60 entries of shape \(5, 3, 4\)\)"
    ):
        gradand.combine(tf.constant(g), gradand.AndMask())


def test_nan_raises_invalid_argument_inside_tf_function():
    g = _grads()
    g[1, 0, 0] = np.inf
    step = tf.function(lambda x: gradand.combine(x, gradand.AndMask()))
    with pytest.raises(tf.errors.InvalidArgumentError, match="gradand: grads contains NaN or Inf"):
        step(tf.constant(g))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_nan_policy_zero_drops_non_finite_components_in_graph_mode(jit_compile):
    g = _grads()
    g[0, 0, 0] = np.nan
    clean = g.copy()
    clean[0, 0, 0] = 0.0
    step = tf.function(
        lambda x: gradand.combine(x, gradand.AndMask(0.5), nan_policy="zero"), jit_compile=jit_compile
    )
    np.testing.assert_allclose(
        step(tf.constant(g)).numpy(), gradand.combine(clean, gradand.AndMask(0.5)), rtol=1e-5
    )


def test_integer_gradients_are_rejected_with_the_dtype():
    with pytest.raises(TypeError, match=r"real floating dtype.*int32"):
        gradand.combine(tf.constant([[1, 2], [3, 4]]), gradand.AndMask())


def test_finfo_and_isdtype_follow_the_array_api():
    xp = gtf.xp
    assert xp.finfo(tf.bfloat16).bits == 16 and xp.finfo(tf.float64).bits == 64
    assert xp.finfo(tf.float32).eps == pytest.approx(np.finfo(np.float32).eps)
    assert xp.isdtype(tf.bfloat16, "real floating") and not xp.isdtype(tf.int32, "real floating")
    assert xp.isdtype(tf.int64, ("bool", "integral"))
    with pytest.raises(TypeError, match="floating dtype; got int32"):
        xp.finfo(tf.int32)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["float32", "float64", "float16", "bfloat16"]),
    st.booleans(),
)
def test_select_hook_is_where_mask_d_d_minus_d(seed, dtype, graph):
    """The namespace's ``gradand_select`` (a product, not ``SelectV2``) selects like the core's
    ``where(mask, d, d - d)``, eagerly and in ``tf.function``: kept values bit for bit, masked
    zero (a negative one may be -0.0, which equals 0.0), NaN and ±Inf NaN either way."""
    rng = np.random.default_rng(seed)
    d = with_specials(rng, 300)
    t = tf.cast(tf.constant(d), getattr(tf, dtype))
    mask = tf.constant(rng.random(300) < 0.5)
    select = tf.function(gtf.xp.gradand_select) if graph else gtf.xp.gradand_select
    got = select(mask, t)
    want = tf.where(mask, t, t - t)
    assert got.dtype == t.dtype
    g, w = got.numpy().astype(np.float64), want.numpy().astype(np.float64)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    both = ~np.isnan(w)
    np.testing.assert_array_equal(g[both], w[both])  # == : -0.0 equals 0.0
    kept = mask.numpy() & both
    np.testing.assert_array_equal(np.signbit(g[kept]), np.signbit(w[kept]))  # kept: the same bits


@pytest.mark.parametrize("graph", [False, True])
def test_count_nonzero_counts_exactly_in_int64(graph):
    x = np.random.default_rng(0).standard_normal((7, 300)) > 0.3
    x[0] = False
    count = tf.function(gtf.xp.count_nonzero) if graph else gtf.xp.count_nonzero
    for arg, axis in [(x, None), (x, 0), (x, 1), (x.astype(np.float32), None)]:
        got = count(tf.constant(arg), axis=axis)
        assert got.dtype == tf.int64
        np.testing.assert_array_equal(got.numpy(), np.count_nonzero(arg, axis=axis))
