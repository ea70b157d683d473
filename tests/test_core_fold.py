"""The streaming accumulator (``gradand._stats.Fold``): dense = folded, for every combiner and mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradand
from gradand._stats import Fold
from tests.strategies import combiners, stacked_grads


def _assert_same(folded: gradand.Statistics, dense: gradand.Statistics, size: float = 1.0) -> None:
    """``size``: the largest |g|: sums in another order differ by rounding relative to it."""
    assert folded.count == dense.count
    assert folded.fields == dense.fields
    assert folded.dtype == dense.dtype
    assert folded.eps == dense.eps
    if dense.sign_sum is not None:
        assert folded.sign_sum.dtype == np.int32
        np.testing.assert_array_equal(folded.sign_sum, dense.sign_sum)  # votes are exact
    for name in ("mean", "log_abs_mean"):
        if getattr(dense, name) is not None:
            atol = 1e-9 + 1e-14 * size * dense.count
            np.testing.assert_allclose(getattr(folded, name), getattr(dense, name), rtol=1e-9, atol=atol)
    if dense.m2 is not None:
        scale = np.maximum(np.abs(dense.m2), 1e-6 * np.max(np.abs(dense.mean)) ** 2 + 1e-12)
        np.testing.assert_allclose(folded.m2 / scale, dense.m2 / scale, atol=1e-6)


def _size(g: np.ndarray) -> float:
    return float(np.max(np.abs(g))) if g.size else 1.0


@settings(max_examples=80, deadline=None)
@given(g=stacked_grads(), combiner=combiners(), known=st.booleans())
def test_folding_one_environment_at_a_time_equals_the_dense_statistics(g, combiner, known):
    fold = Fold(combiner, expected=len(g) if known else None)
    for e in range(len(g)):
        fold.add(g[e])
    _assert_same(fold.result(), gradand.statistics(g, combiner), _size(g))
    # and it finalizes to the same update as combine() (votes exact, so the same mask)
    np.testing.assert_allclose(
        gradand.finalize(fold.result(), combiner),
        gradand.combine(g, combiner),
        rtol=1e-7,
        atol=1e-9 + 1e-13 * _size(g) * len(g),
    )


@settings(max_examples=60, deadline=None)
@given(g=stacked_grads(min_envs=2), combiner=combiners(), data=st.data())
def test_absent_environments_add_nothing_and_are_not_counted(g, combiner, data):
    present = data.draw(st.lists(st.booleans(), min_size=len(g), max_size=len(g)).filter(any))
    if isinstance(combiner, gradand.SandMask):
        # numpy reads a merged 0-d count back as a scalar, and an empty count is no count: lead
        # with a present environment (in a TensorFlow graph the count stays a tensor)
        present[0] = True
    fold = Fold(combiner, expected=len(g))
    for e in range(len(g)):
        fold.add(g[e], present=np.asarray(present[e]))
    out = fold.result()
    assert int(out.count) == sum(present)
    _assert_same(
        out.replace(count=int(out.count)), gradand.statistics(g[np.asarray(present)], combiner), _size(g)
    )


@settings(max_examples=40, deadline=None)
@given(g=stacked_grads(min_envs=2), threshold=st.floats(0.0, 1.0))
def test_a_backward_pass_seeded_with_the_folds_scale_gives_the_same_statistics(g, threshold):
    combiner = gradand.AndMask(threshold)
    fold = Fold(combiner, expected=len(g))
    seed = fold.seed(g.dtype, np)
    assert seed is not None and float(seed).is_integer() is False and np.log2(seed).is_integer()
    for e in range(len(g)):
        fold.add(g[e] * seed, seeded=True)  # what autograd returns with the seed as output gradient
    _assert_same(fold.result(), gradand.statistics(g, combiner), _size(g))


def test_no_seed_where_it_could_underflow_or_where_logs_need_the_true_values():
    assert Fold(gradand.AndMask(), expected=8).seed(np.float16, np) is None
    assert Fold(gradand.GeometricMean(), expected=8).seed(np.float32, np) is None
    assert Fold(gradand.SandMask(0.5, 10.0), expected=8).seed(np.float32, np) is None
    assert Fold(gradand.AndMask(), expected=None).seed(np.float32, np) is None
    assert Fold(gradand.AndMask(), expected=1).seed(np.float32, np) is None


@pytest.mark.parametrize("known", [True, False])
def test_the_folded_mean_of_huge_float32_gradients_does_not_overflow(known):
    g = np.full((4, 3), 1e38, dtype=np.float32)
    fold = Fold(gradand.AndMask(), expected=4 if known else None)
    for row in g:
        fold.add(row)
    out = fold.result()
    assert np.all(np.isfinite(out.mean))
    np.testing.assert_allclose(out.mean, 1e38, rtol=1e-6)


def test_nan_policies_match_the_dense_path():
    g = np.array([[1.0, np.nan, 2.0], [3.0, 1.0, -np.inf], [1.0, 1.0, 1.0]])
    c = gradand.AndMask(0.5)
    for policy in ("zero", "propagate"):
        fold = Fold(c, expected=3, nan_policy=policy)
        for row in g:
            fold.add(row)
        dense = gradand.statistics(g, c, nan_policy=policy)
        np.testing.assert_array_equal(fold.result().sign_sum, dense.sign_sum)
        np.testing.assert_array_equal(np.isnan(fold.result().mean), np.isnan(dense.mean))
    fold = Fold(c, expected=3)
    fold.add(np.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fold.add(g[1])


def test_skipped_environments_count_as_zero_gradients():
    c = gradand.AndMask(0.5)
    fold = Fold(c, expected=3)
    fold.add(np.array([2.0, -1.0]))
    fold.skip()
    fold.skip()
    _assert_same(fold.result(), gradand.statistics(np.array([[2.0, -1.0], [0, 0], [0, 0]]), c))
    only_skipped = Fold(c, expected=2)
    only_skipped.skip()
    only_skipped.skip()
    out = only_skipped.result(like=np.zeros(2, np.float32))
    assert out.count == 2 and out.dtype == np.float32
    np.testing.assert_array_equal(out.sign_sum, [0, 0])
    with pytest.raises(ValueError, match="no shape known"):
        only_skipped.result()
    with pytest.raises(ValueError, match="add\\(\\) the zeros"):
        Fold(gradand.GeometricMean(), expected=2).skip()


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        Fold("and_mask", expected=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan_policy"):
        Fold(gradand.AndMask(), expected=2, nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grads"):
        Fold(gradand.AndMask(), expected=2).add(np.array([1, 2]))
    with pytest.raises(ValueError, match="expected number"):
        Fold(gradand.AndMask()).add(np.ones(2), present=np.asarray(True))
    assert Fold(gradand.AndMask(), expected=2).result().is_empty


@settings(max_examples=60, deadline=None)
@given(g=stacked_grads(min_envs=2), combiner=combiners(), data=st.data())
def test_folding_chunks_of_environments_equals_the_dense_statistics(g, combiner, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(g) - 1), max_size=len(g) - 1)))
    fold = Fold(combiner, expected=len(g) if data.draw(st.booleans()) else None)
    for lo, hi in zip([0, *cuts], [*cuts, len(g)]):
        fold.add(g[lo:hi], axis=0)
    _assert_same(fold.result(), gradand.statistics(g, combiner), _size(g))
