"""Hostile inputs to gradand.consistency (issue 13, classes 4 and 5).

Class 4: every argument of every public function is validated, and the error
names the argument, what it got and what was expected. Class 5: the numerics
stay accurate for ill-conditioned SPD Hessians (conditions up to 1e12) and for
magnitudes from 1e-300 to 1e300.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gradand import consistency as C

ULP = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- helpers


def rotation(seed: int, p: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))
    return q * np.sign(np.diag(r))


def from_spectrum(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    h = (q * w) @ q.T
    return 0.5 * h + 0.5 * h.T


@st.composite
def spectra(draw, min_p=1, max_p=6, max_log10_cond=12.0):
    """Eigenvalues in (0, 1] with condition number exactly 10**k, k up to ``max_log10_cond``."""
    p = draw(st.integers(min_p, max_p))
    k = draw(st.floats(0.0, max_log10_cond))
    inner = draw(st.lists(st.floats(0.0, 1.0), min_size=p, max_size=p))
    w = 10.0 ** (-k * np.array(inner))
    if p > 1:
        w[0], w[-1] = 1.0, 10.0**-k
    return w, 10.0**k


@st.composite
def ill_conditioned_spd(draw, max_p=6, max_log10_cond=12.0):
    """A rotated SPD matrix of condition up to 1e12, with its condition number."""
    w, cond = draw(spectra(max_p=max_p, max_log10_cond=max_log10_cond))
    q = rotation(draw(st.integers(0, 2**32 - 1)), len(w))
    return from_spectrum(q, w), cond


def whitened_error(x: np.ndarray, reference: np.ndarray) -> float:
    """``‖R^{-½} X R^{-½} - I‖₂``: the error relative to each of the reference's eigen-directions."""
    w, u = np.linalg.eigh(reference)
    r = (u / np.sqrt(w)) @ u.T
    return float(np.linalg.norm(r @ x @ r - np.eye(len(w)), 2))


def rounding_level(p: int, cond: float) -> float:
    """How far a P×P matrix of condition ``cond`` is determined by its float64 entries (relative)."""
    return 8.0 * p * ULP * cond + 1e-13


def quadratics(hs):
    return [lambda t, h=h: 0.5 * float(t @ h @ t) for h in hs]


GOOD = np.stack([np.diag([1.0, 2.0]), np.diag([2.0, 1.0])])

STACK_FUNCTIONS = {
    "inconsistency": (lambda h: C.inconsistency(h), "hessians"),
    "ilc": (lambda h: C.ilc(h), "hessians"),
    "arithmetic_mean": (lambda h: C.arithmetic_mean(h), "matrices"),
    "karcher_mean": (lambda h: C.karcher_mean(h), "matrices"),
}
PAIR_FUNCTIONS = {
    "pair_inconsistency": C.pair_inconsistency,
    "proposition3_bound": C.proposition3_bound,
}


# --------------------------------------------------------------------------- class 4: Hessian arrays


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@given(st.integers(1, 5), st.integers(1, 5), st.booleans())
def test_hessians_of_different_sizes_name_both_shapes(function, p, q, as_diagonals):
    call, name = STACK_FUNCTIONS[function]
    if p == q:
        q += 1
    first, second = (np.ones(p), np.ones(q)) if as_diagonals else (np.eye(p), np.eye(q))
    with pytest.raises(ValueError, match=rf"{name}\[1\] has shape \({q},.*but {name}\[0\] has shape \({p},"):
        call([first, second])


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
@given(st.integers(1, 5), st.integers(1, 5), st.sampled_from(["full", "diagonal", "mixed"]))
def test_a_pair_of_different_shapes_names_both_arguments(function, p, q, kind):
    if p == q and kind != "mixed":
        q += 1
    a = np.eye(p) if kind != "diagonal" else np.ones(p)
    b = np.eye(q) if kind == "full" else np.ones(q)
    with pytest.raises(ValueError, match=r"hessian_a has shape \(.*\) and hessian_b has shape \(.*\)"):
        PAIR_FUNCTIONS[function](a, b)


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@pytest.mark.parametrize("shape", [(2, 0, 0), (2, 0), (3, 0, 0)])
def test_zero_parameters_are_refused_with_the_shape(function, shape):
    call, name = STACK_FUNCTIONS[function]
    with pytest.raises(ValueError, match=rf"{name} has shape \({shape[0]}, 0.*P >= 1"):
        call(np.zeros(shape))


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
@pytest.mark.parametrize("shape", [(0,), (0, 0)])
def test_a_zero_parameter_pair_is_refused(function, shape):
    with pytest.raises(ValueError, match=r"hessian_a has shape \(0,.*P >= 1"):
        PAIR_FUNCTIONS[function](np.zeros(shape), np.zeros(shape))


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
def test_zero_environments_are_refused(function):
    call, name = STACK_FUNCTIONS[function]
    with pytest.raises(ValueError, match=rf"{name} needs at least \d environments?; got 0"):
        call(np.zeros((0, 3, 3)))


