"""The one API in PyTorch: every method and env_ids against the per-environment loop, Result, aliases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
nn = torch.nn
METHODS = ["streaming", "vectorized", "factored"]
COMBINERS = [
    gradand.AndMask(threshold=0.6),
    gradand.GeometricMean(threshold=0.5),
    gradand.SandMask(0.3, k=5.0),
]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def clone(m: nn.Module) -> nn.Module:
    c = model()
    c.load_state_dict(m.state_dict())
    return c


def grads(m: nn.Module) -> list[np.ndarray]:
    return [p.grad.numpy().copy() for p in m.parameters()]


def uneven(seed: int = 1):
    """13 examples in 4 environments of sizes 2, 5, 1 and 5, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0] * 2 + [1] * 5 + [2] * 1 + [3] * 5)[torch.randperm(13, generator=g)]
    return torch.randn(13, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (13,), generator=g), ids


def loop(m: nn.Module, x, y, ids, combiner) -> tuple[list[np.ndarray], list[float]]:
    """The oracle: each environment's own gradient, stacked and combined by the numpy core."""
    params = list(m.parameters())
    per, losses = [], []
    for e in range(int(ids.max()) + 1):
        loss = F.cross_entropy(m(x[ids == e]), y[ids == e])
        losses.append(float(loss.detach()))
        per.append([g.numpy() for g in torch.autograd.grad(loss, params)])
    return [gradand.combine(np.stack([p[i] for p in per]), combiner) for i in range(len(params))], losses


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_env_ids_of_different_sizes_equal_the_per_environment_loop(method, combiner) -> None:
    x, y, ids = uneven()
    m = model()
    want, want_losses = loop(clone(m), x, y, ids, combiner)
    r = gt.model_backward(m, F.cross_entropy, x, y, combiner, method=method, env_ids=ids)
    for got, exp in zip(grads(m), want):
        np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.losses.numpy(), want_losses, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_env_ids_of_equal_sizes_equal_the_environment_axis(method) -> None:
    x, y, _ = uneven()
    x, y = x[:12], y[:12]
    ids = torch.arange(4).repeat_interleave(3)
    a, b = model(), model()
    c = gradand.AndMask(threshold=0.5)
    ra = gt.model_backward(a, F.cross_entropy, x, y, c, method=method, env_ids=ids)
    rb = gt.model_backward(b, F.cross_entropy, x.reshape(4, 3, 3), y.reshape(4, 3), c, method=method)
    for ga, gb in zip(grads(a), grads(b)):
        np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ra.losses, rb.losses)


@pytest.mark.parametrize("method", METHODS)
def test_an_environment_without_examples_is_named(method) -> None:
    x, y, _ = uneven()
    ids = torch.tensor([0, 2] * 6 + [0])
    with pytest.raises(ValueError, match=r"environment\(s\) \[1\]"):
        gt.model_backward(model(), F.cross_entropy, x, y, gradand.AndMask(), method=method, env_ids=ids)


@pytest.mark.parametrize("method", METHODS)
def test_result_loss_is_the_mean_of_losses_and_summary_is_summarize_of_infos(method) -> None:
    x, y, ids = uneven()
    m = model()
    r = gt.model_backward(
        m, F.cross_entropy, x, y, gradand.AndMask(threshold=0.5), method=method, env_ids=ids
    )
    assert isinstance(r, gradand.Result) and r.aux is None
    assert r.losses.shape == (4,) and not r.losses.requires_grad
    torch.testing.assert_close(r.loss, r.losses.mean())
    assert len(r.infos) == len(list(m.parameters()))
    want = gradand.summarize(r.infos, [p.numel() for p in m.parameters()])
    torch.testing.assert_close(r.summary.survivor_fraction, want.survivor_fraction)
    torch.testing.assert_close(r.summary.agreement, want.agreement)


def test_backward_returns_a_result_of_the_given_losses() -> None:
    x, y, ids = uneven()
    m = model()
    losses = [F.cross_entropy(m(x[ids == e]), y[ids == e]) for e in range(4)]
    r = gt.backward(losses, m.parameters(), gradand.Mean())
    torch.testing.assert_close(r.losses, torch.stack(losses).detach())
    torch.testing.assert_close(r.loss, torch.stack(losses).detach().mean())
    want = gradand.summarize(r.infos, [p.numel() for p in m.parameters()])
    torch.testing.assert_close(r.summary.survivor_fraction, want.survivor_fraction)


