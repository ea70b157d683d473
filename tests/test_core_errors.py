"""Bad input gets a clear error naming the argument, its value or shape, and what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import gradand


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [gradand.AndMask, gradand.GeometricMean])
def test_threshold_outside_unit_interval_is_rejected(cls, bad):
    with pytest.raises(ValueError, match="threshold"):
        cls(threshold=bad)


@pytest.mark.parametrize("bad", ["0.5", None, True, [0.5]])
def test_threshold_of_wrong_type_is_rejected(bad):
    with pytest.raises(TypeError, match="threshold must be a real number"):
        gradand.AndMask(threshold=bad)


def test_sand_mask_validates_k_and_threshold():
    with pytest.raises(ValueError, match=r"k must be > 0; got 0.0"):
        gradand.SandMask(0.5, k=0)
    with pytest.raises(ValueError, match=r"k must be > 0; got -1.0"):
        gradand.SandMask(0.5, k=-1)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\].*got 2.0"):
        gradand.SandMask(2, k=1)


def test_geometric_mean_validates_eps_and_rescale():
    with pytest.raises(ValueError, match=r"eps must be > 0; got 0.0"):
        gradand.GeometricMean(eps=0.0)
    with pytest.raises(TypeError, match="rescale must be True or False"):
        gradand.GeometricMean(rescale=1)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128])
def test_integer_bool_and_complex_gradients_are_rejected(dtype):
    g = np.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"real floating dtype.*got {np.dtype(dtype)}"):
        gradand.combine(g, gradand.AndMask())


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], (1.0,), 3.0, "grads", None])
def test_non_arrays_are_rejected(bad):
    with pytest.raises(TypeError, match="grads must be an array"):
        gradand.combine(bad, gradand.AndMask())


def test_zero_environments_are_rejected():
    with pytest.raises(ValueError, match=r"0 environments along axis 0 \(shape \(0, 3\)\)"):
        gradand.combine(np.zeros((0, 3)), gradand.AndMask())
    with pytest.raises(ValueError, match="0 environments"):
        gradand.agreement(np.zeros((0,)))


def test_axis_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"axis=2 is not an axis of grads with shape \(2, 3\)"):
        gradand.combine(np.zeros((2, 3)), gradand.Mean(), axis=2)
    with pytest.raises(ValueError, match="axis=0 is not an axis"):
        gradand.combine(np.float64(1.0) * np.ones(()), gradand.Mean())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_raise_by_default(value):
    g = np.ones((3, 4))
    g[1, 2] = value
    with pytest.raises(ValueError, match=r"NaN or Inf \(1 of 12 entries of shape \(3, 4\)\)"):
        gradand.combine(g, gradand.AndMask())
    with pytest.raises(ValueError, match="nan_policy='zero'"):
        gradand.statistics(g[1], gradand.AndMask(), axis=None)


def test_nan_policy_zero_drops_non_finite_components():
    g = np.array([[1.0, np.nan], [3.0, 2.0]])
    out = gradand.combine(g, gradand.AndMask(0.5, rescale=False), nan_policy="zero")
    # the NaN becomes 0: no vote (agreement 1/2 >= 0.5), nothing added (mean 2/2)
    np.testing.assert_allclose(out, [2.0, 1.0])


def test_nan_policy_propagate_lets_nan_through():
    g = np.array([[1.0, np.nan], [3.0, 2.0]])
    out = gradand.combine(g, gradand.Mean(), nan_policy="propagate")
    assert out[0] == 2.0 and np.isnan(out[1])


def test_unknown_nan_policy_is_rejected():
    with pytest.raises(ValueError, match=r"nan_policy must be one of .*got 'ignore'"):
        gradand.combine(np.ones((2, 2)), gradand.Mean(), nan_policy="ignore")


def test_merging_mismatched_shapes_names_both_shapes():
    c = gradand.AndMask()
    a = gradand.statistics(np.ones(3), c, axis=None)
    b = gradand.statistics(np.ones(4), c, axis=None)
    with pytest.raises(ValueError, match=r"shape \(3,\) with statistics of shape \(4,\)"):
        _ = a + b


def test_merging_statistics_of_different_combiners_is_rejected():
    a = gradand.statistics(np.ones(3), gradand.AndMask(), axis=None)
    b = gradand.statistics(np.ones(3), gradand.GeometricMean(), axis=None)
    with pytest.raises(ValueError, match="different combiners"):
        gradand.merge(a, b)


def test_merging_different_eps_or_dtype_is_rejected():
    a = gradand.statistics(np.ones(3), gradand.GeometricMean(eps=1e-10), axis=None)
    b = gradand.statistics(np.ones(3), gradand.GeometricMean(eps=1e-8), axis=None)
    with pytest.raises(ValueError, match="eps"):
        gradand.merge(a, b)
    c = gradand.statistics(np.ones(3, np.float32), gradand.AndMask(), axis=None)
    d = gradand.statistics(np.ones(3, np.float16), gradand.AndMask(), axis=None)
    with pytest.raises(ValueError, match="dtype float32 and float16"):
        gradand.merge(c, d)


def test_merge_rejects_non_statistics():
    with pytest.raises(TypeError, match="merge\\(\\) takes Statistics; argument 1 is ndarray"):
        gradand.merge(gradand.Statistics(), np.ones(3))


def test_finalizing_empty_statistics_is_rejected():
    with pytest.raises(ValueError, match="zero environments"):
        gradand.finalize(gradand.Statistics(), gradand.AndMask())


def test_finalizing_with_a_combiner_whose_statistics_are_missing_is_rejected():
    s = gradand.statistics(np.ones((2, 3)), gradand.AndMask())
    with pytest.raises(ValueError, match=r"needs statistics \['log_abs_mean'\]"):
        gradand.finalize(s, gradand.GeometricMean())
    g = gradand.statistics(np.ones((2, 3)), gradand.GeometricMean(eps=1e-6))
    with pytest.raises(ValueError, match="eps=1e-06"):
        gradand.finalize(g, gradand.GeometricMean(eps=1e-10))


def test_non_combiner_is_rejected():
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gradand.combine(np.ones((2, 2)), "and_mask")


def test_statistics_of_a_superset_finalize_with_a_subset_combiner():
    # SandMask collects mean, sign_sum, m2: enough for AndMask and Mean too
    g = np.random.default_rng(0).standard_normal((4, 3))
    s = gradand.statistics(g, gradand.SandMask(0.5, k=1.0))
    np.testing.assert_allclose(
        gradand.finalize(s, gradand.AndMask(0.5)), gradand.combine(g, gradand.AndMask(0.5))
    )