@pytest.mark.parametrize("function", ["inconsistency", "ilc"])
@pytest.mark.parametrize("shape", [(1, 3, 3), (1, 3)])
def test_one_environment_is_too_few_for_an_inconsistency(function, shape):
    call, name = STACK_FUNCTIONS[function]
    with pytest.raises(ValueError, match=rf"{name} needs at least 2 environments; got 1"):
        call(np.ones(shape))


@given(ill_conditioned_spd(max_log10_cond=6))
def test_the_mean_of_one_matrix_is_that_matrix(h_cond):
    h, _ = h_cond
    np.testing.assert_array_equal(C.karcher_mean(h[None]), h)
    np.testing.assert_array_equal(C.arithmetic_mean(h[None]), h)
    np.testing.assert_array_equal(C.karcher_mean(np.diag(h)[None]), np.diag(h))


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@pytest.mark.parametrize("shape", [(2, 2, 3), (3, 4, 1)])
def test_non_square_matrices_are_refused_with_the_shape(function, shape):
    call, name = STACK_FUNCTIONS[function]
    with pytest.raises(
        ValueError, match=rf"{name} must be square.*got shape \({shape[0]}, {shape[1]}, {shape[2]}\)"
    ):
        call(np.ones(shape))


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
def test_a_non_square_pair_is_refused(function):
    with pytest.raises(ValueError, match=r"hessian_b must be a square \(P, P\) matrix; got shape \(2, 3\)"):
        PAIR_FUNCTIONS[function](np.eye(2), np.ones((2, 3)))


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@pytest.mark.parametrize("shape", [(3,), (2, 2, 2, 2), ()])
def test_wrong_ranks_are_refused_with_the_expected_shapes(function, shape):
    call, name = STACK_FUNCTIONS[function]
    with pytest.raises(ValueError, match=rf"{name} must have shape \(E, P, P\).*or \(E, P\).*got shape"):
        call(np.ones(shape))


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
def test_a_stack_is_not_a_pair_argument(function):
    with pytest.raises(ValueError, match=r"hessian_a must have shape \(P, P\).*or \(P,\).*\(2, 2, 2\)"):
        PAIR_FUNCTIONS[function](np.ones((2, 2, 2)), np.eye(2))


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@given(env=st.integers(0, 2), diagonal=st.booleans(), where=st.integers(0, 2))
def test_non_finite_entries_name_the_environment(function, bad, env, diagonal, where):
    call, name = STACK_FUNCTIONS[function]
    h = np.stack([np.diag([1.0, 2.0, 3.0])] * 3)
    if diagonal:
        h = np.stack([np.diagonal(x) for x in h])
        h[env, where] = bad
    else:
        h[env, where, where] = bad
    with pytest.raises(ValueError, match=rf"{name}\[{env}\] contains NaN or Inf"):
        call(h)


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
def test_non_finite_pair_entries_name_the_argument(function):
    with pytest.raises(ValueError, match=r"hessian_b contains NaN or Inf \(value nan at index \(1,\)\)"):
        PAIR_FUNCTIONS[function](np.ones(2), np.array([1.0, np.nan]))


@pytest.mark.parametrize("function", STACK_FUNCTIONS)
@given(scale=st.sampled_from([1e-300, 1e-6, 1.0, 1e6, 1e300]), env=st.integers(0, 1))
def test_non_symmetric_matrices_are_refused_at_every_scale(function, scale, env):
    call, name = STACK_FUNCTIONS[function]
    h = np.stack([np.eye(2), np.eye(2)]) * scale
    h[env, 0, 1] += 1e-3 * scale
    with pytest.raises(ValueError, match=rf"{name}\[{env}\] is not symmetric"):
        call(h)


@pytest.mark.parametrize("function", PAIR_FUNCTIONS)
def test_a_non_symmetric_pair_is_refused(function):
    with pytest.raises(ValueError, match="hessian_a is not symmetric"):
        PAIR_FUNCTIONS[function](np.array([[1.0, 2.0], [0.0, 1.0]]), np.eye(2))


def test_rounding_asymmetry_is_accepted_and_symmetrised():
    h = np.stack([np.array([[2.0, 1.0], [1.0 + 1e-12, 2.0]]), np.eye(2)])
    assert C.inconsistency(h) == pytest.approx(C.inconsistency(0.5 * (h + np.swapaxes(h, 1, 2))), rel=1e-12)


@pytest.mark.parametrize("function", ["inconsistency", "ilc"])
@given(env=st.integers(0, 2), diagonal=st.booleans(), scale=st.sampled_from([1e-200, 1.0, 1e200]))
def test_indefinite_hessians_name_the_environment_at_every_scale(function, env, diagonal, scale):
    call, name = STACK_FUNCTIONS[function]
    h = np.stack([np.diag([1.0, 2.0])] * 3) * scale
    h[env, 1, 1] = -1e-6 * scale
    if diagonal:
        h = np.stack([np.diagonal(x) for x in h])
    with pytest.raises(ValueError, match=rf"{name}\[{env}\] is not positive semi-definite"):
        call(h)


