"""Golden values worked out by hand for small inputs, and the reference code's semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradand

G = np.array(
    [
        [1.0, -2.0, 0.0, 4.0],
        [3.0, 1.0, 0.0, 1.0],
        [2.0, -1.0, 5.0, 0.0],
    ]
)  # 3 environments, 4 components


def test_agreement_by_hand():
    # signs: [+,+,+], [-,+,-], [0,0,+], [+,+,0]
    np.testing.assert_allclose(gradand.agreement(G), [1.0, 1 / 3, 1 / 3, 2 / 3])


def test_zero_gradient_casts_no_vote_but_counts_in_the_mean():
    g = np.array([[1.0], [0.0]])
    assert gradand.agreement(g)[0] == 0.5
    assert gradand.combine(g, gradand.AndMask(0.5, rescale=False))[0] == 0.5
    assert gradand.combine(g, gradand.AndMask(0.6, rescale=False))[0] == 0.0


def test_and_mask_by_hand():
    mean = G.mean(axis=0)  # [2, -2/3, 5/3, 5/3]
    np.testing.assert_allclose(gradand.combine(G, gradand.AndMask(1.0, rescale=False)), [2, 0, 0, 0])
    np.testing.assert_allclose(gradand.combine(G, gradand.AndMask(2 / 3, rescale=False)), [2, 0, 0, mean[3]])
    # rescale: 2 of 4 survive -> x2
    np.testing.assert_allclose(gradand.combine(G, gradand.AndMask(2 / 3)), [4, 0, 0, 2 * mean[3]])


def test_threshold_at_a_fraction_of_environments_is_inclusive():
    # 3 of 5 environments agree: agreement (3 - 2)/5 = 0.2; 4 of 5: 0.6 — exactly at τ = 0.6 survives.
    g = np.array([[1.0], [1.0], [1.0], [1.0], [-1.0]])
    assert gradand.combine(g, gradand.AndMask(0.6, rescale=False))[0] == pytest.approx(0.6)
    g32 = g.astype(np.float32)
    assert gradand.combine(g32, gradand.AndMask(0.6, rescale=False))[0] == pytest.approx(0.6)


def test_fully_masked_tensor_gives_zero_update_not_nan():
    g = np.array([[1.0, -1.0], [-1.0, 1.0]])
    for c in [gradand.AndMask(1.0), gradand.GeometricMean(1.0), gradand.SandMask(0.5, k=10.0)]:
        out = gradand.combine(g, c)
        assert np.all(out == 0) and np.all(np.isfinite(out))


def test_geometric_mean_by_hand():
    g = np.array([[1.0, 2.0], [4.0, 8.0]])
    np.testing.assert_allclose(
        gradand.combine(g, gradand.GeometricMean(rescale=False, eps=1e-300)), [2.0, 4.0]
    )
    # sign follows the arithmetic mean; masked where signs disagree
    g = np.array([[-1.0, -2.0], [-4.0, 8.0]])
    np.testing.assert_allclose(
        gradand.combine(g, gradand.GeometricMean(0.0, rescale=False, eps=1e-300)), [-2.0, 4.0]
    )
    np.testing.assert_allclose(
        gradand.combine(g, gradand.GeometricMean(1.0, rescale=False, eps=1e-300)), [-2.0, 0.0]
    )


def test_geometric_mean_matches_reference_formula_with_eps():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((5, 7))
    ref = np.sign(g.mean(0)) * np.exp(np.log(np.abs(g) + 1e-10).sum(0) / 5)
    mask = np.abs(np.sign(g).mean(0)) >= 0.6
    out = gradand.combine(g, gradand.GeometricMean(0.6, rescale=False))
    np.testing.assert_allclose(out, mask * ref, rtol=1e-12)


def _reference_and_mask(grads, tau, scale):
    """The reference code's get_grads (and_mask branch), transcribed in numpy."""
    mask = (np.abs(np.sign(grads).mean(axis=0)) >= tau).astype(np.float64)
    out = mask * grads.mean(axis=0)
    if scale:
        out = out * (1.0 / (1e-10 + mask.sum() / mask.size))
    return out


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_and_mask_matches_the_reference_code(tau):
    rng = np.random.default_rng(int(tau * 10))
    g = rng.standard_normal((6, 3, 5)) + 0.5
    for scale in (False, True):
        ours = gradand.combine(g, gradand.AndMask(tau, rescale=scale))
        np.testing.assert_allclose(ours, _reference_and_mask(g, tau, scale), rtol=1e-8)


