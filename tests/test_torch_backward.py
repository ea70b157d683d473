"""The PyTorch backend's two strategies against the numpy core, and against each other.

Inputs are built in torch, per-environment gradients taken one by one with
``torch.autograd.grad``, stacked in numpy, and combined with ``gradand.combine``
on numpy: that is the oracle every path must match.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(threshold=0.0),
    gradand.AndMask(threshold=0.5),
    gradand.AndMask(threshold=1.0, rescale=False),
    gradand.GeometricMean(threshold=0.7),
    gradand.SandMask(threshold=0.3, k=10.0),
]
ENV_COUNTS = [1, 3, 8]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(seed: int, d_in: int = 3, hidden: int = 7, d_out: int = 2, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
    ).to(dtype)


def data(seed: int, n_env: int, n: int = 5, d_in: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_env, n, d_in, generator=g, dtype=dtype), torch.randint(0, 2, (n_env, n), generator=g)


def oracle(model, x, y, combiner, loss_fn=F.cross_entropy):
    """numpy core on stacked per-environment gradients: (updates, infos)."""
    params = list(model.parameters())
    per = []
    for e in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[e]), y[e]), params, allow_unused=True)
        per.append(
            [np.zeros(tuple(p.shape)) if g is None else g.double().numpy() for p, g in zip(params, grads)]
        )
    out = [
        gradand.combine(np.stack([per[e][i] for e in range(x.shape[0])]), combiner, return_info=True)
        for i in range(len(params))
    ]
    return [u for u, _ in out], [i for _, i in out]


def grads_of(model) -> list[np.ndarray]:
    return [p.grad.double().numpy().copy() for p in model.parameters()]


def assert_close_to(got: list[np.ndarray], expected: list[np.ndarray], rtol=2e-5, atol=1e-6) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n_env", ENV_COUNTS)
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_streaming_backward_equals_numpy_core(combiner, n_env) -> None:
    model = mlp(n_env)
    x, y = data(10 + n_env, n_env)
    expected, infos = oracle(model, x, y, combiner)
    losses = [F.cross_entropy(model(x[e]), y[e]) for e in range(n_env)]
    got_infos = gt.backward(losses, model.parameters(), combiner).infos
    assert_close_to(grads_of(model), expected)
    for g, e in zip(got_infos, infos):
        np.testing.assert_allclose(float(g.survivor_fraction), float(e.survivor_fraction), rtol=1e-6)
        np.testing.assert_allclose(float(g.agreement), float(e.agreement), rtol=1e-6)


@pytest.mark.parametrize("n_env", ENV_COUNTS)
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_vmap_backward_equals_numpy_core(combiner, n_env) -> None:
    model = mlp(n_env)
    x, y = data(20 + n_env, n_env)
    expected, infos = oracle(model, x, y, combiner)
    loss, _, got_infos, *_ = gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized")
    assert_close_to(grads_of(model), expected)
    for g, e in zip(got_infos, infos):
        np.testing.assert_allclose(float(g.survivor_fraction), float(e.survivor_fraction), rtol=1e-6)
        np.testing.assert_allclose(float(g.agreement), float(e.agreement), rtol=1e-6)
    mean = np.mean([F.cross_entropy(model(x[e]), y[e]).item() for e in range(n_env)])
    assert loss.shape == () and not loss.requires_grad
    np.testing.assert_allclose(loss.item(), mean, rtol=1e-6)


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_streaming_with_one_shared_graph_equals_vectorised(combiner) -> None:
    """Losses from ONE forward pass over all environments (a 1-D tensor) give the vmap result."""
    x, y = data(3, 6)
    a, b = mlp(3), mlp(3)
    out = a(x.reshape(-1, 3)).reshape(6, 5, 2)
    losses = torch.stack([F.cross_entropy(out[e], y[e]) for e in range(6)])
    gt.backward(losses, a.parameters(), combiner)
    gt.model_backward(b, F.cross_entropy, x, y, combiner, method="vectorized")
    assert_close_to(grads_of(a), grads_of(b), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_chunked_vmap_equals_unchunked(chunk_size) -> None:
    combiner = gradand.SandMask(threshold=0.2, k=5.0)
    x, y = data(4, 7)
    a, b = mlp(4), mlp(4)
    la, *_ = gt.model_backward(a, F.cross_entropy, x, y, combiner, method="vectorized")
    lb, *_ = gt.model_backward(b, F.cross_entropy, x, y, combiner, chunk_size=chunk_size, method="vectorized")
    assert_close_to(grads_of(a), grads_of(b), rtol=1e-5)
    np.testing.assert_allclose(la.item(), lb.item(), rtol=1e-6)


def test_env_ids_equal_the_stacked_environment_axis() -> None:
    combiner = gradand.AndMask(threshold=0.6)
    x, y = data(5, 4, n=6)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(4).repeat_interleave(6)[perm]
    a, b = mlp(5), mlp(5)
    la, *_ = gt.model_backward(a, F.cross_entropy, x, y, combiner, method="vectorized")
    lb, *_ = gt.model_backward(
        b,
        F.cross_entropy,
        x.reshape(24, 3)[perm],
        y.reshape(24)[perm],
        combiner,
        env_ids=ids,
        method="vectorized",
    )
    assert_close_to(grads_of(a), grads_of(b), rtol=1e-5)
    np.testing.assert_allclose(la.item(), lb.item(), rtol=1e-6)


def test_env_ids_with_unequal_environment_sizes_equal_streaming() -> None:
    combiner = gradand.GeometricMean(threshold=0.5)
    g = torch.Generator().manual_seed(6)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 3, 3, 2, 4])
    x, y = torch.randn(12, 3, generator=g), torch.randint(0, 2, (12,), generator=g)
    a, b = mlp(6), mlp(6)
    gt.model_backward(a, F.cross_entropy, x, y, combiner, env_ids=ids, chunk_size=2, method="vectorized")
    gt.backward([F.cross_entropy(b(x[ids == e]), y[ids == e]) for e in range(5)], b.parameters(), combiner)
    assert_close_to(grads_of(a), grads_of(b), rtol=1e-5)


def test_every_example_its_own_environment_equals_numpy_core() -> None:
    """The paper's memorisation setting: inputs (B, 1, ...), one environment per example."""
    combiner = gradand.AndMask(threshold=0.8)
    x, y = data(7, 16, n=1)
    model = mlp(7)
    expected, _ = oracle(model, x, y, combiner)
    gt.model_backward(model, F.cross_entropy, x, y, combiner, chunk_size=5, method="vectorized")
    assert_close_to(grads_of(model), expected)