def test_negative_rounding_eigenvalues_count_as_flat():
    h = np.stack([np.diag([1.0, -1e-12]), np.diag([1.0, -1e-13])])
    assert C.inconsistency(h) == pytest.approx(1.0)


@given(env=st.integers(0, 2), diagonal=st.booleans())
def test_karcher_mean_refuses_indefinite_and_singular_matrices_by_name(env, diagonal):
    for low, match in [(-1e-3, "is not positive definite"), (0.0, "is singular to working precision")]:
        h = np.stack([np.diag([1.0, 2.0])] * 3)
        h[env, 0, 0] = low
        if diagonal:
            h = np.stack([np.diagonal(x) for x in h])
        with pytest.raises(ValueError, match=rf"matrices\[{env}\] {match}.*positive-definite"):
            C.karcher_mean(h)


def test_karcher_mean_refuses_a_numerically_singular_rotated_matrix():
    q = rotation(3, 3)
    singular = from_spectrum(q, np.array([1.0, 0.5, 0.0]))  # eigenvalue ~1e-17: rounding
    with pytest.raises(ValueError, match=r"matrices\[1\] (is singular|is not positive definite)"):
        C.karcher_mean(np.stack([np.eye(3), singular]))


@pytest.mark.parametrize("which", ["hessian_a", "hessian_b"])
@pytest.mark.parametrize("low", [0.0, -1.0])
def test_proposition3_bound_refuses_non_positive_definite_hessians_by_name(which, low):
    bad = np.array([1.0, low])
    args = {"hessian_a": np.ones(2), "hessian_b": np.ones(2), which: bad}
    with pytest.raises(ValueError, match=rf"{which} is (not positive definite|singular)"):
        C.proposition3_bound(**args)
    with pytest.raises(ValueError, match=rf"{which} is (not positive definite|singular)"):
        C.proposition3_bound(*(np.diag(args[k]) for k in ("hessian_a", "hessian_b")))


@pytest.mark.parametrize("function", [*STACK_FUNCTIONS, *PAIR_FUNCTIONS])
@pytest.mark.parametrize(
    "value,match",
    [
        (np.ones((2, 2), dtype=bool), "not booleans"),
        (np.ones((2, 2), dtype=np.complex128), "complex"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers; got dtype <U1"),
        (None, "real numbers; got dtype object"),
        ({"a": 1}, "real numbers; got dtype object"),
        ((x for x in range(3)), "real numbers; got dtype object"),
    ],
)
def test_non_real_data_is_a_type_error_naming_the_argument(function, value, match):
    if function in PAIR_FUNCTIONS:
        with pytest.raises(TypeError, match=rf"hessian_a (must )?.*{match}"):
            PAIR_FUNCTIONS[function](value, np.ones(2))
    else:
        call, name = STACK_FUNCTIONS[function]
        with pytest.raises(TypeError, match=rf"{name} (must )?.*{match}"):
            call(value)


@given(st.lists(st.lists(st.integers(1, 9), min_size=3, max_size=3), min_size=2, max_size=4))
def test_integer_hessians_are_converted_to_float(rows):
    ints = np.array(rows, dtype=np.int64)
    assert C.inconsistency(ints) == C.inconsistency(ints.astype(np.float64))
    np.testing.assert_array_equal(C.karcher_mean(ints), C.karcher_mean(ints.astype(np.float64)))
    np.testing.assert_array_equal(C.arithmetic_mean(ints), C.arithmetic_mean(ints.astype(np.float64)))


def test_lists_and_float32_hessians_are_accepted():
    assert C.inconsistency([np.diag([1.0, 2.0]), np.diag([2.0, 1.0])]) == pytest.approx(2.0)
    assert C.inconsistency(GOOD.astype(np.float32)) == pytest.approx(2.0)
    assert C.pair_inconsistency([[1, 0], [0, 2]], [[2, 0], [0, 1]]) == pytest.approx(2.0)


# --------------------------------------------------------------------------- class 4: scalars


EPSILON_CALLS = {
    "inconsistency": lambda eps: C.inconsistency(GOOD, epsilon=eps),
    "ilc": lambda eps: C.ilc(GOOD, epsilon=eps),
    "pair_inconsistency": lambda eps: C.pair_inconsistency(GOOD[0], GOOD[1], epsilon=eps),
    "proposition3_bound": lambda eps: C.proposition3_bound(GOOD[0], GOOD[1], epsilon=eps),
    "empirical_inconsistency": lambda eps: (
        C.empirical_inconsistency(quadratics(GOOD), np.zeros(2), epsilon=eps, n_probes=2, n_steps=1).value
    ),
}


@pytest.mark.parametrize("function", EPSILON_CALLS)
@pytest.mark.parametrize("eps", [0, 0.0, -1.0, -1e-300, np.float64(-2.0), np.nan, np.inf, -np.inf])
def test_epsilon_must_be_positive_and_finite(function, eps):
    with pytest.raises(ValueError, match=r"epsilon must be (> 0|finite).*got"):
        EPSILON_CALLS[function](eps)


@pytest.mark.parametrize("function", EPSILON_CALLS)
@pytest.mark.parametrize("eps", ["1", None, True, np.bool_(True), [1.0], 1 + 0j, np.complex128(1.0)])
def test_epsilon_of_a_non_real_type_is_a_type_error(function, eps):
    with pytest.raises(TypeError, match=r"epsilon must be a real number.*got"):
        EPSILON_CALLS[function](eps)


@pytest.mark.parametrize("function", EPSILON_CALLS)
@given(
    value=st.sampled_from([0.5, 3, 1e-3, 7.25]),
    kind=st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.int64, Fraction, float, int]),
)
def test_numpy_scalars_are_accepted_wherever_python_numbers_are(function, value, kind):
    if kind in (np.int32, np.int64, int) and value != int(value):
        value = 3
    scalar = kind(value) if kind is not Fraction else Fraction(value).limit_denominator(1000)
    assert EPSILON_CALLS[function](scalar) == EPSILON_CALLS[function](float(scalar))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tol": 0.0}, ValueError, r"tol must be > 0.*got 0.0"),
        ({"tol": -1e-6}, ValueError, r"tol must be > 0"),
        ({"tol": np.nan}, ValueError, r"tol must be finite"),
        ({"tol": np.inf}, ValueError, r"tol must be finite"),
        ({"tol": "1e-6"}, TypeError, r"tol must be a real number.*str"),
        ({"tol": True}, TypeError, r"tol must be a real number.*bool"),
        ({"max_iter": 0}, ValueError, r"max_iter must be an int >= 1; got 0"),
        ({"max_iter": -5}, ValueError, r"max_iter must be an int >= 1; got -5"),
        ({"max_iter": 10.0}, TypeError, r"max_iter must be an int >= 1; got 10.0 \(float\)"),
        ({"max_iter": True}, TypeError, r"max_iter must be an int.*bool"),
        ({"max_iter": np.float64(3)}, TypeError, r"max_iter must be an int"),
        ({"max_iter": None}, TypeError, r"max_iter must be an int.*NoneType"),
    ],
)
def test_karcher_mean_validates_tol_and_max_iter(kwargs, error, match):
    with pytest.raises(error, match=match):
        C.karcher_mean(GOOD, **kwargs)


