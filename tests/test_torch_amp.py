"""Mixed precision: half-precision gradients, torch.autocast and torch.amp.GradScaler."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
SAND = gradand.SandMask(threshold=0.2, k=10.0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def data(seed: int, n_env: int = 4, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_env, n, 3, generator=g), torch.randint(0, 2, (n_env, n), generator=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_accumulate_in_float32(dtype) -> None:
    """1024 environments of gradient 1 + 2^-3: a half-precision running sum would stall, float32 does not."""
    w = torch.zeros(3, dtype=dtype, requires_grad=True)
    c = torch.full((3,), 1.0 + 2.0**-3, dtype=dtype)
    losses = [(c * w).sum() for _ in range(1024)]
    gt.backward(losses, [w], gradand.Mean())
    assert w.grad.dtype == dtype
    assert torch.equal(w.grad, c)
    stalled = torch.zeros(3, dtype=dtype)
    for _ in range(1024):
        stalled = stalled + c
    assert not torch.equal(stalled / 1024, c)  # what a half-precision accumulator would have given


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["streaming", "vmap"])
def test_half_precision_models_get_updates_in_their_dtype_equal_to_the_core(dtype, strategy) -> None:
    model = mlp(1).to(dtype)
    x, y = data(1)
    x = x.to(dtype)
    params = list(model.parameters())
    per = [torch.autograd.grad(F.cross_entropy(model(x[e]), y[e]), params) for e in range(4)]
    expected = [gradand.combine(torch.stack([g[i] for g in per]), SAND) for i in range(len(params))]
    if strategy == "streaming":
        gt.backward([F.cross_entropy(model(x[e]), y[e]) for e in range(4)], params, SAND)
    else:
        gt.model_backward(model, F.cross_entropy, x, y, SAND, method="vectorized")
    for p, e in zip(params, expected):
        assert p.grad.dtype == e.dtype == dtype
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        np.testing.assert_allclose(p.grad.float().numpy(), e.float().numpy(), rtol=tol, atol=tol)


def test_sand_mask_is_not_scale_equivariant_so_gradients_are_unscaled_before_combining() -> None:
    """combine(S g) = S combine(g) holds for the AND-mask but not for SAND (σ² scales by S²)."""
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    s = 2.0**12
    and_mask = gradand.AndMask(threshold=0.5)
    torch.testing.assert_close(gradand.combine(s * g, and_mask) / s, gradand.combine(g, and_mask))
    assert not torch.allclose(gradand.combine(s * g, SAND) / s, gradand.combine(g, SAND), rtol=1e-3)


def autocast_losses(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return [F.cross_entropy(model(x[e]), y[e]) for e in range(x.shape[0])]


@pytest.mark.parametrize("combiner", [SAND, gradand.AndMask(threshold=0.5)], ids=repr)
def test_autocast_with_grad_scaler_equals_combining_the_unscaled_gradients(combiner) -> None:
    x, y = data(2)
    model, ref = mlp(2), mlp(2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = torch.stack(autocast_losses(model, x, y))
    infos = gt.backward(scaler.scale(losses), model.parameters(), combiner, loss_scale=scaler).infos
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**14  # no inf: the scale is kept
    params = list(ref.parameters())
    per = [torch.autograd.grad(loss, params) for loss in autocast_losses(ref, x, y)]
    for i, p in enumerate(params):
        update, info = gradand.combine(torch.stack([g[i] for g in per]), combiner, return_info=True)
        expected = p.detach() - 0.5 * update
        torch.testing.assert_close(list(model.parameters())[i].detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(infos[i].survivor_fraction, info.survivor_fraction)


def test_vmap_backward_with_autocast_and_grad_scaler_equals_streaming() -> None:
    x, y = data(3)
    a, b = mlp(3), mlp(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gt.backward(scaler.scale(torch.stack(autocast_losses(a, x, y))), a.parameters(), SAND, loss_scale=scaler)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gt.model_backward(b, F.cross_entropy, x, y, SAND, loss_scale=scaler, method="vectorized")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-2)  # bf16 forward, two code paths


def test_non_finite_gradient_under_a_grad_scaler_skips_the_step_and_lowers_the_scale() -> None:
    x, y = data(4)
    model = mlp(4)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = autocast_losses(model, x, y)
    losses[2] = losses[2] + model[2].bias.sum() * float("inf")  # an overflowing environment
    gt.backward([scaler.scale(loss) for loss in losses], model.parameters(), SAND, loss_scale=scaler)
    assert not torch.isfinite(model[2].bias.grad).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**7
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_a_disabled_grad_scaler_changes_nothing() -> None:
    x, y = data(5)
    a, b = mlp(5), mlp(5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gt.backward([F.cross_entropy(a(x[e]), y[e]) for e in range(4)], a.parameters(), SAND, loss_scale=scaler)
    gt.backward([F.cross_entropy(b(x[e]), y[e]) for e in range(4)], b.parameters(), SAND)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_loss_scale_must_be_a_number_or_a_grad_scaler() -> None:
    x, y = data(6)
    model = mlp(6)
    with pytest.raises(TypeError, match=r"loss_scale must be a number or a torch\.amp\.GradScaler"):
        gt.backward([F.cross_entropy(model(x[0]), y[0])], model.parameters(), SAND, loss_scale="2")