def test_per_example_statistics_match_the_core_outer_product_statistics() -> None:
    """For a linear layer, vmapped per-example gradients give gradand.outer_statistics' sums."""
    torch.manual_seed(8)
    layer = torch.nn.Linear(4, 3, bias=False)
    x, t = torch.randn(10, 1, 4), torch.randn(10, 1, 3)
    combiner = gradand.AndMask(threshold=0.7, rescale=False)
    gt.model_backward(layer, F.mse_loss, x, t, combiner, method="vectorized")
    deltas = (2.0 / 3.0) * (layer(x[:, 0]) - t[:, 0]).detach()  # d mse / d output, per example
    stats = gradand.outer_statistics(x[:, 0].numpy(), deltas.numpy(), combiner)
    np.testing.assert_allclose(
        layer.weight.grad.numpy(), gradand.finalize(stats, combiner), rtol=1e-5, atol=1e-7
    )


def test_backward_accumulates_into_existing_grad_like_loss_backward() -> None:
    combiner = gradand.AndMask(threshold=0.5)
    x, y = data(9, 3)
    model = mlp(9)
    expected, _ = oracle(model, x, y, combiner)
    for _ in range(2):
        gt.backward([F.cross_entropy(model(x[e]), y[e]) for e in range(3)], model.parameters(), combiner)
    assert_close_to(grads_of(model), [2 * e for e in expected])
    gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized")
    assert_close_to(grads_of(model), [3 * e for e in expected])


def test_environment_not_depending_on_a_parameter_gives_it_a_zero_gradient() -> None:
    """allow_unused: a missing gradient is zero (no sign vote) and still counts as an environment."""
    torch.manual_seed(0)
    shared, head_a, head_b, unused = (
        torch.nn.Linear(3, 3),
        torch.nn.Linear(3, 1),
        torch.nn.Linear(3, 1),
        torch.nn.Linear(3, 1),
    )
    x = torch.randn(3, 3)
    params = [*shared.parameters(), *head_a.parameters(), *head_b.parameters(), *unused.parameters()]
    losses = [head_a(shared(x[0])).sum(), head_b(shared(x[1])).sum(), head_a(shared(x[2])).sum()]
    combiner = gradand.Mean()
    gt.backward(losses, params, combiner)
    per = [
        torch.autograd.grad(head_a(shared(x[0])).sum(), head_a.weight)[0],
        torch.zeros(1, 3),
        torch.autograd.grad(head_a(shared(x[2])).sum(), head_a.weight)[0],
    ]
    expected = gradand.combine(torch.stack(per).numpy(), combiner)
    np.testing.assert_allclose(head_a.weight.grad.numpy(), expected, rtol=1e-6)
    g_b = torch.autograd.grad(head_b(shared(x[1])).sum(), head_b.weight)[0]
    np.testing.assert_allclose(head_b.weight.grad.numpy(), g_b.numpy() / 3, rtol=1e-6)
    assert unused.weight.grad is None and unused.bias.grad is None  # like loss.backward()