def test_karcher_mean_takes_numpy_scalars_for_tol_and_max_iter():
    h = np.stack([np.diag([1.0, 4.0]), np.diag([4.0, 1.0]), np.eye(2)])
    expected = C.karcher_mean(h, tol=2.0**-30, max_iter=50)
    np.testing.assert_array_equal(
        C.karcher_mean(h, tol=np.float32(2.0**-30), max_iter=np.int64(50)), expected
    )


def test_karcher_mean_warns_when_max_iter_runs_out():
    h = np.stack([from_spectrum(rotation(s, 3), np.array([1.0, 1e-3, 1e-6])) for s in range(3)])
    with pytest.warns(RuntimeWarning, match=r"did not converge in max_iter=1 iterations"):
        C.karcher_mean(h, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.karcher_mean(h)  # the default converges


# --------------------------------------------------------------------------- class 4: the empirical estimator


def _estimate(**kwargs):
    args = {"losses": quadratics(GOOD), "theta_star": np.zeros(2), "n_probes": 3, "n_steps": 2}
    args.update(kwargs)
    return C.empirical_inconsistency(args.pop("losses"), args.pop("theta_star"), **args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_radius": -1}, ValueError, r"max_radius must be > 0.*got -1"),
        ({"max_radius": 0.0}, ValueError, r"max_radius must be > 0"),
        ({"max_radius": np.inf}, ValueError, r"max_radius must be finite"),
        ({"max_radius": np.nan}, ValueError, r"max_radius must be finite"),
        ({"max_radius": "10"}, TypeError, r"max_radius must be a real number"),
        ({"n_probes": 0}, ValueError, r"n_probes must be an int >= 1; got 0"),
        ({"n_probes": -3}, ValueError, r"n_probes must be an int >= 1"),
        ({"n_probes": 2.0}, TypeError, r"n_probes must be an int >= 1; got 2.0 \(float\)"),
        ({"n_probes": True}, TypeError, r"n_probes must be an int"),
        ({"n_steps": 0}, ValueError, r"n_steps must be an int >= 1; got 0"),
        ({"n_steps": 1.5}, TypeError, r"n_steps must be an int"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0; got -1"),
        ({"seed": 1.5}, TypeError, r"seed must be an int >= 0"),
        ({"seed": None}, TypeError, r"seed must be an int >= 0"),
        ({"epsilon": -1}, ValueError, r"epsilon must be > 0"),
        ({"theta_star": np.zeros((2, 2))}, ValueError, r"theta_star must be a non-empty 1-D.*\(2, 2\)"),
        ({"theta_star": np.zeros(0)}, ValueError, r"theta_star must be a non-empty 1-D.*\(0,\)"),
        ({"theta_star": 0.0}, ValueError, r"theta_star must be a non-empty 1-D.*\(\)"),
        (
            {"theta_star": np.array([0.0, np.nan])},
            ValueError,
            r"theta_star contains NaN or Inf \(at index 1\)",
        ),
        (
            {"theta_star": np.array([np.inf, 0.0])},
            ValueError,
            r"theta_star contains NaN or Inf \(at index 0\)",
        ),
        ({"theta_star": np.zeros(2, complex)}, TypeError, r"theta_star must hold real numbers; got complex"),
        ({"theta_star": np.zeros(2, bool)}, TypeError, r"theta_star must hold real numbers, not booleans"),
        ({"theta_star": ["a", "b"]}, TypeError, r"theta_star must hold real numbers"),
        ({"losses": quadratics(GOOD)[:1]}, ValueError, r"losses needs at least 2 environments; got 1"),
        ({"losses": []}, ValueError, r"losses needs at least 2 environments; got 0"),
        ({"losses": quadratics(GOOD)[0]}, TypeError, r"sequence of callables.*single function"),
        ({"losses": 5}, TypeError, r"losses must be a sequence of callables.*got int"),
        ({"losses": "ab"}, TypeError, r"losses must be a sequence of callables.*single str"),
        ({"losses": [quadratics(GOOD)[0], 2]}, TypeError, r"callables.*losses\[1\] is 2 \(int\)"),
    ],
)
def test_empirical_inconsistency_validates_every_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        _estimate(**kwargs)


@pytest.mark.parametrize(
    "returned,error,match",
    [
        (np.ones(2), TypeError, r"losses\[1\] must return a real number.*ndarray of shape \(2,\)"),
        ("0.5", TypeError, r"losses\[1\] must return a real number; returned '0.5'"),
        (None, TypeError, r"losses\[1\] must return a real number.*NoneType"),
        (1j, TypeError, r"losses\[1\] must return a real number"),
        (np.complex128(1.0), TypeError, r"losses\[1\] must return a real number"),
        (True, TypeError, r"losses\[1\] must return a real number"),
        (np.nan, ValueError, r"losses\[1\] returned NaN at theta_star"),
        (np.inf, ValueError, r"losses\[1\] is inf at theta_star"),
    ],
)
def test_a_loss_that_returns_garbage_is_named(returned, error, match):
    losses = [quadratics(GOOD)[0], lambda t: returned]
    with pytest.raises(error, match=match):
        _estimate(losses=losses)


def test_a_loss_that_turns_nan_away_from_theta_star_is_named():
    def nan_far(t):
        return 0.5 * float(t @ t) if float(t @ t) < 0.25 else math.nan

    with pytest.raises(
        ValueError, match=r"losses\[1\] returned NaN at theta_star \+ [0-9.e-]+·d \(d a unit probe"
    ):
        _estimate(losses=[quadratics(GOOD)[0], nan_far])


def test_loss_values_may_be_numpy_scalars_and_one_element_arrays():
    plain = _estimate().value
    losses = [
        lambda t: np.float32(0.5 * float(t @ GOOD[0] @ t)),
        lambda t: np.array([0.5 * float(t @ GOOD[1] @ t)]),
    ]
    assert _estimate(losses=losses).value == pytest.approx(plain, rel=1e-6)


def test_empirical_inconsistency_takes_numpy_scalars_generators_and_integer_vectors():
    plain = _estimate(n_probes=4, n_steps=2, seed=3, max_radius=10.0)
    same = _estimate(
        losses=(f for f in quadratics(GOOD)),
        theta_star=[0, 0],
        n_probes=np.int64(4),
        n_steps=np.int32(2),
        seed=np.uint8(3),
        max_radius=np.float32(10.0),
    )
    assert same.value == plain.value and same.n_probes == 4 and type(same.n_probes) is int


def test_max_radius_caps_the_walk_along_a_direction_flat_in_a():
    hs = [np.diag([0.0, 1.0]), np.diag([1.0, 1.0])]
    est = C.empirical_inconsistency(quadratics(hs), np.zeros(2), n_probes=8, max_radius=2.0)
    assert 0 < est.value <= 0.5 * 2.0**2 + 1e-9  # B's rise at distance 2
    assert float(np.linalg.norm(est.point)) <= 2.0 + 1e-12


# --------------------------------------------------------------------------- class 5: inconsistency numerics


@given(ill_conditioned_spd(), st.floats(-3.0, 3.0), st.booleans())
def test_inconsistency_of_h_and_c_h_is_c_for_condition_up_to_1e12(h_cond, log10_c, swap):
    h, cond = h_cond
    c = 10.0**log10_c
    pair = np.stack([c * h, h] if swap else [h, c * h])
    expected = max(c, 1 / c)
    # c·h rounds every entry: that alone moves the answer by up to ~ULP·cond
    assert C.inconsistency(pair) == pytest.approx(expected, rel=rounding_level(len(h), cond))


@given(ill_conditioned_spd(), st.integers(-20, 20))
def test_an_exact_power_of_two_multiple_gives_the_ratio_to_a_few_ulps(h_cond, k):
    h, _ = h_cond
    c = 2.0**k
    assert C.inconsistency(np.stack([h, c * h])) == pytest.approx(max(c, 1 / c), rel=64 * ULP)
    assert C.pair_inconsistency(h, c * h) == pytest.approx(c, rel=64 * ULP)


@given(spectra(), st.floats(-3.0, 3.0))
def test_diagonal_hessians_of_condition_up_to_1e12_give_the_exact_ratio(w_cond, log10_c):
    w, _ = w_cond
    c = 10.0**log10_c
    expected = max(c, 1 / c)
    assert C.inconsistency(np.stack([w, c * w])) == pytest.approx(expected, rel=8 * ULP)
    assert C.inconsistency(np.stack([np.diag(w), np.diag(c * w)])) == pytest.approx(expected, rel=64 * ULP)


def test_the_ill_conditioned_pair_from_the_issue_is_a_ratio_not_inf():
    a, b = np.array([1.0, 1e-12]), np.array([2.0, 2e-12])
    for x, y in [(a, b), (np.diag(a), np.diag(b))]:
        assert C.pair_inconsistency(x, y) == pytest.approx(2.0, rel=1e-12)
        assert C.pair_inconsistency(y, x) == pytest.approx(0.5, rel=1e-12)
        assert C.inconsistency(np.stack([x, y])) == pytest.approx(2.0, rel=1e-12)
    # a real disagreement in the small direction is measured, not called infinite
    assert C.inconsistency(np.array([[1.0, 1e-12], [2.0, 3e-12]])) == pytest.approx(3.0, rel=1e-12)
    assert C.inconsistency(np.stack([np.diag([1.0, 1e-12]), np.diag([1.0, 1.0])])) == pytest.approx(1e12)


@given(
    st.integers(2, 5),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1.0, 1e-200, 1e200]),
    st.floats(1e-3, 1e3),
)
def test_a_direction_exactly_flat_in_a_but_curved_in_b_is_infinite(p, seed, scale, curvature_b):
    rank = p - 1
    q = rotation(seed, p)
    w_a = np.concatenate([np.zeros(p - rank), np.logspace(0, -3, rank)])
    ha = from_spectrum(q, w_a) * scale
    hb = np.eye(p) * curvature_b
    assert C.pair_inconsistency(ha, hb) == math.inf
    assert C.inconsistency(np.stack([ha, hb])) == math.inf
    assert C.pair_inconsistency(hb, ha) == pytest.approx(scale / curvature_b, rel=1e-6)
    # flat in both along the same direction: ignored, the curved part decides
    assert C.inconsistency(np.stack([ha, 2 * ha])) == pytest.approx(2.0, rel=1e-9)


