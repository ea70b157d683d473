"""Keras models' per-environment flat losses and Hessians feed gradand.consistency (paper §2)."""

from __future__ import annotations

import numpy as np
import pytest

import gradand

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
gtf = pytest.importorskip("gradand.backends.tensorflow")


def _linear(dtype="float64"):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((3,), dtype=dtype), keras.layers.Dense(1, use_bias=False, dtype=dtype)]
    )


def _mse():
    return keras.losses.MeanSquaredError(dtype="float64")  # Keras losses compute in float32 by default


def test_hessians_of_a_linear_least_squares_model_are_two_x_transpose_x_over_n():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 3))
    y = rng.standard_normal((3, 5, 1))
    h = gtf.environment_hessians(_linear(), _mse(), x, y)
    assert h.shape == (3, 3, 3) and h.dtype == np.float64
    for e in range(3):
        np.testing.assert_allclose(h[e], 2.0 * x[e].T @ x[e] / 5, rtol=1e-10)


def test_flat_losses_match_the_model_and_leave_it_unchanged():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 1))
    model = _linear()
    before = model.get_weights()
    losses, theta = gtf.environment_losses(model, _mse(), x, y)
    np.testing.assert_allclose(theta, before[0].ravel())
    for e in range(2):
        direct = float(_mse()(y[e], model(x[e])))
        assert losses[e](theta) == pytest.approx(direct, rel=1e-12)
    shifted = theta + 1.0
    expected = np.mean((x[0] @ shifted - y[0, :, 0]) ** 2)
    assert losses[0](shifted) == pytest.approx(expected, rel=1e-10)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_a_variable_subset_and_environment_ids_select_what_varies_and_who_counts():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh", dtype="float64"), keras.layers.Dense(1)]
    )
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 1))
    env = np.array([0, 1] * 5)
    last = model.layers[-1].kernel
    h = gtf.environment_hessians(model, _mse(), x, y, variables=[last], env_ids=env)
    by_path = gtf.environment_hessians(model, _mse(), x, y, variables=[last.path], env_ids=env)
    features = model.layers[0](x).numpy()
    for e in range(2):
        f = features[env == e]
        np.testing.assert_allclose(h[e], 2.0 * f.T @ f / len(f), rtol=1e-5)
    np.testing.assert_array_equal(h, by_path)


def test_an_invariant_minimum_is_consistent_and_a_patchwork_one_is_not():
    """Paper §2: environments whose curvatures differ (patchwork) give a large inconsistency."""
    x_same = np.array([[[1.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]]])
    x_diff = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])
    model = _linear()
    y = np.stack([model(x_same[e]).numpy() for e in range(2)])
    consistent = gradand.consistency.inconsistency(
        gtf.environment_hessians(model, _mse(), x_same, y), epsilon=0.1
    )
    y = np.stack([model(x_diff[e]).numpy() for e in range(2)])
    h_diff = gtf.environment_hessians(model, _mse(), x_diff, y)
    inconsistent = gradand.consistency.inconsistency(h_diff, epsilon=0.1)
    assert consistent == pytest.approx(0.1)  # identical curvature: I = epsilon
    assert inconsistent == np.inf  # a direction flat in one environment is curved in the other
    losses, theta = gtf.environment_losses(model, _mse(), x_diff, y)
    est = gradand.consistency.empirical_inconsistency(losses, theta, epsilon=0.1, n_probes=16, seed=0)
    assert est.value > 0.1


def test_bad_input_gets_a_clear_error():
    model = _linear()
    x, y = np.zeros((2, 3, 3)), np.zeros((3, 3, 1))
    with pytest.raises(
        ValueError, match=r"same number of environments on axis 0.*\(2, 3, 3\) and \(3, 3, 1\)"
    ):
        gtf.environment_losses(model, _mse(), x, y)
    with pytest.raises(ValueError, match=r"variables names 'nope', which is not a trainable variable"):
        gtf.environment_hessians(model, _mse(), x, x[..., :1], variables=["nope"])
    with pytest.raises(ValueError, match=r"environments \[1\] have no example"):
        gtf.environment_losses(model, _mse(), x[0], x[0, :, :1], env_ids=np.array([0, 0, 2]))
    losses, theta = gtf.environment_losses(model, _mse(), x, x[..., :1])
    with pytest.raises(ValueError, match=r"theta must have shape \(3,\); got \(2,\)"):
        losses[0](theta[:2])
