"""Every PyTorch entry point, on every scenario, against the numpy core."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

from ._asserts import assert_raises_on_nan, assert_result_is_consistent, assert_updates_match  # noqa: E402
from ._scenarios import COMBINERS, IN, OUT, Scenario, scenarios  # noqa: E402

SCENARIOS = scenarios()
IDS = [s.name for s in SCENARIOS]


def _model(data) -> torch.nn.Linear:
    torch.manual_seed(0)
    m = torch.nn.Linear(IN, OUT).double()
    with torch.no_grad():
        m.weight.copy_(torch.as_tensor(data.weight))
        m.bias.copy_(torch.as_tensor(data.bias))
    return m


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.mean((outputs - targets) ** 2)


def _grads(m: torch.nn.Linear) -> dict:
    return {"weight": m.weight.grad, "bias": m.bias.grad}


def _run_losses_form(s: Scenario):
    data = s.data()
    m = _model(data)
    losses = [_mse(m(torch.as_tensor(x)), torch.as_tensor(y)) for x, y in zip(data.xs, data.ys)]
    result = gt.backward(losses, m.parameters(), COMBINERS[s.combiner], nan_policy=s.nan_policy)
    return m, result


def _run_model_form(s: Scenario, method: str, **kw):
    data = s.data()
    m = _model(data)
    flat_ids = kw.pop("ids", False)
    if s.equal and not flat_ids:
        x, y = data.stacked()
        extra = {}
    else:
        x, y, ids = data.flat()
        extra = {"env_ids": torch.as_tensor(ids), "num_envs": s.envs}
    result = gt.model_backward(
        m,
        _mse,
        torch.as_tensor(x),
        torch.as_tensor(y),
        COMBINERS[s.combiner],
        method=method,
        nan_policy=s.nan_policy,
        **extra,
        **kw,
    )
    return m, result


ENTRY_POINTS = {
    "backward": _run_losses_form,
    "model_backward-streaming": lambda s: _run_model_form(s, "streaming"),
    "model_backward-vectorized": lambda s: _run_model_form(s, "vectorized"),
    "model_backward-vectorized-chunked": lambda s: _run_model_form(s, "vectorized", chunk_size=2),
    "model_backward-factored": lambda s: _run_model_form(s, "factored"),
    "model_backward-factored-chunked": lambda s: _run_model_form(s, "factored", chunk_size=2),
    "model_backward-factored-env_ids": lambda s: _run_model_form(s, "factored", ids=True),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_every_entry_point_matches_the_numpy_core(entry, scenario):
    run = ENTRY_POINTS[entry]
    if scenario.nan_policy == "raise" and scenario.poison is not None:
        assert_raises_on_nan(lambda: run(scenario))
        return
    m, result = run(scenario)
    assert_updates_match(scenario, _grads(m))
    assert_result_is_consistent(scenario, result, list(result.infos))


def test_half_precision_gradients_are_combined_in_float32_and_come_back_in_their_dtype():
    s = Scenario("grouped-bf16", (6, 6, 6, 6), combiner="and0.5-norescale")
    data = s.data()
    m = _model(data).to(torch.bfloat16)
    x, y = data.stacked()
    gt.model_backward(
        m,
        _mse,
        torch.as_tensor(x, dtype=torch.bfloat16),
        torch.as_tensor(y, dtype=torch.bfloat16),
        COMBINERS[s.combiner],
        method="vectorized",
    )
    assert m.weight.grad.dtype == torch.bfloat16
    assert_updates_match(s, _grads(m), rtol=0.1)


def test_the_distributed_option_with_one_rank_equals_one_process(tmp_path):
    import torch.distributed as dist

    s = Scenario("grouped-and1", (6, 6, 6, 6))
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        data = s.data()
        m = _model(data)
        x, y = data.stacked()
        gt.model_backward(
            m,
            _mse,
            torch.as_tensor(x),
            torch.as_tensor(y),
            COMBINERS[s.combiner],
            method="factored",
            all_reduce=True,
        )
        assert_updates_match(s, _grads(m))
    finally:
        dist.destroy_process_group()


def test_the_result_is_the_one_core_type():
    _, result = _run_losses_form(SCENARIOS[0])
    assert type(result) is gradand.Result


def test_factored_path_with_only_the_forward_under_autocast_matches_vectorized():
    s = Scenario("grouped-and1", (6, 6, 6, 6))
    data = s.data()
    x, y = data.stacked()

    class Autocast(torch.nn.Module):  # what accelerate.prepare(mixed_precision="bf16") does
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(inputs).float()

    grads = {}
    for method in ("vectorized", "factored"):
        m = _model(data).float()
        gt.model_backward(
            Autocast(m),
            _mse,
            torch.as_tensor(x).float(),
            torch.as_tensor(y).float(),
            COMBINERS[s.combiner],
            method=method,
        )
        grads[method] = m.weight.grad
    torch.testing.assert_close(grads["factored"], grads["vectorized"], rtol=2e-2, atol=2e-2)


def test_a_fresh_grad_scaler_can_step_after_model_backward():
    s = Scenario("grouped-and1", (6, 6, 6, 6))
    data = s.data()
    m = _model(data).float()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data.stacked()
    result = gt.model_backward(
        m,
        _mse,
        torch.as_tensor(x).float(),
        torch.as_tensor(y).float(),
        COMBINERS[s.combiner],
        loss_scale=scaler,
    )
    scaler.step(opt)  # needs the scale gradand read: initialised by model_backward
    scaler.update()
    np.testing.assert_allclose(result.losses.numpy(), data.losses(), rtol=1e-4)  # reported unscaled


def test_backward_reports_unscaled_losses_under_a_loss_scale():
    s = Scenario("grouped-and1", (6, 6, 6, 6))
    data = s.data()
    m = _model(data)
    losses = [_mse(m(torch.as_tensor(x)), torch.as_tensor(y)) for x, y in zip(data.xs, data.ys)]
    result = gt.backward(
        [loss * 1024.0 for loss in losses], m.parameters(), COMBINERS[s.combiner], loss_scale=1024.0
    )
    np.testing.assert_allclose(result.losses.numpy(), data.losses(), rtol=1e-10)
    # .grad holds the update scaled back (what scaler.step unscales), like loss.backward() would
    assert_updates_match(s, {k: v / 1024.0 for k, v in _grads(m).items()})


def test_an_empty_environment_is_refused_instead_of_silently_casting_no_vote():
    s = Scenario("grouped-and1", (6, 6, 6, 6))
    data = s.data()
    m = _model(data)
    losses = [_mse(m(torch.as_tensor(x)), torch.as_tensor(y)) for x, y in zip(data.xs, data.ys)]
    losses.append(_mse(m(torch.zeros(0, IN, dtype=torch.float64)), torch.zeros(0, OUT, dtype=torch.float64)))
    with pytest.raises(ValueError, match="the loss of environment 4 is nan while its gradients are finite"):
        gt.backward(losses, m.parameters(), COMBINERS[s.combiner])