@pytest.mark.parametrize("diagonal", [True, False])
def test_flat_entries_of_unsorted_diagonals_are_matched_per_parameter(diagonal):
    def arr(x):
        x = np.array(x, dtype=float)
        return x if diagonal else np.diag(x)

    assert C.pair_inconsistency(arr([3.0, 0.0, 1.0]), arr([3.0, 0.0, 2.0])) == pytest.approx(2.0)
    assert C.pair_inconsistency(arr([3.0, 0.0, 1.0]), arr([3.0, 1e-9, 2.0])) == math.inf
    assert C.pair_inconsistency(arr([0.0, 0.0]), arr([0.0, 0.0])) == 0.0
    assert C.pair_inconsistency(arr([1.0, 1.0]), arr([0.0, 0.0])) == 0.0


@given(
    ill_conditioned_spd(max_log10_cond=8),
    ill_conditioned_spd(max_log10_cond=8),
    st.sampled_from([-996, -500, -60, 60, 500, 996]),
    st.sampled_from([1e-300, 1e-150, 1e-20, 1e20, 1e150, 1e300]),
)
def test_inconsistency_is_scale_invariant_from_1e_minus_300_to_1e300(a_cond, b_cond, k, scale):
    (a, cond_a), (b, cond_b) = a_cond, b_cond
    if len(a) != len(b):
        b, cond_b = np.eye(len(a)), 1.0
    h = np.stack([a, b])
    d = np.stack([np.diagonal(a), np.diagonal(b)])
    # a power of two scales exactly (barring subnormal entries): the same answer to the last bit
    nonzero = np.abs(h[h != 0])
    assume(nonzero.size == 0 or 2.0**k * nonzero.min() >= np.finfo(np.float64).tiny)
    assert C.inconsistency(2.0**k * h) == C.inconsistency(h)
    assert C.inconsistency(2.0**k * d) == C.inconsistency(d)
    # any other factor rounds each entry once: the answer moves by up to ~ULP·cond
    rel = rounding_level(len(a), max(cond_a, cond_b))
    assert C.inconsistency(scale * h) == pytest.approx(C.inconsistency(h), rel=rel)
    assert C.inconsistency(scale * d) == pytest.approx(C.inconsistency(d), rel=1e-13)


