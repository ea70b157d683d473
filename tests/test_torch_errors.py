"""Bad input to the PyTorch backend gets a clear error naming the argument, or a documented result."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
AND = gradand.AndMask(threshold=0.5)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 3, generator=g), torch.randint(0, 2, (3, 5), generator=g)


def env_losses(model, x, y):
    return [F.cross_entropy(model(x[e]), y[e]) for e in range(x.shape[0])]


# --- backward (streaming) ---------------------------------------------------


def test_non_scalar_loss_names_the_environment_and_its_shape(model, batch) -> None:
    x, y = batch
    losses = env_losses(model, x, y)
    losses[1] = F.cross_entropy(model(x[1]), y[1], reduction="none")
    with pytest.raises(ValueError, match=r"losses\[1\] has shape \(5,\).*scalar"):
        gt.backward(losses, model.parameters(), AND)


def test_two_dimensional_loss_tensor_is_refused(model, batch) -> None:
    x, y = batch
    losses = torch.stack(env_losses(model, x, y)).reshape(3, 1).expand(3, 2)
    with pytest.raises(ValueError, match=r"1-D tensor.*shape \(3, 2\)"):
        gt.backward(losses, model.parameters(), AND)


def test_a_single_scalar_loss_tensor_is_refused_with_a_hint(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="wrap it in a list"):
        gt.backward(F.cross_entropy(model(x[0]), y[0]), model.parameters(), AND)


def test_empty_loss_list_is_refused(model) -> None:
    with pytest.raises(ValueError, match="losses is empty"):
        gt.backward([], model.parameters(), AND)


def test_loss_that_does_not_require_grad_is_refused(model, batch) -> None:
    x, y = batch
    losses = env_losses(model, x, y)
    losses[2] = losses[2].detach()
    with pytest.raises(ValueError, match=r"losses\[2\] does not require grad"):
        gt.backward(losses, model.parameters(), AND)


def test_integer_loss_is_refused(model) -> None:
    with pytest.raises(TypeError, match=r"losses\[0\] has dtype torch.int64"):
        gt.backward([torch.tensor(1)], model.parameters(), AND)


def test_parameter_not_requiring_grad_is_named(model, batch) -> None:
    x, y = batch
    model[2].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[3\] \(shape \(2,\)\) does not require grad"):
        gt.backward(env_losses(model, x, y), model.parameters(), AND)


def test_empty_parameter_list_is_refused(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="params is empty"):
        gt.backward(env_losses(model, x, y), [], AND)


def test_duplicate_parameters_are_refused(model, batch) -> None:
    x, y = batch
    p = model[0].weight
    with pytest.raises(ValueError, match=r"params\[1\].*appears twice"):
        gt.backward(env_losses(model, x, y), [p, p], AND)


def test_parameter_groups_are_refused_with_a_hint(model, batch) -> None:
    x, y = batch
    with pytest.raises(TypeError, match="parameter group"):
        gt.backward(env_losses(model, x, y), [{"params": list(model.parameters())}], AND)


def test_a_combiner_is_required(model, batch) -> None:
    x, y = batch
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gt.backward(env_losses(model, x, y), model.parameters(), "and")
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gt.model_backward(model, F.cross_entropy, x, y, None, method="vectorized")


def test_unknown_nan_policy_is_refused(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="nan_policy"):
        gt.backward(env_losses(model, x, y), model.parameters(), AND, nan_policy="ignore")


def test_nan_gradient_raises_naming_environment_and_parameter(model, batch) -> None:
    x, y = batch
    losses = env_losses(model, x, y)
    losses[1] = losses[1] * model[2].bias.sum() * float("nan")
    with pytest.raises(ValueError, match=r"environment 1, params\[0\] \(shape \(4, 3\)\).*NaN"):
        gt.backward(losses, model.parameters(), AND)
    assert all(p.grad is None for p in model.parameters())


def test_nan_policy_zero_drops_the_non_finite_components(model, batch) -> None:
    x, y = batch
    bad = torch.tensor([0.0, float("nan")])
    losses = env_losses(model, x, y)
    losses[0] = losses[0] + (model[2].bias * bad).sum()
    gt.backward(losses, model.parameters(), gradand.Mean(), nan_policy="zero")
    params = list(model.parameters())
    per = [torch.autograd.grad(loss, params[3]) for loss in env_losses(model, x, y)]
    expected = (per[0][0] + per[1][0] + per[2][0]) / 3
    expected[1] = (per[1][0][1] + per[2][0][1]) / 3  # env 0's NaN component adds nothing, still counts
    np.testing.assert_allclose(params[3].grad.numpy(), expected.numpy(), rtol=1e-6)


# --- vmap_backward -----------------------------------------------------------


def test_mismatched_environment_counts_are_refused(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match=r"inputs has 3 environments.*targets has 2"):
        gt.model_backward(model, F.cross_entropy, x, y[:2], AND, method="vectorized")


def test_inputs_without_an_environment_axis_are_refused(model) -> None:
    with pytest.raises(ValueError, match=r"\(E, n, \.\.\.\).*shape \(3,\)"):
        gt.model_backward(
            torch.nn.Linear(3, 1), F.mse_loss, torch.ones(3), torch.ones(3), AND, method="vectorized"
        )


def test_zero_environments_are_refused(model, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="0 environments"):
        gt.model_backward(model, F.cross_entropy, x[:0], y[:0], AND, method="vectorized")


def test_loss_fn_returning_a_vector_is_refused(model, batch) -> None:
    x, y = batch

    def per_example(out, t):
        return F.cross_entropy(out, t, reduction="none")

    with pytest.raises(ValueError, match=r"loss_fn must return one environment's loss as a scalar.*\(5,\)"):
        gt.model_backward(model, per_example, x, y, AND, method="vectorized")


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_bad_chunk_size_is_refused(model, batch, chunk_size) -> None:
    x, y = batch
    with pytest.raises(ValueError, match="chunk_size"):
        gt.model_backward(model, F.cross_entropy, x, y, AND, chunk_size=chunk_size, method="vectorized")


def test_model_must_be_a_module(batch) -> None:
    x, y = batch
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        gt.model_backward(lambda t: t, F.cross_entropy, x, y, AND, method="vectorized")


def test_model_without_trainable_parameters_is_refused(model, batch) -> None:
    x, y = batch
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        gt.model_backward(model, F.cross_entropy, x, y, AND, method="vectorized")


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([0, 1, 1]), r"env_ids has 3 entries but inputs has 4"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "1-D integer tensor"),
        (torch.tensor([[0, 1, 1, 0]]), "1-D integer tensor"),
        (torch.tensor([0, -1, 1, 0]), r"\[0, num_envs=2\).*\[-1, 1\]"),
        (torch.tensor([0, 2, 2, 0]), r"environment\(s\) \[1\].*no example"),
    ],
)
def test_bad_env_ids_are_refused(model, ids, match) -> None:
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=match):
        gt.model_backward(model, F.cross_entropy, x, y, AND, env_ids=ids, method="vectorized")


def test_env_ids_beyond_num_envs_are_refused(model) -> None:
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=r"num_envs=2"):
        gt.model_backward(
            model,
            F.cross_entropy,
            x,
            y,
            AND,
            env_ids=torch.tensor([0, 1, 2, 0]),
            num_envs=2,
            method="vectorized",
        )


def test_nan_in_vmap_gradients_names_the_parameter(model, batch) -> None:
    x, y = batch
    x = x.clone()
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(shape \(4, 3\)\).*NaN"):
        gt.model_backward(model, F.cross_entropy, x, y, AND, method="vectorized")
