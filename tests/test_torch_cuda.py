"""CUDA: the backend on GPU tensors equals the CPU result (skipped without a CUDA device)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
COMBINERS = [
    gradand.AndMask(threshold=0.5),
    gradand.GeometricMean(threshold=0.5),
    gradand.SandMask(0.2, 10.0),
]


def problem(device: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(
        device, dtype
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, 3, generator=g), torch.randint(0, 2, (8, 5), generator=g)
    return model, x.to(device, dtype), y.to(device)


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
@pytest.mark.parametrize("strategy", ["streaming", "vmap"])
def test_cuda_gradients_equal_cpu_gradients(combiner, strategy) -> None:
    results = []
    for device in ("cpu", "cuda"):
        model, x, y = problem(device)
        if strategy == "streaming":
            infos = gt.backward(
                [F.cross_entropy(model(x[e]), y[e]) for e in range(8)], model.parameters(), combiner
            ).infos
        else:
            _, _, infos, *_ = gt.model_backward(
                model, F.cross_entropy, x, y, combiner, chunk_size=3, method="vectorized"
            )
        assert all(p.grad.device.type == device for p in model.parameters())
        assert all(i.survivor_fraction.device.type == device for i in infos)
        results.append([p.grad.cpu() for p in model.parameters()])
    for c, g in zip(*results):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-5)


def test_cuda_temporal_optimizer_equals_cpu() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model, x, y = problem(device)
        opt = gt.TemporalAndMaskAdam(model.parameters(), lr=0.01, threshold=0.5)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x.reshape(-1, 3)), y.reshape(-1)).backward()
            opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for c, g in zip(*results):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-5)


def test_cuda_float16_autocast_with_grad_scaler_steps_and_keeps_the_scale() -> None:
    model, x, y = problem("cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        losses = torch.stack([F.cross_entropy(model(x[e]), y[e]) for e in range(8)])
    gt.backward(scaler.scale(losses), model.parameters(), COMBINERS[2], loss_scale=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**12
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
