"""IRMv1 and V-REx in the one training loop: every backend's gradient is the closed-form numpy one.

The model is linear (``MLPSpec(hidden_layers=0)``: logits ``z = x W + b``), the loss binary
cross-entropy, so the penalised objective and its gradient have a closed form. Adam is swapped
for plain SGD with learning rate 1 and the loop takes one step over each environment's whole
batch: the parameters move by exactly minus the gradient of the objective.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradand
from gradand.experiments.training import MLPSpec, Penalty, get_backend, train_classifier

E, N, D = 3, 6, 4
SPEC = MLPSpec(in_features=D, out_features=1, hidden_units=1, hidden_layers=0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference_gradient(w, b, x, y, penalty, step=0):
    """d/d(W, b) of scale · (mean_e L_e + weight · P) in float64, written out by hand."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    z = (x @ w)[..., 0] + b  # (E, n)
    p = _sigmoid(z)
    n, envs = z.shape[1], z.shape[0]
    losses = np.mean(np.logaddexp(0.0, z) - y * z, axis=1)  # bce with logits, per environment
    dl_dz = (p - y) / n  # dL_e/dz_i
    dj_dz = dl_dz / envs
    if penalty is not None:
        weight, scale = penalty.factors(step)
        if penalty.kind == "irm":
            g = np.sum((p - y) * z, axis=1) / n  # dL_e(s z)/ds at s = 1
            dg_dz = (p * (1 - p) * z + (p - y)) / n
            dp_dz = 2.0 / envs * g[:, None] * dg_dz
        else:
            dp_dz = 2.0 / envs * (losses - losses.mean())[:, None] * dl_dz
        dj_dz = scale * (dj_dz + weight * dp_dz)
    return np.einsum("enk,en->k", x, dj_dz)[:, None], np.array([dj_dz.sum()])