def test_backward_is_the_composition_of_the_three_layers() -> None:
    x, y, ids = uneven()
    a, b = model(), model()
    c = gradand.SandMask(threshold=0.2, k=3.0)
    r = gt.backward([F.cross_entropy(a(x[ids == e]), y[ids == e]) for e in range(4)], a.parameters(), c)
    losses, stats = gt.streaming_statistics(
        (F.cross_entropy(b(x[ids == e]), y[ids == e]) for e in range(4)), b.parameters(), c
    )  # a generator: one environment's graph at a time
    updates, infos = gt.finalize_gradients(stats, b.parameters(), c)
    for ga, gb, u in zip(grads(a), grads(b), updates):
        np.testing.assert_array_equal(ga, gb)
        np.testing.assert_array_equal(gb, u.numpy())
    torch.testing.assert_close(r.losses, losses)
    assert [float(i.survivor_fraction) for i in r.infos] == [float(i.survivor_fraction) for i in infos]


@pytest.mark.parametrize(
    ("source", "kwargs"),
    [(gt.vectorized_statistics, {}), (gt.factored_statistics, {"fallback": "error"})],
)
def test_model_sources_return_the_losses_and_one_statistic_per_parameter(source, kwargs) -> None:
    x, y, ids = uneven()
    m = model()
    c = gradand.AndMask()
    losses, stats = source(m, F.cross_entropy, x, y, c, env_ids=ids, **kwargs)
    assert losses.shape == (4,)
    assert [s.shape for s in stats] == [tuple(p.shape) for p in m.parameters()]
    assert all(s.count == 4 for s in stats)
    assert all(p.grad is None for p in m.parameters())  # a source writes nothing


def test_factored_path_hands_the_layers_to_the_core_engine(monkeypatch) -> None:
    seen = []
    real = gradand.layer_statistics

    def spy(factors, combiner, **kw):
        seen.append((kw["name"], tuple(kw["shape"]), [f.inputs is None for f in factors]))
        return real(factors, combiner, **kw)

    monkeypatch.setattr(gradand, "layer_statistics", spy)
    x, y, ids = uneven()
    gt.model_backward(model(), F.cross_entropy, x, y, gradand.AndMask(), env_ids=ids, fallback="error")
    assert [(n, s) for n, s, _ in seen] == [
        ("parameter '0.weight'", (6, 3)),
        ("parameter '0.bias'", (6,)),
        ("parameter '2.weight'", (2, 6)),
        ("parameter '2.bias'", (2,)),
    ]
    assert [b for _, _, b in seen] == [[False], [True], [False], [True]]


def test_deprecated_aliases_warn_and_give_the_same_numbers() -> None:
    x, y, _ = uneven()
    x, y = x[:12].reshape(4, 3, 3), y[:12].reshape(4, 3)
    c = gradand.AndMask(threshold=0.5)
    for old, method in ((gt.vmap_backward, "vectorized"), (gt.factored_backward, "factored")):
        a, b = model(), model()
        with pytest.warns(DeprecationWarning, match=old.__name__):
            loss, infos = old(a, F.cross_entropy, x, y, c)
        r = gt.model_backward(b, F.cross_entropy, x, y, c, method=method)
        assert torch.equal(loss, r.loss)
        assert [float(i.agreement) for i in infos] == [float(i.agreement) for i in r.infos]
        for ga, gb in zip(grads(a), grads(b)):
            np.testing.assert_array_equal(ga, gb)


def test_deprecated_option_names_warn_and_give_the_same_numbers() -> None:
    x, y, _ = uneven()
    x, y = x[:12].reshape(4, 3, 3), y[:12].reshape(4, 3)
    c = gradand.AndMask(threshold=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    a, b = model(), model()
    with pytest.warns(DeprecationWarning) as record:
        gt.model_backward(a, F.cross_entropy, x, y, c, fallback="batched", grad_scaler=scaler)
    assert {str(w.message).split(" is ")[0] for w in record} == {"grad_scaler=", "fallback='batched'"}
    assert all(w.filename == __file__ for w in record)  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gt.model_backward(b, F.cross_entropy, x, y, c, fallback="vectorized", loss_scale=scaler)
    for ga, gb in zip(grads(a), grads(b)):
        np.testing.assert_array_equal(ga, gb)


def test_a_number_as_loss_scale_equals_a_grad_scaler_of_that_scale() -> None:
    x, y, _ = uneven()
    x, y = x[:12].reshape(4, 3, 3), y[:12].reshape(4, 3)
    c = gradand.GeometricMean(threshold=0.5)
    a, b = model(), model()
    ra = gt.model_backward(a, F.cross_entropy, x, y, c, loss_scale=64.0)
    rb = gt.model_backward(
        b, F.cross_entropy, x, y, c, loss_scale=torch.amp.GradScaler("cpu", init_scale=64.0)
    )
    for ga, gb in zip(grads(a), grads(b)):
        np.testing.assert_array_equal(ga, gb)
    torch.testing.assert_close(ra.loss, rb.loss)


def test_unknown_method_is_refused() -> None:
    x, y, _ = uneven()
    with pytest.raises(ValueError, match="method must be one of"):
        gt.model_backward(model(), F.cross_entropy, x[:, None], y[:, None], gradand.Mean(), method="vmap")
