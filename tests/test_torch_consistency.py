"""Flat-vector environment losses and Hessians of torch models, for gradand.consistency."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional


def linear_problem(seed: int = 0, n_env: int = 2, n: int = 4, d: int = 2):
    """A linear model at a zero-loss minimum of every environment (y = model(x) exactly)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1).double()
    x = torch.randn(n_env, n, d, dtype=torch.float64)
    y = model(x).detach()
    return model, x, y


def test_hessians_of_mse_are_two_over_n_x_transpose_x_per_environment() -> None:
    model, x, y = linear_problem(n_env=3)
    h = gt.environment_hessians(model, F.mse_loss, x, y, params=["weight"])
    assert h.shape == (3, 2, 2) and h.dtype == np.float64
    for e in range(3):
        xe = x[e].numpy()
        np.testing.assert_allclose(h[e], 2.0 / xe.shape[0] * xe.T @ xe, rtol=1e-12)


def test_hessian_over_weight_and_bias_orders_parameters_as_named() -> None:
    model, x, y = linear_problem(1)
    h = gt.environment_hessians(model, F.mse_loss, x, y, params=["bias", "weight"])
    xe = torch.cat([torch.ones(4, 1, dtype=torch.float64), x[0]], dim=1).numpy()  # bias first
    np.testing.assert_allclose(h[0], 2.0 / 4 * xe.T @ xe, rtol=1e-12)


def test_flat_losses_equal_the_model_loss_and_leave_the_model_unchanged() -> None:
    model, x, y = linear_problem(2)
    losses, theta = gt.environment_losses(model, F.mse_loss, x, y)
    assert theta.shape == (3,)  # weight (1, 2) then bias (1,)
    np.testing.assert_allclose(
        theta, np.r_[model.weight.detach().numpy().ravel(), model.bias.detach().numpy()]
    )
    shifted = theta + np.array([0.5, -0.25, 0.1])
    w = torch.from_numpy(shifted[:2].reshape(1, 2))
    b = torch.from_numpy(shifted[2:])
    for e in range(2):
        expected = F.mse_loss(x[e] @ w.T + b, y[e]).item()
        np.testing.assert_allclose(losses[e](shifted), expected, rtol=1e-12)
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), theta[:2])


def test_empirical_inconsistency_of_a_torch_model_approaches_the_closed_form_from_below() -> None:
    """Quadratic losses with zero loss at θ*: the probe estimate is a lower bound of ε·max λ(H_A⁻¹ H_B)."""
    model, x, y = linear_problem(3, n_env=2, n=3)
    h = gt.environment_hessians(model, F.mse_loss, x, y)
    exact = gradand.consistency.inconsistency(h, epsilon=0.1)
    losses, theta = gt.environment_losses(model, F.mse_loss, x, y)
    est = gradand.consistency.empirical_inconsistency(losses, theta, epsilon=0.1, n_probes=64, n_steps=4)
    assert est.value <= exact * (1 + 1e-6)
    assert est.value >= 0.5 * exact


def test_env_ids_give_the_same_losses_and_hessians_as_the_stacked_axis() -> None:
    model, x, y = linear_problem(4, n_env=3)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(3).repeat_interleave(4)[perm]
    xf, yf = x.reshape(12, 2)[perm], y.reshape(12, 1)[perm]
    np.testing.assert_allclose(
        gt.environment_hessians(model, F.mse_loss, xf, yf, env_ids=ids),
        gt.environment_hessians(model, F.mse_loss, x, y),
        rtol=1e-12,
    )
    a, theta = gt.environment_losses(model, F.mse_loss, xf, yf, env_ids=ids)
    b, _ = gt.environment_losses(model, F.mse_loss, x, y)
    probe = theta + 0.3
    assert [f(probe) for f in a] == pytest.approx([f(probe) for f in b], rel=1e-12)


def test_float32_hessians_are_symmetrised_for_the_core() -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x, y = torch.randn(2, 5, 2), torch.randn(2, 5, 1)
    h = gt.environment_hessians(model, F.mse_loss, x, y, params=["2.weight", "2.bias"])
    assert h.shape == (2, 4, 4)
    np.testing.assert_array_equal(h, np.swapaxes(h, 1, 2))
    gradand.consistency.inconsistency(h + 1e-3 * np.eye(4), epsilon=1.0)  # accepted by the core


def test_unknown_parameter_names_are_refused() -> None:
    model, x, y = linear_problem()
    with pytest.raises(ValueError, match=r"\['weights'\].*\['weight', 'bias'\]"):
        gt.environment_hessians(model, F.mse_loss, x, y, params=["weights"])


def test_a_flat_loss_refuses_a_vector_of_the_wrong_length() -> None:
    model, x, y = linear_problem()
    losses, _ = gt.environment_losses(model, F.mse_loss, x, y)
    with pytest.raises(ValueError, match=r"theta must have shape \(3,\); got \(2,\)"):
        losses[0](np.zeros(2))