def test_one_dimensional_loss_tensor_equals_a_list_of_scalars() -> None:
    combiner = gradand.SandMask(threshold=0.1, k=3.0)
    x, y = data(11, 4)
    a, b = mlp(11), mlp(11)
    gt.backward([F.cross_entropy(a(x[e]), y[e]) for e in range(4)], a.parameters(), combiner)
    gt.backward(
        torch.stack([F.cross_entropy(b(x[e]), y[e]) for e in range(4)]), list(b.parameters()), combiner
    )
    assert_close_to(grads_of(a), grads_of(b), rtol=0, atol=0)


def test_frozen_parameters_are_left_alone_by_vmap_backward() -> None:
    combiner = gradand.AndMask(threshold=0.5)
    x, y = data(12, 3)
    model = mlp(12)
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _, _, infos, *_ = gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized")
    assert len(infos) == len(trainable) == 3
    assert model[0].weight.grad is None
    ref = mlp(12)
    ref[0].weight.requires_grad_(False)
    gt.backward(
        [F.cross_entropy(ref(x[e]), y[e]) for e in range(3)],
        [p for p in ref.parameters() if p.requires_grad],
        combiner,
    )
    for p, q in zip(trainable, [p for p in ref.parameters() if p.requires_grad]):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_batchnorm_in_eval_mode_reads_its_buffers_under_vmap() -> None:
    torch.manual_seed(13)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x, y = data(13, 4)
    combiner = gradand.AndMask(threshold=0.5)
    expected, _ = oracle(model, x, y, combiner)
    running = model[1].running_mean.clone()
    gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized")
    assert_close_to(grads_of(model), expected)
    assert torch.equal(model[1].running_mean, running)


def test_batchnorm_in_train_mode_is_refused_with_a_clear_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    x, y = data(0, 4)
    with pytest.raises(ValueError, match=r"BatchNorm1d '1' in train mode.*eval\(\)"):
        gt.model_backward(model, F.cross_entropy, x, y, gradand.AndMask(), method="vectorized")
    assert all(p.grad is None for p in model.parameters())


def test_float64_models_keep_float64_gradients() -> None:
    combiner = gradand.GeometricMean(threshold=0.5)
    x, y = data(14, 3, dtype=torch.float64)
    a, b = mlp(14, dtype=torch.float64), mlp(14, dtype=torch.float64)
    expected, _ = oracle(a, x, y, combiner)
    gt.backward([F.cross_entropy(a(x[e]), y[e]) for e in range(3)], a.parameters(), combiner)
    gt.model_backward(b, F.cross_entropy, x, y, combiner, method="vectorized")
    for m in (a, b):
        assert all(p.grad.dtype == torch.float64 for p in m.parameters())
        assert_close_to(grads_of(m), expected, rtol=1e-10, atol=1e-12)


def test_an_and_masked_sgd_step_moves_only_components_where_every_environment_agrees() -> None:
    combiner = gradand.AndMask(threshold=1.0, rescale=False)
    x, y = data(15, 4)
    model = mlp(15)
    params = list(model.parameters())
    per = [torch.autograd.grad(F.cross_entropy(model(x[e]), y[e]), params) for e in range(4)]
    agreed = [torch.stack([torch.sign(g[i]) for g in per]).sum(0).abs() == 4 for i in range(len(params))]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    gt.backward([F.cross_entropy(model(x[e]), y[e]) for e in range(4)], params, combiner)
    opt.step()
    assert any(bool(a.any()) for a in agreed) and not all(bool(a.all()) for a in agreed)
    for p, b, a in zip(params, before, agreed):
        assert torch.equal(p.detach() != b, a)


def test_streaming_memory_does_not_grow_with_the_number_of_environments(monkeypatch) -> None:
    """No environment's gradient outlives the next backward pass: at most one per parameter is alive."""
    import weakref

    real_grad = torch.autograd.grad
    returned: list[list[weakref.ref]] = []
    live_counts = []

    def tracking_grad(*args, **kwargs):  # the first environment's gradients become the vote sums
        live_counts.append(sum(r() is not None for refs in returned[1:] for r in refs))
        out = real_grad(*args, **kwargs)
        returned.append([weakref.ref(g) for g in out if g is not None])
        return out

    monkeypatch.setattr(torch.autograd, "grad", tracking_grad)
    x, y = data(16, 12)
    model = mlp(16)
    gt.backward(
        [F.cross_entropy(model(x[e]), y[e]) for e in range(12)], model.parameters(), gradand.AndMask()
    )
    assert len(live_counts) == 12
    assert max(live_counts) <= len(list(model.parameters()))
    assert live_counts[1:] == [0] * 11