def test_environments_at_wildly_different_scales_do_not_overflow_into_nan():
    h = np.stack([np.eye(2) * 1e-300, np.eye(2) * 1e300])
    assert C.pair_inconsistency(h[0], h[1]) == math.inf  # 1e600 is past float64
    assert C.pair_inconsistency(h[1], h[0]) == 0.0  # 1e-600 underflows
    # flat in A, curved in B stays inf even when B's scale underflows against A's
    assert C.pair_inconsistency(1e300 * np.diag([0.0, 1.0]), 1e-300 * np.eye(2)) == math.inf
    assert C.pair_inconsistency(1e300 * np.array([0.0, 1.0]), 1e-300 * np.ones(2)) == math.inf
    assert C.arithmetic_mean(np.stack([np.eye(2) * 1.5e308] * 2))[0, 0] == 1.5e308
    np.testing.assert_allclose(C.karcher_mean(h), np.eye(2), rtol=1e-14)
    np.testing.assert_allclose(
        C.karcher_mean(np.stack([h[0], h[1], np.diag([1.0, 8.0])])), np.diag([1.0, 2.0])
    )


# --------------------------------------------------------------------------- class 5: Karcher mean numerics


@given(
    st.integers(1, 5),
    st.integers(1, 6),
    st.floats(0.0, 12.0),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1e-250, 1.0, 1e250]),
)
def test_karcher_mean_of_diagonal_matrices_is_the_elementwise_geometric_mean(e, p, log10_cond, seed, scale):
    rng = np.random.default_rng(seed)
    unit = 10.0 ** (-log10_cond * rng.uniform(0, 1, (e, p)))
    d = scale * unit
    expected = np.exp(np.log(unit).mean(axis=0)) * scale
    np.testing.assert_allclose(C.karcher_mean(d), expected, rtol=1e-13)
    full = C.karcher_mean(np.stack([np.diag(x) for x in d]))
    # three or more full matrices iterate until the gradient is <= tol (1e-12): that far, no further
    np.testing.assert_allclose(np.diagonal(full), expected, rtol=1e-13 if e < 3 else 4e-12)
    assert np.max(np.abs(full - np.diag(np.diagonal(full)))) <= 1e-14 * expected.max()