def _data(seed=0, identical=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((E, N, D)).astype(np.float32)
    y = (rng.random((E, N)) > 0.5).astype(np.float32)
    if identical:
        x, y = np.repeat(x[:1], E, axis=0), np.repeat(y[:1], E, axis=0)
    return x, y


def _weights(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((D, 1)).astype(np.float32), np.array([0.3], np.float32)


def _sgd_instead_of_adam(monkeypatch, backend):
    """Each backend's Adam replaced by SGD with the same learning rate (weight decay still applied)."""
    if backend == "torch":
        import torch

        def sgd(params, lr, betas, weight_decay):
            return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

        monkeypatch.setattr(torch.optim, "Adam", sgd)
    elif backend == "jax":
        import optax

        monkeypatch.setattr(optax, "adam", lambda lr, b1, b2, eps: optax.sgd(lr))
    else:
        import keras

        def sgd_keras(lr, beta_1, beta_2, epsilon):
            return keras.optimizers.SGD(lr)

        monkeypatch.setattr(keras.optimizers, "Adam", sgd_keras)


def _model(backend, w, b):
    if backend == "torch":
        import torch

        model = get_backend("torch").build(SPEC, seed=0)
        with torch.no_grad():
            model[0].weight.copy_(torch.as_tensor(w.T))
            model[0].bias.copy_(torch.as_tensor(b))
        return model
    if backend == "jax":
        from gradand.experiments.jax_training import MLP

        return MLP(SPEC, {"w0": w, "b0": b}, {})
    model = get_backend("tensorflow").build(SPEC, seed=0)
    model.layers[0].set_weights([w, b])
    return model


def _read(backend, model):
    if backend == "torch":
        return model[0].weight.detach().numpy().T, model[0].bias.detach().numpy()
    if backend == "jax":
        return np.asarray(model.params["w0"]), np.asarray(model.params["b0"])
    kernel, bias = model.layers[0].get_weights()
    return kernel, bias


def backend_gradient(monkeypatch, backend, x, y, penalty, steps=1):
    """The gradient of the objective the backend's trainer hands its optimizer (SGD, lr 1, one step)."""
    pytest.importorskip({"torch": "torch", "jax": "optax", "tensorflow": "tensorflow"}[backend])
    _sgd_instead_of_adam(monkeypatch, backend)
    w, b = _weights()
    out = train_classifier(
        _model(backend, w, b), backend=backend, train_x=x, train_y=y, eval_sets={}, combiner=gradand.Mean(),
        loss="bce", epochs=steps, batch_size=N, lr=1.0, penalty=penalty, show_progress=False,
    )  # fmt: skip
    w1, b1 = _read(backend, out["model"])
    return w - w1, b - b1


BACKENDS = ["torch", "jax", "tensorflow"]
PENALTIES = [
    Penalty("irm", 0.7),  # weight below 1: no rescaling
    Penalty("irm", 50.0),  # weight 50, objective divided by 50
    Penalty("vrex", 0.7),
    Penalty("vrex", 50.0),
    Penalty("irm", 50.0, anneal_steps=1),  # the first step is annealed: weight 1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_each_backend_hands_the_optimizer_the_closed_form_gradient_of_the_penalised_objective(
    monkeypatch, backend, penalty
):
    x, y = _data()
    got_w, got_b = backend_gradient(monkeypatch, backend, x, y, penalty)
    want_w, want_b = reference_gradient(*_weights(), x, y, penalty)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=2e-6)
    plain_w, _ = reference_gradient(*_weights(), x, y, None)
    assert not np.allclose(want_w, plain_w, rtol=1e-3), "the penalty changes the gradient on these data"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trainer_counts_steps_weight_1_while_annealing_then_lambda_with_the_objective_divided_by_it(
    monkeypatch, backend
):
    x, y = _data(seed=2)
    penalty = Penalty("vrex", 20.0, anneal_steps=1)
    got_w, got_b = backend_gradient(monkeypatch, backend, x, y, penalty, steps=2)  # w0 - w2
    w, b = _weights()
    for step in range(2):  # SGD with learning rate 1, step 0 annealed, step 1 at λ = 20, divided by 20
        gw, gb = reference_gradient(w, b, x, y, penalty, step=step)
        w, b = w - gw, b - gb
    w0, b0 = _weights()
    np.testing.assert_allclose(got_w, w0 - w, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(got_b, b0 - b, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vrex_is_zero_when_all_environments_are_identical_so_the_step_is_averaging(monkeypatch, backend):
    x, y = _data(identical=True)
    got_w, got_b = backend_gradient(monkeypatch, backend, x, y, Penalty("vrex", 0.9))
    want_w, want_b = reference_gradient(*_weights(), x, y, None)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_irmv1_of_identical_environments_is_that_of_one_environment_not_zero(monkeypatch, backend):
    # IRMv1 asks whether scaling the logits would lower each environment's loss; identical
    # environments give E copies of one environment's penalty: the same as E = 1, and not 0.
    x, y = _data(identical=True)
    penalty = Penalty("irm", 0.9)
    got_w, _ = backend_gradient(monkeypatch, backend, x, y, penalty)
    one_w, _ = reference_gradient(*_weights(), x[:1], y[:1], penalty)
    plain_w, _ = reference_gradient(*_weights(), x, y, None)
    np.testing.assert_allclose(got_w, one_w, rtol=1e-4, atol=2e-6)
    assert not np.allclose(got_w, plain_w, rtol=1e-3)


@pytest.mark.parametrize("kind", ["irm", "vrex"])
def test_both_penalties_are_zero_at_zero_logits_and_for_identical_environments_respectively(kind):
    # IRMv1's term d L_e(s z)/ds = mean((σ(z) - y) z) vanishes at z = 0; V-REx's for equal losses.
    x, y = _data(identical=kind == "vrex")
    w, b = np.zeros((D, 1)), np.zeros(1)
    if kind == "vrex":
        w, b = _weights()
    np.testing.assert_allclose(
        reference_gradient(w, b, x, y, Penalty(kind, 0.9))[0], reference_gradient(w, b, x, y, None)[0]
    )


def test_a_penalty_needs_mean_and_names_what_is_wrong():
    backend = get_backend("torch")
    pytest.importorskip("torch")
    model = backend.build(SPEC, seed=0)
    with pytest.raises(ValueError, match=r"combiner must be Mean\(\); got AndMask"):
        backend.trainer(model, combiner=gradand.AndMask(1.0), loss="bce", penalty=Penalty("irm", 1.0))
    with pytest.raises(ValueError, match="penalty kind must be 'irm' or 'vrex'; got 'fish'"):
        backend.trainer(model, combiner=gradand.Mean(), loss="bce", penalty=Penalty("fish", 1.0))
    with pytest.raises(ValueError, match=r"penalty weight must be a finite number >= 0; got nan"):
        backend.trainer(model, combiner=gradand.Mean(), loss="bce", penalty=Penalty("vrex", float("nan")))
    with pytest.raises(ValueError, match=r"anneal_steps must be an integer >= 0; got 1\.5"):
        backend.trainer(model, combiner=gradand.Mean(), loss="bce", penalty=Penalty("vrex", 1.0, 1.5))
    with pytest.raises(ValueError, match="penalty must be a Penalty or None; got"):
        backend.trainer(model, combiner=gradand.Mean(), loss="bce", penalty=("irm", 1.0))