def _domainbed_sand_mask(grads, tau, k):
    """DomainBed's SANDMask.mask_grads, transcribed in numpy."""
    avg = grads.mean(0)
    var = grads.var(0, ddof=1) if grads.shape[0] > 1 else np.full(avg.shape, np.nan)
    var[np.isnan(var)] = 1e-17
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = 1.0 / var
        mask = np.tanh(k * lam * (np.abs(np.sign(grads).mean(0)) - tau))
    mask = np.maximum(mask, 0)
    mask[np.isnan(mask)] = 1e-17
    out = mask * avg
    return out * (1.0 / (1e-10 + mask.sum() / mask.size))


@pytest.mark.parametrize("tau,k", [(0.2, 1.0), (0.5, 10.0), (0.7, 100.0)])
def test_sand_mask_matches_domainbed_on_generic_inputs(tau, k):
    rng = np.random.default_rng(7)
    g = rng.standard_normal((8, 4, 6)) * 0.3 + 0.2
    ours = gradand.combine(g, gradand.SandMask(tau, k=k))
    np.testing.assert_allclose(ours, _domainbed_sand_mask(g, tau, k), rtol=1e-6, atol=1e-12)


def test_sand_mask_degenerate_zero_variance_is_the_step_limit():
    g = np.array([[1.0, 2.0, -1.0], [1.0, 2.0, 1.0]])  # σ² = 0 in the first two columns
    c = gradand.SandMask(0.5, k=10.0, rescale=False)
    np.testing.assert_allclose(gradand.combine(g, c), [1.0, 2.0, 0.0])
    # at a = τ with σ² = 0 the mask is exactly 0 (DomainBed writes 1e-17)
    c1 = gradand.SandMask(1.0, k=10.0, rescale=False)
    np.testing.assert_array_equal(gradand.combine(g, c1), [0.0, 0.0, 0.0])


def test_statistics_hold_exact_integer_sign_votes_and_float32_means():
    g = np.ones((1000, 3), dtype=np.float16)
    g[::3] = -1
    s = gradand.statistics(g, gradand.AndMask())
    assert s.sign_sum.dtype == np.int32 and s.mean.dtype == np.float32
    np.testing.assert_array_equal(s.sign_sum, [1000 - 2 * 334] * 3)


def test_half_precision_gradients_come_back_in_their_dtype():
    g = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float16)
    for c in [gradand.Mean(), gradand.AndMask(0.5), gradand.GeometricMean(0.5), gradand.SandMask(0.5, k=1.0)]:
        out = gradand.combine(g, c)
        assert out.dtype == np.float16
        ref = gradand.combine(g.astype(np.float32), c)
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-3, atol=1e-3)


def test_mask_info_by_hand():
    _, info = gradand.combine(G, gradand.AndMask(2 / 3), return_info=True)
    assert float(info.survivor_fraction) == 0.5
    assert float(info.agreement) == pytest.approx((1 + 1 / 3 + 1 / 3 + 2 / 3) / 4)
    _, info = gradand.combine(G, gradand.Mean(), return_info=True)
    assert float(info.survivor_fraction) == 1.0


def test_combiners_are_hashable_immutable_and_readable():
    a, b = gradand.AndMask(0.5), gradand.AndMask(0.5)
    assert a == b and hash(a) == hash(b) and len({a, b, gradand.AndMask(0.6)}) == 2
    assert repr(a) == "AndMask(threshold=0.5, rescale=True)"
    assert repr(gradand.SandMask(0.4, k=10)) == "SandMask(threshold=0.4, k=10.0, rescale=True)"
    assert repr(gradand.Mean()) == "Mean()"
    with pytest.raises(AttributeError):
        a.threshold = 0.1  # type: ignore[misc]


def test_threshold_accepts_ints_and_is_stored_as_float():
    assert gradand.AndMask(1).threshold == 1.0 and isinstance(gradand.AndMask(1).threshold, float)
    assert math.isclose(gradand.GeometricMean(0).threshold, 0.0)
