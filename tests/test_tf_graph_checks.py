"""TensorFlow's namespace hooks in a graph: the sum-first finite check and the lazy dense mean."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import gradand  # noqa: E402
from gradand.backends.tensorflow import xp  # noqa: E402


@pytest.mark.parametrize("size", [16, 5000])  # below and above the sum-first size
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_raise_in_a_graph_catches_every_non_finite_value_small_or_large(size, bad):
    g = np.ones((3, size), np.float32)
    g[1, size // 2] = bad

    @tf.function
    def stats(a):
        return gradand.statistics(a, gradand.AndMask(), xp=xp).mean

    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        stats(tf.constant(g))


def test_a_finite_tensor_whose_sum_overflows_passes_the_graph_check():
    g = np.full((3, 5000), 3e38, np.float32)  # the sum overflows, every value is finite

    @tf.function
    def stats(a):
        return gradand.statistics(a, gradand.AndMask(), xp=xp).mean

    out = stats(tf.constant(g)).numpy()
    np.testing.assert_allclose(out, 3e38, rtol=1e-6)


@pytest.mark.parametrize("size", [16, 70000])  # the scaled pass, and the lazy branch
def test_the_dense_mean_in_a_graph_does_not_overflow_and_propagates_nan(size):
    g = np.full((4, size), 1e38, np.float32)

    @tf.function
    def mean(a):
        return gradand.statistics(a, gradand.Mean(), nan_policy="propagate", xp=xp).mean

    np.testing.assert_allclose(mean(tf.constant(g)).numpy(), 1e38, rtol=1e-6)
    g[2, 3] = np.nan
    out = mean(tf.constant(g)).numpy()
    assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all()
    small = np.arange(4 * size, dtype=np.float32).reshape(4, size)
    np.testing.assert_allclose(mean(tf.constant(small)).numpy(), small.mean(0), rtol=1e-6)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("size", [16, 70000])  # the scaled pass, and the lazy branch
def test_the_folded_chunks_scale_their_sum_only_when_it_is_finite(graph, size):
    """The fold's chunks (the factored engine's batched products) are summed, then scaled by the
    power of two, when that sum is finite: the same values as scaling every term; the scaled
    terms when the plain sum overflows (1e38 gradients) or holds a NaN."""
    from gradand._stats import Fold

    def folded(a, policy):
        fold = Fold(gradand.AndMask(0.5), expected=8, nan_policy=policy, xp=xp)
        fold.add(a[:4], axis=0)
        fold.add(a[4:], axis=0)
        s = fold.result()
        return s.mean, s.sign_sum

    run = tf.function(folded, reduce_retracing=True) if graph else folded
    rng = np.random.default_rng(size)
    for g in (rng.standard_normal((8, size)).astype(np.float32), np.full((8, size), 1e38, np.float32)):
        mean, votes = run(tf.constant(g), "raise" if graph else "propagate")
        want = gradand.statistics(g, gradand.AndMask(0.5))
        np.testing.assert_allclose(mean.numpy(), want.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(votes.numpy(), want.sign_sum)
    g = rng.standard_normal((8, size)).astype(np.float32)
    g[5, 1] = np.nan
    mean, votes = run(tf.constant(g), "propagate")
    want = gradand.statistics(g, gradand.AndMask(0.5), nan_policy="propagate")
    assert np.isnan(mean.numpy()[1]) and np.isfinite(np.delete(mean.numpy(), 1)).all()
    np.testing.assert_array_equal(votes.numpy(), want.sign_sum)
