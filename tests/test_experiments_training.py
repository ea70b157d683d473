"""The experiments' PyTorch loops hand the optimizer exactly what the numpy core computes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.experiments import patchwork  # noqa: E402
from gradand.experiments.torch_training import mlp, train_classifier, train_patchwork  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _captured_first_step_grads(monkeypatch):
    captured = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        if not captured:
            captured.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return captured


def _per_env_grads(model, loss_fn, xs, ys):
    """Oracle: one plain autograd pass per environment, stacked as numpy (E, *shape) per parameter."""
    out = []
    for x, y in zip(xs, ys):
        model.zero_grad()
        loss_fn(model(torch.as_tensor(x)), torch.as_tensor(y)).backward()
        out.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    return [np.stack([env[i] for env in out]) for i in range(len(out[0]))]


def _bce(out, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)


@pytest.mark.parametrize(
    "combiner",
    [
        gradand.Mean(),
        gradand.AndMask(threshold=1.0),
        gradand.AndMask(threshold=0.5, rescale=False),
        gradand.GeometricMean(threshold=0.5),
        gradand.SandMask(threshold=0.5, k=10.0),
    ],
)
def test_the_update_given_to_adam_is_the_numpy_core_combining_per_environment_gradients(
    monkeypatch, combiner
):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 12, 4)).astype(np.float32)
    y = (rng.random((5, 12)) > 0.5).astype(np.float32)
    torch.manual_seed(0)
    model = mlp(4, 1, hidden_units=6, hidden_layers=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    expected = [gradand.combine(g, combiner) for g in _per_env_grads(model, _bce, x, y)]
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    captured = _captured_first_step_grads(monkeypatch)
    # batch_size = all of an environment: every step sees each environment's full mean loss
    train_classifier(
        model, train_x=x, train_y=y, eval_sets={}, combiner=combiner, loss="bce", epochs=1, batch_size=12,
        lr=1e-3, show_progress=False,
    )  # fmt: skip
    assert len(captured[0]) == len(expected)
    for got, want in zip(captured[0], expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)


def test_l1_adds_l1_times_the_sign_of_the_weights_after_combining(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 4)).astype(np.float32)
    y = (rng.random((3, 8)) > 0.5).astype(np.float32)
    torch.manual_seed(1)
    model = mlp(4, 1, hidden_units=5, hidden_layers=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    combiner = gradand.AndMask(threshold=1.0, rescale=False)
    expected = [gradand.combine(g, combiner) for g in _per_env_grads(model, _bce, x, y)]
    signs = [torch.sign(p.detach()).numpy() for p in model.parameters()]
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    captured = _captured_first_step_grads(monkeypatch)
    train_classifier(
        model, train_x=x, train_y=y, eval_sets={}, combiner=combiner, loss="bce", epochs=1, batch_size=8,
        lr=1e-3, l1=0.01, show_progress=False,
    )  # fmt: skip
    for got, want, s in zip(captured[0], expected, signs):
        np.testing.assert_allclose(got.numpy(), want + 0.01 * s, rtol=2e-5, atol=1e-7)


def test_every_example_its_own_environment_combines_per_example_gradients(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.integers(0, 4, 16)
    torch.manual_seed(2)
    model = mlp(3, 4, hidden_units=5, hidden_layers=1, activation="relu")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ce = torch.nn.functional.cross_entropy
    combiner = gradand.AndMask(threshold=0.25)
    expected = [gradand.combine(g, combiner) for g in _per_env_grads(model, ce, x[:, None], y[:, None])]
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    captured = _captured_first_step_grads(monkeypatch)
    out = train_classifier(
        model, train_x=x[:, None], train_y=y[:, None], eval_sets={"train": (x, y)}, combiner=combiner,
        loss="ce", epochs=1, batch_size=1, envs_per_step=16, lr=1e-3, show_progress=False,
    )  # fmt: skip
    for got, want in zip(captured[0], expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)
    assert out["steps"] == 1 and 0.0 <= out["final"]["train"] <= 1.0
    assert 0.0 < out["survivor_fraction"] < 1.0


def test_learning_rate_drops_tenfold_at_three_quarters_of_the_epochs(monkeypatch):
    lrs = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    x = np.zeros((2, 4, 3), np.float32)
    train_classifier(
        mlp(3, 1, hidden_units=4, hidden_layers=1), train_x=x, train_y=np.zeros((2, 4), np.float32),
        eval_sets={}, combiner=gradand.Mean(), loss="bce", epochs=8, batch_size=4, lr=1e-2, lr_milestone=0.75,
        show_progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(lrs, [1e-2] * 6 + [1e-3] * 2)


@pytest.mark.parametrize(
    "combiner",
    [gradand.Mean(), gradand.AndMask(1.0, rescale=False), gradand.GeometricMean(1.0, rescale=False)],
)
@pytest.mark.parametrize("envs", [(0, 1, 2, 3), (0, 1)])
def test_patchwork_through_the_torch_backend_equals_the_numpy_run(combiner, envs):
    a = patchwork.train(combiner, environments=envs, steps=200)
    b = train_patchwork(combiner, environments=envs, steps=200)
    np.testing.assert_allclose(b.trajectory, a.trajectory, rtol=1e-9, atol=1e-12)


def test_reference_mlp_uses_kaiming_weights_and_small_biases_with_optional_batch_norm_and_dropout():
    torch.manual_seed(0)
    net = mlp(10, 1, hidden_units=256, hidden_layers=3, dropout=0.5, batch_norm=True)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Dropout"] * 3 + ["Linear"]
    first = net[0]
    assert torch.all(first.bias == 0.01)
    assert abs(float(first.weight.detach().std()) - (2.0 / 10) ** 0.5) < 0.05  # Kaiming normal, fan_in 10


def test_bad_batch_settings_are_rejected_with_the_numbers():
    x = np.zeros((2, 4, 3), np.float32)
    y = np.zeros((2, 4), np.float32)
    net = mlp(3, 1, hidden_units=4, hidden_layers=1)
    kw = dict(eval_sets={}, combiner=gradand.Mean(), epochs=1, lr=1e-2, show_progress=False)
    with pytest.raises(ValueError, match="batch_size=5 is larger than the 4 examples"):
        train_classifier(net, train_x=x, train_y=y, loss="bce", batch_size=5, **kw)
    with pytest.raises(ValueError, match=r"envs_per_step must be in \[1, 2\]"):
        train_classifier(net, train_x=x, train_y=y, loss="bce", batch_size=4, envs_per_step=3, **kw)
    with pytest.raises(ValueError, match="loss must be"):
        train_classifier(net, train_x=x, train_y=y, loss="mse", batch_size=4, **kw)
