"""Consistency of minima (paper §2): inconsistency, ILC, Karcher mean, Proposition 3, empirical estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradand import consistency as C

positive = st.floats(1e-2, 1e2)


def spd(draw, p):
    a = draw(hnp.arrays(np.float64, (p, p), elements=st.floats(-2, 2)))
    return a @ a.T + 0.1 * np.eye(p)


@st.composite
def spd_stack(draw, min_envs=2, max_envs=4, max_p=4):
    e = draw(st.integers(min_envs, max_envs))
    p = draw(st.integers(1, max_p))
    return np.stack([spd(draw, p) for _ in range(e)])


@given(spd_stack(), st.floats(1e-3, 10))
def test_inconsistency_is_at_least_epsilon(h, eps):
    assert C.inconsistency(h, epsilon=eps) >= eps * (1 - 1e-9)


@given(spd_stack(min_envs=1, max_envs=1), st.integers(2, 4), st.floats(1e-3, 10))
def test_equal_hessians_give_exactly_epsilon(h, e, eps):
    assert C.inconsistency(np.repeat(h, e, axis=0), epsilon=eps) == pytest.approx(eps, rel=1e-8)


@given(spd_stack(min_envs=2, max_envs=2))
def test_inconsistency_is_symmetric_in_the_pair(h):
    assert C.inconsistency(h) == pytest.approx(C.inconsistency(h[::-1]), rel=1e-10)


@given(spd_stack(), st.floats(1e-3, 1e3))
def test_inconsistency_is_scale_invariant(h, c):
    assert C.inconsistency(c * h) == pytest.approx(C.inconsistency(h), rel=1e-7)


@given(hnp.arrays(np.float64, st.tuples(st.integers(2, 4), st.integers(1, 5)), elements=positive))
def test_diagonal_fast_path_equals_the_generalised_eigenproblem(d):
    full = np.stack([np.diag(row) for row in d])
    assert C.inconsistency(d) == pytest.approx(C.inconsistency(full), rel=1e-9)


def test_diagonal_closed_form_by_hand():
    # ε · max_i max(λB/λA, λA/λB) = 0.5 · 1/0.05
    h = np.array([[0.05, 1.0], [1.0, 0.05]])
    assert C.inconsistency(h, epsilon=0.5) == pytest.approx(10.0)
    assert C.ilc(h, epsilon=0.5) == pytest.approx(-10.0)
    assert C.inconsistency(np.array([[0.01, 1.0], [1.0, 0.01]])) == pytest.approx(100.0)


def test_flat_in_one_environment_and_curved_in_another_is_infinite():
    assert C.inconsistency(np.array([[0.0, 1.0], [1.0, 1.0]])) == math.inf
    full = np.stack([np.diag([0.0, 1.0]), np.diag([1.0, 1.0])])
    assert C.inconsistency(full) == math.inf
    # flat in both along the same direction: finite
    assert C.inconsistency(np.array([[0.0, 1.0], [0.0, 2.0]])) == pytest.approx(2.0)
    both = np.stack([np.diag([0.0, 1.0]), np.diag([0.0, 2.0])])
    assert C.inconsistency(both) == pytest.approx(2.0)


def test_rotated_flat_direction_is_detected_in_the_general_case():
    r = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    ha = r @ np.diag([0.0, 2.0]) @ r.T
    assert C.pair_inconsistency(ha, np.eye(2)) == math.inf
    assert C.pair_inconsistency(np.eye(2), ha) == pytest.approx(2.0)


def test_generalised_eigenvalue_matches_scipy_free_reference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    b = rng.standard_normal((4, 4))
    ha, hb = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    expected = np.max(np.real(np.linalg.eigvals(np.linalg.solve(ha, hb))))
    assert C.pair_inconsistency(ha, hb, epsilon=2.0) == pytest.approx(2.0 * expected, rel=1e-9)


@given(hnp.arrays(np.float64, st.tuples(st.just(2), st.integers(1, 4)), elements=positive))
def test_karcher_mean_of_commuting_matrices_is_the_elementwise_geometric_mean(d):
    full = np.stack([np.diag(row) for row in d])
    np.testing.assert_allclose(C.karcher_mean(full), np.diag(np.sqrt(d[0] * d[1])), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(C.karcher_mean(d), np.sqrt(d[0] * d[1]), rtol=1e-12)


@given(spd_stack(min_envs=2, max_envs=2, max_p=3))
def test_karcher_mean_of_two_matrices_is_the_matrix_geometric_mean(h):
    a, b = h
    w, u = np.linalg.eigh(a)
    a_half, a_mhalf = (u * np.sqrt(w)) @ u.T, (u / np.sqrt(w)) @ u.T
    w2, u2 = np.linalg.eigh(a_mhalf @ b @ a_mhalf)
    expected = a_half @ ((u2 * np.sqrt(w2)) @ u2.T) @ a_half  # A #½ B
    np.testing.assert_allclose(C.karcher_mean(h), expected, rtol=1e-6, atol=1e-8)


@given(spd_stack(max_envs=3, max_p=3))
def test_karcher_determinant_is_the_geometric_mean_of_determinants(h):
    det = np.linalg.det(C.karcher_mean(h))
    assert det == pytest.approx(np.exp(np.mean(np.log(np.linalg.det(h)))), rel=1e-6)


def test_arithmetic_mean_has_more_volume_than_geometric_for_disagreeing_hessians():
    h = np.stack([np.diag([0.05, 1.0]), np.diag([1.0, 0.05])])
    assert np.linalg.det(C.arithmetic_mean(h)) > np.linalg.det(C.karcher_mean(h))
    np.testing.assert_allclose(np.diag(C.arithmetic_mean(h)), [0.525, 0.525])


@given(
    hnp.arrays(np.float64, st.tuples(st.just(2), st.integers(1, 4)), elements=positive), st.floats(1e-2, 10)
)
def test_proposition3_bound_holds_for_co_diagonalisable_hessians(d, eps):
    bound = C.proposition3_bound(d[0], d[1], epsilon=eps)
    assert C.inconsistency(d, epsilon=eps) <= bound * (1 + 1e-9)
    full = C.proposition3_bound(np.diag(d[0]), np.diag(d[1]), epsilon=eps)
    assert full == pytest.approx(bound, rel=1e-8)


def test_proposition3_bound_rejects_non_commuting_hessians():
    a = np.array([[2.0, 1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="co-diagonalisable"):
        C.proposition3_bound(a, np.diag([1.0, 3.0]))


def _quadratics(hs):
    return [lambda t, h=h: 0.5 * float(t @ h @ t) for h in hs]


def test_empirical_estimate_approaches_the_closed_form_from_below():
    hs = [np.diag([0.05, 1.0]), np.diag([1.0, 0.05])]
    exact = C.inconsistency(np.stack(hs), epsilon=0.5)
    values = [
        C.empirical_inconsistency(_quadratics(hs), np.zeros(2), epsilon=0.5, n_probes=n, seed=1).value
        for n in (4, 32, 256, 2048)
    ]
    assert all(v <= exact * (1 + 1e-9) for v in values)  # a lower bound
    assert values == sorted(values)  # nested probes: non-decreasing
    assert values[-1] == pytest.approx(exact, rel=0.02)  # and it gets there


def test_empirical_estimate_on_a_general_quadratic_is_close_in_three_dimensions():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    hs = [a @ a.T + 0.5 * np.eye(3), b @ b.T + 0.5 * np.eye(3)]
    exact = C.inconsistency(np.stack(hs))
    est = C.empirical_inconsistency(_quadratics(hs), np.zeros(3), n_probes=3000, n_steps=2, seed=0)
    assert est.value <= exact * (1 + 1e-9)
    assert est.value == pytest.approx(exact, rel=0.05)
    assert est.pair in {(0, 1), (1, 0)} and est.n_probes == 3000


def test_empirical_estimate_is_seeded():
    hs = [np.diag([0.3, 1.0]), np.diag([1.0, 0.2])]
    a = C.empirical_inconsistency(_quadratics(hs), np.zeros(2), n_probes=20, seed=5)
    b = C.empirical_inconsistency(_quadratics(hs), np.zeros(2), n_probes=20, seed=5)
    assert a.value == b.value


@pytest.mark.parametrize(
    "hessians,match",
    [
        (np.ones((2, 2, 3)), "square"),
        (np.ones(3), r"shape \(E, P, P\)"),
        (np.ones((1, 3)), "at least 2 environments"),
        (np.array([[1.0, np.nan], [1.0, 1.0]]), "NaN"),
        (np.array([[-1.0, 1.0], [1.0, 1.0]]), "not positive semi-definite"),
        (np.stack([np.array([[1.0, 2.0], [0.0, 1.0]])] * 2), "symmetric"),
    ],
)
def test_bad_hessians_get_clear_errors(hessians, match):
    with pytest.raises(ValueError, match=match):
        C.inconsistency(hessians)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epsilon_is_rejected(eps):
    with pytest.raises(ValueError, match="epsilon"):
        C.inconsistency(np.ones((2, 2)), epsilon=eps)


@pytest.mark.parametrize("eps", ["1", None, True, [1.0]])
def test_epsilon_of_the_wrong_type_is_a_type_error(eps):
    with pytest.raises(TypeError, match="epsilon must be a real number"):
        C.inconsistency(np.ones((2, 2)), epsilon=eps)


def test_empirical_estimator_validates_its_arguments():
    f = _quadratics([np.eye(2), np.eye(2)])
    with pytest.raises(ValueError, match="at least 2 environments"):
        C.empirical_inconsistency(f[:1], np.zeros(2))
    with pytest.raises(ValueError, match="n_probes"):
        C.empirical_inconsistency(f, np.zeros(2), n_probes=0)
    with pytest.raises(ValueError, match="theta_star"):
        C.empirical_inconsistency(f, np.zeros((2, 2)))
    with pytest.raises(TypeError, match="callables"):
        C.empirical_inconsistency([1, 2], np.zeros(2))