@given(st.integers(2, 4), spectra(max_p=5, max_log10_cond=10.0), st.integers(0, 2**32 - 1))
def test_karcher_mean_of_commuting_matrices_is_the_geometric_mean_of_eigenvalues(e, w_cond, seed):
    w, cond = w_cond  # each matrix below has condition up to 100·cond <= 1e12
    rng = np.random.default_rng(seed)
    q = rotation(seed, len(w))
    spectra_ = [w * 10.0 ** rng.uniform(-1, 1, len(w)) for _ in range(e)]
    expected = from_spectrum(q, np.exp(np.mean(np.log(spectra_), axis=0)))
    got = C.karcher_mean(np.stack([from_spectrum(q, x) for x in spectra_]))
    assert whitened_error(got, expected) <= rounding_level(len(w), 100 * cond)


@given(ill_conditioned_spd(), st.integers(2, 4))
def test_karcher_mean_of_copies_of_a_is_a(h_cond, copies):
    h, _ = h_cond
    np.testing.assert_array_equal(C.karcher_mean(np.stack([h] * copies)), h)


@given(ill_conditioned_spd(), st.integers(-8, 8))
def test_karcher_mean_of_a_and_4_to_the_k_a_is_2_to_the_k_a(h_cond, k):
    h, _ = h_cond
    got = C.karcher_mean(np.stack([h, 4.0**k * h]))
    np.testing.assert_allclose(got, 2.0**k * h, rtol=0, atol=64 * ULP * 2.0**k * np.abs(h).max())


@st.composite
def spd_stacks(draw, min_e=2, max_e=5, max_p=5, max_log10_cond=12.0):
    e = draw(st.integers(min_e, max_e))
    p = draw(st.integers(1, max_p))
    out, conds = [], []
    for _ in range(e):
        w, cond = draw(spectra(min_p=p, max_p=p, max_log10_cond=max_log10_cond))
        out.append(from_spectrum(rotation(draw(st.integers(0, 2**32 - 1)), p), w))
        conds.append(cond)
    return np.stack(out), max(conds)


@given(spd_stacks(), st.randoms(use_true_random=False))
def test_karcher_mean_is_symmetric_spd_and_permutation_invariant(h_cond, random):
    h, cond = h_cond
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN, overflow or non-convergence warnings
        x = C.karcher_mean(h)
        order = list(range(len(h)))
        random.shuffle(order)
        y = C.karcher_mean(h[order])
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, x.T)
    np.linalg.cholesky(x)  # SPD
    # the mean moves at most as far as its data (it is non-expansive), and the data are known
    # to ~ULP·cond; the iterations' rounding adds a small factor
    assert whitened_error(y, x) <= 8 * rounding_level(h.shape[1], cond)


