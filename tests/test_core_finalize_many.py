"""finalize_many: the fused multi-tensor finalize equals finalize tensor by tensor, in every namespace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import combiners, element

import gradand


@st.composite
def model_grads(draw):
    """Per-environment gradients of several tensors of one model (same environments)."""
    n_env = draw(st.integers(1, 6))
    shapes = draw(
        st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4), min_size=1, max_size=5)
    )
    return [draw(hnp.arrays(np.float64, (n_env, *s), elements=element)) for s in shapes]


def _assert_same(many, one, infos_many, infos_one):
    for u, v in zip(many, one, strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=0)
        assert np.array_equal(np.signbit(u), np.signbit(v)) or not np.all(np.isfinite(v))
    for a, b in zip(infos_many, infos_one, strict=True):
        np.testing.assert_allclose(float(a.survivor_fraction), float(b.survivor_fraction), rtol=1e-12)
        np.testing.assert_allclose(float(a.agreement), float(b.agreement), rtol=1e-12, equal_nan=True)


@given(model_grads(), combiners())
def test_equals_finalize_tensor_by_tensor(grads, combiner):
    stats = [gradand.statistics(g, combiner) for g in grads]
    many, infos = gradand.finalize_many(stats, combiner, return_info=True)
    one = [gradand.finalize(s, combiner, return_info=True) for s in stats]
    _assert_same(many, [u for u, _ in one], infos, [i for _, i in one])
    assert all(np.array_equal(u, v) for u, v in zip(gradand.finalize_many(stats, combiner), many))


def test_each_tensor_is_rescaled_by_its_own_survivors_and_a_dead_tensor_gets_zeros():
    c = gradand.AndMask(threshold=1.0)
    alive = gradand.statistics(np.array([[1.0, -1.0, 2.0, 1.0], [1.0, 1.0, 2.0, 1.0]]), c)  # 3 of 4
    dead = gradand.statistics(np.array([[1.0, -1.0], [-1.0, 1.0]]), c)  # 0 of 2
    (u, v), infos = gradand.finalize_many([alive, dead], c, return_info=True)
    np.testing.assert_allclose(u, [4 / 3, 0.0, 8 / 3, 4 / 3])
    assert v.tolist() == [0.0, 0.0] and not np.signbit(v).any()
    assert [float(i.survivor_fraction) for i in infos] == [0.75, 0.0]


def _namespaces():
    out = [("numpy", np.asarray)]
    try:
        import array_api_strict as xs

        out.append(("array_api_strict", xs.asarray))
    except ImportError:
        pass
    try:
        import torch

        out.append(("torch", lambda a: torch.from_numpy(np.array(a))))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        out.append(("jax", lambda a: jnp.asarray(np.asarray(a, np.float32))))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize(("name", "to"), _namespaces(), ids=[n for n, _ in _namespaces()])
@pytest.mark.parametrize(
    "combiner",
    [gradand.Mean(), gradand.AndMask(0.6), gradand.GeometricMean(0.5), gradand.SandMask(0.4, k=10.0)],
    ids=repr,
)
def test_every_namespace_gives_the_numpy_result_in_its_own_arrays(name, to, combiner):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((5, *s)) + 0.2 for s in [(3, 4), (4,), (), (2, 2, 2)]]
    if name == "jax":
        grads = [g.astype(np.float32) for g in grads]
    stats = [gradand.statistics(to(g), combiner) for g in grads]
    updates, infos = gradand.finalize_many(stats, combiner, return_info=True)
    ref = [gradand.finalize(gradand.statistics(g, combiner), combiner) for g in grads]
    tol = 1e-5 if name == "jax" else 1e-10
    for u, r, g in zip(updates, ref, grads, strict=True):
        assert tuple(u.shape) == r.shape and type(u) is type(to(g))
        np.testing.assert_allclose(np.asarray(u), r, rtol=tol, atol=tol * 1e-3)
    assert len(infos) == 4


def test_tensors_that_cannot_be_fused_go_one_by_one():
    c = gradand.AndMask(0.5)
    a = gradand.statistics(np.ones((3, 2)), c)
    b = gradand.statistics(np.ones((2, 2)), c)  # another count: not fusable, still right
    ua, ub = gradand.finalize_many([a, b], c)
    assert ua.tolist() == [1.0, 1.0] and ub.tolist() == [1.0, 1.0]
    [only] = gradand.finalize_many([a], c)
    assert only.tolist() == [1.0, 1.0]


def test_bad_input_names_the_problem():
    c = gradand.AndMask()
    with pytest.raises(ValueError, match="stats is empty"):
        gradand.finalize_many([], c)
    with pytest.raises(ValueError, match=r"stats\[1\]: cannot finalize statistics of zero environments"):
        gradand.finalize_many([gradand.statistics(np.ones((2, 2)), c), gradand.Statistics()], c)
    with pytest.raises(TypeError, match=r"stats\[0\]: stats must be gradand.Statistics"):
        gradand.finalize_many([np.ones(2)], c)
    with pytest.raises(ValueError, match=r"stats\[0\].*needs statistics"):
        mean_stats = gradand.statistics(np.ones((2, 2)), gradand.Mean())
        gradand.finalize_many([mean_stats], gradand.SandMask(0.5, k=1.0))
