"""Hypothesis property tests of the core's combiners (numpy as the oracle)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import combiners, stacked_grads, thresholds

import gradand


def sum_tol(g):
    """Absolute rounding error a different summation order may make (bound ~ E·eps·max|g|), times
    the largest rescaling factor (numel): the sums are order-dependent in floating point, the
    integer sign counts are not."""
    numel = max(1, g[0].size)
    return 4 * g.shape[0] * np.finfo(g.dtype).eps * float(np.max(np.abs(g), initial=0.0)) * numel


nonzero = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False).filter(lambda v: abs(v) > 1e-6)


@given(stacked_grads())
def test_agreement_lies_in_unit_interval(g):
    a = gradand.agreement(g)
    assert a.shape == g.shape[1:]
    assert np.all((a >= 0) & (a <= 1))


@given(stacked_grads(), thresholds, thresholds)
def test_mask_is_monotone_in_threshold(g, t1, t2):
    lo, hi = sorted((t1, t2))
    stats = gradand.statistics(g, gradand.AndMask())
    m_lo = gradand.AndMask(lo).mask(stats, np)
    m_hi = gradand.AndMask(hi).mask(stats, np)
    assert np.all(m_hi <= m_lo)  # mask(τ2) ⊆ mask(τ1)


@given(stacked_grads())
def test_threshold_zero_without_rescale_equals_the_mean(g):
    np.testing.assert_allclose(
        gradand.combine(g, gradand.AndMask(0.0, rescale=False)), g.mean(axis=0), rtol=1e-12, atol=0
    )
    np.testing.assert_allclose(gradand.combine(g, gradand.Mean()), g.mean(axis=0), rtol=1e-12, atol=0)


@given(stacked_grads())
def test_threshold_zero_with_rescale_is_still_the_mean(g):
    # nothing is masked, so numel / Σm = 1
    np.testing.assert_allclose(gradand.combine(g, gradand.AndMask(0.0)), g.mean(axis=0), rtol=1e-12)


@given(stacked_grads())
def test_threshold_one_keeps_exactly_components_whose_signs_all_agree(g):
    out = gradand.combine(g, gradand.AndMask(1.0, rescale=False))
    s = np.sign(g)
    all_agree = np.all(s == s[:1], axis=0) & (s[0] != 0)
    np.testing.assert_array_equal(out != 0, all_agree & (g.mean(axis=0) != 0))
    np.testing.assert_allclose(out[all_agree], g.mean(axis=0)[all_agree], rtol=1e-12)
    assert np.all(out[~all_agree] == 0)


@given(stacked_grads(min_envs=2), combiners(), st.randoms(use_true_random=False))
def test_combiners_are_invariant_to_permuting_environments(g, combiner, rnd):
    perm = list(range(g.shape[0]))
    rnd.shuffle(perm)
    np.testing.assert_allclose(
        gradand.combine(g[perm], combiner), gradand.combine(g, combiner), rtol=1e-9, atol=sum_tol(g)
    )


@given(stacked_grads(min_envs=1, max_envs=5), thresholds, st.data())
def test_mask_is_invariant_to_positive_per_environment_scaling(g, tau, data):
    scales = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=g.shape[0], max_size=g.shape[0]).map(np.array))
    scaled = g * scales.reshape((-1,) + (1,) * (g.ndim - 1))
    c = gradand.AndMask(tau)
    m1 = c.mask(gradand.statistics(g, c), np)
    m2 = c.mask(gradand.statistics(scaled, c), np)
    np.testing.assert_array_equal(m1, m2)


@given(stacked_grads(), combiners())
def test_combiners_are_odd(g, combiner):
    np.testing.assert_allclose(
        gradand.combine(-g, combiner), -gradand.combine(g, combiner), rtol=1e-12, atol=0
    )


@given(stacked_grads(min_envs=1, max_envs=1, elements=nonzero), thresholds)
def test_one_environment_gives_that_environments_gradient(g, tau):
    for c in [gradand.Mean(), gradand.AndMask(tau), gradand.AndMask(tau, rescale=False)]:
        np.testing.assert_allclose(gradand.combine(g, c), g[0], rtol=1e-12)
    geo = gradand.combine(g, gradand.GeometricMean(tau, eps=1e-300))
    np.testing.assert_allclose(geo, g[0], rtol=1e-9)
    # SAND with one environment: σ² := 0, so the mask is the limit 1[a > τ] (a = 1 here)
    sand = gradand.combine(g, gradand.SandMask(tau, k=10.0, rescale=False))
    np.testing.assert_allclose(sand, g[0] if tau < 1 else np.zeros_like(g[0]), rtol=1e-12)


@given(stacked_grads(min_envs=1, max_envs=6, elements=nonzero), thresholds)
def test_geometric_mean_is_no_larger_than_arithmetic_where_signs_agree(g, tau):
    s = np.sign(g)
    agree = np.all(s == s[:1], axis=0)
    geo = gradand.combine(g, gradand.GeometricMean(0.0, rescale=False, eps=1e-300))
    arith = g.mean(axis=0)
    assert np.all(np.abs(geo[agree]) <= np.abs(arith[agree]) * (1 + 1e-9))


@given(stacked_grads(), thresholds, st.sampled_from([0.01, 1.0, 10.0, 1e4]))
def test_sand_mask_lies_in_unit_interval_and_is_finite(g, tau, k):
    c = gradand.SandMask(tau, k=k)
    stats = gradand.statistics(g, c)
    m = c.mask(stats, np)
    assert np.all(np.isfinite(m)) and np.all((m >= 0) & (m <= 1))
    assert np.all(np.isfinite(gradand.combine(g, c)))


@given(stacked_grads(), combiners())
def test_updates_are_always_finite(g, combiner):
    out, info = gradand.combine(g, combiner, return_info=True)
    assert out.shape == g.shape[1:]
    assert np.all(np.isfinite(out))
    assert 0 <= float(info.survivor_fraction) <= 1 and 0 <= float(info.agreement) <= 1


@given(stacked_grads(max_envs=8), combiners(), st.data())
def test_streaming_equals_dense_equals_merge_for_random_splits(g, combiner, data):
    dense = gradand.combine(g, combiner)
    # streaming: one environment at a time
    stats = gradand.Statistics()
    for e in range(g.shape[0]):
        stats = stats + gradand.statistics(g[e], combiner, axis=None)
    np.testing.assert_allclose(gradand.finalize(stats, combiner), dense, rtol=1e-9, atol=sum_tol(g))
    # merge: a random split into contiguous chunks, merged in a random order
    cuts = sorted(data.draw(st.sets(st.integers(1, g.shape[0] - 1), max_size=3))) if g.shape[0] > 1 else []
    bounds = [0, *cuts, g.shape[0]]
    parts = [gradand.statistics(g[a:b], combiner) for a, b in itertools.pairwise(bounds)]
    order = data.draw(st.permutations(range(len(parts))))
    merged = gradand.merge(*[parts[i] for i in order])
    assert merged.count == g.shape[0]
    np.testing.assert_allclose(gradand.finalize(merged, combiner), dense, rtol=1e-9, atol=sum_tol(g))


@given(stacked_grads(min_envs=2), combiners())
def test_environment_axis_can_be_any_axis(g, combiner):
    assume(g.ndim >= 2)
    moved = np.moveaxis(g, 0, -1)
    np.testing.assert_allclose(
        gradand.combine(moved, combiner, axis=-1), gradand.combine(g, combiner), rtol=1e-12, atol=0
    )


@given(stacked_grads(min_envs=1), thresholds)
def test_rescaled_and_mask_preserves_the_sum_of_surviving_magnitude_ratio(g, tau):
    plain = gradand.combine(g, gradand.AndMask(tau, rescale=False))
    scaled, info = gradand.combine(g, gradand.AndMask(tau), return_info=True)
    frac = float(info.survivor_fraction)
    if frac == 0:
        assert np.all(scaled == 0)
    else:
        np.testing.assert_allclose(scaled, plain / frac, rtol=1e-12)