@given(spd_stacks(min_e=2, max_e=2, max_log10_cond=6.0))
def test_karcher_mean_of_two_matrices_is_the_closed_form(h_cond):
    (a, b), cond = h_cond
    w, u = np.linalg.eigh(a)
    a_half, a_mhalf = (u * np.sqrt(w)) @ u.T, (u / np.sqrt(w)) @ u.T
    w2, u2 = np.linalg.eigh(a_mhalf @ b @ a_mhalf)
    expected = a_half @ ((u2 * np.sqrt(np.maximum(w2, 0))) @ u2.T) @ a_half  # A^½ (A^-½ B A^-½)^½ A^½
    got = C.karcher_mean(np.stack([a, b]))
    # the reference formula itself loses ~ULP·cond² (it inverts A^½); A # B = B # A exactly
    assert whitened_error(got, 0.5 * (expected + expected.T)) <= rounding_level(len(a), cond**2)
    np.testing.assert_array_equal(C.karcher_mean(np.stack([b, a])), got)


@given(spd_stacks(min_e=3, max_e=5, max_p=4, max_log10_cond=4.0))
def test_karcher_mean_solves_its_defining_equation(h_cond):
    h, _ = h_cond
    x = C.karcher_mean(h)
    w, u = np.linalg.eigh(x)
    r = (u / np.sqrt(w)) @ u.T
    residual = np.zeros_like(x)
    for m in h:
        lam, v = np.linalg.eigh(r @ m @ r)
        residual += (v * np.log(lam)) @ v.T
    assert np.linalg.norm(residual / len(h)) <= 1e-8


@given(spd_stacks(min_e=3, max_e=4, max_p=4, max_log10_cond=3.0), st.integers(0, 2**32 - 1))
def test_karcher_mean_commutes_with_congruence(h_cond, seed):
    h, _ = h_cond
    p = h.shape[1]
    s = rotation(seed, p) * np.random.default_rng(seed).uniform(0.5, 2.0, p)
    moved = np.stack([s @ m @ s.T for m in h])
    expected = s @ C.karcher_mean(h) @ s.T
    assert whitened_error(C.karcher_mean(moved), 0.5 * (expected + expected.T)) <= 1e-8


def test_far_apart_ill_conditioned_matrices_give_a_finite_spd_mean():
    # the old fixed-point iteration returned NaN or raised LinAlgError on every one of these
    for seed in range(10):
        h = np.stack(
            [from_spectrum(rotation(100 * seed + e, 4), np.array([1.0, 1e-4, 1e-8, 1e-12])) for e in range(3)]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = C.karcher_mean(h)
        np.linalg.cholesky(x)
        det = np.sum(np.log(np.linalg.eigvalsh(x)))
        assert det == pytest.approx(np.mean([np.sum(np.log(np.linalg.eigvalsh(m))) for m in h]), abs=1e-3)


# --------------------------------------------------------------------------- class 5: Proposition 3 numerics


@given(spectra(max_p=5), spectra(max_p=5), st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3))
def test_proposition3_bound_holds_for_commuting_hessians_of_condition_up_to_1e12(wa, wb, seed, eps):
    (a, cond_a), (b, cond_b) = wa, wb
    p = min(len(a), len(b))
    a, b = a[:p], b[:p]
    q = rotation(seed, p)
    diag_bound = C.proposition3_bound(a, b, epsilon=eps)
    full_bound = C.proposition3_bound(from_spectrum(q, a), from_spectrum(q, b), epsilon=eps)
    assert C.inconsistency(np.stack([a, b]), epsilon=eps) <= diag_bound * (1 + 1e-9)
    # the rotated matrices hold their small eigenvalues to ~ULP·cond: so does the bound
    assert full_bound == pytest.approx(diag_bound, rel=4 * p * rounding_level(p, max(cond_a, cond_b)))


@pytest.mark.parametrize("scale", [1e-300, 1e-100, 1e100, 1e300])
def test_proposition3_bound_is_scale_invariant_and_overflows_to_inf(scale):
    a, b = np.array([0.05, 1.0]), np.array([1.0, 0.05])
    assert C.proposition3_bound(scale * a, scale * b) == pytest.approx(C.proposition3_bound(a, b), rel=1e-12)
    wide_a = np.tile([1.0, 1e-12], 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.proposition3_bound(scale * wide_a, scale * wide_a[::-1]) == math.inf


@pytest.mark.parametrize("scale", [1e-200, 1e-12, 1.0, 1e200])
def test_proposition3_bound_refuses_non_commuting_hessians_at_every_scale(scale):
    a = np.array([[2.0, 1.0], [1.0, 2.0]]) * scale
    with pytest.raises(ValueError, match="co-diagonalisable"):
        C.proposition3_bound(a, np.diag([1.0, 3.0]) * scale)
    assert C.proposition3_bound(a, a * 3.0) == pytest.approx(C.proposition3_bound(a / scale, a / scale * 3.0))
